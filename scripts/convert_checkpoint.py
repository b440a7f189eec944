"""Rename a Wan DiT checkpoint between official and diffusers key names (safetensors out).

    python scripts/convert_checkpoint.py --input CKPT --output OUT_DIR --to {official,diffusers}

CKPT is a checkpoint folder (config.json + weights) or a single weights file with --config_json.
Tensors keep their dtype; they are streamed shard by shard, never all in memory at once.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from utils.errors import OneLineArgumentParser, UserError, run_main
from utils.io import atomic_save_safetensors, atomic_write_json
from utils.presets import ARCH_FIELDS, arch_to_config_json, read_checkpoint_config
from wan.convert import official_to_diffusers_config, official_to_diffusers_key
from wan.loading import Checkpoint
from wan.modules.model import WanModel

REPO_ROOT = Path(__file__).resolve().parents[1]

WEIGHTS_NAME = "diffusion_pytorch_model"
GIB = 1024**3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="checkpoint folder, or a weights file with --config_json")
    parser.add_argument("--output", required=True, help="output folder (must be new or empty)")
    parser.add_argument("--to", required=True, choices=("official", "diffusers"), help="key names to write")
    parser.add_argument("--config_json", help="config.json for a single-file --input")
    parser.add_argument("--max_shard_gb", type=float, default=5.0, help="largest shard, GiB")
    return parser.parse_args(argv)


def read_arch(args: argparse.Namespace) -> dict:
    source = Path(args.input)
    if source.is_dir():
        return read_checkpoint_config(source)
    if not args.config_json:
        raise UserError(f"--input {source} is a single file: pass --config_json with its architecture")
    config_json = Path(args.config_json)
    if config_json.name != "config.json":
        raise UserError(f"--config_json {config_json} must be a file named config.json (official or diffusers fields)")
    return read_checkpoint_config(config_json.parent)


def plan_shards(checkpoint: Checkpoint, max_bytes: float, element_size: int) -> list[list[str]]:
    """Keys grouped into shards of at most max_bytes (a tensor larger than that gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, entry in checkpoint.entries.items():
        nbytes = element_size * int(torch.Size(entry.shape).numel())
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


@run_main
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import math

    from utils.io import check_output_folder

    output = check_output_folder(args.output, "--output")
    if not (math.isfinite(args.max_shard_gb) and args.max_shard_gb > 0):
        raise UserError(f"--max_shard_gb {args.max_shard_gb}: expected a positive size in GiB")
    if output.exists() and any(output.iterdir()):
        raise UserError(f"--output {output} is not empty: choose a new folder")
    # 1. Read and check everything before writing anything.
    arch = read_arch(args)
    checkpoint = Checkpoint(args.input)
    with torch.device("meta"):
        expected = WanModel(**{k: arch[k] for k in ARCH_FIELDS}).state_dict()
    checkpoint.check_against({name: tuple(t.shape) for name, t in expected.items()})
    rename = official_to_diffusers_key if args.to == "diffusers" else (lambda key: key)

    # 2. Stream tensors into shards, in the order of the plan.
    _, first = next(checkpoint.tensors())
    shards = plan_shards(checkpoint, args.max_shard_gb * GIB, first.element_size())
    names = [f"{WEIGHTS_NAME}.safetensors"] if len(shards) == 1 else [
        f"{WEIGHTS_NAME}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    shard_of = {key: index for index, keys in enumerate(shards) for key in keys}
    pending: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    total_size = 0
    for key, tensor in checkpoint.tensors():
        total_size += tensor.numel() * tensor.element_size()
        pending[rename(key)] = tensor
        weight_map[rename(key)] = names[shard_of[key]]
        if len(pending) == len(shards[shard_of[key]]):
            atomic_save_safetensors(output / names[shard_of[key]], pending, metadata={"format": "pt"})
            pending = {}
    if pending:  # tensors arrive file by file, so a shard can fill out of order
        raise RuntimeError("internal: shard plan and read order disagree")

    # 3. Index (when sharded) and config.json in the target convention.
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        atomic_write_json(output / f"{WEIGHTS_NAME}.safetensors.index.json", index)
    config = official_to_diffusers_config(arch) if args.to == "diffusers" else arch_to_config_json(arch)
    atomic_write_json(output / "config.json", config)
    print(json.dumps({"output": str(output), "to": args.to, "tensors": len(weight_map), "shards": len(shards)}))


if __name__ == "__main__":
    main()
