"""The framework stands below its demo world and its tools: nothing in model/, pipeline/, trainer/, utils/ or wan/
imports miniature/, scripts/, service/ or tests/, deferred imports included; components come by registry."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO_ROOT
from utils.errors import UserError

FRAMEWORK = ("model", "pipeline", "trainer", "utils", "wan")
ABOVE = ("miniature", "scripts", "service", "tests", "train", "inference", "serve")


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import in the source, at any depth (functions, branches, try blocks)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant):
                found.append((node.lineno, str(node.args[0].value)))
    return found


def upward_imports(source: str) -> list[tuple[int, str]]:
    return sorted((line, name) for line, name in imported_modules(source) if name.split(".")[0] in ABOVE)


def test_the_framework_imports_nothing_above_it():
    files = [p for package in FRAMEWORK for p in Path(REPO_ROOT, package).rglob("*.py")]
    assert len(files) > 50
    found = [f"{p.relative_to(REPO_ROOT)}:{line} imports {name}" for p in files
             for line, name in upward_imports(p.read_text(encoding="utf-8"))]
    assert found == [], found


def test_the_walk_sees_deferred_imports():
    probe = ("import torch\n"
             "def f():\n"
             "    if True:\n"
             "        from miniature.vae import MiniatureVAE\n"
             "    import scripts.bench_support\n"
             "    importlib.import_module('service.app')\n")
    assert upward_imports(probe) == [(4, "miniature.vae"), (5, "scripts.bench_support"), (6, "service.app")]


def test_the_miniature_world_registers_its_components():
    """Built by kind through the registry, the caller importing nothing of miniature/ (its entry point does)."""
    from pipeline.components import build_vae
    from utils.config import load_config
    from utils.geometry import resolve_recipe
    from utils.registry import JUDGES

    config = load_config(str(Path(REPO_ROOT, "configs/miniature/dmd.yaml")),
                         ["generator.checkpoint=checkpoints/miniature/teacher"])  # its own init exists after a quickstart
    recipe = resolve_recipe(config, check_weights=False)
    vae = build_vae(recipe.vae)
    assert type(vae).__module__ == "miniature.vae" and recipe.vae.kind == "miniature"
    judge = JUDGES.get("miniature")()
    judge.check_prompt("a red circle moving left slowly on a black background")
    with pytest.raises(UserError):
        judge.check_prompt("a cat on a sofa")


def test_unknown_kinds_are_one_line_naming_the_known_ones():
    import pipeline.components  # noqa: F401  (registers the framework's kinds)
    from utils.registry import VAES

    with pytest.raises(UserError, match="vae preset kind 'wan9' names no registered VAE: expected one of .*wan2.1"):
        VAES.get("wan9")


def test_a_stand_in_replaces_a_kind_only_inside_its_block():
    from pipeline.components import DIT_FAMILY, build_wan_dit
    from utils.registry import DITS

    marker = torch.nn.Identity()
    with DITS.replaced(DIT_FAMILY, lambda *a, **k: marker) as original:
        assert original is build_wan_dit and DITS.get(DIT_FAMILY)(None) is marker
    assert DITS.get(DIT_FAMILY) is build_wan_dit
