"""Wan models: DiT (bidirectional, causal, MoE), KV cache, loaders, the VAE and the umT5 text encoder.

Import the module you need (wan.modules.causal_model, wan.vae, wan.text_encoder, ...): the package imports nothing
itself, so a process that only needs the DiT does not load transformers and diffusers.
"""
