"""The one training loop (ODE regression, DMD, SiD) with its checkpoints, EMA, logging and FSDP2 setup."""
