"""The temporal report: seams at block boundaries, flicker and drift, on clips built to have them (or not)."""
from __future__ import annotations

import pytest
import torch

from utils.temporal import block_transitions, drift, flicker, reference_transitions, seam_ratio, temporal_report

BLOCKS = (3, 3, 3, 3)  # latent frames per block; 12 latent frames = 45 pixel frames at temporal stride 4
FRAMES = 45


def moving_square(frames=FRAMES, size=32, jump_after=(), jump=6, seed=0):
    """A bright square moving one pixel per frame over a textured background; optional jumps."""
    generator = torch.Generator().manual_seed(seed)
    background = 0.2 * torch.rand(3, size, size, generator=generator) - 0.5
    video, offset = [], 0
    for t in range(frames):
        frame = background.clone()
        x = (t + offset) % (size - 8)
        frame[:, 8:16, x:x + 8] = 0.8
        video.append(frame)
        if t in jump_after:
            offset += jump  # the next frame is displaced: a seam
    return torch.stack(video)


def test_block_transitions_map_latent_blocks_to_pixel_frames():
    assert block_transitions(BLOCKS) == [2, 5, 8]  # latents: after frames 2, 5, 8
    assert block_transitions(BLOCKS, temporal_stride=4) == [8, 20, 32]  # pixels: latent 2 ends at pixel 8
    assert block_transitions((1, 3, 3), temporal_stride=4) == [0, 12]
    # references: every other transition in latents; in pixels the other latent-frame boundaries (not 0 -> 1)
    assert reference_transitions(BLOCKS, 1, 11) == [0, 1, 3, 4, 6, 7, 9, 10]
    assert reference_transitions(BLOCKS, 4, 44) == [4, 12, 16, 24, 28, 36, 40]


def test_a_jump_at_every_block_boundary_gives_a_high_seam_ratio():
    seams = block_transitions(BLOCKS, temporal_stride=4)
    smooth = seam_ratio(moving_square(), BLOCKS, 4)
    jumpy = seam_ratio(moving_square(jump_after=seams), BLOCKS, 4)
    assert 0.7 < smooth < 1.3
    assert jumpy > 3 * smooth
    # a jump at another latent-frame boundary is not a seam: it raises the reference instead
    assert seam_ratio(moving_square(jump_after=[t + 4 for t in seams]), BLOCKS, 4) < 1.0


def test_seam_ratio_by_boundary_finds_the_boundary_that_jumps():
    seams = block_transitions(BLOCKS, temporal_stride=4)
    report = temporal_report(moving_square(jump_after=seams[:1]), BLOCKS, 4)
    first, *later = report["seam_ratio_by_boundary"]
    assert len(later) == len(seams) - 1 and first > 3 and all(0.7 < r < 1.3 for r in later)
    assert report["seam_ratio"] == pytest.approx((first + sum(later)) / len(seams))
    smooth = temporal_report(moving_square(), BLOCKS, 4)["seam_ratio_by_boundary"]
    assert len(smooth) == len(seams) and all(0.7 < r < 1.3 for r in smooth)


def test_changes_between_latent_frames_alone_are_not_seams():
    """A clip that changes only between latent frames (as a VAE decodes it) has seam ratio 1, not 4."""
    steps = torch.tensor([0] + [1 + (t - 1) // 4 for t in range(1, FRAMES)], dtype=torch.float32)
    video = steps.view(-1, 1, 1, 1).expand(-1, 3, 8, 8)
    assert seam_ratio(video, BLOCKS, 4) == pytest.approx(1.0, rel=1e-5)


def test_flicker_of_alternating_frames_is_high_and_of_steady_motion_low():
    a, b = torch.zeros(3, 16, 16), torch.ones(3, 16, 16)
    alternating = torch.stack([a if t % 2 else b for t in range(20)])
    assert flicker(alternating) == pytest.approx(1.0, abs=1e-4)
    ramp = torch.stack([torch.full((3, 16, 16), t / 20) for t in range(20)])
    assert flicker(ramp) < 1e-4
    assert flicker(moving_square()) < 0.6  # motion has some high-frequency energy, far less than alternation
    noise = torch.randn(400, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert flicker(noise) == pytest.approx(0.75, abs=0.03)


def test_drift_is_zero_for_a_stationary_clip_and_grows_for_a_fading_one():
    still = moving_square(frames=1).expand(84, -1, -1, -1)
    report = drift(still, segment_frames=21)
    assert len(report["segments"]) == 4 and report["max"] < 1e-6
    fading = torch.stack([moving_square(frames=1)[0] * (1 - t / 100) for t in range(84)])
    values = [s["drift"] for s in drift(fading, segment_frames=21)["segments"]]
    assert values[0] == 0 and all(later > earlier for earlier, later in zip(values, values[1:]))
    assert values[-1] > 10 * report["max"] + 1e-3


def test_the_report_holds_every_metric_and_works_on_latents():
    latents = torch.randn(12, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    report = temporal_report(latents, BLOCKS)
    assert set(report) == {"seam_ratio", "seam_ratio_by_boundary", "flicker", "frame_change", "drift"}
    assert len(report["seam_ratio_by_boundary"]) == len(BLOCKS) - 1
    assert report["drift"]["segment_frames"] == 6  # not longer than training: halves
    with pytest.raises(ValueError, match=r"\[T, C, H, W\]"):
        temporal_report(latents[0], BLOCKS)
