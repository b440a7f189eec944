"""Model, VAE and text-encoder presets (YAML under configs/) and checkpoint config.json reading.

The numbers of every Wan family live in configs/models/*.yaml and configs/vae/*.yaml; this module only
finds and reads them, and turns a recipe's references into resolved specs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from utils.errors import UserError
from utils.folders import DIFFUSERS_EXPERT_DIRS, MOE_EXPERT_DIRS, dit_folder, moe_expert_dirs  # noqa: F401 (re-exported)

ROPE_MAX_POSITIONS = 1024  # frame positions of the official RoPE table (rope_max_seq_len): the longest video placeable


REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS_DIR = REPO_ROOT / "configs"

# The fields of an official Wan config.json, in the official order.
ARCH_FIELDS = (
    "model_type", "patch_size", "text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "text_dim",
    "out_dim", "num_heads", "num_layers", "window_size", "qk_norm", "cross_attn_norm", "eps",
)
# An official config.json holds 12 keys; these architecture fields are not among them and come from the
# official WanModel constructor's defaults, the same for every published Wan model.
OFFICIAL_CONSTRUCTOR_DEFAULTS = {
    "patch_size": [1, 2, 2], "text_dim": 4096, "window_size": [-1, -1], "qk_norm": True, "cross_attn_norm": True,
    "text_len": 512, "freq_dim": 256, "eps": 1e-6,
}
# Without these a config.json does not say which model it is (the constructor's own values are no real model).
REQUIRED_CONFIG_FIELDS = ("model_type", "dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim")


# --------------------------------------------------------------------------------------------- files
def _preset_path(kind: str, name: str) -> Path:
    """A preset is a name under configs/<kind>/ or a path to a YAML file."""
    if name.endswith((".yaml", ".yml")) or "/" in name:
        path = Path(name)
        return path if path.is_absolute() or path.exists() else REPO_ROOT / name
    return CONFIGS_DIR / kind / f"{name}.yaml"


def available_presets(kind: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS_DIR / kind).glob("*.yaml"))


def _load_preset(kind: str, name: str) -> dict:
    path = _preset_path(kind, name)
    if not path.is_file():
        known = ", ".join(available_presets(kind))
        raise UserError(f"{kind[:-1]} preset '{name}' not found ({path}): expected one of {known} or a YAML path")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]


def load_model_preset(name: str) -> dict:
    return _load_preset("models", name)


def load_vae_preset(name: str) -> dict:
    return _load_preset("vae", name)


def load_text_encoder_preset(name: str) -> dict:
    return _load_preset("text_encoders", name)


# --------------------------------------------------------------------------------------------- config.json
def _expands_timesteps(folder: Path) -> bool:
    """diffusers marks Wan2.2-TI2V by `expand_timesteps` in the pipeline's model_index.json (one folder up)."""
    for index in (folder / "model_index.json", folder.parent / "model_index.json"):
        if index.is_file():
            return bool(json.loads(index.read_text()).get("expand_timesteps"))
    return False


def _from_diffusers_config(raw: dict, folder: Path) -> dict:
    """Translate a diffusers WanTransformer3DModel config.json into the official fields."""
    heads, head_dim = raw["num_attention_heads"], raw["attention_head_dim"]
    in_dim = raw["in_channels"]
    # diffusers' transformer config has no model_type: TI2V is the pipeline's expand_timesteps flag.
    model_type = raw.get("model_type") or ("ti2v" if raw.get("expand_timesteps") or _expands_timesteps(folder) else "t2v")
    if raw.get("image_dim"):
        raise UserError("diffusers config.json describes an image-embedding (i2v) model: only t2v and ti2v are supported")
    return {
        "model_type": model_type,
        "patch_size": list(raw["patch_size"]),
        "text_len": raw.get("text_len", 512),
        "in_dim": in_dim,
        "dim": heads * head_dim,
        "ffn_dim": raw["ffn_dim"],
        "freq_dim": raw["freq_dim"],
        "text_dim": raw["text_dim"],
        "out_dim": raw["out_channels"],
        "num_heads": heads,
        "num_layers": raw["num_layers"],
        "window_size": [-1, -1],
        "qk_norm": bool(raw.get("qk_norm")),
        "cross_attn_norm": bool(raw["cross_attn_norm"]),
        "eps": raw["eps"],
    }


def read_checkpoint_config(folder: str | Path) -> dict:
    """Official architecture fields from a checkpoint folder's config.json (official or diffusers style)."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"no config.json in checkpoint folder {folder}: expected the model's config.json beside its weights")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} is not a model config: expected a JSON object with dim, num_heads, num_layers, ...")
    if "num_attention_heads" in raw:
        return _from_diffusers_config(raw, folder)
    missing = [k for k in REQUIRED_CONFIG_FIELDS if k not in raw]
    if missing:
        raise UserError(
            f"{path} lacks {', '.join(missing)}: expected an official Wan config.json (dim, ffn_dim, num_heads, "
            "num_layers, in_dim, out_dim, model_type, ...) or a diffusers one"
        )
    merged = {**OFFICIAL_CONSTRUCTOR_DEFAULTS, **raw}
    return {k: list(merged[k]) if isinstance(merged[k], tuple) else merged[k] for k in ARCH_FIELDS}


def arch_to_config_json(arch: dict) -> dict:
    """The official config.json for an architecture (written beside exported weights): the published 12 keys, plus
    any constructor-default field this architecture departs from (tiny presets), so it reads back to the same arch."""
    official = ("dim", "eps", "ffn_dim", "freq_dim", "in_dim", "model_type", "num_heads", "num_layers", "out_dim", "text_len")
    config = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", **{k: arch[k] for k in official}}
    for key, default in OFFICIAL_CONSTRUCTOR_DEFAULTS.items():
        value = list(arch[key]) if isinstance(arch[key], tuple) else arch[key]
        if key not in config and value != default:
            config[key] = value
    return config


# --------------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class ModelSpec:
    """A resolved DiT reference: its architecture and where its weights are."""

    role: str
    name: str  # the preset name, or the checkpoint path
    arch: dict = field(hash=False)  # official config.json fields
    vae: Optional[str] = None  # the latent space's VAE preset, when the preset says it
    moe_boundary: Optional[float] = None  # MoE teachers: expert switch at t >= boundary * num_train_timesteps
    checkpoint: Optional[str] = None

    @property
    def head_dim(self) -> int:
        return self.arch["dim"] // self.arch["num_heads"]

    @property
    def latent_channels(self) -> int:
        return self.arch["in_dim"]

    @property
    def is_moe(self) -> bool:
        return self.moe_boundary is not None


def _checkpoint_arch(role: str, checkpoint: str) -> tuple[dict, bool]:
    """Read a checkpoint's architecture; returns (arch, is_moe_folder)."""
    path = Path(checkpoint)
    if not path.exists():
        raise UserError(f"{role}.checkpoint {checkpoint} does not exist: expected a weights folder or file")
    experts = moe_expert_dirs(path)
    if experts is not None:
        return read_checkpoint_config(experts[0]), True
    folder = dit_folder(path) if path.is_dir() else path.parent
    return read_checkpoint_config(folder), False


def resolve_model(role: str, ref: Any, check_weights: bool = True) -> ModelSpec:
    """Turn a recipe's ModelRef into a ModelSpec; the checkpoint's config.json wins and must agree with a preset.

    With check_weights=False a preset alone may stand for a checkpoint that is not on this machine (geometry only).
    """
    if not ref.preset and not ref.checkpoint:
        raise UserError(f"{role} names no model: set {role}.preset (configs/models/) or {role}.checkpoint")
    preset = load_model_preset(ref.preset) if ref.preset else {}
    preset_arch = {k: preset[k] for k in ARCH_FIELDS if k in preset}
    if ref.preset and len(preset_arch) != len(ARCH_FIELDS):
        missing = [k for k in ARCH_FIELDS if k not in preset]
        raise UserError(f"model preset '{ref.preset}' lacks fields {', '.join(missing)}")
    moe = preset.get("moe") or None
    arch = preset_arch
    if ref.checkpoint and (check_weights or not preset_arch or Path(ref.checkpoint).exists()):
        arch, is_moe_folder = _checkpoint_arch(role, ref.checkpoint)
        if is_moe_folder and not moe:  # a diffusers A14B names its boundary in model_index.json
            index = Path(ref.checkpoint) / "model_index.json"
            ratio = json.loads(index.read_text()).get("boundary_ratio") if index.is_file() else None
            moe = {"boundary": ratio} if ratio else None
        if is_moe_folder and not moe:
            raise UserError(
                f"{role}.checkpoint {ref.checkpoint} holds MoE experts: set {role}.preset to a MoE preset "
                "(e.g. wan2.2-t2v-a14b) for its boundary"
            )
        for key in ("dim", "num_heads", "num_layers", "in_dim", "ffn_dim"):
            if preset_arch and preset_arch[key] != arch[key]:
                raise UserError(
                    f"{role}.checkpoint {ref.checkpoint} has {key}={arch[key]} but preset '{ref.preset}' says {preset_arch[key]}"
                )
    arch = {**arch, "patch_size": list(arch["patch_size"]), "window_size": list(arch["window_size"])}
    return ModelSpec(
        role=role,
        name=ref.preset or str(ref.checkpoint),
        arch=arch,
        vae=preset.get("vae"),
        moe_boundary=float(moe["boundary"]) if moe else None,
        checkpoint=ref.checkpoint,
    )


@dataclass(frozen=True)
class VaeSpec:
    """A resolved VAE: its latent space and where its weights are."""

    name: str
    kind: str  # wan2.1, wan2.2 or miniature
    z_dim: int
    stride: tuple  # (t, h, w)
    preset: dict = field(hash=False)  # the whole preset (mean/std, arch for tiny ones)
    checkpoint: Optional[str] = None


def resolve_vae(ref: Any, generator: ModelSpec, check_weights: bool = True) -> VaeSpec:
    name = ref.preset or generator.vae
    if not name:
        raise UserError("vae.preset is empty and the generator's preset names no VAE: set vae.preset (configs/vae/)")
    preset = load_vae_preset(name)
    if check_weights and ref.checkpoint and not Path(ref.checkpoint).exists():
        raise UserError(
            f"vae.checkpoint {ref.checkpoint} does not exist: expected Wan2.x_VAE.pth, a .safetensors or a diffusers vae/ folder"
        )
    return VaeSpec(
        name=name,
        kind=preset["kind"],
        z_dim=int(preset["z_dim"]),
        stride=tuple(int(s) for s in preset["stride"]),
        preset=preset,
        checkpoint=ref.checkpoint,
    )
