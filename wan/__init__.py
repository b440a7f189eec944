"""Wan models: DiT (bidirectional, causal, MoE), KV cache, loaders; VAE and text wrappers live beside them."""
