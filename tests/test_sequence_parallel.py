"""Ulysses sequence parallelism on 2 CPU ranks (gloo): every DiT entry equals the whole-sequence model, outputs
and gradients; bad sizes are one line before work."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO_ROOT
from tests.train_helpers import PROMPTS, TINY, assert_ok, checkpoint_tensors, metrics, torchrun_train

pytestmark = pytest.mark.distributed


def run_worker(tmp_path, nproc=2):
    out = tmp_path / "sp.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               os.path.join(REPO_ROOT, "tests", "sp_worker.py"), str(out)]
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_every_dit_entry_equals_the_whole_sequence(tmp_path):
    report = run_worker(tmp_path)
    cases = report["cases"]
    assert report["world"] == 2 and report["blocks"] == 3
    assert set(cases) == {"predict_flow", "predict_flow_per_token_timestep", "predict_flow_no_grad",
                          "forward_block_causal_window_sink", "rollout_inference_rolling_cache",
                          "rollout_training_exit_steps"}
    for name, case in cases.items():
        # outputs: the same tokens through the same kernels, only exchanged between ranks
        assert case["output_scale"] > 0.5, name
        assert case["output"] <= 1e-5 * case["output_scale"], (name, case)
        if "gradient" in case:  # relative to each parameter's largest gradient; every parameter has one
            assert case["num_gradients"] == 69, (name, case)
            assert case["gradient"] < 1e-4, (name, case)


# ---- the trainer: sp_size 2 on 2 ranks trains exactly like one process (same data shard, noise and exit steps) ----
DMD = os.path.join(TINY, "self_forcing_dmd.yaml")
SID = os.path.join(TINY, "self_forcing_sid.yaml")
STEPS = (f"train.data_path={PROMPTS}", "train.max_steps=4", "train.save_iters=2", "train.ema_start_step=1")


def assert_same_training(single, split, prefixes, rtol=1e-4):
    """Losses of every logged step and every tensor of the last checkpoint (weights, optimizer states, EMA)."""
    one, two = metrics(single), metrics(split)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        for key in (k for k in a if k.endswith("_loss")):
            assert abs(a[key] - b[key]) <= rtol * max(abs(a[key]), 1e-3), (a["step"], key, a[key], b[key])
    last_one = checkpoint_tensors(single / "checkpoints" / "step_000004")
    last_two = checkpoint_tensors(split / "checkpoints" / "step_000004")
    assert last_one.keys() == last_two.keys()
    for prefix in prefixes:
        assert any(key.startswith(prefix) for key in last_one), prefix
    first = checkpoint_tensors(single / "checkpoints" / "step_000002")
    moved = 0
    for key, tensor in last_one.items():
        if tensor.is_floating_point():
            assert torch.allclose(tensor, last_two[key], rtol=1e-3, atol=1e-5), (key, (tensor - last_two[key]).abs().max())
            moved += int(not torch.equal(first[key], tensor))
    assert moved > 20  # the weights and optimizer states really changed between steps 2 and 4


@pytest.fixture(scope="module")
def single_dmd(tmp_path_factory):
    """4 DMD steps in one process, saved at steps 2 and 4: the reference the sequence-parallel runs are held to."""
    single = tmp_path_factory.mktemp("single_dmd")
    assert_ok(torchrun_train(DMD, single, *STEPS, nproc=1))
    return single


@pytest.mark.parametrize("recipe", [DMD, SID], ids=["dmd", "sid"])
def test_score_distillation_with_sp2_equals_one_process(tmp_path, recipe, request):
    split = tmp_path / "sp2"
    if recipe == DMD:
        single = request.getfixturevalue("single_dmd")
    else:
        single = tmp_path / "single"
        assert_ok(torchrun_train(recipe, single, *STEPS, nproc=1))
    proc = torchrun_train(recipe, split, *STEPS, "parallel.sp_size=2")
    assert_ok(proc)
    assert_same_training(single, split, ("generator.model.", "critic.model.", "ema.shadow.", "generator.optim."))


def test_ode_regression_with_sp2_equals_one_process(tmp_path):
    from tests.train_helpers import write_tiny_ode_lmdb
    from utils.config import load_config

    recipe = os.path.join(TINY, "ode.yaml")
    lmdb_path = write_tiny_ode_lmdb(load_config(recipe), tmp_path / "pairs.lmdb")
    args = (f"train.data_path={lmdb_path}", "train.max_steps=4", "train.save_iters=2")
    single, split = tmp_path / "single", tmp_path / "sp2"
    assert_ok(torchrun_train(recipe, single, *args, nproc=1))
    assert_ok(torchrun_train(recipe, split, *args, "parallel.sp_size=2"))
    assert_same_training(single, split, ("generator.model.", "generator.optim."))


def test_resume_on_another_mesh_continues_exactly(tmp_path, single_dmd):
    """2 steps on 2 ranks with sp_size 2 (sharded checkpoint), then steps 3-4 in one process: equals 4 steps in one."""
    single, moved = single_dmd, tmp_path / "moved"
    first = STEPS[:1] + ("train.max_steps=2",) + STEPS[2:]
    assert_ok(torchrun_train(DMD, moved, *first, "parallel.sp_size=2"))
    assert {p.name for p in (moved / "checkpoints" / "step_000002").glob("rng_*")} == {"rng_dp0.pt"}
    proc = torchrun_train(DMD, moved, *STEPS, nproc=1)
    assert_ok(proc)
    assert "at step 2" in proc.stdout
    assert_same_training(single, moved, ("generator.model.", "critic.model.", "ema.shadow.", "generator.optim."))


def test_sp_size_that_does_not_fit_is_one_line_before_work(tmp_path):
    from tests.helpers import assert_one_line_error, run_script

    def train(logdir, *overrides):
        return run_script(["train.py", "--config_path", DMD, "--logdir", str(logdir), "--disable-wandb", *STEPS,
                           *overrides])

    assert_one_line_error(train(tmp_path / "heads", "parallel.sp_size=3"),
                          "parallel.sp_size=3 does not divide the 2 attention heads of generator 'tiny-t2v'")
    assert_one_line_error(train(tmp_path / "tokens", "parallel.sp_size=2", "video.height=16"),
                          "parallel.sp_size=2 does not divide the 3 tokens of a latent frame")
    assert_one_line_error(train(tmp_path / "ranks", "parallel.sp_size=2"),
                          "parallel.sp_size=2 does not divide the 1 rank(s) of this run")
    assert not any((tmp_path / name).exists() for name in ("heads", "tokens", "ranks"))


def test_two_data_ranks_times_two_sequence_ranks_equal_two_data_ranks(tmp_path):
    """dp 2 x sp 2 on 4 ranks trains like dp 2 on 2 ranks: the same shards, seeds and exit steps, each sample split."""
    dp, dp_sp = tmp_path / "dp2", tmp_path / "dp2_sp2"
    assert_ok(torchrun_train(DMD, dp, *STEPS, nproc=2))
    assert_ok(torchrun_train(DMD, dp_sp, *STEPS, "parallel.sp_size=2", nproc=4, timeout=600))
    assert_same_training(dp, dp_sp, ("generator.model.", "critic.model.", "ema.shadow.", "generator.optim."))
