"""The quickstart's stages run once, and again (from scratch, with every later stage) when what they read changed."""
import json
import shutil

import pytest

from miniature.stages import Stages

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
# a stage: appends a line to <folder>/runs.txt (so a run that was not started over shows two lines)
WRITE = "import pathlib, sys; f = pathlib.Path(sys.argv[1]); f.mkdir(exist_ok=True); (f / 'runs.txt').open('a').write('x\\n')"


def stage(stages, name, folder, *extra):
    return stages.run(name, ["-c", WRITE, str(folder), *map(str, extra)], outputs=[folder])


def test_a_finished_stage_is_reused_while_its_inputs_are_the_same(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    assert stage(Stages(out, REPO_ROOT), "a", out / "a") and stage(Stages(out, REPO_ROOT), "a", out / "a") is False
    assert "done earlier with the same inputs, reused" in capsys.readouterr().out
    assert (out / "a" / "runs.txt").read_text() == "x\n"
    recorded = json.loads((out / "a.done").read_text())["inputs"]
    assert recorded["command"][2] == "<out>/a"  # portable: a copy of the stage into another run still matches
    assert json.loads((out / "a.done").read_text())["outputs"] == ["<out>/a"]  # what a copy must take along
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert stage(Stages(copy, REPO_ROOT), "a", copy / "a") is False
    assert stage(Stages(out, REPO_ROOT, fresh=True), "a", out / "a")  # --fresh runs everything


def test_a_changed_command_reruns_the_stage_from_scratch_and_every_later_stage(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    first = Stages(out, REPO_ROOT)
    stage(first, "a", out / "a", "--option=1")
    stage(first, "b", out / "b")
    second = Stages(out, REPO_ROOT)
    assert stage(second, "a", out / "a", "--option=2")
    assert stage(second, "b", out / "b")  # its own command is the same: it reads what "a" made again
    printed = capsys.readouterr().out
    assert "a: running it again: its command line changed" in printed
    assert "b: running it again: an earlier stage ran again" in printed
    # started over: the earlier run's output was removed first
    assert (out / "a" / "runs.txt").read_text() == "x\n" and (out / "b" / "runs.txt").read_text() == "x\n"


def test_a_changed_recipe_or_base_recipe_reruns_the_stage(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (tmp_path / "base.yaml").write_text("train: {max_steps: 4}\n")
    (tmp_path / "recipe.yaml").write_text("base: base.yaml\ntrain: {batch_size: 2}\n")
    recipe = tmp_path / "recipe.yaml"
    assert stage(Stages(out, REPO_ROOT), "a", out / "a", recipe)
    assert stage(Stages(out, REPO_ROOT), "a", out / "a", recipe) is False
    (tmp_path / "base.yaml").write_text("# a comment changes no setting\ntrain: {max_steps: 4}\n")
    assert stage(Stages(out, REPO_ROOT), "a", out / "a", recipe) is False
    (tmp_path / "base.yaml").write_text("train: {max_steps: 8}\n")
    assert stage(Stages(out, REPO_ROOT), "a", out / "a", recipe)
    assert "its recipe changed (base.yaml)" in capsys.readouterr().out


def test_another_prompt_list_reruns_the_stage(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    prompts = out / "prompts.txt"
    prompts.write_text("a red circle\n")
    assert stage(Stages(out, REPO_ROOT), "a", out / "a", prompts)
    prompts.write_text("a red circle\n")  # written again, the same list
    assert stage(Stages(out, REPO_ROOT), "a", out / "a", prompts) is False
    prompts.write_text("a red circle\na blue square\n")
    assert stage(Stages(out, REPO_ROOT), "a", out / "a", prompts)
    assert "a prompt list it reads changed (prompts.txt)" in capsys.readouterr().out


def test_a_marker_without_recorded_inputs_is_not_trusted(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "a.done").write_text(json.dumps({"seconds": 1.0, "command": ["old"]}))
    assert stage(Stages(out, REPO_ROOT), "a", out / "a")
    assert "does not record what it read" in capsys.readouterr().out


def test_a_failed_stage_stops_the_chain_and_leaves_no_marker(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(SystemExit, match="exit status 3"):
        Stages(out, REPO_ROOT).run("a", ["-c", "raise SystemExit(3)"])
    assert not (out / "a.done").exists()
