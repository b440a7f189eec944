"""Training objectives: ODE regression, teacher forcing, DMD and SiD behind one interface (`model.objective.Objective`),
looked up by the recipe through `model.registry`."""
from __future__ import annotations

from model.objective import Batch, Models, Objective
from model.registry import build_objective, objective_class

__all__ = ["Batch", "Models", "Objective", "build_objective", "objective_class"]
