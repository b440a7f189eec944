"""Live judging of a stream: each training-length segment of decoded frames is scored by a registered judge (the
miniature's) as soon as its last frame is decoded, so the page can draw adherence over time while a long video plays.

Segments are the report's (miniature.report.long_video_summary): consecutive windows of the training length's pixel
frames from frame 0; frames after the last whole window are not judged. A segment is judged against the prompt in
effect when its last block was made (after a prompt switch: the new prompt), and not judged (adherence None) when
the judge cannot read that prompt, or when its world has no true trajectory there (a judge's optional
`judges_segment(index)`: the bounded miniature world's shape leaves the canvas after the first segment).
"""
from __future__ import annotations

from typing import Optional

import torch

from utils.errors import UserError


class SegmentJudge:
    """Collects a stream's decoded frames and scores every whole segment of `segment_frames` frames."""

    def __init__(self, judge, segment_frames: int) -> None:
        if segment_frames < 1:
            raise ValueError(f"segment_frames must be at least 1, got {segment_frames}")
        self.judge, self.segment_frames = judge, segment_frames
        self._pending: list[torch.Tensor] = []  # frames of the segment being filled, [f, 3, H, W] in [-1, 1]
        self._pending_frames = 0
        self._segments = 0

    def add(self, frames: torch.Tensor, prompt: str) -> list[dict]:
        """Frames [f, 3, H, W] in [-1, 1] of the next block, made under `prompt`: a {"type": "segment", ...} event for
        each segment this block completes (its index, first frame, frame count, prompt and adherence)."""
        self._pending.append(frames.detach().float().cpu())
        self._pending_frames += frames.shape[0]
        events = []
        while self._pending_frames >= self.segment_frames:
            clip = torch.cat(self._pending)
            segment, rest = clip[: self.segment_frames], clip[self.segment_frames:]
            self._pending, self._pending_frames = ([rest] if len(rest) else []), len(rest)
            events.append({"type": "segment", "index": self._segments, "start_frame": self._segments * self.segment_frames,
                           "frames": self.segment_frames, "prompt": prompt,
                           "adherence": self._score(segment, prompt) if self._judges(self._segments) else None})
            self._segments += 1
        return events

    def _judges(self, index: int) -> bool:
        judges_segment = getattr(self.judge, "judges_segment", None)
        return judges_segment is None or judges_segment(index)

    def _score(self, segment: torch.Tensor, prompt: str) -> Optional[float]:
        try:
            self.judge.check_prompt(prompt)
        except UserError:
            return None  # a prompt the judge cannot read: the segment is shown as not judged
        return float(self.judge.score(segment, prompt))
