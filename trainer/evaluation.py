"""Evaluation during training (recipe section `evaluation`): fixed prompts and seeds rolled out with the
generator as it would be deployed (EMA weights once EMA has started), measured without learned parts.

Every rank rolls out the same prompts (the generator may be sharded, so its forwards are collective); rank 0
logs. Noise comes from generators seeded per prompt, never from the global RNG, so training with evaluation
draws the same numbers as training without it, and resumes stay exact.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch

from model.registry import objective_class
from utils.config import Config
from utils.errors import UserError
from utils.registry import JUDGES
from utils.temporal import seam_ratio, temporal_report


def evaluation_prompts(config: Config) -> list[str]:
    """The first evaluation.num_prompts lines of evaluation.prompts (or of the training prompt file)."""
    evaluation, train = config.evaluation, config.train
    source = evaluation.prompts or train.data_path
    if source is None or objective_class(config).data == "ode_pairs" and evaluation.prompts is None:
        raise UserError("evaluation.every is set but evaluation.prompts is empty: expected a prompt file "
                        f"(train.trainer={train.trainer} reads an ODE-pair LMDB, so its prompts must be named)")
    path = Path(source)
    if not path.is_file():
        raise UserError(f"evaluation prompts {path} not found: expected a text file, one prompt per line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"evaluation prompts {path} holds no prompt")
    return prompts[: evaluation.num_prompts]


def check_evaluation(config: Config) -> None:
    """Before any model is built: the prompts exist, the task is supported."""
    if not config.evaluation.every:
        return
    if config.video.task == "ti2v":
        raise UserError("evaluation.every is set for a ti2v recipe: evaluation during training needs first-frame "
                        "images and supports t2v recipes only; set evaluation.every=0")
    prompts = evaluation_prompts(config)
    if config.evaluation.judge:
        judge = JUDGES.get(config.evaluation.judge)()
        for prompt in prompts:
            try:
                judge.check_prompt(prompt)
            except (UserError, ValueError) as error:
                raise UserError(f"evaluation.judge is {config.evaluation.judge} and cannot judge the evaluation prompt "
                                f"{prompt[:60]!r}: {error}") from None


class TrainingEvaluator:
    def __init__(self, config: Config, setup, autocast: Callable[[], contextlib.AbstractContextManager]) -> None:
        from pipeline.rollout import BlockRollout

        self.config, self.setup, self.autocast = config, setup, autocast
        self.prompts = evaluation_prompts(config)
        self.rollout = BlockRollout.from_config(config, setup.geometry)
        self.vae = self.judge = None
        if config.evaluation.judge:
            from pipeline.components import build_vae

            self.vae = build_vae(setup.recipe.vae, device=setup.info.device)
            self.judge = JUDGES.get(config.evaluation.judge)()

    def due(self, step: int) -> bool:
        every = self.config.evaluation.every
        return bool(every) and step % every == 0

    @torch.no_grad()
    def run(self) -> dict[str, float]:
        """Roll out every prompt; means of the temporal report (and the judge's adherence) over prompts."""
        setup, geometry = self.setup, self.setup.geometry
        device = setup.info.device
        ema = setup.ema
        weights = ema.swapped_in() if ema is not None and ema.started else contextlib.nullcontext()
        text = setup.batches.text_encoder
        totals: dict[str, float] = {}
        was_training = setup.generator.training
        setup.generator.eval()
        try:
            with weights, self.autocast():
                for index, prompt in enumerate(self.prompts):
                    seed = self.config.evaluation.seed + index
                    noise = torch.randn((1, *geometry.latent_shape[1:]), generator=torch.Generator().manual_seed(seed))
                    output = self.rollout.run(
                        setup.generator, noise.to(device), text.encode([prompt]).to(device),
                        noise_generator=torch.Generator(device).manual_seed(seed),
                    )
                    for key, value in self._measure(output.latents[0].float(), prompt).items():
                        totals[key] = totals.get(key, 0.0) + value
        finally:
            setup.generator.train(was_training)
        return {f"eval/{key}": value / len(self.prompts) for key, value in totals.items()}

    def _measure(self, latents: torch.Tensor, prompt: str) -> dict[str, float]:
        """The temporal report on the latents (no decode: cheap at any size; its seam ratio compares block
        boundaries with every other latent transition). With the judge the clip is decoded anyway, and the
        seam ratio is also measured in pixels, as inference records and the quickstart report measure it."""
        geometry = self.setup.geometry
        report = temporal_report(latents, geometry.block_sizes)
        values = {"seam_ratio": report["seam_ratio"], "flicker": report["flicker"], "drift": report["drift"]["max"]}
        if self.judge is not None:
            video = self.vae.decode_to_pixel(latents[None].to(self.vae.dtype))[0].float().clamp(-1, 1).cpu()
            values["adherence"] = self.judge.score(video, prompt)
            values["seam_ratio_pixels"] = seam_ratio(video, geometry.block_sizes, geometry.vae_stride[0])
        return {key: float(value) for key, value in values.items() if value is not None}


__all__ = ["TrainingEvaluator", "check_evaluation", "evaluation_prompts"]
