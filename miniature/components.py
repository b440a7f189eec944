"""The miniature world's components, registered with the framework (announced in pyproject.toml's entry points):
its VAE (preset kind "miniature") and its judges (evaluation.judge "miniature" and "miniature_wrap")."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from utils.presets import VaeSpec
from utils.registry import JUDGES, VAES

JUDGE_WORLDS = {"miniature": "bounded", "miniature_wrap": "wrap"}  # evaluation.judge -> the world it judges


@VAES.register("miniature")
def build_miniature_vae(vae: VaeSpec, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The analytic miniature VAE (float32 always: its few parameters are fixed bases, not weights)."""
    from miniature.vae import MiniatureVAE

    return MiniatureVAE.from_preset(vae.preset).to(device)


@dataclass(frozen=True)
class WorldJudge:
    """Scores a decoded clip against its caption in one miniature world (the protocol trainer.evaluation uses)."""

    world_name: str

    def check_prompt(self, prompt: str) -> None:
        """Raises UserError when `prompt` is not a caption of the world."""
        from miniature.world import parse_caption

        parse_caption(prompt)

    def judges_segment(self, index: int) -> bool:
        """Whether the world has a true trajectory for training-length segment `index` of a long video: in the
        bounded world the shape leaves the canvas after the first segment, so only that one is judged."""
        from miniature.world import world_named

        return world_named(self.world_name).wrap or index == 0

    def score(self, video: torch.Tensor, prompt: str) -> float:
        """Adherence in [0, 1] of a clip [T, 3, H, W] in [-1, 1] to its caption."""
        from miniature.judge import score_clip
        from miniature.world import parse_caption, world_named

        return float(score_clip(video, parse_caption(prompt), world_named(self.world_name))["total"])


for _judge, _world in JUDGE_WORLDS.items():
    JUDGES.register(_judge)(lambda world=_world: WorldJudge(world))
