"""Load Wan DiT weights: official or diffusers names; sharded, single-file safetensors or .pth.

The model is built on the meta device and each tensor is read, cast and moved on its own, so a
checkpoint is never held twice in memory. Everything is checked from the file headers first
(missing, unexpected and mis-shaped keys) before a single weight is read.
"""
from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, TypeVar

import torch
import torch.nn as nn
from safetensors import safe_open

from utils.config import Config
from utils.errors import UserError
from utils.presets import ARCH_FIELDS, dit_folder, read_checkpoint_config
from utils.weights import read_weight_file
from wan.convert import detect_naming, to_official_key

ModelT = TypeVar("ModelT", bound=nn.Module)
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")
MAX_KEYS_SHOWN = 3


def is_companion_file(name: str) -> bool:
    """The VAE, umT5 and CLIP files that official folders keep beside the DiT (Wan2.1_VAE.pth, models_t5_*.pth)."""
    lower = name.lower()
    return "vae" in lower or lower.startswith(("models_t5", "models_clip")) or "umt5" in lower


@dataclass(frozen=True)
class CheckpointEntry:
    file: Path
    source_key: str  # the name in the file
    shape: tuple[int, ...]


def _shown(keys) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - MAX_KEYS_SHOWN} more)" if len(keys) > MAX_KEYS_SHOWN else ""
    return ", ".join(keys[:MAX_KEYS_SHOWN]) + more


def weight_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint folder (via its *.safetensors.index.json when there is one), or [file]."""
    if path.is_file():
        if not path.name.endswith(WEIGHT_SUFFIXES):
            raise UserError(f"{path} is not a weights file: expected .safetensors, .pth or .pt")
        return [path]
    if not path.is_dir():
        raise UserError(f"checkpoint {path} does not exist: expected a folder (config.json + weights) or a weights file")
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise UserError(f"{path} holds several index files ({_shown(p.name for p in indexes)}): expected one")
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{indexes[0]} is not a safetensors index: expected JSON with a 'weight_map'") from None
        shards = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [shard.name for shard in shards if not shard.is_file()]
        if missing:
            raise UserError(f"{indexes[0]} names shards missing from {path}: {_shown(missing)}")
        return shards
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    candidates = [p for p in files if not is_companion_file(p.name)]
    if len(candidates) != 1:
        found = _shown(p.name for p in candidates) if candidates else "none"
        raise UserError(
            f"{path} must hold one DiT weights file (besides the VAE and text-encoder files) or a "
            f"*.safetensors.index.json, found {found}"
        )
    return candidates


def _open_safetensors(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as err:  # the safetensors error types vary by version
        raise UserError(f"{file} cannot be read as safetensors ({' '.join(str(err).split())}): truncated or corrupt?") from None


def _load_pth(file: Path) -> dict[str, torch.Tensor]:
    return read_weight_file(file, "DiT checkpoint", "a torch state dict of the DiT (weights_only)")


class Checkpoint:
    """A checkpoint's tensors by official key, known from the headers; `tensors()` reads them one at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: dict[str, CheckpointEntry] = {}
        self._pth: dict[Path, dict[str, torch.Tensor]] = {}  # .pth files are memory-mapped, read once
        raw: list[tuple[str, CheckpointEntry]] = []
        for file in weight_files(self.path):
            if file.name.endswith(".safetensors"):
                with _open_safetensors(file) as handle:
                    raw += [(key, CheckpointEntry(file, key, tuple(handle.get_slice(key).get_shape()))) for key in handle.keys()]
            else:
                self._pth[file] = _load_pth(file)
                raw += [(key, CheckpointEntry(file, key, tuple(t.shape))) for key, t in self._pth[file].items()]
        self.naming = detect_naming(key for key, _ in raw)
        unknown: dict[Path, list[str]] = defaultdict(list)
        for key, entry in raw:
            official = to_official_key(key, self.naming)
            if official is None:
                unknown[entry.file].append(key)
            else:
                self.entries[official] = entry
        for file, keys in unknown.items():
            raise UserError(f"{file} has keys that are not Wan DiT ({self.naming} names) keys: {_shown(keys)}")

    def check_against(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Missing, unexpected or mis-shaped keys against {official key: shape} -> one-line UserError."""
        missing = expected.keys() - self.entries.keys()
        if missing:
            raise UserError(f"{self.path} lacks {len(missing)} keys the model needs: {_shown(missing)}")
        unexpected = defaultdict(list)
        for key in self.entries.keys() - expected.keys():
            unexpected[self.entries[key].file].append(self.entries[key].source_key)
        for file, keys in unexpected.items():
            raise UserError(f"{file} has {len(keys)} keys this model does not have: {_shown(keys)}")
        for key, shape in expected.items():
            entry = self.entries[key]
            if entry.shape != shape:
                found = list(entry.shape)
                raise UserError(f"{entry.file}: {entry.source_key} has shape {found}, the model expects {list(shape)}")

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(official key, tensor) file by file, one tensor at a time."""
        by_file: dict[Path, list[str]] = defaultdict(list)
        for key, entry in self.entries.items():
            by_file[entry.file].append(key)
        for file, keys in by_file.items():
            if file in self._pth:
                yield from ((key, self._pth[file][self.entries[key].source_key]) for key in keys)
                continue
            with _open_safetensors(file) as handle:
                for key in keys:
                    try:
                        tensor = handle.get_tensor(self.entries[key].source_key)
                    except Exception as err:
                        reason = " ".join(str(err).split())
                        raise UserError(f"{file}: cannot read {self.entries[key].source_key} ({reason})") from None
                    yield key, tensor


def load_weights_into(
    model: nn.Module, path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> nn.Module:
    """Fill `model` from a checkpoint folder or file; parameters on the meta device are materialised.

    Without dtype/device each tensor takes the dtype and device of the parameter it replaces.
    """
    checkpoint = Checkpoint(path)
    checkpoint.check_against({name: tuple(t.shape) for name, t in model.state_dict().items()})
    for key, tensor in checkpoint.tensors():
        module_name, _, attr = key.rpartition(".")
        module = model.get_submodule(module_name)
        current = module._parameters[attr]
        target_device = device if device is not None else ("cpu" if current.is_meta else current.device)
        value = tensor.to(device=target_device, dtype=dtype or current.dtype)
        with torch.no_grad():
            if current.is_meta:
                module._parameters[attr] = nn.Parameter(value, requires_grad=current.requires_grad)
            else:
                current.copy_(value)
        del tensor
    return model


def load_pretrained(
    model_cls: type[ModelT],
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attention_backend: str = "sdpa",
    arch: dict | None = None,
) -> ModelT:
    """Build `model_cls` from a checkpoint folder (config.json + weights) or a weights file plus `arch`."""
    path = dit_folder(path)  # a diffusers pipeline root: its transformer/
    if path.is_dir():
        if arch is not None:
            raise UserError(f"{path} is a folder: its config.json gives the architecture, do not pass arch as well")
        arch = read_checkpoint_config(path)
    elif arch is None:
        raise UserError(f"{path} is a single weights file: pass arch= with the official config.json fields")
    missing = [field for field in ARCH_FIELDS if field not in arch]
    if missing:
        raise UserError(f"arch for {path} lacks {', '.join(missing)}")
    with torch.device("meta"):
        model = model_cls(**{k: arch[k] for k in ARCH_FIELDS}, attention_backend=attention_backend)
    return load_weights_into(model, path, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------- a student's weights
GENERATOR_FILE = "generator.safetensors"  # the trainer's export names
GENERATOR_EMA_FILE = "generator_ema.safetensors"
ARCH_KEYS_CHECKED = ("dim", "num_heads", "num_layers", "in_dim", "out_dim", "ffn_dim", "patch_size", "text_dim")


@dataclass(frozen=True)
class GeneratorWeights:
    """Where the generator's weights come from: a weights file or an official folder, and its architecture."""

    path: Optional[Path]  # None: the recipe's generator (its checkpoint, or a seeded random init)
    arch: dict


def resolve_generator_weights(checkpoint: str | Path | None, use_ema: bool, recipe_arch: dict) -> GeneratorWeights:
    """Pick the weights file of a checkpoint (the trainer's <logdir>/latest/ folder or a file); checks only paths.

    A folder with generator(.ema).safetensors is a trainer export; any other folder is an official
    one (config.json + weights). A config.json beside the weights must agree with the recipe's generator.
    """
    if checkpoint is None:
        if use_ema:
            raise UserError("--use_ema needs --checkpoint: a trainer export folder holding generator_ema.safetensors")
        return GeneratorWeights(None, recipe_arch)
    path = Path(checkpoint)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist: expected a trainer export folder or a weights file")
    if path.is_dir():
        wanted = path / (GENERATOR_EMA_FILE if use_ema else GENERATOR_FILE)
        if use_ema and not wanted.is_file():
            raise UserError(f"--use_ema: {wanted} not found (the run kept no EMA weights)")
        folder, file = path, (wanted if wanted.is_file() else path)
    else:
        if use_ema:
            raise UserError(f"--use_ema picks {GENERATOR_EMA_FILE} inside a folder, but checkpoint {path} is a file")
        folder, file = path.parent, path
    folder = dit_folder(folder)  # a diffusers pipeline root: its transformer/
    if (folder / "config.json").is_file():
        found = read_checkpoint_config(folder)
        mismatched = [k for k in ARCH_KEYS_CHECKED if list_like(found[k]) != list_like(recipe_arch[k])]
        if mismatched:
            key = mismatched[0]
            raise UserError(
                f"checkpoint {folder}/config.json has {key}={found[key]} but the recipe's generator has {recipe_arch[key]}: "
                "use the recipe the checkpoint was trained with"
            )
    arch = {k: recipe_arch[k] for k in ARCH_FIELDS}
    # A folder without a trainer file is an official folder: load_pretrained reads its own config.json.
    return GeneratorWeights(file, arch)


def recipe_for_checkpoint(config: Config, checkpoint: str | Path | None) -> Config:
    """The recipe as run with --checkpoint, which replaces the generator's weights.

    A recipe whose generator is named by a checkpoint that is absent here (the training run's initialisation,
    e.g. an ODE-init export that exists only where that run was made) takes the architecture from the given
    checkpoint instead. When the recipe's checkpoint exists, its architecture stays the recipe's, and a
    --checkpoint of another model is refused against it.
    """
    if checkpoint is None or config.generator.checkpoint is None or Path(config.generator.checkpoint).exists():
        return config
    path = Path(checkpoint)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist: expected a trainer export folder or a weights file")
    return dataclasses.replace(config, generator=dataclasses.replace(config.generator, checkpoint=str(path)))


def list_like(value: object) -> object:
    return list(value) if isinstance(value, (list, tuple)) else value
