"""Wan models: DiT (bidirectional, causal, MoE), KV cache, loaders, the VAE and the umT5 text encoder."""
from wan.loading import load_weights_into
from wan.modules.attention import describe_backend
from wan.modules.causal_model import CausalWanModel
from wan.modules.kv_cache import KVCache
from wan.modules.model import WanModel
from wan.moe import MoEWanModel
from wan.text_encoder import WanTextEncoder
from wan.tokenizers import HuggingfaceTokenizer, WordTokenizer, clean_prompt
from wan.vae import StreamingDecoder, WanVAEWrapper

__all__ = [
    "CausalWanModel", "HuggingfaceTokenizer", "KVCache", "MoEWanModel", "StreamingDecoder", "WanModel",
    "WanTextEncoder", "WanVAEWrapper", "WordTokenizer", "clean_prompt", "describe_backend", "load_weights_into",
]
