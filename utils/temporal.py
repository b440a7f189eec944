"""Temporal quality of a video, without learned parts: seams at block boundaries, flicker, and drift.

Works on pixels [T, 3, H, W] or latents [F, C, h, w] (float; any range, compared with itself).

- seam ratio: mean absolute change across the transitions between generation blocks, over the mean change
  of the same kind of transitions inside blocks. About 1 when the boundaries cannot be told apart; a visible
  jump at every boundary makes it large. In pixels the reference is the other latent-frame boundaries (a
  Wan VAE decodes each latent frame to 4 pixel frames, and changes between latent frames differ from
  changes within one, for any model), without the first (frame 0 is decoded alone). The seam ratio by
  boundary (the change across each boundary alone over the same reference; the seam ratio is their mean)
  tells one boundary that jumps, such as the first block's, from seams everywhere.
- flicker: high-frequency temporal energy, mean (x[t+1] - 2 x[t] + x[t-1])^2 over 4 x mean (x[t+1] - x[t])^2.
  0 for a still clip or steady motion, 1 for a clip alternating between two frames, 0.75 for white noise.
- drift: the clip cut into segments (of the training length, or halves when it is not longer); for each
  segment its per-channel means, contrast (standard deviation) and sharpness (mean absolute spatial
  gradient), and how far those moved from the first segment's (mean absolute difference).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

EPS = 1e-8


def block_transitions(block_sizes: Sequence[int], temporal_stride: int = 1) -> list[int]:
    """Indices t of the transitions t -> t+1 that cross a block boundary.

    `block_sizes`: latent frames per block. In pixels (temporal_stride > 1), latent frame 0 decodes to pixel
    frame 0 and latent frame k >= 1 to pixels stride*(k-1)+1 .. stride*k, so a block ending at latent frame
    e-1 ends at pixel frame stride*(e-1).
    """
    ends, total = [], 0
    for size in block_sizes[:-1]:
        total += size
        ends.append((total - 1) * temporal_stride if temporal_stride > 1 else total - 1)
    return ends


def reference_transitions(block_sizes: Sequence[int], temporal_stride: int, num_transitions: int) -> list[int]:
    """Transitions inside blocks to compare seams with: every one in latents, the latent-frame boundaries in pixels."""
    seams = set(block_transitions(block_sizes, temporal_stride))
    if temporal_stride > 1:
        candidates = range(temporal_stride, num_transitions, temporal_stride)  # latent k -> k+1 for k >= 1
    else:
        candidates = range(num_transitions)
    return [t for t in candidates if t not in seams]


def _frame_changes(video: Tensor) -> Tensor:
    """Mean absolute change of each transition t -> t+1: [T - 1] (frame by frame: no video-sized temporaries)."""
    return torch.stack([(video[t + 1].float() - video[t].float()).abs().mean() for t in range(len(video) - 1)]) \
        if len(video) > 1 else torch.zeros(0)


def seam_ratio(video: Tensor, block_sizes: Sequence[int], temporal_stride: int = 1) -> Optional[float]:
    """Mean change across block transitions / mean change of the reference transitions inside blocks (None
    without both kinds)."""
    return _seam_ratio(_frame_changes(video), block_sizes, temporal_stride)


def _seam_ratio(changes: Tensor, block_sizes: Sequence[int], temporal_stride: int) -> Optional[float]:
    by_boundary = _seam_ratio_by_boundary(changes, block_sizes, temporal_stride)
    return sum(by_boundary) / len(by_boundary) if by_boundary else None


def _seam_ratio_by_boundary(changes: Tensor, block_sizes: Sequence[int], temporal_stride: int) -> list[float]:
    """Change across each block boundary, in order, over the mean change of the reference transitions."""
    seams = [t for t in block_transitions(block_sizes, temporal_stride) if 0 <= t < len(changes)]
    inside = reference_transitions(block_sizes, temporal_stride, len(changes))
    if not seams or not inside:
        return []
    reference = changes[inside].mean() + EPS
    return [float(changes[t] / reference) for t in seams]


def flicker(video: Tensor) -> Optional[float]:
    """Second-difference over first-difference energy, in [0, 1] for alternating frames (None under 3 frames)."""
    if len(video) < 3:
        return None
    first = second = 0.0
    for t in range(1, len(video) - 1):
        previous, current, following = video[t - 1].float(), video[t].float(), video[t + 1].float()
        second += float((following - 2 * current + previous).pow(2).mean())
        first += float((current - previous).pow(2).mean())
    first += float((video[-1].float() - video[-2].float()).pow(2).mean())
    first, second = first / (len(video) - 1), second / (len(video) - 2)
    return second / (4 * first + EPS)


def segment_statistics(segment: Tensor) -> dict[str, object]:
    """Per-channel means, contrast and sharpness of a segment [t, C, H, W]."""
    dx = (segment[..., :, 1:] - segment[..., :, :-1]).abs().mean()
    dy = (segment[..., 1:, :] - segment[..., :-1, :]).abs().mean()
    return {
        "channel_means": [float(v) for v in segment.mean(dim=(0, 2, 3))],
        "contrast": float(segment.std()),
        "sharpness": float((dx + dy) / 2),
    }


def _statistics_vector(stats: dict) -> list[float]:
    return [*stats["channel_means"], stats["contrast"], stats["sharpness"]]


def drift(video: Tensor, segment_frames: Optional[int] = None) -> dict[str, object]:
    """Segments (of `segment_frames`, or halves when the clip is not longer), their statistics and drift."""
    frames = len(video)
    if segment_frames is None or segment_frames >= frames:
        segment_frames = max(1, math.ceil(frames / 2))
    segments = []
    first: Optional[list[float]] = None
    for start in range(0, frames, segment_frames):
        end = min(frames, start + segment_frames)
        if end - start < max(1, segment_frames // 2) and segments:
            break  # a short tail is not a segment of its own
        stats = segment_statistics(video[start:end].float())
        vector = _statistics_vector(stats)
        first = first or vector
        stats["drift"] = sum(abs(a - b) for a, b in zip(vector, first)) / len(vector)
        segments.append({"start": start, "end": end, **stats})
    return {"segment_frames": segment_frames, "segments": segments, "max": max(s["drift"] for s in segments)}


def temporal_report(video: Tensor, block_sizes: Sequence[int], temporal_stride: int = 1,
                    segment_frames: Optional[int] = None) -> dict[str, object]:
    """Seam ratio (overall and by boundary), flicker, mean frame change and drift of `video` ([T, C, H, W]);
    JSON-ready."""
    if video.dim() != 4:
        raise ValueError(f"temporal_report expects [T, C, H, W], got {tuple(video.shape)}")
    video = video.detach().cpu()
    changes = _frame_changes(video)
    return {
        "seam_ratio": _seam_ratio(changes, block_sizes, temporal_stride),
        "seam_ratio_by_boundary": _seam_ratio_by_boundary(changes, block_sizes, temporal_stride),
        "flicker": flicker(video),
        "frame_change": float(changes.mean()) if len(changes) else None,
        "drift": drift(video, segment_frames),
    }
