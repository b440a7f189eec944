"""Reading weight files safely: safetensors, or torch files with weights_only=True (never arbitrary pickles)."""
from __future__ import annotations

from pathlib import Path

import torch

from utils.errors import UserError


def read_weight_file(path: str | Path, what: str, expected: str) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors or a torch file (memory-mapped); a read failure is one UserError line.

    `what` names the file's role ("VAE checkpoint"), `expected` says what should be there.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} is missing: expected {expected}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated / not a checkpoint: torch and safetensors raise many types
        reason = " ".join(str(err).split())[:120] if str(err) else type(err).__name__
        raise UserError(f"{what} {path} could not be read ({reason}): expected {expected}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # some training tools nest the weights
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{what} {path} is not a flat state dict of tensors: expected {expected}")
    return state
