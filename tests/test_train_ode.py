"""ODE regression under torchrun (2 CPU ranks, gloo): the loss falls on tiny consistent pairs; exports load."""
import os

import pytest
import torch

from tests.helpers import assert_one_line_error, run_script
from tests.train_helpers import TINY, assert_ok, metrics, torchrun_train, write_tiny_ode_lmdb


@pytest.mark.distributed
def test_ode_regression_loss_falls_and_export_loads(tmp_path):
    from utils.config import load_config
    from wan.modules.causal_model import CausalWanModel

    recipe = os.path.join(TINY, "ode.yaml")
    lmdb_path = write_tiny_ode_lmdb(load_config(recipe), tmp_path / "pairs.lmdb")
    logdir = tmp_path / "run"
    # noisy points only: with clean context (the default, tested in test_objectives and by the quickstart chain) a
    # block at t = 0 drops out of a step's loss, and 16 tiny steps are too few to see the trend through that noise
    proc = torchrun_train(recipe, logdir, f"train.data_path={lmdb_path}", "train.max_steps=16", "train.save_iters=16",
                          "train.ode_clean_context=false")
    assert_ok(proc)

    losses = [r["generator_loss"] for r in metrics(logdir)]
    assert len(losses) == 16
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.7 * first, losses

    # the export is an official-key checkpoint folder that WanModel.from_pretrained reads
    export = logdir / "latest"
    assert {"generator.safetensors", "config.json", "config.yaml"} <= {p.name for p in export.iterdir()}
    model = CausalWanModel.from_pretrained(str(export))
    from safetensors.torch import load_file

    weights = load_file(export / "generator.safetensors")
    assert "blocks.0.self_attn.q.weight" in weights
    assert torch.equal(model.state_dict()["head.head.weight"], weights["head.head.weight"])
    assert (logdir / "training_curves.png").stat().st_size > 0


def test_bad_command_line_and_config_fail_in_one_line(tmp_path):
    recipe = os.path.join(TINY, "self_forcing_dmd.yaml")
    proc = run_script(["train.py", "--config_path", recipe])
    assert_one_line_error(proc, "--logdir")
    proc = run_script(["train.py", "--config_path", recipe, "--logdir", str(tmp_path), "train.max_stepz=3"])
    assert_one_line_error(proc, "train.max_stepz")
    proc = run_script(["train.py", "--config_path", recipe, "--logdir", str(tmp_path), "train.total_batch_size=3",
                       "train.batch_size=2"])
    assert_one_line_error(proc, "train.total_batch_size")
    assert not (tmp_path / "checkpoints").exists()
