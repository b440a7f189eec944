"""What a downloaded Wan folder holds, in either published layout, so a recipe can point at the folder alone.

Official (Wan-AI/Wan2.x-...): config.json + DiT weights (one file, or shards + index), Wan2.x_VAE.pth,
models_t5_umt5-xxl-enc-bf16.pth and google/umt5-xxl/ side by side; the A14B keeps its experts in
high_noise_model/ and low_noise_model/. diffusers (Wan-AI/...-Diffusers): model_index.json with transformer/
(+ transformer_2/ for the A14B), vae/, text_encoder/ and tokenizer/.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from utils.errors import UserError

MOE_EXPERT_DIRS = ("high_noise_model", "low_noise_model")
DIFFUSERS_EXPERT_DIRS = ("transformer", "transformer_2")  # diffusers A14B: high noise, low noise
OFFICIAL_VAE_FILES = {"wan2.1": "Wan2.1_VAE.pth", "wan2.2": "Wan2.2_VAE.pth"}
OFFICIAL_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
OFFICIAL_TOKENIZER_DIR = "google/umt5-xxl"


def is_diffusers_root(path: Path) -> bool:
    """A diffusers pipeline folder (model_index.json, transformer/, vae/, text_encoder/, tokenizer/ ...)."""
    return path.is_dir() and (path / "model_index.json").is_file() and not (path / "config.json").is_file()


def dit_folder(path: str | Path) -> Path:
    """Where a DiT's config.json and weights are: a diffusers pipeline root means its transformer/."""
    path = Path(path)
    return path / "transformer" if is_diffusers_root(path) and (path / "transformer").is_dir() else path


def moe_expert_dirs(path: str | Path) -> tuple[Path, Path] | None:
    """(high-noise, low-noise) expert folders of an A14B folder, official or diffusers layout; None otherwise."""
    path = Path(path)
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    for high, low in (MOE_EXPERT_DIRS, DIFFUSERS_EXPERT_DIRS):
        if (path / high).is_dir() and (path / low).is_dir():
            return path / high, path / low
    return None


@dataclass(frozen=True)
class FolderComponents:
    """The VAE, text encoder and tokenizer paths inside a model folder."""

    vae: str
    text_encoder: str
    tokenizer: str


def folder_components(folder: str | Path, vae_kind: str) -> FolderComponents:
    """The components inside `folder`; a folder not on this machine gives the official layout's paths (geometry
    checks need no weights), one that exists must hold them all (one line naming the first that is missing)."""
    root = Path(folder)
    if is_diffusers_root(root):
        found = FolderComponents(str(root / "vae"), str(root / "text_encoder"), str(root / "tokenizer"))
    else:
        vae_name: Optional[str] = OFFICIAL_VAE_FILES.get(vae_kind)
        if vae_name is None:
            raise UserError(f"model_folder {root}: the {vae_kind} VAE is not part of a published Wan folder; set vae.checkpoint")
        found = FolderComponents(str(root / vae_name), str(root / OFFICIAL_T5_FILE), str(root / OFFICIAL_TOKENIZER_DIR))
    if root.exists():
        if not root.is_dir():
            raise UserError(f"model_folder {root} is a file: expected a downloaded Wan folder (official or diffusers)")
        for role, path in (("VAE", found.vae), ("text encoder", found.text_encoder), ("tokenizer", found.tokenizer)):
            if not Path(path).exists():
                raise UserError(f"model_folder {root} has no {role} at {path}: expected the published layout "
                                "(official: Wan2.x_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/; "
                                "diffusers: vae/, text_encoder/, tokenizer/)")
    return found
