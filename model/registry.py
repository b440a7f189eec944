"""The objectives by recipe name, and the one place that reads `train.trainer` and `distill.distribution_loss`.

Callers ask the class what a run needs (`data`, `has_critic`, `uses_teacher`, ...; see `model.objective`),
so a new objective is one class and one entry here.
"""
from __future__ import annotations

from typing import Optional

import torch

from model.dmd import DMD
from model.objective import Batch, Models, Objective
from model.ode import OdeRegression
from model.score import ScoreDistillation
from model.sid import SiD
from model.teacher_forcing import TeacherForcing
from utils.config import Config
from utils.geometry import Geometry

OBJECTIVES: dict[str, type[Objective]] = {  # train.trainer -> objective
    "ode": OdeRegression,
    "teacher_forcing": TeacherForcing,
    "score_distillation": ScoreDistillation,
}
DISTRIBUTION_LOSSES: dict[str, type[ScoreDistillation]] = {"dmd": DMD, "sid": SiD}  # distill.distribution_loss


def objective_class(config: Config) -> type[Objective]:
    """The recipe's objective class (DMD or SiD for score distillation); the schema has checked both names."""
    cls = OBJECTIVES[config.train.trainer]
    if cls is ScoreDistillation:
        return DISTRIBUTION_LOSSES[config.distill.distribution_loss]
    return cls


def build_objective(config: Config, geometry: Geometry) -> Objective:
    """The recipe's objective, its settings read from the recipe."""
    return objective_class(config).from_config(config, geometry)


def random_batch(config: Config, geometry: Geometry, batch_size: int, device: torch.device | str,
                 dtype: Optional[torch.dtype] = None, generator: Optional[torch.Generator] = None) -> Batch:
    """A micro-batch of the recipe's shapes with random values: full-length text contexts, the kept ODE points
    for objectives that read pairs, a first latent frame for TI2V objectives that take one, a switch prompt's context
    for those that switch prompts (memory estimates, profiles, verification)."""
    from utils.fake import real_values

    g, cls = geometry, objective_class(config)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(device, dtype)

    context = randn(batch_size, g.text_len, g.text_dim)
    batch = Batch(prompts=[""] * batch_size, context=context, negative_context=randn(batch_size, g.text_len, g.text_dim))
    if cls.data == "ode_pairs":
        points = len(config.ode.keep_indices)
        batch.ode_latents = randn(batch_size, points, *g.latent_shape[1:])
        with real_values():  # Python-valued like the LMDB header's
            batch.ode_timesteps = torch.linspace(float(config.flow.num_train_timesteps), 0.0, points)
    if config.video.task == "ti2v" and cls.encodes_first_frames:
        batch.first_frame = randn(batch_size, 1, *g.latent_shape[2:])
    if cls.switches_prompts(config):
        batch.switch_context = randn(batch_size, g.text_len, g.text_dim)
    return batch


def step_models(config: Config, recipe, generator: torch.nn.Module, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, seed: int = 0) -> Models:
    """The networks one step of the recipe's objective runs, outside the trainer (verification, profiles): the
    given generator, the frozen teacher when the objective runs one, the critic (from the teacher's weights
    when their architectures agree and no critic weights are named) when it trains one."""
    from pipeline.components import build_dit

    cls, backend = objective_class(config), config.attention_backend
    real = fake = None
    if cls.uses_teacher or cls.has_critic:
        real = build_dit(recipe.real_score, causal=False, attention_backend=backend, device=device, dtype=dtype, seed=seed)
        real.requires_grad_(False)
    if cls.has_critic:
        fake = build_dit(recipe.critic, causal=False, attention_backend=backend, device=device, dtype=dtype, seed=seed)
        if not recipe.critic.checkpoint and recipe.critic.arch == recipe.real_score.arch:
            fake.load_state_dict(real.state_dict())
    return Models(generator=generator, real_score=real if cls.uses_teacher else None, critic=fake)
