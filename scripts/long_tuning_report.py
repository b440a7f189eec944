"""What long tuning buys in the miniature: long-tune a quickstart's DMD student and judge long videos with and without.

    python scripts/long_tuning_report.py --quickstart outputs/quickstart_wrap [--seeds 0 1 2] [--factors 4 8 16]
        [--eval_clips 12] [--steps N] [--switch_to continuations|any] [--switch_share S] [--tune_only]

From a finished quickstart folder (python scripts/quickstart.py --world wrap: the world whose canvas wraps, so every
segment of a long video has a true motion to judge), it long-tunes the DMD student's EMA export with
configs/miniature/long_tuning.yaml once per seed (stages reused when run again), then judges the DMD student and each
tuned one at every factor x the training length, per training-length segment (adherence of the first and last
segment, seam ratio, flicker, drift), and after a prompt switch (the segment after it against the new caption, beside
the teacher's adherence to that caption). Writes long_tuning.json, long_tuning.md and long_tuning_segments.png there.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from utils.errors import OneLineArgumentParser, UserError, run_main
from utils.io import atomic_write_text

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE = "configs/miniature/long_tuning.yaml"


def student(recipe: str, checkpoint: Path, overrides: list[str]):
    """The student as inference.py loads it (EMA weights of a trainer export), in this process, on the CPU."""
    import torch

    from pipeline.causal_inference import CausalInferencePipeline
    from utils.config import load_config
    from utils.geometry import resolve_recipe
    from wan.loading import recipe_for_checkpoint

    config = recipe_for_checkpoint(load_config(REPO_ROOT / recipe, overrides), checkpoint)
    resolved = resolve_recipe(config, need_scores=False, check_weights=False)
    return CausalInferencePipeline(config, resolved, "cpu", torch.float32, checkpoint=checkpoint, use_ema=True)


def times(value: float, reference: float) -> str:
    return f"{value / reference:.2f}x" if reference else "-"


def table(results: dict, teacher: dict) -> list[str]:
    lines = []
    if any(rows["lengths"] for rows in results.values()):
        lines += ["| model | length | first segment | last segment (+- se) | last / first | seam ratio (x teacher) | "
                  "flicker | last drift |", "|---|---|---|---|---|---|---|---|"]
        for name, rows in results.items():
            for length, row in rows["lengths"].items():
                lines.append(f"| {name} | {length} | {row['first_adherence']:.3f} | {row['last_adherence']:.3f} +- "
                             f"{row['last_adherence_se']:.3f} | {row['adherence_ratio']:.3f} | {row['seam_ratio']:.3f} "
                             f"({times(row['seam_ratio'], teacher['seam_ratio'])}) | {row['flicker']:.3f} | "
                             f"{row['last_drift']:.3f} |")
        lines.append("")
    lines += ["After a prompt switch (the segment after it, judged against the new caption; teacher: "
              f"{teacher['switch_adherence']:.3f} +- {teacher['switch_adherence_se']:.3f} on those captions):", "",
              "| model | adherence after the switch | x teacher | the new caption from the start (no switch) |",
              "|---|---|---|---|"]
    for name, rows in results.items():
        switch = rows["switch"]
        lines.append(f"| {name} | {switch['adherence_after_switch']:.3f} +- {switch['adherence_after_switch_se']:.3f} | "
                     f"{times(switch['adherence_after_switch'], teacher['switch_adherence'])} | "
                     f"{switch['adherence_from_start']:.3f} +- {switch['adherence_from_start_se']:.3f} |")
    return lines


@run_main
def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quickstart", type=Path, required=True, help="a finished quickstart folder (its dmd/ export)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="long-tuning runs, one per seed")
    parser.add_argument("--factors", type=int, nargs="*", default=[4, 8, 16],
                        help="video lengths, x the training length (none: judge the prompt switch only)")
    parser.add_argument("--eval_clips", type=int, default=12, help="evaluation clips (the judge's set)")
    parser.add_argument("--steps", type=int, default=None, help="long-tuning iterations (default: the recipe's)")
    parser.add_argument("--switch_to", choices=("continuations", "any"), default="continuations",
                        help="where the tuning's prompt switches go: continuations (as LongLive's data: the same scene, "
                             "the shape turning to another direction; switch_prompts.txt) or any other training prompt")
    parser.add_argument("--switch_share", type=float, default=None,
                        help="share of the longer rollouts that switch prompt (default: the recipe's)")
    parser.add_argument("--tune_only", action="store_true",
                        help="only the long-tuning runs (several seeds in parallel processes); judge in a later call")
    args = parser.parse_args(argv)
    out = args.quickstart.resolve()
    dmd = out / "dmd" / "latest"
    if not (dmd / "generator_ema.safetensors").is_file() or not (out / "dmd" / "config.yaml").is_file():
        raise UserError(f"--quickstart {out} has no finished DMD student (dmd/latest/generator_ema.safetensors): run "
                        "python scripts/quickstart.py --world wrap first")
    if any(f < 1 for f in args.factors) or args.eval_clips < 1:
        raise UserError("--factors and --eval_clips: expected positive numbers")
    from miniature.components import JUDGE_WORLDS
    from utils.config import load_config

    world_name = JUDGE_WORLDS[load_config(out / "dmd" / "config.yaml").evaluation.judge]  # the world DMD was judged in
    if world_name != "wrap":
        raise UserError(f"--quickstart {out} is a run of the {world_name} world, where the shape leaves the canvas after "
                        "the training length, so longer videos cannot be judged in full: run python scripts/quickstart.py "
                        "--world wrap and pass its folder")

    import torch

    from miniature.judge import eval_prompts
    from miniature.long_videos import judge_long_student, teacher_adherence
    from miniature.pictures import segment_adherence
    from miniature.report import TeacherSampler
    from miniature.stages import Stages
    from miniature.world import TEACHER_FOLDERS, world_named

    torch.set_num_threads(1)
    start = time.perf_counter()
    world = world_named(world_name)
    # the world's teacher, as the quickstart used it (the bounded world's is the recipes' own)
    folder = REPO_ROOT / "checkpoints" / "miniature" / TEACHER_FOLDERS.get(world_name, "teacher")
    teacher_over = [f"real_score.checkpoint={folder}", f"generator.checkpoint={folder}"]
    fps = float(load_config(REPO_ROOT / "configs/miniature/ode.yaml").video.fps)
    stages = Stages(out, REPO_ROOT)
    prompts = eval_prompts(num_clips=args.eval_clips)
    # the real score (and the critic's start) is the world's teacher; the generator starts from the DMD export
    switches = []
    if args.switch_to == "continuations":
        from miniature.long_videos import continuation_lines
        from utils.datasets import read_text_lines

        atomic_write_text(out / "switch_prompts.txt",
                          "\n".join(continuation_lines(read_text_lines(out / "train_prompts.txt", "prompt"))) + "\n")
        switches = [f"distill.switch_prompts={out / 'switch_prompts.txt'}"]
    common = [f"real_score.checkpoint={folder}", f"train.data_path={out / 'train_prompts.txt'}", *switches,
              *([f"train.max_steps={args.steps}"] if args.steps else []),
              *([f"distill.prompt_switch_share={args.switch_share}"] if args.switch_share is not None else [])]
    # 1. Long tuning from the DMD student's EMA weights, one run per seed.
    for seed in args.seeds:
        stages.run(f"long_tuning_s{seed}", ["train.py", "--config_path", RECIPE, "--logdir", str(out / f"long_tuning_s{seed}"),
                                             "--disable-wandb", f"generator.checkpoint={dmd / 'generator_ema.safetensors'}",
                                             f"train.seed={seed}", *common], outputs=[out / f"long_tuning_s{seed}"])
    if args.tune_only:
        return 0
    if not (out / "report.json").is_file():
        raise UserError(f"--quickstart {out} has no report.json yet (the teacher's seam ratio): let the quickstart finish")
    report = json.loads((out / "report.json").read_text())
    # 2. Every student at every length, and after a switch; the teacher on the switched-to captions.
    results = {"dmd": judge_long_student(student("configs/miniature/dmd.yaml", dmd, teacher_over[:1]), prompts,
                                         args.factors, world)}
    for seed in args.seeds:
        tuned = student(RECIPE, out / f"long_tuning_s{seed}" / "latest", teacher_over[:1])
        results[f"long_tuned_s{seed}"] = judge_long_student(tuned, prompts, args.factors, world)
    sampler = TeacherSampler(load_config(REPO_ROOT / "configs/miniature/ode.yaml", teacher_over), torch.device("cpu"))
    switched = teacher_adherence(sampler, prompts, world)
    teacher = {"seam_ratio": report["teacher"]["seam_ratio"], "switch_adherence": switched["adherence"],
               "switch_adherence_se": switched["adherence_se"]}
    # 3. The report.
    document = {"world": world_name, "factors": args.factors, "seeds": args.seeds, "eval_clips": args.eval_clips,
                "switch_to": args.switch_to,
                "teacher": teacher, "students": results, "seconds": time.perf_counter() - start}
    atomic_write_text(out / "long_tuning.json", json.dumps(document, indent=2) + "\n")
    lines = [f"# Long tuning in the {world_name} world ({args.eval_clips} clips per row)", "",
             f"Teacher seam ratio (training length): {teacher['seam_ratio']:.3f}", "", *table(results, teacher)]
    if args.factors:
        longest = f"{max(args.factors)}x"
        segment_adherence(out / "long_tuning_segments.png",
                          {name: rows["lengths"][longest] for name, rows in results.items()}, fps,
                          title=f"students at {longest} its training length ({world_name} world)")
        lines += ["", "Picture: long_tuning_segments.png (adherence per segment at the longest length)."]
    atomic_write_text(out / "long_tuning.md", "\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
