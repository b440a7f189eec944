"""A run directory is one run's: a second run is refused while the first holds it, a resume with another recipe
is refused before anything is overwritten, pruning follows latest.txt, and a damaged latest falls back."""
from __future__ import annotations

import json
import os
import socket

import pytest

from tests.helpers import REPO_ROOT, assert_one_line_error, run_script
from trainer.checkpoint import CheckpointManager
from trainer.run_folder import LOCK_NAME, RunLock, first_difference
from utils.errors import UserError

TINY_DMD = os.path.join(REPO_ROOT, "configs/tiny/self_forcing_dmd.yaml")
TINY_ODE = os.path.join(REPO_ROOT, "configs/tiny/ode.yaml")


def train(logdir, *overrides, config=TINY_DMD):
    return run_script(["train.py", "--config_path", config, "--logdir", str(logdir), "--disable-wandb",
                       "train.log_iters=1", *overrides])


def snapshot(folder):
    """Every file under `folder` with its bytes (to prove a refused run changed nothing)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A DMD logdir with checkpoints at steps 2 and 4 (keep_last 2)."""
    logdir = tmp_path_factory.mktemp("trained") / "run"
    result = train(logdir, "train.max_steps=4", "train.save_iters=2", "train.keep_last=2")
    assert result.returncode == 0, result.stderr
    return logdir


def copy_of(trained, tmp_path):
    import shutil

    target = tmp_path / "run"
    shutil.copytree(trained, target)
    return target


# --------------------------------------------------------------------------------------------- the lock
def test_a_second_run_on_a_held_logdir_is_refused_naming_the_holder(tmp_path):
    logdir = tmp_path / "run"
    with RunLock(logdir):
        result = train(logdir, "train.max_steps=1")
        assert_one_line_error(result, "is in use by another run", f"pid {os.getpid()}", socket.gethostname())
        assert os.listdir(logdir) == [LOCK_NAME]  # the refused run wrote nothing
    assert not logdir.exists()  # the holder created the folder for nothing and removed it on release


def test_a_lock_left_by_a_killed_run_does_not_block(tmp_path):
    logdir = tmp_path / "run"
    logdir.mkdir()
    (logdir / LOCK_NAME).write_text("pid 999999 on host gone, since yesterday\n")  # a file, but nobody holds it
    result = train(logdir, "train.max_steps=1", "train.save_iters=1")
    assert result.returncode == 0, result.stderr
    assert (logdir / "checkpoints" / "latest.txt").read_text().strip() == "step_000001"
    assert not (logdir / LOCK_NAME).exists()  # released at the end


def test_a_run_refused_for_bad_input_leaves_no_logdir(tmp_path):
    logdir = tmp_path / "run"
    result = train(logdir, "train.data_path=/nonexistent/prompts.txt")
    assert result.returncode == 2, result.stderr
    assert not logdir.exists()


@pytest.mark.parametrize("name", ["checkpoints", "latest"])
def test_a_file_where_the_run_keeps_a_folder_is_refused_before_training(tmp_path, name):
    logdir = tmp_path / "run"
    logdir.mkdir()
    (logdir / name).write_text("not a folder")
    result = train(logdir, "train.max_steps=1", "train.save_iters=1")
    assert_one_line_error(result, f"a file named {name}")
    assert sorted(os.listdir(logdir)) == [name] and (logdir / name).read_text() == "not a folder"


# --------------------------------------------------------------------------------------------- the recipe
@pytest.mark.parametrize("config,overrides,fragment", [
    (TINY_ODE, ["train.data_path=unused.lmdb"], "train.trainer is score_distillation there and ode here"),
    (TINY_DMD, ["distill.distribution_loss=sid"], "distill.distribution_loss is dmd there and sid here"),
    (TINY_DMD, ["train.lora_rank=4"], "train.lora_rank is 0 there and 4 here"),
    (TINY_DMD, ["train.ema_weight=0"], "train.ema is True there and False here"),
])
def test_resuming_with_another_recipe_is_refused_before_anything_is_overwritten(trained, tmp_path, config, overrides,
                                                                                fragment):
    logdir = copy_of(trained, tmp_path)
    before = snapshot(logdir)
    result = train(logdir, "train.max_steps=6", *overrides, config=config)
    assert_one_line_error(result, "was trained with another recipe", fragment, "checkpoint step 4")
    assert snapshot(logdir) == before


def test_other_architectures_are_named_field_by_field():
    stored = {"generator": {"dim": 32, "num_heads": 2}, "train.trainer": "ode"}
    assert first_difference(stored, {"generator": {"dim": 64, "num_heads": 2}, "train.trainer": "ode"}) == (
        "generator.dim", 32, 64)
    assert first_difference(stored, json.loads(json.dumps(stored))) is None


def test_changed_schedules_resume(trained, tmp_path):
    logdir = copy_of(trained, tmp_path)
    result = train(logdir, "train.max_steps=5", "optim.lr=5e-5", "train.save_iters=5")
    assert result.returncode == 0, result.stderr
    assert "at step 4" in result.stdout
    assert (logdir / "checkpoints" / "latest.txt").read_text().strip() == "step_000005"


# --------------------------------------------------------------------------------------------- latest and pruning
def test_pruning_follows_latest_txt_and_stale_later_folders_go(trained, tmp_path):
    logdir = copy_of(trained, tmp_path)
    root = logdir / "checkpoints"
    stale = root / "step_000099"  # a higher-numbered leftover (say, from a run that was rewound)
    stale.mkdir()
    (stale / "junk").write_text("x")
    result = train(logdir, "train.max_steps=5", "train.save_iters=1", "train.keep_last=2")
    assert result.returncode == 0, result.stderr
    assert CheckpointManager(logdir, 2, 0).steps() == [4, 5]
    assert (root / "latest.txt").read_text().strip() == "step_000005"


def _truncate_a_shard(folder):
    shard = next(p for p in sorted(folder.iterdir()) if p.suffix == ".distcp")
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size // 2)
    return shard


@pytest.mark.parametrize("damage", ["truncated shard", "junk latest.txt", "missing folder"])
def test_a_damaged_latest_falls_back_to_the_previous_complete_checkpoint(trained, tmp_path, damage):
    logdir = copy_of(trained, tmp_path)
    root = logdir / "checkpoints"
    if damage == "truncated shard":
        _truncate_a_shard(root / "step_000004")
        expected_step, why = 2, "has"
    elif damage == "junk latest.txt":
        (root / "latest.txt").write_bytes(b"\x00\xffgarbage")
        expected_step, why = 4, "not a step folder name"
    else:
        import shutil

        shutil.rmtree(root / "step_000004")
        expected_step, why = 2, "does not exist"
    result = train(logdir, "train.max_steps=6", "train.save_iters=2")
    assert result.returncode == 0, result.stderr
    assert "warning:" in result.stdout and why in result.stdout
    assert f"resumed from {root} at step {expected_step}" in result.stdout
    assert (root / "latest.txt").read_text().strip() == "step_000006"
    steps = [json.loads(line)["step"] for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))  # the steps after the fallback point were logged again, once


def test_no_complete_checkpoint_is_one_line(trained, tmp_path):
    logdir = copy_of(trained, tmp_path)
    root = logdir / "checkpoints"
    for step in (2, 4):
        _truncate_a_shard(root / f"step_{step:06d}")
    before = snapshot(logdir)
    assert_one_line_error(train(logdir, "train.max_steps=6"), "latest.txt names step_000004", "no earlier complete")
    assert snapshot(logdir) == before
    with pytest.raises(UserError, match="no earlier complete checkpoint"):
        CheckpointManager(logdir, 2, 0).resume_candidates()
