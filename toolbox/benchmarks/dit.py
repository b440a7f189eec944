"""Time one causal block forward at a given geometry, with random weights.

The cache is pre-filled with every frame before the last block (random K/V), then the last block
runs forward_cached: the denoising pass (commit=False) and the context pass (commit=True).
`--cache_modes in_place,copy` times the cache as it is (attention over the storage in place) and as
it was (the kept frames concatenated with the block's keys in every layer), same run, with the peak
memory of each forward (CUDA allocator, or sampled process RSS on a CPU).

    python scripts/benchmark.py dit --config_path configs/self_forcing_dmd_5B.yaml --device cuda --dtype bf16
    python scripts/benchmark.py dit --preset wan2.1-t2v-1.3b --latent_height 60 --latent_width 104 --num_frames 21
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pipeline.run_options import DTYPES
from utils.errors import UserError, run_main
from utils.presets import ARCH_FIELDS, load_model_preset
from wan.modules.attention import describe_backend
from wan.modules.causal_model import CausalWanModel
from wan.modules.kv_cache import KVCache

REPO_ROOT = Path(__file__).resolve().parents[2]


class CopyingKVCache(KVCache):
    """The cache as it was before in-place attention: every forward concatenates the kept frames with the block."""

    def _visible_in_place(self, layer, plan, k, v, commit):
        if commit:
            self._write(layer, plan, k, v)
        if not plan.kept_slots:
            return k, v
        cached_k, cached_v = self._gather(self.keys[layer], plan.kept_slots), self._gather(self.values[layer], plan.kept_slots)
        return torch.cat([cached_k, k], dim=1), torch.cat([cached_v, v], dim=1)


CACHE_MODES = {"in_place": KVCache, "copy": CopyingKVCache}
ARCH_OVERRIDES = ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config_path", help="a recipe: model, latent size, block size and cache window from it")
    parser.add_argument("--preset", default="tiny-t2v", help="model preset under configs/models (without --config_path)")
    for field in ARCH_OVERRIDES:
        parser.add_argument(f"--{field}", type=int, help=f"override the preset's {field}")
    parser.add_argument("--latent_height", type=int, default=4)
    parser.add_argument("--latent_width", type=int, default=6)
    parser.add_argument("--num_frames", type=int, default=6, help="latent frames of the video (last block included)")
    parser.add_argument("--block_frames", type=int, default=3, help="latent frames per block")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--backend", default="sdpa", choices=("sdpa", "flash", "flex"))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache_modes", default="in_place", help="comma list of in_place (today) and copy (before)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (as inference.compile)")
    args = parser.parse_args(argv)
    modes = args.cache_modes.split(",")
    if not modes or any(mode not in CACHE_MODES for mode in modes):
        parser.error(f"--cache_modes {args.cache_modes!r}: expected a comma list of {', '.join(CACHE_MODES)}")
    args.cache_modes = modes
    return args


def resolve_geometry(args: argparse.Namespace) -> tuple[dict, int, int, int, int, int, int]:
    """(arch, latent_height, latent_width, cache_frames, sink_frames, block_frames, cached_frames)."""
    if args.config_path:
        from utils.config import load_config
        from utils.geometry import resolve_recipe

        recipe = resolve_recipe(load_config(args.config_path), check_weights=False)
        geometry = recipe.geometry
        block = geometry.block_sizes[-1]
        cached = geometry.num_latent_frames - block
        return (recipe.generator.arch, geometry.latent_height, geometry.latent_width, geometry.cache_frames,
                geometry.sink_frames, block, cached)  # fmt: skip
    preset = load_model_preset(args.preset)
    arch = {k: preset[k] for k in ARCH_FIELDS}
    arch.update({k: vars(args)[k] for k in ARCH_OVERRIDES if vars(args)[k] is not None})
    if args.block_frames > args.num_frames:
        raise UserError(f"--block_frames {args.block_frames} exceeds --num_frames {args.num_frames}")
    return (arch, args.latent_height, args.latent_width, args.num_frames, 0, args.block_frames,
            args.num_frames - args.block_frames)  # fmt: skip


def random_model(arch: dict, dtype: torch.dtype, device: str, backend: str) -> CausalWanModel:
    with torch.device("meta"):
        model = CausalWanModel(**{k: arch[k] for k in ARCH_FIELDS}, attention_backend=backend)
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    return model.eval()


def time_call(call, device: torch.device, warmup: int, repeats: int) -> float:
    """Milliseconds per call (median of `repeats`)."""
    from utils.timing import median_seconds

    return median_seconds(call, device, warmup, repeats) * 1000


@run_main
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    arch, height, width, cache_frames, sink_frames, block, cached = resolve_geometry(args)
    model = random_model(arch, dtype, args.device, args.backend)
    patch_h, patch_w = arch["patch_size"][1:]
    frame_seq_length = (height // patch_h) * (width // patch_w)
    if args.compile:
        from pipeline.components import compile_blocks

        compile_blocks(model, True, "default", device)
    x = torch.randn(args.batch_size, block, arch["in_dim"], height, width, device=device, dtype=dtype)
    timestep = torch.full((args.batch_size, block), 500.0, device=device)
    context = torch.randn(args.batch_size, arch["text_len"], arch["text_dim"], device=device, dtype=dtype)
    results = {}
    for mode in args.cache_modes:
        cache = CACHE_MODES[mode](arch["num_layers"], args.batch_size, cache_frames, frame_seq_length, arch["num_heads"],
                                  model.head_dim, dtype, device, sink_frames=sink_frames)  # fmt: skip
        results[mode] = time_cache(model, cache, x, timestep, context, block, cached, args)
        del cache

    params = sum(p.numel() for p in model.parameters())
    rows = [
        ("device", torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"),
        ("dtype / attention", f"{args.dtype} / {describe_backend(args.backend, device)}"),
        ("model", f"dim {arch['dim']}, {arch['num_heads']} heads, {arch['num_layers']} layers, {params / 1e9:.3f} B params"),
        ("latent / tokens per frame", f"{arch['in_dim']}x{height}x{width} / {frame_seq_length}"),
        ("block / cached frames (window)", f"{block} / {cached} ({cache_frames} frames, sink {sink_frames})"),
        ("compiled blocks", "yes" if args.compile else "no"),
    ]
    for mode, (denoise_ms, commit_ms, peak) in results.items():
        suffix = "" if len(results) == 1 else f" [{mode}]"
        rows += [
            (f"ms / forward, denoise (commit=False){suffix}", f"{denoise_ms:.2f}"),
            (f"ms / forward, context (commit=True){suffix}", f"{commit_ms:.2f}"),
            (f"peak MiB above the cache, denoise forward{suffix}", f"{peak / 2**20:.0f}"),
        ]
    width_col = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width_col}}  {value}")


def time_cache(model, cache, x, timestep, context, block, cached, args) -> tuple[float, float, int]:
    """(denoise ms, context-pass ms, peak bytes of one denoise forward above what was allocated before it)."""
    from utils.memory import _PeakTracker, current_bytes

    device = x.device
    # Pre-fill the cache with the earlier frames (random keys: the timing does not depend on their values).
    cache.keys.normal_()
    cache.values.normal_()
    cache.commit(cache.plan(0, min(cached, cache.max_frames - block)))
    cache.next_frame = cached  # absolute position of the last block (the window may have rolled)

    def denoise():
        model.forward_cached(x, timestep, context, cache, cached, commit=False)

    with torch.no_grad():
        denoise_ms = time_call(denoise, device, args.warmup, args.repeats)
        tracker = _PeakTracker(device)
        tracker.reset()
        before = current_bytes(device)
        denoise()
        peak = tracker.read() - before
        tracker.close()
        # The commit pass writes the block; reset the bookkeeping each time so every call sees the same window.
        frames, next_frame = list(cache.slot_frames), cache.next_frame

        def context_pass():
            cache.slot_frames, cache.next_frame = list(frames), next_frame
            model.forward_cached(x, timestep, context, cache, cached, commit=True)

        commit_ms = time_call(context_pass, device, args.warmup, args.repeats)
    return denoise_ms, commit_ms, peak


if __name__ == "__main__":
    main()
