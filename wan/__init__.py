"""Wan models: DiT (bidirectional, causal, MoE), KV cache, loaders; VAE and text wrappers live beside them."""
from wan.loading import load_weights_into
from wan.modules.attention import describe_backend
from wan.modules.causal_model import CausalWanModel
from wan.modules.kv_cache import KVCache
from wan.modules.model import WanModel
from wan.moe import MoEWanModel

__all__ = ["CausalWanModel", "KVCache", "MoEWanModel", "WanModel", "describe_backend", "load_weights_into"]
