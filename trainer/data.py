"""From dataset items to an objective's Batch: the rank's next items, text embeddings, TI2V first frames."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.utils.data import Dataset

from model.registry import objective_class
from trainer.data_position import ShardedSampler
from utils.config import Config
from utils.datasets import ImageTextDataset, OdeLmdbDataset, TextPromptDataset, collate
from utils.errors import UserError
from utils.geometry import Geometry


def build_dataset(config: Config, geometry: Geometry) -> Dataset:
    """Objectives on ODE pairs read the pair LMDB; score distillation a prompt file (image<TAB>prompt lines for TI2V).

    Called before any model is built: a database the recipe cannot train on is refused first."""
    train = config.train
    objective = objective_class(config)
    if objective.data == "ode_pairs":
        dataset = OdeLmdbDataset(train.data_path, geometry)
        if objective.reads_point_timesteps:  # the student's steps (teacher forcing reads only the clean ends)
            from model.ode import ode_point_timesteps

            dataset.ode_timesteps = ode_point_timesteps(dataset.ode_timesteps, config, f"ODE LMDB {train.data_path}")
        return dataset
    if config.video.task == "ti2v":
        if train.image_root is None:
            raise UserError("video.task is ti2v: set train.image_root to the folder of first-frame images")
        return ImageTextDataset(train.data_path, train.image_root, config.video.height, config.video.width)
    return TextPromptDataset(train.data_path)


def held_first_frames(ode_latents: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """TI2V pairs [B, P, F, C, H, W]: the clean first frames [B, 1, C, H, W] and the rows holding them.

    A row holds its first frame when the teacher did (image-conditioned pairs: frame 0 is the clean image at every
    kept point); text-to-video pairs packed into the same LMDB start frame 0 from noise. Rows None: every row holds it;
    first frame None: none does."""
    rows = (ode_latents[:, :, 0] == ode_latents[:, -1:, 0]).flatten(1).all(dim=1)
    return _plain_when_uniform(ode_latents[:, -1, :1], rows)


def _plain_when_uniform(first_frame: torch.Tensor, rows: torch.Tensor):
    if bool(rows.all()):
        return first_frame, None
    if not bool(rows.any()):
        return None, None
    return first_frame, rows


class BatchSource:
    """Hands out the next Batch for this rank; its position is the sampler's (saved in checkpoints)."""

    def __init__(self, dataset: Dataset, sampler: ShardedSampler, text_encoder: nn.Module, negative_prompt: str,
                 device: torch.device, *, ti2v: bool, vae: Optional[nn.Module] = None,
                 switch_prompts: bool = False, image_share: float = 1.0,
                 next_prompts: Optional[list[list[str]]] = None) -> None:
        self.dataset, self.sampler, self.ti2v, self.switch_prompts = dataset, sampler, ti2v, switch_prompts
        self.next_prompts = next_prompts  # per item, the prompts a switch may go to (None: any other item's)
        self.image_share = image_share  # TI2V prompt data: the share of rows given their first frame
        self.text_encoder, self.negative_prompt = text_encoder, negative_prompt
        self.device, self.vae = device, vae

    @torch.no_grad()
    def next(self):
        from model.objective import Batch

        indices = self.sampler.next_indices()
        items = collate([self.dataset[i] for i in indices])
        prompts = items["prompts"]
        context = self.text_encoder.encode(prompts).to(self.device)
        switch_context = None
        if self.switch_prompts and self.next_prompts is not None:  # long tuning's switches: one of its next prompts
            options = [self.next_prompts[i] for i in indices]
            chosen = self.sampler.draw_choices(indices, [len(o) for o in options])
            switch_context = self.text_encoder.encode([o[c] for o, c in zip(options, chosen)]).to(self.device)
        elif self.switch_prompts:  # or another prompt of the data
            partners = [self.dataset.prompt(i) for i in self.sampler.partner_indices(indices)]
            switch_context = self.text_encoder.encode(partners).to(self.device)
        negative = self.text_encoder.encode_cached(self.negative_prompt).to(self.device)
        ode_latents = ode_timesteps = first_frame = first_frame_rows = None
        if "ode_latents" in items:
            ode_latents = items["ode_latents"].to(self.device)
            ode_timesteps = items["ode_timesteps"][0].to(self.device)  # the same trajectory points for every row
            if self.ti2v:  # the given image is the clean end of the trajectory's first frame
                first_frame, first_frame_rows = held_first_frames(ode_latents)
        if "image" in items:
            # [B, 3, H, W] -> a one-frame video [B, 3, 1, H, W] -> the clean first latent frame [B, 1, C, h, w]
            first_frame = self.vae.encode_to_latent(items["image"].to(self.device)[:, :, None])
            if self.image_share < 1.0:  # one student for both tasks: the other rows are text-to-video
                first_frame_rows = torch.tensor(self.sampler.draw_below(indices, self.image_share), device=self.device)
                first_frame, first_frame_rows = _plain_when_uniform(first_frame, first_frame_rows)
        return Batch(
            prompts=prompts,
            context=context,
            negative_context=negative.expand(len(prompts), -1, -1),
            ode_latents=ode_latents,
            ode_timesteps=ode_timesteps,
            first_frame=first_frame,
            first_frame_rows=first_frame_rows,
            switch_context=switch_context,
        )
