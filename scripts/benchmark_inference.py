"""Frames per second and first-block latency: causal streaming inference vs bidirectional sampling, one run.

Both sides use random weights of the recipe's generator architecture at the recipe's geometry (any
`key=value` override applies), bf16 on a GPU and fp32 on a CPU:
  - causal: `CausalInferencePipeline.generate` (few steps per block, KV cache, context pass,
    streaming VAE decode): the code path of inference.py;
  - bidirectional: the same architecture as a WanModel sampled with `teacher` steps x CFG (two
    forwards per step), then one full VAE decode; its first frame exists only at the end.
The text encoder is left out of both (a fixed random context of the model's text_len x text_dim).

    python scripts/benchmark_inference.py --config_path configs/self_forcing_dmd.yaml [--repeats 3] [--json]
    python scripts/benchmark_inference.py --config_path configs/tiny/self_forcing_dmd.yaml teacher.num_steps=8
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from utils.config import Config, load_config, parse_cli  # noqa: E402
from utils.errors import run_main  # noqa: E402
from utils.geometry import ResolvedRecipe, resolve_recipe  # noqa: E402
from utils.tables import format_table  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SEED = 0


class RandomContext:
    """Stands in for the text encoder: one fixed random context [1, text_len, text_dim]."""

    def __init__(self, text_len: int, text_dim: int, device: torch.device, dtype: torch.dtype):
        self.context = torch.randn(1, text_len, text_dim, generator=torch.Generator().manual_seed(SEED)).to(device, dtype)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self.context.expand(len(prompts), -1, -1)


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def bench_causal(config: Config, resolved: ResolvedRecipe, vae, device: torch.device, dtype: torch.dtype,
                 repeats: int) -> dict:
    """Median of `repeats` timed generations after one warm-up."""
    from pipeline.causal_inference import CausalInferencePipeline, InferenceComponents
    from pipeline.components import build_dit

    spec = dataclasses.replace(resolved.generator, checkpoint=None)  # random weights
    generator = build_dit(spec, causal=True, attention_backend=config.attention_backend, device=device, dtype=dtype,
                          seed=SEED).eval().requires_grad_(False)
    text = RandomContext(spec.arch["text_len"], spec.arch["text_dim"], device, dtype)
    pipe = CausalInferencePipeline(config, resolved, device, dtype,
                                   components=InferenceComponents(text_encoder=text, vae=vae, generator=generator))
    pipe.generate("warm-up", seed=SEED)
    _peak_reset(device)
    runs = [pipe.generate("benchmark", seed=SEED) for _ in range(repeats)]
    total = statistics.median(r.timings["total_s"] for r in runs)
    frames = runs[0].video.shape[0]
    return {
        "mode": "causal",
        "steps_x_cfg": f"{len(config.rollout.denoising_step_list)}x1 (+1 context pass)",
        "nfe_per_video": runs[0].nfe,
        "frames": frames,
        "total_s": total,
        "fps": frames / total,
        "first_block_latency_s": statistics.median(r.timings["first_block_latency_s"] for r in runs),
        "denoise_s": statistics.median(r.timings["denoise_s"] for r in runs),
        "vae_decode_s": statistics.median(r.timings["vae_decode_s"] for r in runs),
        "denoise_fps": frames / statistics.median(r.timings["denoise_s"] for r in runs),
        "peak_gib": _peak_gib(device),
    }


def bench_bidirectional(config: Config, resolved: ResolvedRecipe, vae, device: torch.device, dtype: torch.dtype) -> dict:
    """One timed sampling (it is long) after a one-step warm-up."""
    from pipeline.components import build_dit
    from pipeline.teacher_sampling import sample_teacher

    spec = dataclasses.replace(resolved.generator, checkpoint=None)
    model = build_dit(spec, causal=False, attention_backend=config.attention_backend, device=device, dtype=dtype,
                      seed=SEED).eval().requires_grad_(False)
    geometry = resolved.geometry
    text = RandomContext(spec.arch["text_len"], spec.arch["text_dim"], device, dtype)
    cond, uncond = text.context, -text.context
    noise = torch.randn((1, *geometry.latent_shape[1:]), generator=torch.Generator().manual_seed(SEED)).to(device)
    sampling = config.teacher
    num_train_timesteps = config.flow.num_train_timesteps

    with torch.no_grad():
        sample_teacher(model, noise, cond, uncond, dataclasses.replace(sampling, num_steps=1),
                       num_train_timesteps=num_train_timesteps)
        _peak_reset(device)
        start = _sync(device)
        sample = sample_teacher(model, noise, cond, uncond, sampling, num_train_timesteps=num_train_timesteps)
        denoised = _sync(device)
        video = vae.decode_to_pixel(sample.latent)
        end = _sync(device)
    frames = video.shape[1]
    return {
        "mode": "bidirectional",
        "steps_x_cfg": f"{sampling.num_steps}x2",
        "nfe_per_video": sample.nfe,
        "frames": frames,
        "total_s": end - start,
        "fps": frames / (end - start),
        "first_block_latency_s": end - start,  # nothing is shown before the whole video is decoded
        "denoise_s": denoised - start,
        "vae_decode_s": end - denoised,
        "denoise_fps": frames / (denoised - start),
        "peak_gib": _peak_gib(device),
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@run_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_path", required=True, help="recipe giving the architecture and geometry")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed causal generations (median reported)")
    parser.add_argument("--skip_bidirectional", action="store_true", help="time only the causal side")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    known, overrides = parse_cli(parser, argv)

    # 1. Recipe and geometry (presets only: the weights are random).
    config = load_config(known.config_path, overrides)
    resolved = resolve_recipe(config, need_scores=False, check_weights=False)
    device = torch.device(known.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[known.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    from pipeline.components import build_vae

    vae = build_vae(dataclasses.replace(resolved.vae, checkpoint=None), device=device, dtype=dtype)

    # 2. Both sides, one after the other (the causal model is freed before the bidirectional one is built).
    results = [bench_causal(config, resolved, vae, device, dtype, known.repeats)]
    if not known.skip_bidirectional:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        results.append(bench_bidirectional(config, resolved, vae, device, dtype))

    # 3. Report.
    geometry = resolved.geometry
    report = {
        "device": device_name(device), "dtype": str(dtype).removeprefix("torch."), "model": geometry.model,
        "size": f"{geometry.width}x{geometry.height}", "latent_frames": geometry.num_latent_frames,
        "num_frame_per_block": geometry.num_frame_per_block, "attention_backend": config.attention_backend,
        "command": " ".join(["python", "scripts/benchmark_inference.py", *(argv if argv is not None else sys.argv[1:])]),
        "results": results,
    }
    if len(results) == 2:
        report["fps_ratio"] = results[0]["fps"] / results[1]["fps"]
        report["latency_ratio"] = results[1]["first_block_latency_s"] / results[0]["first_block_latency_s"]
    if known.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['device']}, {report['dtype']}, {report['model']} at {report['size']}, {report['latent_frames']} latent "
          f"frames, blocks of {report['num_frame_per_block']}, attention {report['attention_backend']}")
    header = ("mode", "steps x cfg", "nfe", "frames", "total s", "fps", "first block s", "denoise s", "decode s",
              "denoise fps", "peak GiB")
    rows = [(r["mode"], r["steps_x_cfg"], r["nfe_per_video"], r["frames"], f"{r['total_s']:.3f}", f"{r['fps']:.2f}",
             f"{r['first_block_latency_s']:.3f}", f"{r['denoise_s']:.3f}", f"{r['vae_decode_s']:.3f}",
             f"{r['denoise_fps']:.2f}", "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}") for r in results]
    print(format_table(rows, header=header))
    if "fps_ratio" in report:
        print(f"causal / bidirectional: {report['fps_ratio']:.1f}x fps, {report['latency_ratio']:.1f}x sooner first frame")
    return 0


if __name__ == "__main__":
    sys.exit(main())
