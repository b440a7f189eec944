"""Training objectives: ODE regression, DMD and SiD behind one interface (`model.objective.Objective`)."""
from __future__ import annotations

from model.dmd import DMD
from model.objective import Batch, Models, Objective
from model.ode import OdeRegression
from model.score import ScoreTimesteps
from model.sid import SiD
from model.teacher_forcing import TeacherForcing
from pipeline.self_forcing_training import SelfForcingRollout
from utils.config import Config
from utils.geometry import Geometry

__all__ = ["Batch", "Models", "Objective", "build_objective"]


def build_objective(config: Config, geometry: Geometry) -> Objective:
    """The recipe's objective: ODE regression (train.trainer=ode), teacher forcing (the causal teacher of causal
    ODE init) or DMD / SiD (distill.distribution_loss)."""
    if config.train.trainer == "ode":
        return OdeRegression(geometry, config.flow.num_train_timesteps, clean_context=config.train.ode_clean_context,
                             teacher_forcing=config.train.ode_teacher_forcing)
    if config.train.trainer == "teacher_forcing":
        return TeacherForcing(geometry, config.flow.num_train_timesteps, config.flow.timestep_shift)
    distill = config.distill
    parts = dict(
        rollout=SelfForcingRollout.from_config(config, geometry),
        score_timesteps=ScoreTimesteps.from_config(config),
        guidance_scale=distill.guidance_scale,
        guidance_form=distill.guidance_form,
    )
    if distill.distribution_loss == "sid":
        return SiD(**parts, alpha=distill.sid_alpha)
    return DMD(**parts)
