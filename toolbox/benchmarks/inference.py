"""Frames per second and first-block latency: causal streaming inference vs bidirectional sampling, one run.

Both sides use random weights of the recipe's generator architecture at the recipe's geometry (any
`key=value` override applies), bf16 on a GPU and fp32 on a CPU:
  - causal: `CausalInferencePipeline.generate` (few steps per block, KV cache, context pass,
    streaming VAE decode): the code path of inference.py;
  - bidirectional: the same architecture as a WanModel sampled with `teacher` steps x CFG (two
    forwards per step), then one full VAE decode; its first frame exists only at the end.
The text encoder is left out of both (a fixed random context of the model's text_len x text_dim).

    python scripts/benchmark.py inference --config_path configs/self_forcing_dmd.yaml [--repeats 3] [--json]
    python scripts/benchmark.py inference --config_path configs/tiny/self_forcing_dmd.yaml teacher.num_steps=8
    python scripts/benchmark.py inference --config_path configs/self_forcing_dmd.yaml --skip_bidirectional \
        --variants sdpa:eager,sdpa:compile,flex:eager --json_out outputs/bench.json
    python scripts/benchmark.py inference --config_path configs/self_forcing_dmd_5B.yaml --skip_bidirectional \
        --variants sdpa:compile:full:inline,sdpa:compile:full:overlap,sdpa:compile:light:inline,sdpa:compile:light:overlap

--variants times the causal side once per item backend:eager|compile[:full|light][:inline|overlap]
(attention backend, inference.compile, inference.decoder, inference.overlap_decode; a part left out is the
recipe's), one generator per backend and compilation; the light decoder is the recipe's
inference.light_decoder file, or random weights at the published TAEHV widths for the VAE's latents.
--num_output_frames times longer videos (the KV cache rolls past the training length); --deadline_s
skips the variants that would start after it (said in the report); --json_out rewrites the report after
every variant, so a run cut short keeps its rows.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from pipeline.run_options import DTYPES
from toolbox.benchmarks.support import (
    SEED,
    RandomTextEncoder,
    device_name,
    peak_gib,
    random_dit,
    reset_peak,
    synchronize,
)
from utils.config import Config, load_config, parse_cli
from utils.errors import UserError, run_main
from utils.geometry import ResolvedRecipe, resolve_recipe
from utils.tables import format_table

REPO_ROOT = Path(__file__).resolve().parents[2]


def bench_causal(config: Config, resolved: ResolvedRecipe, components, device: torch.device, dtype: torch.dtype,
                 repeats: int, num_output_frames: int | None = None) -> dict:
    """Median of `repeats` timed generations after one warm-up (prebuilt components: nothing is loaded)."""
    from pipeline.causal_inference import CausalInferencePipeline

    pipe = CausalInferencePipeline(config, resolved, device, dtype, components=components)
    started = synchronize(device)
    pipe.generate("warm-up", seed=SEED, num_output_frames=num_output_frames)  # a compiled generator compiles here
    warmup_s = synchronize(device) - started
    reset_peak(device)
    runs = [pipe.generate("benchmark", seed=SEED, num_output_frames=num_output_frames) for _ in range(repeats)]
    total = statistics.median(r.timings["total_s"] for r in runs)
    frames = runs[0].video.shape[0]
    decode_s = statistics.median(r.timings["vae_decode_s"] for r in runs)
    return {
        "mode": "causal",
        "attention_backend": config.attention_backend,
        "compiled": pipe.compiled,
        "decoder": pipe.decoder_name,
        "overlap_decode": pipe.overlap_decode,
        "warmup_s": warmup_s,
        "steps_x_cfg": f"{len(config.rollout.denoising_step_list)}x1 (+1 context pass)",
        "nfe_per_video": runs[0].nfe,
        "frames": frames,
        "total_s": total,
        "fps": frames / total,
        "first_block_latency_s": statistics.median(r.timings["first_block_latency_s"] for r in runs),
        "denoise_s": statistics.median(r.timings["denoise_s"] for r in runs),
        "vae_decode_s": decode_s,
        "denoise_fps": frames / statistics.median(r.timings["denoise_s"] for r in runs),
        "decode_fps": frames / decode_s,
        "peak_gib": peak_gib(device),
        # the same generator, seed and decoder give the same frames in line and beside: compare across rows
        "video_sum": float(runs[-1].video.double().sum()),
    }


def random_light_decoder(config: Config, resolved: ResolvedRecipe, device: torch.device, dtype: torch.dtype):
    """The recipe's light decoder file, or one at the published widths with random weights (speed only)."""
    from pipeline.components import build_light_decoder
    from wan.light_decoder import LightDecoder

    if config.inference.light_decoder:
        light_config = dataclasses.replace(config, inference=dataclasses.replace(config.inference, decoder="light"))
        return build_light_decoder(light_config, resolved.vae, device=device, dtype=dtype)
    torch.manual_seed(SEED)
    model = LightDecoder(latent_channels=resolved.vae.z_dim, patch_size=resolved.vae.stride[1] // 8)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def bench_bidirectional(config: Config, resolved: ResolvedRecipe, vae, device: torch.device, dtype: torch.dtype) -> dict:
    """One timed sampling (it is long) after a one-step warm-up."""
    from pipeline.teacher_sampling import sample_teacher

    spec = dataclasses.replace(resolved.generator, checkpoint=None)
    model = random_dit(spec, causal=False, attention_backend=config.attention_backend, device=device,
                       dtype=dtype).eval().requires_grad_(False)
    geometry = resolved.geometry
    text = RandomTextEncoder(spec.arch["text_len"], spec.arch["text_dim"], device, dtype)
    cond, uncond = text.encode(["benchmark"]), text.encode_cached("negative")
    noise = torch.randn((1, *geometry.latent_shape[1:]), generator=torch.Generator().manual_seed(SEED)).to(device)
    sampling = config.teacher
    num_train_timesteps = config.flow.num_train_timesteps

    with torch.no_grad():
        sample_teacher(model, noise, cond, uncond, dataclasses.replace(sampling, num_steps=1),
                       num_train_timesteps=num_train_timesteps)
        reset_peak(device)
        start = synchronize(device)
        sample = sample_teacher(model, noise, cond, uncond, sampling, num_train_timesteps=num_train_timesteps)
        denoised = synchronize(device)
        video = vae.decode_to_pixel(sample.latent)
        end = synchronize(device)
    frames = video.shape[1]
    return {
        "mode": "bidirectional",
        "attention_backend": config.attention_backend,
        "compiled": False,
        "steps_x_cfg": f"{sampling.num_steps}x2",
        "nfe_per_video": sample.nfe,
        "frames": frames,
        "total_s": end - start,
        "fps": frames / (end - start),
        "first_block_latency_s": end - start,  # nothing is shown before the whole video is decoded
        "denoise_s": denoised - start,
        "vae_decode_s": end - denoised,
        "denoise_fps": frames / (denoised - start),
        "peak_gib": peak_gib(device),
    }


@dataclasses.dataclass(frozen=True)
class Variant:
    backend: str
    compiled: bool | None
    decoder: str
    overlap: bool | None

    @property
    def name(self) -> str:
        overlap = {None: "default", True: "overlap", False: "inline"}[self.overlap]
        return f"{self.backend}:{'compile' if self.compiled else 'eager'}:{self.decoder}:{overlap}"


def parse_variants(text: str | None, config: Config) -> list[Variant]:
    """'sdpa:compile:light:overlap,...' -> variants; a part left out (or no --variants) is the recipe's."""
    inference = config.inference
    if not text:
        return [Variant(config.attention_backend, inference.compile, inference.decoder, inference.overlap_decode)]
    variants = []
    for item in text.split(","):
        parts = item.split(":")
        backend, mode = parts[0], parts[1] if len(parts) > 1 else None
        decoder = parts[2] if len(parts) > 2 else inference.decoder
        decode = parts[3] if len(parts) > 3 else None
        if (backend not in ("sdpa", "flash", "flex") or mode not in ("eager", "compile") or len(parts) > 4
                or decoder not in ("full", "light") or decode not in (None, "inline", "overlap")):
            raise UserError(f"--variants item {item!r}: expected <sdpa|flash|flex>:<eager|compile>[:<full|light>]"
                            "[:<inline|overlap>]")
        overlap = inference.overlap_decode if decode is None else decode == "overlap"
        variants.append(Variant(backend, mode == "compile", decoder, overlap))
    return variants


def bench_variants(config: Config, resolved: ResolvedRecipe, vae, device: torch.device, dtype: torch.dtype,
                   known: argparse.Namespace, report: dict) -> None:
    """The causal side once per variant, in order; what cannot run (deadline, missing kernel) says why.

    Variants with the same backend and compilation share one generator (built, and compiled, once).
    """
    from pipeline.causal_inference import InferenceComponents

    deadline = None if known.deadline_s is None else time.monotonic() + known.deadline_s
    spec = dataclasses.replace(resolved.generator, checkpoint=None)  # random weights
    text = RandomTextEncoder(spec.arch["text_len"], spec.arch["text_dim"], device, dtype)
    generators: dict = {}
    light = None
    for variant in parse_variants(known.variants, config):
        if deadline is not None and time.monotonic() > deadline:
            report["skipped"].append({"variant": variant.name, "reason": f"time budget of {known.deadline_s:.0f} s spent"})
            continue
        inference = dataclasses.replace(config.inference, compile=variant.compiled, overlap_decode=variant.overlap)
        run_config = dataclasses.replace(config, attention_backend=variant.backend, inference=inference)
        try:
            key = (variant.backend, variant.compiled)
            if key not in generators:
                generators.clear()  # one generator held at a time
                generators[key] = random_dit(spec, causal=True, attention_backend=variant.backend, device=device,
                                             dtype=dtype).eval().requires_grad_(False)
            if variant.decoder == "light" and light is None:
                light = random_light_decoder(config, resolved, device, dtype)
            components = InferenceComponents(text_encoder=text, vae=vae, generator=generators[key],
                                              light_decoder=light if variant.decoder == "light" else None)
            row = bench_causal(run_config, resolved, components, device, dtype, known.repeats, known.num_output_frames)
            report["results"].append({**row, "variant": variant.name})
        except UserError as err:  # e.g. flash-attn not installed
            report["skipped"].append({"variant": variant.name, "reason": str(err)})
        except torch.OutOfMemoryError:
            report["skipped"].append({"variant": variant.name, "reason": "out of GPU memory"})
        except Exception as err:  # noqa: BLE001 - one broken variant must not cost the item's other rows
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            report["skipped"].append({"variant": variant.name, "reason": f"failed: {type(err).__name__}: {first}"})
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write_report(report, known.json_out)


def write_report(report: dict, path: str | None) -> None:
    if path:
        from utils.io import atomic_write_json

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(path), report)


@run_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_path", required=True, help="recipe giving the architecture and geometry")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed causal generations (median reported)")
    parser.add_argument("--skip_bidirectional", action="store_true", help="time only the causal side")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--variants", default=None,
                        help="backend:eager|compile[:full|light][:inline|overlap] list for the causal side, in order")
    parser.add_argument("--num_output_frames", type=int, default=None, help="pixel frames (default: video.num_frames)")
    parser.add_argument("--deadline_s", type=float, default=None, help="start no variant after this many seconds")
    parser.add_argument("--json_out", default=None, help="also write the report here (after every variant)")
    known, overrides = parse_cli(parser, argv)

    # 1. Recipe and geometry (presets only: the weights are random).
    config = load_config(known.config_path, overrides)
    resolved = resolve_recipe(config, need_scores=False, check_weights=False)
    device = torch.device(known.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[known.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    from pipeline.components import build_vae

    vae = build_vae(dataclasses.replace(resolved.vae, checkpoint=None), device=device, dtype=dtype)

    # 2. The causal variants, then the bidirectional side (each model freed before the next is built).
    geometry = resolved.geometry
    report = {
        "device": device_name(device), "dtype": str(dtype).removeprefix("torch."), "model": geometry.model,
        "size": f"{geometry.width}x{geometry.height}", "latent_frames": geometry.num_latent_frames,
        "num_frame_per_block": geometry.num_frame_per_block, "num_steps": len(config.rollout.denoising_step_list),
        "command": " ".join(["python", "scripts/benchmark.py", "inference", *(argv if argv is not None else sys.argv[1:])]),
        "results": [], "skipped": [],
    }
    bench_variants(config, resolved, vae, device, dtype, known, report)
    results = report["results"]
    if not known.skip_bidirectional:
        results.append(bench_bidirectional(config, resolved, vae, device, dtype))
    if len(results) == 2 and results[1]["mode"] == "bidirectional":
        report["fps_ratio"] = results[0]["fps"] / results[1]["fps"]
        report["latency_ratio"] = results[1]["first_block_latency_s"] / results[0]["first_block_latency_s"]
    write_report(report, known.json_out)

    # 3. Report.
    if known.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['device']}, {report['dtype']}, {report['model']} at {report['size']}, {report['latent_frames']} latent "
          f"frames, blocks of {report['num_frame_per_block']}")
    header = ("mode", "attention", "compiled", "decoder", "overlap", "steps x cfg", "nfe", "frames", "total s", "fps",
              "first block s", "denoise s", "decode s", "denoise fps", "peak GiB")
    rows = [(r["mode"], r["attention_backend"], "yes" if r["compiled"] else "no", r.get("decoder", "full"),
             "yes" if r.get("overlap_decode") else "no", r["steps_x_cfg"], r["nfe_per_video"],
             r["frames"], f"{r['total_s']:.3f}", f"{r['fps']:.2f}", f"{r['first_block_latency_s']:.3f}",
             f"{r['denoise_s']:.3f}", f"{r['vae_decode_s']:.3f}",
             f"{r['denoise_fps']:.2f}", "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}") for r in results]
    print(format_table(rows, header=header))
    for skip in report["skipped"]:
        print(f"skipped {skip['variant']}: {skip['reason']}")
    if "fps_ratio" in report:
        print(f"causal / bidirectional: {report['fps_ratio']:.1f}x fps, {report['latency_ratio']:.1f}x sooner first frame")
    return 0


if __name__ == "__main__":
    sys.exit(main())
