"""`make quickstart`: the whole Self-Forcing distillation on the miniature world, on a CPU, with a verdict.

    python scripts/quickstart.py [--out outputs/quickstart] [--fresh] [--loss dmd|sid] [--world bounded|wrap]
        [--chain self_forcing|causal_forcing|longlive] [--task t2v|ti2v|both] [--seed N] [--pairs_per_caption N]
        [--student_shift S] [--eval_clips N] [--short]

The chain runs the real entry points: generate_ode_pairs.py (the shipped miniature teacher, many steps with
CFG) -> create_lmdb.py -> train.py (ODE init) -> train.py (DMD or SiD on self-forcing rollouts) ->
inference.py (4-step causal student, KV cache) -> the judge. --chain picks how the student is initialised
before DMD (miniature/inits.py; the published Self-Forcing chain by default). --task ti2v distils an image-to-video
student: first frames from the teacher's own text-to-video pairs (scripts/first_frames.py), ODE pairs from them,
ODE init and DMD with video.task ti2v, every clip judged from a given first frame; --task both trains one student
on both kinds of pairs and rollouts (half from an image) and judges it on each task. It writes report.json / report.md with the
teacher's, the ODE-init student's and the distilled student's adherence, model evaluations and seconds per
video, a training-curve PNG, a frame strip PNG and the mp4s. Finished stages are reused when the command
runs again with the same inputs (each stage leaves a <stage>.done marker recording its command line and recipes;
a stage whose inputs changed runs again from scratch, and so does every stage after it); --fresh starts over.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from miniature.inits import CHAIN_STAGES, CHAINS
from miniature.judge import EVAL_FIRST_SEED, MAX_CLIPS
from miniature.stages import Stages
from miniature.world import ODE_PAIRS_PER_CAPTION, TEACHER_FOLDERS, WORLDS
from utils.errors import UserError, run_main
from utils.io import atomic_write_text

REPO_ROOT = Path(__file__).resolve().parents[1]

# Clips judged for the report: the judge's 12 captions 4 times over with their own seeds. Per-clip figures vary
# (seam ratio 0.7-2.1, adherence 0-1 for one model), so a mean of 12 clips moves by about 0.08 with the clips'
# noise alone; 48 halve that, which a seam goal of 1.2x needs (docs/EXPERIMENTS.md, 2026-12-01).
EVAL_CLIPS = 48
# The teacher is small: on 2 cores, two processes of one thread each sample its ODE pairs 1.9x faster than one process
# of two threads (0.63 s per clip each against 0.59 s). Training stays in one process: data parallelism over gloo cost
# 2.5x per DMD step here (0.70 s against 0.27 s), the model being too small to pay for its communication.
MAX_PAIR_PROCESSES = 8
RECIPES = {"ode": "configs/miniature/ode.yaml", "dmd": "configs/miniature/dmd.yaml", "sid": "configs/miniature/sid.yaml",
           "causal_teacher": "configs/miniature/causal_teacher.yaml", "ode_causal": "configs/miniature/ode_causal.yaml",
           "ode_ti2v": "configs/miniature/ode_ti2v.yaml", "dmd_ti2v": "configs/miniature/dmd_ti2v.yaml",
           "dmd_both": "configs/miniature/dmd_both.yaml"}
# --task: text-to-video, image-to-video (the student starts from a given first frame), or one student for both
TASKS = ("t2v", "ti2v", "both")
# the teacher of both tasks (the bounded world's, fine-tuned with half its clips image-to-video)
TI2V_TEACHER = "teacher_ti2v"
CHAIN_OUT_SUFFIX = {"self_forcing": "", "causal_forcing": "_causal", "longlive": "_longlive"}
# --short: a shortened run for the end-to-end test (same chain, fewer prompts and steps; no quality bar).
SHORT = {
    "num_prompts": 8,
    "ode": ["train.max_steps=4", "train.batch_size=4", "train.save_iters=2", "ode.num_steps=8", "ode.keep_indices=[0,2,4,6,-1]"],
    "distill": ["train.max_steps=4", "train.batch_size=2", "train.save_iters=2", "train.ema_start_step=1",
                "distill.dfake_gen_update_ratio=2", "evaluation.every=2", "evaluation.num_prompts=2"],
    "teacher": ["teacher.num_steps=8"],
    "causal_teacher": ["train.max_steps=2", "train.save_iters=2"],
    "num_eval": 2,
}


def decode_saved_latents(folder: Path, vae):
    """The clip the student generated: its saved latents decoded by the recipe's VAE ([T, 3, H, W] in [-1, 1]).

    The judge scores decoded latents for every model alike; the mp4s are for people (compression would
    cost the students, and only them, a little adherence).
    """
    import torch
    from safetensors.torch import load_file

    with torch.no_grad():
        latents = load_file(str(folder / "latents.safetensors"))["latents"]
        return vae.decode_to_pixel(latents[None])[0].float().clamp(-1, 1)


def save_teacher_videos(folder: Path, videos: list, prompts: list[tuple[str, int]], fps: int) -> None:
    """The teacher's evaluation clips as mp4s, beside the students' (for people; the judge reads tensors)."""
    from pipeline.inference_outputs import slugify
    from utils.video_io import write_mp4

    for index, (video, (prompt, _seed)) in enumerate(zip(videos, prompts)):
        write_mp4(folder / f"{index:02d}_{slugify(prompt)}.mp4", video, fps)


def generate_clips(out: Path, name: str, recipe: str, checkpoint: Path, prompts: list[tuple[str, int]],
                   overrides: list[str], stages: Stages, vae, images: list[Path] | None = None) -> tuple[list, list]:
    """inference.py on the prompts (prompt i uses seed base + i), each from its first-frame image if `images` are
    given; returns (records, decoded clips) in prompt order."""
    folder = out / "videos" / name
    prompt_file = out / f"{name}_prompts.txt"
    lines = [f"{image.name}\t{p}" for image, (p, _) in zip(images, prompts, strict=True)] if images else [p for p, _ in prompts]
    atomic_write_text(prompt_file, "\n".join(lines) + "\n")
    image_root = ["--image_root", str(images[0].parent)] if images else []
    stages.run(f"infer_{name}", ["inference.py", "--config_path", recipe, "--checkpoint", str(checkpoint),
                                 "--data_path", str(prompt_file), *image_root, "--seed", str(prompts[0][1]),
                                 "--output_folder", str(folder), "--save_latents", *overrides], outputs=[folder])
    clips = _clips_in(folder)
    records = [clips[prompt][0] for prompt in prompts]
    return records, [decode_saved_latents(clips[prompt][1], vae) for prompt in prompts]


def _clips_in(folder: Path) -> dict[tuple[str, int], tuple[dict, Path]]:
    """inference.py's clips in `folder` by (prompt, seed): their records and folders."""
    clips = {}
    for record_path in sorted(folder.glob("*/inference_record.json")):
        record = json.loads(record_path.read_text())
        clips[(record["prompt"], record["seed"])] = (record, record_path.parent)
    return clips


def judge_student(out: Path, name: str, recipe: str, checkpoint: Path, prompts: list[tuple[str, int]], overrides: list[str],
                  stages: Stages, vae, world, images: "EvalImages | None" = None) -> tuple[dict, list]:
    """Generate the evaluation clips with inference.py (from their first frames, if given) and judge them."""
    from miniature.report import summarise

    records, videos = generate_clips(out, name, recipe, checkpoint, prompts, overrides, stages, vae,
                                     images.paths if images else None)
    geometry = records[0]["geometry"]
    # every block gets the same forwards, each covering that block only: per frame, nfe = calls / blocks
    nfe = [r["nfe"] / len(r["geometry"]["block_sizes"]) for r in records]
    calls = [r["nfe"] for r in records]
    seconds = [r["timings"]["denoise_s"] + r["timings"]["vae_decode_s"] for r in records]
    summary = summarise(name, videos, [p for p, _ in prompts], nfe, seconds, calls, geometry["block_sizes"],
                        geometry["vae_stride"][0], world, images.pixels if images else None)
    return summary, videos


def student_pipeline(recipe: str, checkpoint: Path, overrides: list[str], use_ema: bool):
    """The student as inference.py loads it (recipe, key=value overrides, checkpoint, dtype), in this process."""
    import torch

    from pipeline.causal_inference import CausalInferencePipeline
    from pipeline.run_options import default_dtype
    from utils.config import load_config
    from utils.geometry import resolve_recipe
    from wan.loading import recipe_for_checkpoint

    device = torch.device("cpu")
    config = recipe_for_checkpoint(load_config(REPO_ROOT / recipe, overrides), checkpoint)
    resolved = resolve_recipe(config, need_scores=False, check_weights=False)
    return CausalInferencePipeline(config, resolved, device, default_dtype(None, device), checkpoint=checkpoint,
                                   use_ema=use_ema)


def student_seconds(pipe, prompt: str, seed: int, image: Path | None = None) -> float:
    """Seconds of one clip as the report's s / video counts them: sampling + VAE decode."""
    timings = pipe.generate(prompt, seed=seed, image=image).timings
    return timings["denoise_s"] + timings["vae_decode_s"]


def judge_long_video(out: Path, name: str, recipe: str, checkpoint: Path, prompts: list[tuple[str, int]],
                     overrides: list[str], stages: Stages, vae, geometry, world,
                     images: "EvalImages | None" = None) -> tuple[dict, list]:
    """The student rolled out to LONG_VIDEO_FACTOR x its training length (rolling cache), judged per segment."""
    from miniature.report import LONG_VIDEO_FACTOR, long_video_summary
    from utils.geometry import pixel_frames_for

    frames = pixel_frames_for(LONG_VIDEO_FACTOR * geometry.num_latent_frames, geometry.vae_stride[0])
    _, videos = generate_clips(out, f"{name}_long", recipe, checkpoint, prompts,
                               [*overrides, "--num_output_frames", str(frames)], stages, vae,
                               images.paths if images else None)
    return long_video_summary(name, videos, [p for p, _ in prompts], geometry.num_pixel_frames, world), videos


@run_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="where everything goes (default: outputs/quickstart)")
    parser.add_argument("--fresh", action="store_true", help="start over instead of reusing finished stages")
    parser.add_argument("--loss", choices=("dmd", "sid"), default="dmd", help="the score-distillation loss")
    parser.add_argument("--chain", choices=CHAINS, default="self_forcing",
                        help="how the student starts before DMD / SiD: self_forcing (published): ODE init on the "
                             "bidirectional teacher's pairs; causal_forcing: the teacher is tuned causal with teacher "
                             "forcing and makes the ODE pairs block by block, the ODE student starts from it and "
                             "regresses against clean context (default out: outputs/quickstart_causal); longlive: no "
                             "ODE stage, DMD starts from that causal teacher (default out: outputs/quickstart_longlive)")
    parser.add_argument("--task", choices=TASKS, default="t2v",
                        help="ti2v: an image-to-video student from the teacher of both tasks "
                             f"(checkpoints/miniature/{TI2V_TEACHER}), on first frames of its own text-to-video pairs, "
                             "judged from given first frames (default out: outputs/quickstart_ti2v); both: one "
                             "student for both tasks, judged on each (outputs/quickstart_both)")
    parser.add_argument("--seed", type=int, default=None,
                        help="the score-distillation stage's train.seed instead of the recipe's (default out gets "
                             "_seedN; the stages before it do not depend on it)")
    parser.add_argument("--short", action="store_true", help="a shortened run (tests): fewer prompts and steps")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a check of the report fails")
    parser.add_argument("--world", choices=tuple(WORLDS), default="bounded",
                        help="wrap: the world whose canvas wraps, where videos past the training length are judged in "
                             "full, with its teacher checkpoints/miniature/teacher_wrap (default out: outputs/quickstart_wrap)")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="teacher folder (config.json + weights) instead of the world's shipped teacher")
    parser.add_argument("--student_shift", type=float, default=None,
                        help="the student's step list warped by this shift instead of the recipe's flow.timestep_shift "
                             "(published 5), with the ODE pairs it regresses on kept on that list (ode.shift); the "
                             "causal chain's causal teacher and its training pairs keep the recipe's. Not the published "
                             "recipe: a lever on the seams at the miniature's size (docs/EXPERIMENTS.md); default out "
                             "gets _shiftS")
    parser.add_argument("--eval_clips", type=int, default=None,
                        help=f"evaluation clips judged (the 12 captions of the judge's set, each with further seeds "
                             f"past 12; default {EVAL_CLIPS}, --short {SHORT['num_eval']})")
    parser.add_argument("--pairs_per_caption", type=int, default=None,
                        help="ODE pairs per caption, each from its own noise seed (default: the world's, "
                             f"{ODE_PAIRS_PER_CAPTION})")
    parser.add_argument("--processes", type=int, default=None,
                        help="processes that sample the ODE pairs, one thread each (default: the CPU count, at most "
                             f"{MAX_PAIR_PROCESSES}; 1 on a CUDA machine); the pairs are the same for any count (each "
                             "prompt has its own seed)")
    args = parser.parse_args(argv)
    if args.processes is not None and args.processes < 1:
        raise UserError(f"--processes {args.processes}: expected at least 1")
    pairs_per_caption = ODE_PAIRS_PER_CAPTION[args.world] if args.pairs_per_caption is None else args.pairs_per_caption
    eval_clips = args.eval_clips if args.eval_clips is not None else SHORT["num_eval"] if args.short else EVAL_CLIPS
    if not 1 <= eval_clips <= MAX_CLIPS:
        raise UserError(f"--eval_clips {eval_clips}: expected 1 to {MAX_CLIPS} (the evaluation seeds start at "
                        f"{EVAL_FIRST_SEED}; more clips would reach the teacher's validation seeds)")
    if args.student_shift is not None and not args.student_shift > 0:
        raise UserError(f"--student_shift {args.student_shift}: expected a shift above 0 (1 leaves the step list as it is)")
    if args.seed is not None and args.seed < 0:
        raise UserError(f"--seed {args.seed}: expected a seed of 0 or more")
    if pairs_per_caption < 1:
        raise UserError(f"--pairs_per_caption {pairs_per_caption}: expected at least 1")
    images_task = args.task != "t2v"  # the student learns image-to-video (and with both, text-to-video too)
    if images_task and (args.chain != "self_forcing" or args.loss != "dmd"):
        raise UserError(f"--task {args.task} runs the published chain with DMD: leave out --chain {args.chain} and "
                        f"--loss {args.loss} (the causal chains and SiD are text-to-video here)")
    if images_task and args.world != "bounded" and args.teacher is None:
        raise UserError(f"--task {args.task} --world {args.world}: the image-to-video teacher is the bounded world's; "
                        "pass --teacher with a teacher of that world trained for both tasks")

    import torch

    # one-thread CPU processes by default; on a CUDA machine one process (a rank per process would need a GPU each)
    processes = args.processes or (1 if torch.cuda.is_available() else max(1, min(os.cpu_count() or 1, MAX_PAIR_PROCESSES)))

    from miniature.components import JUDGE_WORLDS
    from miniature.judge import eval_prompts
    from miniature.report import LONG_VIDEO_FACTOR, TeacherSampler, sample_teacher_videos, time_alternately, write_report
    from miniature.world import all_captions, world_named
    from utils.config import load_config

    world = world_named(args.world)
    default_out = "outputs/quickstart" + ("_wrap" if args.world == "wrap" else "") + CHAIN_OUT_SUFFIX[args.chain] + (
        f"_{args.task}" if images_task else "") + (
        f"_shift{args.student_shift:g}" if args.student_shift is not None else "") + (
        f"_seed{args.seed}" if args.seed is not None else "")
    out = (args.out or REPO_ROOT / default_out).resolve()
    # the bounded world's teacher is the recipes' own (checkpoints/miniature/teacher); another world names its folder
    teacher = args.teacher or (REPO_ROOT / "checkpoints" / "miniature" / TI2V_TEACHER if images_task else
                               None if args.world == "bounded" else
                               REPO_ROOT / "checkpoints" / "miniature" / TEACHER_FOLDERS[args.world])
    if teacher is not None and not (teacher / "config.json").is_file():
        raise UserError(f"teacher folder {teacher} has no config.json: expected a miniature teacher "
                        "(scripts/train_miniature_teacher.py writes one)")
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out, REPO_ROOT, fresh=args.fresh)
    short = SHORT if args.short else None
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    start = time.perf_counter()

    # 1. Prompts: every caption of the world for training, the judge's fixed set for evaluation.
    captions = [c.text for c in all_captions()]
    prompts = eval_prompts(num_clips=eval_clips)
    if [p[1] for p in prompts] != list(range(prompts[0][1], prompts[0][1] + len(prompts))):
        raise UserError("the evaluation seeds must be consecutive (inference.py gives prompt i the seed base + i)")
    atomic_write_text(out / "train_prompts.txt", "\n".join(captions) + "\n")
    atomic_write_text(out / "eval_prompts.txt", "\n".join(p for p, _ in prompts) + "\n")
    num_prompts = short["num_prompts"] if short else len(captions)
    # the ODE pairs' captions: the training captions, the whole list again for each further pair per caption
    # (generate_ode_pairs.py seeds each line by its index, so a repeat is another trajectory of its caption)
    atomic_write_text(out / "ode_prompts.txt", "\n".join(captions[:num_prompts] * pairs_per_caption) + "\n")
    num_pairs = num_prompts * pairs_per_caption
    teacher_over = ([f"real_score.checkpoint={teacher.resolve()}", f"generator.checkpoint={teacher.resolve()}"]
                    if teacher else [])
    judge_name = {world_name: judge for judge, world_name in JUDGE_WORLDS.items()}[args.world]
    # --student_shift: every stage that makes or trains the student, and the pairs it regresses on
    shift_over = ([f"flow.timestep_shift={args.student_shift}", f"ode.shift={args.student_shift}"]
                  if args.student_shift is not None else [])
    student_over = [*teacher_over, *shift_over]
    ode_over = [f"train.data_path={out / 'ode_pairs.lmdb'}", *teacher_over, *(short["ode"] if short else [])]
    if args.chain == "self_forcing":
        ode_over += shift_over  # the pairs the student regresses on
    loss_recipe = RECIPES[f"dmd_{args.task}" if images_task else args.loss]
    recipe_seed = load_config(REPO_ROOT / loss_recipe).train.seed  # --seed at the recipe's own: the recipe's run
    causal_teacher = out / "causal_teacher" / "latest"
    init_export = out / "ode_init" / "latest"
    # the weights score distillation starts from: the ODE-init student, or in the LongLive form the causal teacher
    start_weights = (causal_teacher if args.chain == "longlive" else init_export) / "generator.safetensors"
    frames = out / "first_frames"  # --task ti2v: the first frames of the teacher's text-to-video pairs
    distill_data = ([f"train.data_path={frames / 'captions.tsv'}", f"train.image_root={frames}"] if images_task
                    else [f"train.data_path={out / 'train_prompts.txt'}"])
    distill_over = [*student_over, *distill_data,
                    f"evaluation.prompts={out / 'eval_prompts.txt'}", f"evaluation.judge={judge_name}",
                    f"generator.checkpoint={start_weights}", *(short["distill"] if short else []),
                    *([f"train.seed={args.seed}"] if args.seed not in (None, recipe_seed) else []),
                    *(["evaluation.every=0"] if images_task else [])]  # (evaluation in training samples from text)

    # 2. ODE pairs from the teacher, packed into one LMDB.
    stages.run("ode_pairs", ["scripts/generate_ode_pairs.py", "--config_path", RECIPES["ode"], "--caption_path",
                             str(out / "ode_prompts.txt"), "--output_folder", str(out / "ode_pairs"),
                             "--num_prompts", str(num_pairs), *ode_over], outputs=[out / "ode_pairs"],
               processes=processes)
    stages.run("lmdb", ["scripts/create_lmdb.py", "--data_path", str(out / "ode_pairs"), "--lmdb_path",
                        str(out / "ode_pairs.lmdb")], outputs=[out / "ode_pairs.lmdb"])
    if images_task:
        # 2i. Image-to-video pairs: the teacher's first frames, then its pairs sampled from them, packed.
        stages.run("first_frames", ["scripts/first_frames.py", "--config_path", RECIPES["ode_ti2v"], "--data_path",
                                    str(out / "ode_pairs"), "--output_folder", str(frames), *teacher_over],
                   outputs=[frames])
        stages.run("ode_pairs_ti2v", ["scripts/generate_ode_pairs.py", "--config_path", RECIPES["ode_ti2v"],
                                      "--caption_path", str(frames / "captions.tsv"), "--output_folder",
                                      str(out / "ode_pairs_ti2v"), "--num_prompts", str(num_pairs), *ode_over,
                                      f"train.image_root={frames}"], outputs=[out / "ode_pairs_ti2v"],
                   processes=processes)
        # both: the text-to-video pairs packed beside them (each row trains as its own task)
        packed = [out / "ode_pairs_ti2v", *([out / "ode_pairs"] if args.task == "both" else [])]
        stages.run("lmdb_ti2v", ["scripts/create_lmdb.py", "--data_path", *map(str, packed), "--lmdb_path",
                                 str(out / "ode_pairs_ti2v.lmdb")], outputs=[out / "ode_pairs_ti2v.lmdb"])
        ode_over = [*ode_over, f"train.data_path={out / 'ode_pairs_ti2v.lmdb'}", f"train.image_root={frames}"]
    if args.chain != "self_forcing":
        # 2b. The teacher turned causal (teacher forcing on the pairs' clean videos).
        stages.run("causal_teacher", ["train.py", "--config_path", RECIPES["causal_teacher"], "--logdir",
                                      str(out / "causal_teacher"), "--disable-wandb", *ode_over,
                                      *(short["causal_teacher"] if short else [])], outputs=[out / "causal_teacher"])
    # the causal teacher as the recipe's teacher (and its generator, which the causal ODE stage starts from)
    causal_over = [*student_over, f"real_score.checkpoint={causal_teacher}", f"generator.checkpoint={causal_teacher}",
                   *(short["ode"] if short else [])]
    if args.chain == "causal_forcing":
        # 2c. Causal ODE init: the causal teacher makes the pairs again, block by block; ODE regression reads those.
        stages.run("ode_pairs_causal", ["scripts/generate_ode_pairs.py", "--config_path", RECIPES["ode_causal"],
                                        "--caption_path", str(out / "ode_prompts.txt"), "--output_folder",
                                        str(out / "ode_pairs_causal"), "--num_prompts", str(num_pairs),
                                        *causal_over], outputs=[out / "ode_pairs_causal"], processes=processes)
        stages.run("lmdb_causal", ["scripts/create_lmdb.py", "--data_path", str(out / "ode_pairs_causal"),
                                   "--lmdb_path", str(out / "ode_pairs_causal.lmdb")], outputs=[out / "ode_pairs_causal.lmdb"])
        # the causal chain's ODE stage (Causal Forcing): the student starts from the causal teacher's weights (the
        # recipe's teacher, whatever folder the run is in)
        ode_over = [*ode_over, *shift_over, f"train.data_path={out / 'ode_pairs_causal.lmdb'}",
                    f"generator.checkpoint={causal_teacher}", f"real_score.checkpoint={causal_teacher}"]
    # 3. ODE regression -> ode_init (not in the LongLive form); 4. score distillation on self-forcing rollouts.
    if args.chain != "longlive":
        ode_recipe = RECIPES["ode_causal" if args.chain == "causal_forcing" else "ode_ti2v" if images_task else "ode"]
        stages.run("ode_init", ["train.py", "--config_path", ode_recipe, "--logdir", str(out / "ode_init"),
                                "--disable-wandb", *ode_over], outputs=[out / "ode_init"])
    stages.run(args.loss, ["train.py", "--config_path", loss_recipe, "--logdir", str(out / args.loss),
                           "--disable-wandb", *distill_over], outputs=[out / args.loss])

    # 5. Judge: the teacher (many steps + CFG), the ODE-init student and the distilled student, in this run.
    print("[quickstart] judging the teacher, the student before distillation and the distilled student", flush=True)
    teacher_config = load_config(REPO_ROOT / RECIPES["ode"], teacher_over + (short["teacher"] if short else []))
    teacher_sampler = TeacherSampler(teacher_config, torch.device("cpu"))
    # --task ti2v: every clip starts from the first frame of the world's own clip for its caption and seed
    images = write_eval_images(out / "eval_images", prompts, world, teacher_config.video) if images_task else None
    videos, nfe, seconds = sample_teacher_videos(teacher_sampler, prompts, images.pixels if images else None)
    save_teacher_videos(out / "videos" / "teacher", videos, prompts, teacher_config.video.fps)
    from miniature.report import summarise
    from pipeline.components import build_vae
    from utils.geometry import resolve_recipe

    resolved = resolve_recipe(teacher_config, need_scores=True)
    student_geometry = resolved.geometry  # the teacher's clip is judged at the student's block boundaries
    results = {"teacher": summarise("teacher", videos, [p for p, _ in prompts], nfe, seconds, forward_calls=nfe,
                                    blocks=student_geometry.block_sizes, stride=student_geometry.vae_stride[0],
                                    world=world, images=images.pixels if images else None)}
    if args.chain != "self_forcing":
        # the causal teacher on the same prompts and seeds, block by block as it made its ODE pairs: the seams its
        # pairs hand on to the ODE-init student
        causal_sampler = TeacherSampler(load_config(REPO_ROOT / RECIPES["ode_causal"], [
            *causal_over, *(short["teacher"] if short else [])]), torch.device("cpu"))
        causal_videos, causal_nfe, causal_seconds = sample_teacher_videos(causal_sampler, prompts)
        save_teacher_videos(out / "videos" / "causal_teacher", causal_videos, prompts, teacher_config.video.fps)
        results["causal_teacher"] = summarise(
            "causal_teacher", causal_videos, [p for p, _ in prompts], causal_nfe, causal_seconds,
            forward_calls=[n * causal_sampler.calls_per_nfe for n in causal_nfe], blocks=student_geometry.block_sizes,
            stride=student_geometry.vae_stride[0], world=world)
    vae = build_vae(resolved.vae)
    if images:
        from miniature.report import vae_reconstruction_error

        results["vae_first_frame"] = vae_reconstruction_error(vae, images.pixels)
    start_videos = {}
    if args.chain != "longlive":
        init_recipe = RECIPES["ode_ti2v" if images_task else "ode"]  # the student's (a causal chain's too)
        results["ode_init"], init_videos = judge_student(out, "ode_init", init_recipe, init_export, prompts,
                                                         student_over, stages, vae, world, images)
        start_videos["ode_init"] = init_videos[0]
    # the distilled student as deployed: its EMA weights; the raw weights beside them, for comparison
    distilled_over = [*student_over, f"generator.checkpoint={start_weights}"]
    results[args.loss], distilled_videos = judge_student(
        out, args.loss, loss_recipe, out / args.loss / "latest", prompts, [*distilled_over, "--use_ema"], stages, vae,
        world, images)
    results[f"{args.loss}_no_ema"], _ = judge_student(
        out, f"{args.loss}_no_ema", loss_recipe, out / args.loss / "latest", prompts, distilled_over, stages, vae,
        world, images)
    if args.task == "both":
        # the same student from text alone, beside the teacher from text alone (same prompts and seeds)
        text_videos, text_nfe, text_seconds = sample_teacher_videos(teacher_sampler, prompts)
        results["teacher_t2v"] = summarise("teacher_t2v", text_videos, [p for p, _ in prompts], text_nfe, text_seconds,
                                           forward_calls=text_nfe, blocks=student_geometry.block_sizes,
                                           stride=student_geometry.vae_stride[0], world=world)
        results[f"{args.loss}_t2v"], _ = judge_student(out, f"{args.loss}_t2v", loss_recipe, out / args.loss / "latest",
                                                       prompts, [*distilled_over, "--use_ema"], stages, vae, world)
    # the speed check: the teacher and the deployed student timed back to back on every evaluation prompt
    student = student_pipeline(loss_recipe, out / args.loss / "latest", distilled_over, use_ema=True)
    first_frames = dict(zip(prompts, images.paths if images else [None] * len(prompts)))
    pixels = dict(zip(prompts, images.pixels if images else [None] * len(prompts)))
    results["speed"] = {"student": args.loss, **time_alternately(
        lambda prompt, seed: teacher_sampler(prompt, seed, pixels[prompt, seed])[2],
        lambda prompt, seed: student_seconds(student, prompt, seed, first_frames[prompt, seed]), prompts)}
    # every evaluation prompt again at 4x the length: per-segment adherence over 12 clips moves in steps of 1/12
    results["long_video"], long_videos = judge_long_video(out, args.loss, loss_recipe, out / args.loss / "latest", prompts,
                                             [*distilled_over, "--use_ema"], stages, vae, student_geometry, world, images)

    # 6. Pictures and the report.
    from miniature.pictures import frame_strips, segment_adherence, training_curves

    stage_logs = {name: out / name for name in ("causal_teacher", "ode_init") if name in CHAIN_STAGES[args.chain]}
    training_curves(out / "training_curves.png", {**stage_logs, args.loss: out / args.loss})
    frame_strips(out / "frames.png", {"teacher": videos[0], **start_videos, args.loss: distilled_videos[0]},
                 title=prompts[0][0])
    frame_strips(out / "long_video.png", {prompt[:24]: video for (prompt, _), video in zip(prompts[:4], long_videos)},
                 num_frames=15, title=f"{args.loss} student at {LONG_VIDEO_FACTOR}x its training length ({args.world} world)")
    segment_adherence(out / "long_video_segments.png", {args.loss: results["long_video"]}, teacher_config.video.fps,
                      title=f"{args.loss} student at {LONG_VIDEO_FACTOR}x its training length ({args.world} world)")
    settings = {"loss": args.loss, "chain": args.chain, "task": args.task,
                "seed": args.seed, "world": args.world, "short": args.short,
                "num_train_prompts": num_prompts, "ode_pairs_per_caption": pairs_per_caption, "num_eval": len(prompts),
                "student_shift": args.student_shift, "cpu_count": os.cpu_count(), "stages": stages.timings,
                "seconds_total": time.perf_counter() - start}
    name = "report" if args.loss == "dmd" else f"report_{args.loss}"  # a SiD run keeps the DMD report
    report = write_report(out, results, settings, name=name)
    print((out / f"{name}.md").read_text(), flush=True)
    print(f"[quickstart] report: {out / (name + '.json')} ({settings['seconds_total']:.0f} s)", flush=True)
    failed = [name for name, value in report["checks"].items() if not _all_true(value)]
    print(f"[quickstart] verdict: {'all checks pass' if not failed else 'checks not met: ' + ', '.join(failed)}", flush=True)
    return 1 if args.strict and failed else 0


class EvalImages:
    """The first frames image-to-video evaluation clips start from: PNG files (inference.py reads them) and their
    pixels [3, H, W] in [-1, 1] as read back (what every model was given)."""

    def __init__(self, paths: list[Path], pixels: list) -> None:
        self.paths, self.pixels = paths, pixels


def write_eval_images(folder: Path, prompts: list[tuple[str, int]], world, video) -> EvalImages:
    """For each evaluation (prompt, seed): the world's own clip's first frame as <folder>/<index>.png."""
    import imageio.v3 as iio

    from miniature.judge import given_image
    from utils.datasets import load_image
    from utils.io import atomic_write

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (prompt, seed) in enumerate(prompts):
        pixels = ((given_image(prompt, seed, world) + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0)
        path = folder / f"{index:03d}.png"
        atomic_write(path, lambda tmp, image=pixels.numpy(): iio.imwrite(tmp, image, extension=".png"))
        paths.append(path)
    return EvalImages(paths, [load_image(path, video.height, video.width) for path in paths])


def _all_true(value) -> bool:
    return all(_all_true(v) for v in value.values()) if isinstance(value, dict) else bool(value)


if __name__ == "__main__":
    sys.exit(main())
