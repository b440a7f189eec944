"""Causal streaming inference with a distilled generator.

    python inference.py --config_path configs/self_forcing_dmd.yaml --checkpoint logs/run/latest [--use_ema] \
        (--prompt "a cat walks in the park" | --data_path prompts.txt [--image_root DIR]) [--image first.png] \
        [--num_output_frames 81] [--seed 0] [--output_folder outputs] [--profile_memory] [key=value ...]

Each prompt gives <output_folder>/<task>_<W>x<H>_<YYYYmmdd_HHMMSS>_<slug>/ with video.mp4, frames.png and
inference_record.json (prompt, parameters, checkpoint, seed, timings, memory). --num_output_frames counts
pixel frames, any number from 1 (made as whole blocks, the asked ones kept); longer than the recipe's video, the
KV cache rolls (rollout.local_attn_size, sink_size). A --data_path line `image.png<TAB>prompt` starts that video
from its own first frame (the image relative to --image_root, by default the list's folder).
Everything that can be wrong is checked before a model is loaded, and a failed run writes nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from pipeline.causal_inference import CausalInferencePipeline, check_request
from pipeline.components import check_light_decoder
from pipeline.run_options import DTYPES, MAX_SEED, check_device, default_dtype
from utils.config import load_config, parse_cli
from utils.datasets import read_video_requests
from utils.errors import OneLineArgumentParser, UserError, run_main
from utils.geometry import resolve_recipe
from utils.io import check_output_folder
from utils.memory import MemoryProfiler, torch_trace
from wan.loading import recipe_for_checkpoint, resolve_generator_weights

MEMORY_EVENTS_FILE = "memory_events.json"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_path", required=True, help="the recipe the generator was trained with")
    parser.add_argument("--checkpoint", required=True, help="trainer export folder (<logdir>/latest) or a weights file")
    parser.add_argument("--use_ema", action="store_true", help="use generator_ema.safetensors from the export folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt")
    source.add_argument("--data_path", help="a text file with one prompt per line (or `image<TAB>prompt` per line)")
    parser.add_argument("--image", default=None, help="first frame (TI2V): resized to cover, centre-cropped")
    parser.add_argument("--image_root", default=None,
                        help="the folder of the images a --data_path list names (default: the list's folder)")
    parser.add_argument("--num_output_frames", type=int, default=None, help="pixel frames (default: video.num_frames)")
    parser.add_argument("--seed", type=int, default=0,
                        help="noise seed; the same seed gives the same video (with --data_path, line i uses seed + i)")
    parser.add_argument("--output_folder", default="outputs", help="where the per-video folders go")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--save_latents", action="store_true",
                        help="also write latents.safetensors (the clean latents, to judge or re-decode later)")
    parser.add_argument("--profile_memory", action="store_true", help="write memory_events.json beside each video")
    parser.add_argument("--trace_path", default=None, help="write a torch.profiler trace (Chrome JSON) of the first video")
    known, overrides = parse_cli(parser, argv)
    return known, overrides


@run_main
def main(argv: list[str] | None = None) -> int:
    from pipeline.inference_outputs import save_result

    args, overrides = parse_args(argv)
    # 1. Check every input before loading anything.
    config = recipe_for_checkpoint(load_config(args.config_path, overrides), args.checkpoint)
    resolved = resolve_recipe(config, need_scores=False, check_weights=False)  # --checkpoint replaces the generator's
    check_light_decoder(config, resolved.vae)  # inference.decoder: light, for the recipe's latents
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("--prompt is empty: expected a text prompt")
    if args.image_root is not None and args.data_path is None:
        raise UserError("--image_root names the folder of a --data_path list's images: give --data_path too")
    # (prompt, first-frame image or None) per video
    requests = ([(args.prompt, args.image)] if args.prompt is not None else
                read_video_requests(args.data_path, args.image_root))
    if args.data_path is not None and args.image is not None:
        if any(image is not None for _, image in requests):
            raise UserError(f"--image and a --data_path list that names images ({args.data_path}): give the first "
                            "frames in one place")
        requests = [(prompt, args.image) for prompt, _ in requests]
    if args.num_output_frames is not None and args.num_output_frames < 1:
        raise UserError(f"--num_output_frames {args.num_output_frames}: expected a positive number of pixel frames "
                        "(omit it for the recipe's video.num_frames)")
    if not 0 <= args.seed <= MAX_SEED - len(requests):
        raise UserError(f"--seed {args.seed}: expected 0..{MAX_SEED - len(requests)} (prompt i of a file uses seed + i)")
    check_output_folder(args.output_folder, "--output_folder")
    device = check_device(args.device)
    # Under torchrun: groups of parallel.sp_size ranks make each video together (Ulysses sequence parallelism),
    # groups share out the prompts, and each group's first rank writes its videos.
    groups = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from pipeline.parallel_sampling import build_sampling_groups
        from utils.dist import init_distributed

        info = init_distributed("cuda" if device.type == "cuda" else "cpu")
        device = info.device
        groups = build_sampling_groups(info, config.parallel.sp_size, cfg_parallel=False)
    elif config.parallel.sp_size > 1:
        raise UserError(f"parallel.sp_size={config.parallel.sp_size} needs that many ranks: launch inference.py with "
                        f"torchrun --nproc_per_node {config.parallel.sp_size}")
    # every image read and checked here, before any model; each read again (not kept) when its video is made
    for image in dict.fromkeys(image for _, image in requests):
        geometry = check_request(config, resolved, image, args.num_output_frames).geometry
    resolve_generator_weights(args.checkpoint, args.use_ema, resolved.generator.arch)
    dtype = default_dtype(args.dtype, device)

    # 2. Load once.
    profiler = MemoryProfiler(enabled=args.profile_memory, device=device)
    pipe = CausalInferencePipeline(config, resolved, device, dtype, checkpoint=args.checkpoint, use_ema=args.use_ema,
                                   profiler=profiler)
    if groups is not None and groups.sequence is not None:
        pipe.generator.set_sequence_parallel(groups.sequence)
    parameters = {
        "config_path": args.config_path, "overrides": overrides, "checkpoint": args.checkpoint, "use_ema": args.use_ema,
        "seed": args.seed, "num_output_frames": args.num_output_frames or config.video.num_frames,
        "device": str(device), "dtype": str(dtype).removeprefix("torch."), "attention_backend": config.attention_backend,
        "denoising_timesteps": [round(float(t), 4) for t in pipe.timesteps], "context_noise": config.rollout.context_noise,
        "cache_frames": geometry.cache_frames, "sink_frames": geometry.sink_frames, "fps": config.video.fps,
        "decoder": pipe.decoder_name, "overlap_decode": pipe.overlap_decode,
        "config": OmegaConf.to_container(OmegaConf.structured(config)),
    }

    # 3. Generate and save each video.
    for index, (prompt, image) in enumerate(requests):
        if groups is not None and index % groups.count != groups.index:
            continue
        with torch_trace(args.trace_path if index == 0 else None, device):
            # prompt i of a prompt file uses seed + i: distinct noise per video, reproducible per line
            result = pipe.generate(prompt, request=pipe.check_request(image, args.num_output_frames),
                                   seed=args.seed + index)
        if groups is not None and not groups.writer:
            continue
        folder = save_result(result, args.output_folder, parameters, fps=config.video.fps, save_latents=args.save_latents)
        if args.profile_memory:
            profiler.save(Path(folder) / MEMORY_EVENTS_FILE)
        timings = result.timings
        print(f"{folder}: {result.video.shape[0]} frames, {timings['fps']:.2f} fps, "
              f"first block {timings['first_block_latency_s']:.3f} s", flush=True)
    profiler.close()
    if groups is not None:
        from utils.dist import cleanup

        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
