"""Where seams come from: a distilled student continuing the teacher's first block, against its own rollout.

    python scripts/probe_continuation.py --config_path configs/miniature/dmd.yaml \
        --checkpoint outputs/quickstart_wrap/dmd/latest --use_ema --world wrap [--num_prompts 12] \
        [--json_out probe.json] [key=value ...]

On the judge's evaluation prompts and seeds, three clips each:
  teacher            the teacher's clip (the recipe's `teacher:` sampling), judged at the student's block boundaries;
  student            the student's own causal rollout, as inference.py makes it;
  teacher block 0 +  the teacher's first block written into the student's KV cache (video extension), the
  student            student making the blocks after it from the same noise.
For each: seam ratio by block boundary (utils.temporal) and the miniature judge's adherence. If the seams come from a
poor first block (made without context), the third row's seams fall to the teacher's; if they rise, the student's
continuation departs from its context whatever made it.
The teacher is the recipe's real_score (the world's shipped teacher with --world, as in the quickstart).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from utils.errors import OneLineArgumentParser, UserError, run_main

REPO_ROOT = Path(__file__).resolve().parents[1]
ROWS = ("teacher", "student", "teacher block 0 + student")


def parse_args(argv: list[str] | None):
    from utils.config import parse_cli

    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_path", required=True, help="the recipe the student was distilled with")
    parser.add_argument("--checkpoint", required=True, help="trainer export folder (<logdir>/latest)")
    parser.add_argument("--use_ema", action="store_true", help="the EMA generator (as the quickstart judges it)")
    parser.add_argument("--world", choices=("bounded", "wrap"), default="bounded",
                        help="the miniature world judged, and whose shipped teacher is used")
    parser.add_argument("--num_prompts", type=int, default=12, help="evaluation prompts (1..12)")
    parser.add_argument("--json_out", default=None, help="write the figures here as JSON")
    return parse_cli(parser, argv)


def continue_teacher_block(pipe, config, geometry, teacher_latents, noise, context, seed: int):
    """The student's rollout given the teacher's first block; the fresh-noise RNG seeded as inference.py seeds it."""
    import torch

    from pipeline.rollout import BlockRollout

    rollout = BlockRollout(geometry, pipe.timesteps, config.rollout.context_noise)
    head = geometry.block_sizes[0]
    return rollout.run(pipe.generator, noise, context, given_blocks=teacher_latents[:, :head],
                       noise_generator=torch.Generator().manual_seed(seed)).latents


@run_main
def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    if not 1 <= args.num_prompts <= 12:
        raise UserError(f"--num_prompts {args.num_prompts}: expected 1..12 (the judge's evaluation set)")
    import torch

    from miniature.judge import eval_prompts, score_clip
    from miniature.report import TeacherSampler
    from miniature.world import TEACHER_FOLDERS, parse_caption, world_named
    from pipeline.causal_inference import CausalInferencePipeline
    from utils.config import load_config
    from utils.geometry import resolve_recipe
    from utils.tables import format_table
    from utils.temporal import temporal_report
    from wan.loading import recipe_for_checkpoint

    if args.world != "bounded":
        teacher = REPO_ROOT / "checkpoints" / "miniature" / TEACHER_FOLDERS[args.world]
        overrides = [f"real_score.checkpoint={teacher}", f"generator.checkpoint={teacher}", *overrides]
    config = recipe_for_checkpoint(load_config(args.config_path, overrides), args.checkpoint)
    resolved = resolve_recipe(config, need_scores=True)
    geometry, world = resolved.geometry, world_named(args.world)
    pipe = CausalInferencePipeline(config, resolved, "cpu", torch.float32, checkpoint=args.checkpoint,
                                   use_ema=args.use_ema)
    sampler = TeacherSampler(config, torch.device("cpu"))
    figures = {row: {"by_boundary": [], "adherence": []} for row in ROWS}
    for prompt, seed in eval_prompts()[: args.num_prompts]:
        with torch.no_grad():
            noise = torch.randn((1, *geometry.latent_shape[1:]), generator=torch.Generator().manual_seed(seed))
            teacher = sampler.latents(prompt, seed).latent
            own = pipe.generate(prompt, seed=seed).latents
            extended = continue_teacher_block(pipe, config, geometry, teacher, noise,
                                              pipe.text_encoder.encode([prompt]), seed)
            for row, latents in zip(ROWS, (teacher, own, extended)):
                video = pipe.vae.decode_to_pixel(latents)[0].float().clamp(-1, 1)
                report = temporal_report(video, geometry.block_sizes, geometry.vae_stride[0])
                figures[row]["by_boundary"].append(report["seam_ratio_by_boundary"])
                figures[row]["adherence"].append(score_clip(video, parse_caption(prompt), world)["total"])

    summary = {}
    for row, values in figures.items():
        by_boundary = [sum(column) / len(column) for column in zip(*values["by_boundary"])]
        summary[row] = {"seam_ratio": sum(by_boundary) / len(by_boundary), "seam_ratio_by_boundary": by_boundary,
                        "adherence": sum(values["adherence"]) / len(values["adherence"]),
                        "per_clip": {"seam_ratio_by_boundary": values["by_boundary"], "adherence": values["adherence"]}}
    print(format_table([(row, f"{s['seam_ratio']:.3f}", " / ".join(f"{x:.2f}" for x in s["seam_ratio_by_boundary"]),
                         f"{s['adherence']:.3f}") for row, s in summary.items()],
                       header=("clips", "seam ratio", "by boundary", "adherence")))
    if args.json_out:
        from utils.io import atomic_write_json

        atomic_write_json(Path(args.json_out), summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
