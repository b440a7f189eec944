"""Evaluation during training: logged and plotted, and training with it is bit-for-bit training without it."""
from __future__ import annotations

import json
import os

from safetensors.torch import load_file

from tests.helpers import REPO_ROOT, assert_one_line_error, run_script

TINY_DMD = os.path.join(REPO_ROOT, "configs/tiny/self_forcing_dmd.yaml")
COMMON = ["--config_path", TINY_DMD, "--disable-wandb", "train.max_steps=4", "train.save_iters=4", "train.log_iters=2"]


def test_evaluation_is_logged_and_changes_nothing_in_training(tmp_path):
    plain, evaluated = tmp_path / "plain", tmp_path / "evaluated"
    assert run_script(["train.py", "--logdir", str(plain), *COMMON]).returncode == 0
    result = run_script(["train.py", "--logdir", str(evaluated), *COMMON, "evaluation.every=2",
                         "evaluation.num_prompts=2"])
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (evaluated / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "eval/seam_ratio" in r]
    assert [r["step"] for r in evaluations] == [2, 4]
    for record in evaluations:
        assert record["eval/seam_ratio"] > 0 and 0 <= record["eval/flicker"] <= 1.5 and record["eval/drift"] >= 0
    # the evaluation rollouts draw from their own generators: the weights are exactly those of the plain run
    for name in ("generator", "generator_ema"):
        a = load_file(plain / "latest" / f"{name}.safetensors")
        b = load_file(evaluated / "latest" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), name
    losses = [(r["step"], r["generator_loss"], r["critic_loss"]) for r in records if "critic_loss" in r]
    plain_records = [json.loads(line) for line in (plain / "metrics.jsonl").read_text().splitlines()]
    assert losses == [(r["step"], r["generator_loss"], r["critic_loss"]) for r in plain_records]
    assert (evaluated / "training_curves.png").stat().st_size > 0


def test_bad_evaluation_settings_are_one_line_before_work(tmp_path):
    logdir = tmp_path / "run"
    cases = [
        (["evaluation.every=2", "evaluation.judge=miniature"], "not a miniature-world caption"),
        (["evaluation.every=2", "evaluation.prompts=/nonexistent.txt"], "/nonexistent.txt not found"),
        (["evaluation.every=-1"], "evaluation.every"),
        (["evaluation.judge=clip"], "evaluation.judge"),
    ]
    for overrides, fragment in cases:
        assert_one_line_error(run_script(["train.py", "--logdir", str(logdir), *COMMON, *overrides]), fragment)
        assert not logdir.exists()
