"""Live judging of a stream (service.segments): whole training-length segments scored as their last block arrives,
each against the prompt it was made under, exactly as the report judges a long video."""
from __future__ import annotations

import pytest
import torch

from miniature.components import WorldJudge
from miniature.report import long_video_summary
from miniature.world import WORLDS, parse_caption, render
from service.segments import SegmentJudge

WRAP = WORLDS["wrap"]
CAPTION = "a red circle moving left slowly on a black background"
OTHER = "a green square moving up quickly on a white background"


def blocks_of(clip: torch.Tensor, first: int = 9, size: int = 12):
    """The frames as a stream hands them out: a first block, then blocks of `size` (the miniature's 9 + 12 k)."""
    yield clip[:first]
    for start in range(first, clip.shape[0], size):
        yield clip[start:start + size]


def test_segments_are_the_reports_segments_judged_as_they_complete():
    clip = render(parse_caption(CAPTION), 3, WRAP, num_frames=4 * WRAP.num_frames + 9)  # 141 frames
    live = SegmentJudge(WorldJudge("wrap"), WRAP.num_frames)
    events, completed_at = [], []
    for index, block in enumerate(blocks_of(clip)):
        new = live.add(block, CAPTION)
        events += new
        completed_at += [index] * len(new)
    report = long_video_summary("clip", [clip], [CAPTION], WRAP.num_frames, WRAP)["segments"]
    assert [e["start_frame"] for e in events] == [s["start"] for s in report] == [0, 33, 66, 99]
    assert [e["adherence"] for e in events] == pytest.approx([s["adherence"] for s in report], abs=1e-6)
    assert min(e["adherence"] for e in events) > 0.9 and [e["index"] for e in events] == [0, 1, 2, 3]
    # each is announced by the block holding its last frame (33 = 9 + 12 + 12: the third block, index 2)
    assert completed_at == [2, 5, 8, 11]  # ends 33, 66, 99, 132 fall in blocks ending 33, 69, 105, 141


def test_a_segment_is_judged_against_the_prompt_it_was_made_under():
    clip = render(parse_caption(CAPTION), 3, WRAP, num_frames=2 * WRAP.num_frames)
    live = SegmentJudge(WorldJudge("wrap"), WRAP.num_frames)
    events = []
    for index, block in enumerate(blocks_of(clip)):
        events += live.add(block, CAPTION if index < 3 else OTHER)  # a switch after the first segment
    assert [e["prompt"] for e in events] == [CAPTION, OTHER]
    assert events[0]["adherence"] > 0.9 and events[1]["adherence"] < 0.5  # the clip goes on with the old caption
    unreadable = SegmentJudge(WorldJudge("wrap"), WRAP.num_frames).add(clip[:33], "a cat playing piano")
    assert unreadable[0]["adherence"] is None


def test_the_bounded_world_judges_only_the_first_segment_as_the_report_does():
    """Past the training length the bounded world's shape has left the canvas: no true trajectory, no score."""
    bounded = WORLDS["bounded"]
    clip = render(parse_caption(CAPTION), 3, bounded, num_frames=2 * bounded.num_frames)
    live = SegmentJudge(WorldJudge("bounded"), bounded.num_frames)
    events = [event for block in blocks_of(clip) for event in live.add(block, CAPTION)]
    assert len(events) == 2 and events[0]["adherence"] > 0.9 and events[1]["adherence"] is None
    assert long_video_summary("clip", [clip], [CAPTION], bounded.num_frames, bounded)["judged"] == ["appearance"]
