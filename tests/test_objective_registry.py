"""The objective registry: the only reader of train.trainer; every caller asks the class what a run needs."""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from model.registry import DISTRIBUTION_LOSSES, OBJECTIVES, objective_class
from model.teacher_forcing import TeacherForcing
from tests.helpers import REPO_ROOT
from utils.config import CHOICES, load_config

RECIPES = sorted(str(p.relative_to(REPO_ROOT)) for p in Path(REPO_ROOT, "configs").rglob("*.yaml")
                 if p.parent.name in ("configs", "tiny", "miniature") and p.stem not in ("dit", "vae", "text_encoder"))
SELECTORS = ("trainer", "distribution_loss")  # the recipe fields that pick the objective


def test_registry_names_every_objective_the_schema_allows():
    assert set(OBJECTIVES) == set(CHOICES["train.trainer"])
    assert set(DISTRIBUTION_LOSSES) == set(CHOICES["distill.distribution_loss"])
    for cls in (*OBJECTIVES.values(), *DISTRIBUTION_LOSSES.values()):
        assert cls.data in ("ode_pairs", "prompts"), cls


def _selector_comparisons(source: str) -> list[int]:
    """Lines of `x.trainer == ...`, `x.trainer in ...`-style comparisons of the objective's recipe fields."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Attribute) and s.attr in SELECTORS for s in sides):
                found.append(node.lineno)
    return found


def test_no_objective_field_is_compared_outside_the_registry():
    roots = [Path(REPO_ROOT, d) for d in ("model", "pipeline", "trainer", "utils", "wan", "miniature", "scripts", "service")]
    files = [p for root in roots for p in root.rglob("*.py")]
    files += [Path(REPO_ROOT, f) for f in ("train.py", "inference.py", "serve.py")]
    found = [f"{p.relative_to(REPO_ROOT)}:{line}" for p in files if p.name != "registry.py"
             for line in _selector_comparisons(p.read_text(encoding="utf-8"))]
    assert found == [], f"compare through model.registry.objective_class instead: {found}"


def test_the_check_finds_a_comparison():
    """The walk above is not vacuous: it flags the forms it looks for."""
    probe = 'if config.train.trainer == "ode":\n    pass\nx = cfg.distill.distribution_loss in ("dmd",)\n'
    assert _selector_comparisons(probe) == [1, 3]


@pytest.mark.parametrize("recipe", RECIPES)
def test_plan_checks_what_each_recipe_runs(recipe):
    """verify.py plan asks for the critic only when the objective trains one, for the teacher only when it runs
    or samples this stage's pairs, and for the data the objective reads."""
    from toolbox.verification.plan import check_plan

    config = load_config(os.path.join(REPO_ROOT, recipe))
    cls = objective_class(config)
    names = [name for name, _, _ in check_plan(config, recipe)]
    assert ("critic.checkpoint" in names) == cls.has_critic
    assert ("real_score.checkpoint" in names) == (cls is not TeacherForcing)
    data = "train.data_path (ODE LMDB)" if cls.data == "ode_pairs" else "train.data_path (prompts)"
    assert data in names
