"""LoRA (peft) on the DiT's linear layers, as a memory option for the generator and the critic.

Adapters are injected in place (no PeftModel wrapper), so the model keeps its entries (predict_flow,
forward_cached, ...) and its official key names apart from the peft sub-keys. Exports merge the
adapters back into plain official weights: W + (alpha / rank) * B @ A.
"""
from __future__ import annotations

import torch
from torch import nn

# every Linear inside the transformer blocks: attention projections and the feed-forward
LORA_TARGETS = r".*blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o)|.*blocks\.\d+\.ffn\.(0|2)"
ADAPTER = "default"


def apply_lora(model: nn.Module, rank: int, alpha: float) -> nn.Module:
    """Freeze the base weights and add trainable rank-`rank` adapters to the block linears."""
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=LORA_TARGETS, lora_dropout=0.0)
    return inject_adapter_in_model(config, model, adapter_name=ADAPTER)


def merge_lora_state_dict(state: dict[str, torch.Tensor], rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """A full (unsharded) state dict with peft sub-keys -> official keys with the adapters merged in."""
    scale = (alpha or rank) / rank
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if f".lora_A.{ADAPTER}." in key or f".lora_B.{ADAPTER}." in key:
            continue
        if ".base_layer." not in key:
            merged[key] = value
            continue
        prefix, _, leaf = key.partition(".base_layer.")
        if leaf == "weight":
            down = state[f"{prefix}.lora_A.{ADAPTER}.weight"].float()
            up = state[f"{prefix}.lora_B.{ADAPTER}.weight"].float()
            value = (value.float() + scale * (up @ down)).to(value.dtype)
        merged[f"{prefix}.{leaf}"] = value
    return merged
