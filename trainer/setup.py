"""Build everything a run needs, once, before the first step: models (placed, wrapped, sharded), optimizers,
EMA, text encoder, data and the objective. Every recipe check happens here, so a bad config fails before work.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from model.registry import objective_class
from pipeline.components import (
    build_dit,
    build_text_encoder,
    build_vae,
    place,
    text_encoder_device,
    text_encoder_dtype,
)
from trainer.data import BatchSource, build_dataset
from trainer.data_position import ShardedSampler
from trainer.ema import ParameterEMA
from trainer.lora import apply_lora
from trainer.parallel import (
    CpuOffloaded,
    DataParallel,
    attach_sequence_parallel,
    build_data_parallel,
    build_mesh,
    parallelize,
)
from utils.config import Config
from utils.dist import DistInfo
from utils.errors import UserError
from utils.geometry import Geometry, ResolvedRecipe, resolve_recipe
from utils.memory import MemoryProfiler

ObjectiveFactory = Callable[[Config, Geometry], Any]


@dataclass
class ModelSet:
    """The trained and frozen networks of a run, placed, wrapped and sharded, with their optimizers and EMA."""

    generator: nn.Module
    real_score: Optional[nn.Module]
    critic: Optional[nn.Module]
    generator_optimizer: torch.optim.Optimizer
    critic_optimizer: Optional[torch.optim.Optimizer]
    ema: Optional[ParameterEMA]


@dataclass
class TrainingSetup(ModelSet):
    """The models (ModelSet's fields) and everything else a run needs."""

    info: DistInfo
    recipe: ResolvedRecipe
    batches: BatchSource
    objective: Any
    micro_steps: int  # gradient-accumulation micro-steps per optimizer step
    data_parallel: DataParallel  # this rank's data shard (sequence groups share one)

    @property
    def geometry(self) -> Geometry:
        return self.recipe.geometry


def accumulation_steps(config: Config, world_size: int) -> int:
    """total_batch_size / (batch_size * data-parallel ranks), which must be whole; no total means no accumulation.

    Data-parallel ranks = world / parallel.sp_size: a sequence group works on one sample."""
    sp_size = config.parallel.sp_size
    data_ranks = max(world_size // sp_size, 1)
    per_step = config.train.batch_size * data_ranks
    total = config.train.total_batch_size
    if total is None:
        return 1
    if total < per_step or total % per_step:
        ranks = "data-parallel ranks (ranks / parallel.sp_size)" if sp_size > 1 else "ranks"
        raise UserError(
            f"train.total_batch_size={total} is not a whole multiple of batch_size x {ranks} = "
            f"{config.train.batch_size} x {data_ranks} = {per_step}"
        )
    return total // per_step


def check_recipe(config: Config, world_size: int) -> ResolvedRecipe:
    """Everything that can be checked without building a model (fails in one line, before work)."""
    recipe = resolve_recipe(config)
    accumulation_steps(config, world_size)
    if config.train.data_path is None:
        what = "an ODE-pair LMDB" if objective_class(config).data == "ode_pairs" else "a prompt file"
        raise UserError(f"train.data_path is empty: expected {what}")
    if config.train.lora_rank < 0:
        raise UserError(f"train.lora_rank={config.train.lora_rank}: expected 0 (full fine-tuning) or a positive rank")
    if not 0.0 <= config.train.ema_weight < 1.0:
        raise UserError(f"train.ema_weight={config.train.ema_weight}: expected a decay in [0, 1) (0 disables EMA)")
    return recipe


def _adamw(params: list[nn.Parameter], lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.Optimizer:
    if not params:
        raise UserError("a trained model has no trainable parameters")
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)


def _trainable(model: nn.Module, config: Config) -> nn.Module:
    if config.train.lora_rank:
        return apply_lora(model, config.train.lora_rank, config.train.lora_alpha)
    return model.requires_grad_(True)


def build_models(config: Config, recipe: ResolvedRecipe, device: torch.device, mesh, sequence,
                 profiler: MemoryProfiler) -> ModelSet:
    """Generator, teacher and critic as training uses them (also run on fake tensors by the memory estimate)."""
    seed = config.train.seed
    wrap = dict(mixed_precision=config.train.mixed_precision, gradient_checkpointing=config.train.gradient_checkpointing)
    backend = config.attention_backend

    # 1. Generator: causal, trainable (whole or LoRA), then checkpointing and sharding.
    with profiler.component("generator"):
        generator = build_dit(recipe.generator, causal=True, attention_backend=backend, device=device, seed=seed)
        generator = parallelize(_trainable(generator, config), mesh, **wrap)
        attach_sequence_parallel(generator, sequence)

    # 2. Scores: the frozen teacher (optionally kept on the CPU) and the trainable critic, initialised from the teacher.
    real_score = critic = None
    needs = objective_class(config)
    if needs.uses_teacher or needs.has_critic:
        with profiler.component("real_score"):
            real_score = build_dit(recipe.real_score, causal=False, attention_backend=backend, device="cpu", seed=seed)
            real_score.requires_grad_(False).eval()
    if needs.has_critic:
        with profiler.component("critic"):
            critic = build_dit(recipe.critic, causal=False, attention_backend=backend, device="cpu", seed=seed)
            if not recipe.critic.checkpoint and recipe.critic.arch == recipe.real_score.arch:
                critic.load_state_dict(real_score.state_dict())  # no critic weights named: start from the teacher
            critic = parallelize(_trainable(place(critic, device), config), mesh, **wrap)
            attach_sequence_parallel(critic, sequence)
    if not needs.uses_teacher:
        real_score = None  # built only to start the critic from
    elif config.train.real_score_cpu:
        real_score = CpuOffloaded(real_score, device)
    else:
        real_score = parallelize(place(real_score, device), mesh, mixed_precision=config.train.mixed_precision,
                                 gradient_checkpointing=False)
    if real_score is not None:
        attach_sequence_parallel(real_score, sequence)

    # 3. Optimizers and the generator's EMA.
    optim = config.optim
    generator_optimizer = _adamw([p for p in generator.parameters() if p.requires_grad], optim.lr,
                                 (optim.beta1, optim.beta2), optim.weight_decay)
    critic_optimizer = None
    if critic is not None:
        critic_optimizer = _adamw([p for p in critic.parameters() if p.requires_grad], optim.lr_critic,
                                  (optim.beta1_critic, optim.beta2_critic), optim.weight_decay)
    ema = ParameterEMA(generator, config.train.ema_weight, config.train.ema_start_step) if config.train.ema_weight > 0 else None
    return ModelSet(generator, real_score, critic, generator_optimizer, critic_optimizer, ema)


def build_training(
    config: Config, info: DistInfo, build_objective: ObjectiveFactory, profiler: MemoryProfiler
) -> TrainingSetup:
    recipe = check_recipe(config, info.world_size)
    device, seed = info.device, config.train.seed
    data_parallel = build_data_parallel(info, config.parallel.sp_size, config.train.sharding_strategy)
    mesh = build_mesh(info, config.train.sharding_strategy)
    dataset = build_dataset(config, recipe.geometry)  # before the models: a database it cannot use is refused first
    next_prompts = None
    if config.distill.switch_prompts is not None and objective_class(config).switches_prompts(config):
        from utils.datasets import read_switch_prompts

        next_prompts = read_switch_prompts(config.distill.switch_prompts,
                                           [dataset.prompt(i) for i in range(len(dataset))])
    models = build_models(config, recipe, device, mesh, data_parallel.sequence, profiler)

    # 4. Text encoder (frozen, possibly on the CPU), the VAE for TI2V first frames, and the data.
    with profiler.component("text_encoder"):
        text_encoder = build_text_encoder(config, device=text_encoder_device(config, device), seed=seed,
                                          dtype=text_encoder_dtype(config))
        text_encoder.requires_grad_(False).eval()
    vae = None
    if config.video.task == "ti2v" and objective_class(config).encodes_first_frames:
        with profiler.component("vae"):
            vae = build_vae(recipe.vae, device=device)
    sampler = ShardedSampler(len(dataset), config.train.batch_size, data_parallel.rank, data_parallel.size, seed)
    batches = BatchSource(dataset, sampler, text_encoder, config.text_encoder.negative_prompt, device,
                          ti2v=config.video.task == "ti2v", vae=vae,
                          switch_prompts=objective_class(config).switches_prompts(config),
                          image_share=config.train.image_share, next_prompts=next_prompts)

    return TrainingSetup(
        **vars(models),
        info=info,
        recipe=recipe,
        batches=batches,
        objective=build_objective(config, recipe.geometry),
        micro_steps=accumulation_steps(config, info.world_size),
        data_parallel=data_parallel,
    )
