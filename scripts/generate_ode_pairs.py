"""ODE pairs: the bidirectional teacher samples each prompt and keeps a few points of its trajectory.

    python scripts/generate_ode_pairs.py --config_path configs/ode_5B.yaml --caption_path prompts.txt \
        --output_folder DIR [--num_prompts N] [--image_root IMAGES] [--profile_memory] [key=value ...]
    torchrun --nproc_per_node=8 scripts/generate_ode_pairs.py ...   (each rank takes a share of the prompts)

Per prompt i it writes DIR/<i:06d>.safetensors atomically: ode_latents float16 [P, F, C, H, W] (the points
config.ode.keep_indices of config.ode.num_steps teacher steps; the last is clean) and ode_timesteps [P],
with the prompt, its seed and the geometry fingerprint as metadata. The noise seed depends only on
(train.seed, i), so reruns and any number of ranks give the same pairs. Running again skips finished
prompts: an interrupted run loses at most the prompts in flight on each rank.

TI2V recipes (video.task=ti2v) read `image<TAB>prompt` lines and need --image_root; the image, encoded by
the VAE, is the clean first latent frame.

Test-only: ODE_PAIRS_EXIT_AFTER=k makes each rank exit abruptly (os._exit) after writing k pairs, to
simulate a crash.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from utils.config import Config, load_config, parse_cli, to_yaml
from utils.datasets import ImageTextDataset, TextPromptDataset
from utils.errors import OneLineArgumentParser, UserError, run_main
from utils.geometry import ResolvedRecipe, resolve_recipe
from utils.io import atomic_write_text
from utils.lmdb_store import PairInfo, geometry_fingerprint, scan_pair_folder, write_pair_file

EXIT_AFTER_ENV = "ODE_PAIRS_EXIT_AFTER"  # test-only crash simulation (see the module docstring)
CRASH_EXIT_CODE = 3


# --------------------------------------------------------------------------------------------- plan (no models)
def pair_seed(base_seed: int, index: int) -> int:
    """The noise seed of prompt `index`: a stable hash of (train.seed, index), independent of rank count."""
    digest = hashlib.sha256(f"ode-pairs/{base_seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # torch seeds must fit in a signed 64-bit int


def sampling_plan(config: Config) -> tuple[torch.Tensor, list[int]]:
    """The ODE teacher's schedule and kept points (pipeline.teacher_sampling.ode_sampling_plan)."""
    from pipeline.flow_matching import few_step_timesteps
    from pipeline.teacher_sampling import ode_sampling_plan

    rollout, flow = config.rollout, config.flow
    student = few_step_timesteps(rollout.denoising_step_list, rollout.warp_denoising_step, flow.timestep_shift,
                                 flow.num_train_timesteps)
    return ode_sampling_plan(config.ode, student, flow.num_train_timesteps)


def read_prompts(args: argparse.Namespace, config: Config) -> TextPromptDataset | ImageTextDataset:
    if args.num_prompts is not None and args.num_prompts < 1:
        raise UserError(f"--num_prompts is {args.num_prompts}: expected at least 1")
    if config.video.task == "ti2v":
        image_root = args.image_root or config.train.image_root
        if not image_root:
            raise UserError("video.task is ti2v: pass --image_root (or train.image_root), the folder of first-frame images")
        return ImageTextDataset(args.caption_path, image_root, config.video.height, config.video.width)
    return TextPromptDataset(args.caption_path)


def check_output_folder(folder: Path, finished: list[PairInfo], fingerprint: str, prompts: list[str],
                        base_seed: int) -> None:
    """Results already in the folder must come from this recipe, these prompts and this seed."""
    for info in finished:
        if info.fingerprint != fingerprint:
            raise UserError(
                f"output folder {folder} holds results of another geometry ({info.path.name}: fingerprint "
                f"{info.fingerprint}, this recipe {fingerprint}): use a new --output_folder"
            )
        if info.index < len(prompts) and info.prompt != prompts[info.index]:
            raise UserError(
                f"{info.path} holds prompt {info.prompt!r} but caption line {info.index + 1} is {prompts[info.index]!r}: "
                "the caption file changed, use a new --output_folder"
            )
        if info.seed != pair_seed(base_seed, info.index):
            raise UserError(f"{info.path} was sampled with another train.seed: use the same seed or a new --output_folder")


# --------------------------------------------------------------------------------------------- models
def build_models(config: Config, recipe: ResolvedRecipe, device: torch.device, profiler) -> dict:
    from pipeline.components import build_dit, build_text_encoder, build_vae, text_encoder_device

    # bf16 weights on a GPU (sampling runs under autocast); float32 on a CPU for exact tests
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models = {}
    with profiler.component("text_encoder"):
        models["text_encoder"] = build_text_encoder(config, device=text_encoder_device(config, device), dtype=dtype,
                                                    seed=config.train.seed)
    with profiler.component("teacher"):
        # ode.causal_teacher: the teacher is a causal model (teacher forcing), sampled block by block
        models["teacher"] = build_dit(recipe.real_score, causal=config.ode.causal_teacher,
                                      attention_backend=config.attention_backend, device=device, dtype=dtype,
                                      seed=config.train.seed).eval()
    if config.video.task == "ti2v":
        with profiler.component("vae"):
            models["vae"] = build_vae(recipe.vae, device=device, dtype=dtype)
    return models


@torch.no_grad()
def sample_pair(config: Config, recipe: ResolvedRecipe, models: dict, item: dict, seed: int, device: torch.device):
    """One prompt's TeacherSample (trajectory [1, P, F, C, H, W])."""
    from pipeline.causal_teacher_sampling import sample_causal_teacher
    from pipeline.teacher_sampling import sample_teacher

    # 1. Text: the prompt and the negative prompt for CFG.
    encoder = models["text_encoder"]
    cond = encoder.encode([item["prompt"]]).to(device)
    uncond = encoder.encode_cached(config.text_encoder.negative_prompt).to(device)
    # 2. Noise drawn on the CPU from the pair's own generator: the same on every device and rank count.
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, *recipe.geometry.latent_shape[1:]), generator=generator, dtype=torch.float32).to(device)
    # 3. TI2V: the image as a one-frame video, encoded to the clean first latent frame.
    first_frame = None
    if "image" in item:
        first_frame = models["vae"].encode_to_latent(item["image"][None, :, None].to(device)).float()
    # 4. Teacher sampling with CFG on the planned schedule, keeping the planned points.
    sigmas, keep = sampling_plan(config)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        if config.ode.causal_teacher:
            return sample_causal_teacher(
                models["teacher"], noise, cond, uncond, config.ode, recipe.geometry,
                num_train_timesteps=config.flow.num_train_timesteps, first_frame=first_frame,
                keep_indices=keep, boundary=recipe.real_score.moe_boundary, sigmas=sigmas,
            )
        return sample_teacher(
            models["teacher"], noise, cond, uncond, config.ode, num_train_timesteps=config.flow.num_train_timesteps,
            first_frame=first_frame, keep_indices=keep, boundary=recipe.real_score.moe_boundary, sigmas=sigmas,
        )


# --------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_path", required=True, help="a recipe under configs/ (the teacher is real_score)")
    parser.add_argument("--caption_path", required=True, help="prompts, one per line (TI2V: image<TAB>prompt)")
    parser.add_argument("--output_folder", required=True, help="where the <index>.safetensors pairs go")
    parser.add_argument("--num_prompts", type=int, default=None, help="only the first N prompts (default: all)")
    parser.add_argument("--image_root", default=None, help="TI2V: folder of the first-frame images")
    parser.add_argument("--profile_memory", action="store_true", help="write memory_events.json to the output folder")
    known, overrides = parse_cli(parser, argv)
    return known, overrides


@run_main
def main(argv: list[str] | None = None) -> int:
    from pipeline.parallel_sampling import CfgParallelDenoiser, build_sampling_groups
    from utils import dist
    from utils.memory import MemoryProfiler

    # 1. Config, geometry, prompts and the output folder: every check before any model is built.
    args, overrides = parse_args(argv)
    config = load_config(args.config_path, overrides)
    recipe = resolve_recipe(config, need_scores=True)
    if config.parallel.cfg_parallel and config.ode.causal_teacher:
        raise UserError("parallel.cfg_parallel with ode.causal_teacher is not supported: the causal teacher keeps a KV "
                        "cache per branch on every rank; use parallel.sp_size instead")
    from model.registry import objective_class
    from pipeline.teacher_sampling import kept_point_timesteps

    sigmas, keep = sampling_plan(config)
    timesteps = kept_point_timesteps(sigmas, keep, config.flow.num_train_timesteps)
    if objective_class(config).reads_point_timesteps:  # pairs the stage would refuse are refused before GPU hours
        from model.ode import ode_point_timesteps

        ode_point_timesteps(timesteps, config, f"{args.config_path} (ode.shift {config.ode.shift:g}, ode.num_steps "
                            f"{config.ode.num_steps}, ode.keep_indices {list(config.ode.keep_indices)})")
    fingerprint = geometry_fingerprint(recipe.geometry, timesteps.tolist())
    prompts_data = read_prompts(args, config)
    num_prompts = min(len(prompts_data), args.num_prompts or len(prompts_data))
    prompts = prompts_data.prompts[:num_prompts]
    from utils.io import check_output_folder as check_writable

    output = check_writable(args.output_folder, "--output_folder")  # empty, a file, read-only: refused now
    finished = scan_pair_folder(output)
    check_output_folder(output, finished, fingerprint, prompts, config.train.seed)

    # 2. Share out the unfinished prompts; rank 0 decides so every rank sees the same list.
    info = dist.init_distributed()
    if info.is_main and output.is_dir():  # a killed run's half-written files; no rank writes before the broadcast
        for leftover in output.glob(".*.tmp"):
            leftover.unlink()
    done = {pair.index for pair in finished if pair.index < num_prompts}
    remaining = dist.broadcast_int_list([i for i in range(num_prompts) if i not in done])
    # Sample groups (parallel.sp_size x 2 with parallel.cfg_parallel ranks) share each prompt; groups share out prompts.
    groups = build_sampling_groups(info, config.parallel.sp_size, config.parallel.cfg_parallel)
    mine = remaining[groups.index::groups.count]
    if info.is_main:
        output.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output / "config.yaml", to_yaml(config))

    # 3. Models (only when there is work), then one prompt at a time, each written atomically.
    profiler = MemoryProfiler(enabled=args.profile_memory, device=info.device)
    exit_after = int(os.environ.get(EXIT_AFTER_ENV, "0"))
    written, nfe, start = 0, 0, time.perf_counter()
    if mine:
        models = build_models(config, recipe, info.device, profiler)
        if groups.sequence is not None:
            models["teacher"].set_sequence_parallel(groups.sequence)
        if groups.cfg_group is not None:
            models["teacher"] = CfgParallelDenoiser(models["teacher"], groups.cfg_group, groups.cfg_branch)
        start = time.perf_counter()
        with profiler.phase("sampling"):
            for index in tqdm(mine, desc="ode pairs", disable=not info.is_main):
                seed = pair_seed(config.train.seed, index)
                sample = sample_pair(config, recipe, models, prompts_data[index], seed, info.device)
                if not torch.allclose(sample.trajectory_timesteps.cpu(), timesteps):
                    raise RuntimeError(f"sampled trajectory timesteps {sample.trajectory_timesteps} != planned {timesteps}")
                if groups.writer:
                    write_pair_file(output, index, sample.trajectory[0], timesteps, prompt=prompts[index], seed=seed,
                                    geometry=recipe.geometry, keep_indices=keep,
                                    extra={"teacher": recipe.real_score.name})
                    written, nfe = written + 1, nfe + sample.nfe
                if exit_after and written >= exit_after:
                    os._exit(CRASH_EXIT_CODE)
    seconds = time.perf_counter() - start

    # 4. Summary over all ranks.
    total_written = round(dist.all_reduce_mean(written) * info.world_size)
    total_nfe = round(dist.all_reduce_mean(nfe) * info.world_size)
    if args.profile_memory and info.is_main:
        profiler.save(output / "memory_events.json")
    profiler.close()
    if info.is_main:
        per_prompt = f"{seconds / written:.2f} s per prompt on rank 0" if written else "nothing sampled on rank 0"
        nfe_each = f" ({total_nfe // total_written} per prompt)" if total_written else ""
        print(f"ode pairs: {total_written} generated, {len(done)} already done, {num_prompts} prompts in {output}; "
              f"{per_prompt}; {total_nfe} model evaluations{nfe_each}; {info.world_size} rank(s)")
    dist.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
