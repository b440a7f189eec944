"""The checks of scripts/verify.py: plan, vae/text, train and the whole checklist."""
