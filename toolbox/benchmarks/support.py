"""What the benchmark scripts share: a stand-in for the text encoder, device names, clocks and peaks."""
from __future__ import annotations

import platform
import time

import torch
from torch import nn

SEED = 0


class RandomTextEncoder(nn.Module):
    """Stands in for the text encoder: one fixed random context [1, text_len, text_dim] for every prompt.

    Benchmarks time the DiT, the rollout and the VAE; the umT5-XXL forward (once per prompt) is left out, and
    with it the need for its weights and tokenizer.
    """

    def __init__(self, text_len: int, text_dim: int, device: torch.device | str, dtype: torch.dtype = torch.float32):
        super().__init__()
        generator = torch.Generator().manual_seed(SEED)
        self.context = torch.randn(1, text_len, text_dim, generator=generator).to(device, dtype)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self.context.expand(len(prompts), -1, -1)

    def encode_cached(self, prompt: str) -> torch.Tensor:
        return -self.context  # the negative prompt: a different, fixed context


def synchronize(device: torch.device) -> float:
    """Wait for the device, then read the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def random_dit(spec, *, causal: bool, attention_backend: str, device: torch.device | str, dtype: torch.dtype,
               seed: int = SEED) -> nn.Module:
    """A DiT of the spec's architecture with N(0, 0.02) weights, made where it runs (no CPU init, no copy)."""
    from pipeline.components import ROLE_SEED, build_wan_dit

    model = build_wan_dit(spec, causal=causal, attention_backend=attention_backend, device="meta")
    model = model.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(seed + ROLE_SEED.get(spec.role, 0))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=generator)
    return model.to(dtype)
