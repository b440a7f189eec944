"""Long videos of the miniature's students, judged per training-length segment: at several multiples of the training
length, and after a prompt switch (issue 36: what long tuning buys)."""
from __future__ import annotations

from typing import Sequence

import torch

from miniature.report import long_video_summary, standard_error, temporal_means
from miniature.world import DIRECTIONS, WorldSpec, parse_caption


def continuation_lines(captions: Sequence[str]) -> list[str]:
    """`caption<TAB>next caption` lines for long tuning's switches (distill.switch_prompts), written as LongLive's
    continuations are: the same scene goes on and the action changes (the shape turns to each other direction; the
    evaluation's switch, the motion turned round, is one of them)."""
    lines = []
    for text in captions:
        direction = parse_caption(text).direction
        lines += [f"{text}\t{moving(text, other)}" for other in DIRECTIONS if other != direction]
    return lines


def switch_caption(text: str) -> str:
    """The caption a switch moves to: the same scene, the motion turned round (left <-> right, up <-> down)."""
    turned = {"left": "right", "right": "left", "up": "down", "down": "up"}
    return moving(text, turned[parse_caption(text).direction])


def moving(text: str, direction: str) -> str:
    """The caption with its shape moving in `direction` instead, the rest of its scene kept."""
    return text.replace(f"moving {parse_caption(text).direction}", f"moving {direction}")


def length_rows(pipe, prompts: Sequence[tuple[str, int]], factors: Sequence[int], world: WorldSpec) -> dict:
    """For each factor: the student's clips of factor x its training length, judged per segment (adherence of the
    first and last segment, their ratio, seam ratio at its block boundaries, flicker, drift of the last segment)."""
    from utils.geometry import pixel_frames_for

    geometry = pipe.resolved.geometry
    segment = geometry.num_pixel_frames
    rows = {}
    for factor in factors:
        frames = pixel_frames_for(factor * geometry.num_latent_frames, geometry.vae_stride[0])
        results = [pipe.generate(prompt, seed=seed, num_output_frames=frames) for prompt, seed in prompts]
        videos = [r.video for r in results]
        summary = long_video_summary(f"{factor}x", videos, [p for p, _ in prompts], segment, world)
        seams = temporal_means(videos, results[0].geometry.block_sizes, geometry.vae_stride[0])
        per_clip_last = [long_video_summary("", [v], [p], segment, world)["segments"][-1]["adherence"]
                         for v, (p, _) in zip(videos, prompts)]
        rows[f"{factor}x"] = {
            "num_frames": frames, "segment_frames": segment, "segments": summary["segments"], "judged": summary["judged"],
            "first_adherence": summary["segments"][0]["adherence"], "last_adherence": summary["segments"][-1]["adherence"],
            "last_adherence_se": standard_error(per_clip_last), "adherence_ratio": summary["adherence_ratio"],
            "seam_ratio": seams["seam_ratio"], "seam_ratio_se": seams["seam_ratio_se"], "flicker": seams["flicker"],
            "last_drift": summary["drift_per_segment"][-1],
        }
    return rows


def switch_rows(pipe, prompts: Sequence[tuple[str, int]], world: WorldSpec) -> dict:
    """Each clip made 2x the training length, its caption switched (with a recache) where the second segment starts:
    the adherence of that segment to the new caption, beside the student's own clip of the new caption from the start
    (same seed): what the switch costs over making that caption at all."""
    from miniature.judge import score_clip
    from utils.geometry import pixel_frames_for

    geometry = pipe.resolved.geometry
    segment, latent = geometry.num_pixel_frames, geometry.num_latent_frames
    frames = pixel_frames_for(2 * latent, geometry.vae_stride[0])
    switch_block = len(geometry.block_sizes)  # the block where the second training-length window starts
    scores, fresh = [], []
    for prompt, seed in prompts:
        after = switch_caption(prompt)
        result = pipe.generate(prompt, seed=seed, num_output_frames=frames,
                               prompt_switch=lambda index, after=after: (after, True) if index == switch_block else None)
        start = segment  # the pixel frames of the second segment
        scores.append(float(score_clip(result.video[start:start + segment], parse_caption(after), world)["total"]))
        made = pipe.generate(after, seed=seed, num_output_frames=segment).video
        fresh.append(float(score_clip(made, parse_caption(after), world)["total"]))
    return {"adherence_after_switch": sum(scores) / len(scores), "adherence_after_switch_se": standard_error(scores),
            "adherence_from_start": sum(fresh) / len(fresh), "adherence_from_start_se": standard_error(fresh),
            "num_clips": len(scores)}


def teacher_adherence(sampler, prompts: Sequence[tuple[str, int]], world: WorldSpec) -> dict:
    """The teacher's adherence to the switched-to captions, on the same seeds: what a switch is held to."""
    from miniature.judge import score_clip

    scores = []
    for prompt, seed in prompts:
        after = switch_caption(prompt)
        video, _, _ = sampler(after, seed)
        scores.append(float(score_clip(video, parse_caption(after), world)["total"]))
    return {"adherence": sum(scores) / len(scores), "adherence_se": standard_error(scores)}


@torch.no_grad()
def judge_long_student(pipe, prompts, factors, world) -> dict:
    """Rows at each factor x the training length (none: no long videos) and after a prompt switch."""
    return {"lengths": length_rows(pipe, prompts, factors, world), "switch": switch_rows(pipe, prompts, world)}
