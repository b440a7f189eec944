"""Options every generating entry point shares (inference.py, serve.py, benchmarks): dtypes, devices, seeds."""
from __future__ import annotations

import torch

from utils.errors import UserError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed's range


def check_device(name: str | None) -> torch.device:
    """--device: cpu, cuda or cuda:N that exists here (default: cuda when available)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device name: expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"--device {name}: no such CUDA device here ({torch.cuda.device_count()} visible); use cpu")
    return device


def default_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """--dtype, or bf16 on CUDA and fp32 on the CPU."""
    return DTYPES[name or ("bf16" if device.type == "cuda" else "fp32")]
