"""A judge with no learned parts: how well a clip shows what its miniature-world caption says.

Each score is in [0, 1] and saturates at 1 within a tolerance that a clean render, a render passed
through the miniature VAE, or mild generator noise stays inside. The total is the product of the
four parts: a clip adheres only if it gets every attribute right (a wrong colour scores ~0, not 0.75).
Shape (circle vs square) and speed are not scored: the miniature VAE keeps 4x4-pixel block means,
which blur the outline, and speed errors are mild compared with the attributes scored here.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from miniature.world import (
    BACKGROUND_COLOURS,
    DEFAULT_WORLD,
    DIRECTIONS,
    SHAPE_COLOURS,
    SPEED_ADVERBS,
    Caption,
    WorldSpec,
    all_captions,
    parse_caption,
    periodic_offset,
    render,
)

PALETTE = {**SHAPE_COLOURS, **BACKGROUND_COLOURS}
# Palette colours are >= 2.0 apart, so a colour within 1.0 of one palette entry is near no other.
MATCH_RADIUS = 1.0
# Colour distances below this count as noise around the background.
NOISE_DISTANCE = 0.4
# A frame "has the shape" when its weighted area is at least this fraction of the true area.
MIN_AREA_FRACTION = 0.3


def _ramp(value: torch.Tensor | float, full: float, zero: float) -> float:
    """1 at or beyond `full`, 0 at or beyond `zero`, linear in between (either direction)."""
    value = float(value)
    if math.isnan(value):
        return 0.0
    return min(1.0, max(0.0, (value - zero) / (full - zero)))


def _colour_distance(pixels: torch.Tensor, colour: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Euclidean RGB distance of pixels [..., 3] from one colour."""
    return (pixels - torch.as_tensor(colour, dtype=pixels.dtype)).norm(dim=-1)


def _centroid_track(weight: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, wrap: bool) -> torch.Tensor:
    """The weighted centroid (x, y) of every frame [T, 2] of weights [T, H, W].

    On a wrapping canvas each axis is a circle and the centroid is the circular mean (exact for a symmetric shape
    cut by the border), in [0, size).
    """
    if not wrap:
        area = weight.sum(dim=(1, 2)).clamp_min(1e-6)
        return torch.stack([(weight * xs).sum(dim=(1, 2)) / area, (weight * ys).sum(dim=(1, 2)) / area], dim=-1)
    axes = []
    for coords, size in ((xs, xs.shape[-1]), (ys, ys.shape[-2])):
        angle = coords * (2 * math.pi / size)
        mean = torch.atan2((weight * angle.sin()).sum(dim=(1, 2)), (weight * angle.cos()).sum(dim=(1, 2)))
        axes.append(torch.remainder(mean * (size / (2 * math.pi)), size))
    return torch.stack(axes, dim=-1)


def _unwrap(track: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """A track [N, 2] on a wrapping canvas made continuous (each step the shorter way round the torus), so a
    shape crossing the border moves on instead of jumping back."""
    steps = torch.stack([periodic_offset(track[1:, 0] - track[:-1, 0], width),
                         periodic_offset(track[1:, 1] - track[:-1, 1], height)], dim=-1)
    return torch.cat([track[:1], track[:1] + steps.cumsum(0)])


def _expected_area(caption: Caption, spec: WorldSpec) -> float:
    side = spec.shape_size
    return side * side * (math.pi / 4 if caption.shape == "circle" else 1.0)


def score_clip(video: torch.Tensor, caption: Caption, spec: WorldSpec = DEFAULT_WORLD) -> dict[str, float]:
    """Scores {background, shape_colour, direction, steadiness, total} of a clip [T, 3, H, W] in [-1, 1]."""
    if video.ndim != 4 or video.shape[1] != 3:
        raise ValueError(f"score_clip expects a clip [T, 3, H, W], got {tuple(video.shape)}")
    pixels = video.detach().float().clamp(-1, 1).permute(0, 2, 3, 1)  # [T, H, W, 3]
    num_frames, height, width, _ = pixels.shape

    # 1. Background: the per-channel median is the dominant colour (the shape covers < 15% of a frame).
    background_rgb = pixels.reshape(-1, 3).median(dim=0).values
    background = _ramp(_colour_distance(background_rgb, BACKGROUND_COLOURS[caption.background]), 0.3, MATCH_RADIUS)

    # 2. Shape colour: pixels clearly off the background vote for the palette colour they are near.
    off_background = _colour_distance(pixels, background_rgb)  # [T, H, W]
    candidates = pixels[off_background > MATCH_RADIUS]
    names = list(PALETTE)
    distances = torch.stack([_colour_distance(candidates, PALETTE[n]) for n in names], dim=-1)  # [N, palette]
    nearest_distance, nearest = distances.min(dim=-1)
    votes = nearest[nearest_distance < MATCH_RADIUS]
    total_votes = votes.numel()
    correct_votes = int((votes == names.index(caption.colour)).sum())
    area = _expected_area(caption, spec)
    presence = _ramp(total_votes / num_frames, MIN_AREA_FRACTION * area, 0.0)
    shape_colour = presence * (correct_votes / total_votes if total_votes else 0.0)

    # 3. Direction: least-squares velocity of the shape's centroid track. A pixel's weight is its
    # coverage by the shape (linear in the blend of shape and background colour), so the weighted
    # area stays constant under anti-aliasing and block averaging; faint noise is ignored.
    shape_rgb = torch.as_tensor(PALETTE[names[int(votes.mode().values)]] if total_votes else PALETTE[caption.colour])
    contrast = float(_colour_distance(shape_rgb, background_rgb)) if total_votes else 2.0
    weight = (off_background / max(contrast, MATCH_RADIUS)).clamp(0, 1) * (off_background > NOISE_DISTANCE)  # [T, H, W]
    frame_area = weight.sum(dim=(1, 2))
    ys = torch.arange(height, dtype=torch.float32).view(1, -1, 1) + 0.5
    xs = torch.arange(width, dtype=torch.float32).view(1, 1, -1) + 0.5
    track = _centroid_track(weight, xs, ys, spec.wrap)  # [T, 2]: x, y
    visible = frame_area >= MIN_AREA_FRACTION * area
    if int(visible.sum()) < max(2, num_frames // 2):
        return {"background": background, "shape_colour": shape_colour, "direction": 0.0, "steadiness": 0.0, "total": 0.0}
    times = torch.arange(num_frames, dtype=torch.float32)[visible]
    centred_times = times - times.mean()
    visible_track = _unwrap(track[visible], width, height) if spec.wrap else track[visible]
    velocity = (centred_times[:, None] * (visible_track - visible_track.mean(dim=0))).sum(0) / centred_times.pow(2).sum()
    unit = torch.tensor(DIRECTIONS[caption.direction])
    along = float(velocity @ unit)
    across = float(velocity[0] * unit[1] - velocity[1] * unit[0])
    alignment = max(0.0, along) / max(math.hypot(along, across), 1e-6)
    moving = _ramp(along, 0.5 * spec.slow_speed, 0.0)
    direction = alignment * moving

    # 4. Steadiness: the shape in every frame with a stable area, a smooth track (no jumps between
    # frames), a uniform background.
    persistence = _ramp(float(visible.float().mean()), 0.95, 0.5)
    areas = frame_area[visible]
    area_change = float((areas[1:] - areas[:-1]).abs().mean() / areas.mean())
    steps = visible_track[1:] - visible_track[:-1]
    gaps = (times[1:] - times[:-1]).unsqueeze(-1)
    jitter = float((steps - velocity * gaps).norm(dim=-1).div(gaps.squeeze(-1)).mean())
    offset_x, offset_y = xs - track[:, 0].view(-1, 1, 1), ys - track[:, 1].view(-1, 1, 1)
    if spec.wrap:
        offset_x, offset_y = periodic_offset(offset_x, width), periodic_offset(offset_y, height)
    distance_to_shape = (offset_x**2 + offset_y**2).sqrt()
    far_from_shape = distance_to_shape > spec.shape_size / 2 + 4.0  # beyond the shape and one VAE block
    far_from_shape &= visible.view(-1, 1, 1)
    clean = ((off_background[far_from_shape] - 0.3) / 0.7).clamp(0, 1)
    uniformity = 1.0 - float(clean.mean()) if clean.numel() else 0.0
    steadiness = persistence * _ramp(area_change, 0.05, 0.3) * _ramp(jitter, 0.25, 1.0) * _ramp(uniformity, 0.98, 0.8)

    total = background * shape_colour * direction * steadiness
    return {
        "background": background,
        "shape_colour": shape_colour,
        "direction": direction,
        "steadiness": steadiness,
        "total": total,
    }


def adherence(
    videos: Sequence[torch.Tensor] | torch.Tensor, captions: Sequence[Caption], spec: WorldSpec = DEFAULT_WORLD
) -> float:
    """Mean total score of clips [N, T, 3, H, W] against their captions."""
    if len(videos) != len(captions):
        raise ValueError(f"adherence got {len(videos)} videos for {len(captions)} captions")
    return sum(score_clip(v, c, spec)["total"] for v, c in zip(videos, captions)) / len(captions)


# Seeds of the reported evaluation set; the teacher's training script selects checkpoints on other seeds.
EVAL_FIRST_SEED = 1000
# The teacher's checkpoints are selected on the same captions with these seeds (scripts/train_miniature_teacher.py);
# each set may hold up to MAX_CLIPS clips before its seeds would run into the next set's.
VALIDATION_FIRST_SEEDS = (2000, 3000)
MAX_CLIPS = 1000


def eval_prompts(first_seed: int = EVAL_FIRST_SEED, num_clips: int = 12) -> list[tuple[str, int]]:
    """The fixed evaluation set: 12 (caption text, seed) pairs covering every colour, shape, direction and speed.

    Another `first_seed` gives the same captions with other noise (the teacher's validation set). `num_clips`
    over 12 repeats the 12 captions in order, clip i seeded first_seed + i, so the first 12 clips are the set
    itself: more clips per caption narrow the means that a clip's own noise moves (a seam ratio of 12 clips
    has a standard error near 0.08).
    """
    if not 1 <= num_clips <= MAX_CLIPS:
        raise ValueError(f"eval_prompts: num_clips {num_clips}, expected 1 to {MAX_CLIPS} (more would reach the seeds "
                         "of the next set)")
    shapes, colours = list(dict.fromkeys(c.shape for c in all_captions())), list(SHAPE_COLOURS)
    directions, backgrounds, speeds = list(DIRECTIONS), list(BACKGROUND_COLOURS), list(SPEED_ADVERBS)
    prompts = []
    for i in range(12):
        caption = Caption(
            shape=shapes[(i + i // 4) % 2],
            colour=colours[i % 4],
            direction=directions[(i + i // 4) % 4],
            speed=speeds[(i // 2) % 2],
            background=backgrounds[(3 * i + i // 4 + 1) % 4],
        )
        prompts.append(caption.text)
    return [(prompts[i % len(prompts)], first_seed + i) for i in range(num_clips)]


def given_image(prompt: str, seed: int, spec: WorldSpec = DEFAULT_WORLD) -> torch.Tensor:
    """The first frame an image-to-video clip (prompt, seed) starts from [3, H, W]: the world's own clip's first
    frame, so the judge knows the motion that follows from it."""
    return render(parse_caption(prompt), seed, spec, num_frames=1)[0]
