"""scripts/estimate_memory.py: the real step on fake tensors agrees with the same step measured on real CPU tensors
(2 gloo ranks, same tracker); a recipe that does not fit gets the smallest change that does; bad input is one line."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT, assert_one_line_error, run_script

DMD = os.path.join(REPO_ROOT, "configs", "tiny", "self_forcing_dmd.yaml")
ODE = os.path.join(REPO_ROOT, "configs", "tiny", "ode.yaml")


def estimate(tmp_path, name, *args):
    out = tmp_path / f"{name}.json"
    proc = run_script(["scripts/estimate_memory.py", "--json_out", str(out), *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def measure(tmp_path, name, recipe, *overrides, nproc=2):
    out = tmp_path / f"{name}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               os.path.join(REPO_ROOT, "scripts", "estimate_memory.py"), "--config_path", recipe, "--measure",
               "--json_out", str(out), *overrides]
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def rows(result):
    return {row["name"]: row["bytes"] for row in result["rows"]}


@pytest.mark.distributed
@pytest.mark.parametrize("recipe, overrides", [(DMD, ()), (DMD, ("parallel.sp_size=2",)), (ODE, ()),
                                               (ODE, ("train.trainer=teacher_forcing",))],
                         ids=["dmd", "dmd-sp2", "ode", "teacher-forcing"])
def test_estimate_agrees_with_the_measured_step_within_10_percent(tmp_path, recipe, overrides):
    estimated, stdout = estimate(tmp_path, "estimate", "--config_path", recipe, "--nproc_per_node", "2", *overrides)
    measured = measure(tmp_path, "measured", recipe, *overrides)
    assert "estimated for 1 x 2 ranks" in estimated["launch"] and "measured on 2 rank(s)" in measured["launch"]
    # persistent state is read from the same local shards: equal to the byte
    persistent = [name for name in rows(estimated) if any(w in name for w in ("parameters", "optimizer", "EMA", "teacher"))]
    assert len(persistent) >= (2 if recipe == ODE else 6)
    for name in persistent:
        assert rows(estimated)[name] == rows(measured)[name] > 0, name
    # the step's peak: fake tensors vs real ones
    ratio = estimated["step_peak_bytes"] / measured["step_peak_bytes"]
    assert 0.9 <= ratio <= 1.1, (estimated["step_peak_bytes"], measured["step_peak_bytes"])
    assert measured["step_peak_bytes"] > sum(rows(measured)[name] for name in persistent)  # the step allocates
    assert "peak per rank" in stdout and "fits" in stdout


def test_sequence_parallelism_shrinks_the_working_memory_and_long_tuning_keeps_it(tmp_path):
    from utils.config import load_config
    from utils.geometry import derive_geometry

    size = ("video.height=256", "video.width=384")  # 2304 tokens: activations, not weights, dominate the step
    whole, _ = estimate(tmp_path, "sp1", "--config_path", DMD, "--nproc_per_node", "2", *size)
    split, _ = estimate(tmp_path, "sp2", "--config_path", DMD, "--nproc_per_node", "2", "parallel.sp_size=2", *size)
    work = "step working memory at the peak"
    assert rows(split)[work] < 0.7 * rows(whole)[work]
    assert rows(split)["generator parameters"] == rows(whole)["generator parameters"]  # FSDP shards alike
    # Long tuning's estimate rolls out its longest length: from 2x to 8x the working memory grows only by the start
    # noise of the extra frames (and its copy), not by their activations or latents; over DMD's it adds at most one
    # cache of frame copies (the scored blocks attend to frames later blocks evict: each copied once, for the recompute).
    x2, _ = estimate(tmp_path, "x2", "--config_path", DMD, "--nproc_per_node", "2", "distill.long_rollout_factor=2", *size)
    x8, _ = estimate(tmp_path, "x8", "--config_path", DMD, "--nproc_per_node", "2", "distill.long_rollout_factor=8", *size)
    g = derive_geometry(load_config(DMD, list(size)), check_weights=False)
    frame_bytes = 4 * g.latent_channels * g.latent_height * g.latent_width
    grown = rows(x8)[work] - rows(x2)[work]
    assert grown <= 2.5 * 6 * g.num_latent_frames * frame_bytes, (rows(x2)[work], rows(x8)[work])
    copies = 2 * g.num_layers * math.prod(g.kv_cache_shape) * 4  # k and v of every cached frame, every layer, fp32
    window = rows(x2)[work] - rows(whole)[work]
    assert 0 < window <= copies + 2.5 * g.num_latent_frames * frame_bytes, (rows(whole)[work], rows(x2)[work], copies)


def test_a_recipe_that_does_not_fit_gets_the_smallest_change_that_fits(tmp_path):
    first, _ = estimate(tmp_path, "first", "--config_path", DMD, "--nproc_per_node", "2")
    encoder = rows(first)["text encoder"]
    # a card just too small for the peak, large enough without the text encoder on it
    size_gb = (first["peak_bytes"] - encoder / 2) / 0.95 / 1024**3
    result, stdout = estimate(tmp_path, "small", "--config_path", DMD, "--nproc_per_node", "2",
                              "--gpu_memory_gb", f"{size_gb:.9f}")
    assert not result["fits"]
    suggestion = result["suggestions"][0]
    assert suggestion["change"] == "text_encoder.device=cpu" and suggestion["fits"]
    # the encoder left the card (the step's own peak may move by a freed tensor between runs)
    assert abs(suggestion["peak_bytes"] - (first["peak_bytes"] - encoder)) < 0.03 * first["peak_bytes"]
    assert "suggestion: add text_encoder.device=cpu" in stdout and "does NOT fit" in stdout


def test_bad_input_is_one_line(tmp_path):
    script = "scripts/estimate_memory.py"
    assert_one_line_error(run_script([script, "--config_path", DMD, "--nproc_per_node", "0"]),
                          "--nproc_per_node 0", "expected positive")
    assert_one_line_error(run_script([script, "--config_path", DMD, "--nproc_per_node", "2", "parallel.sp_size=3"]),
                          "parallel.sp_size=3 does not divide the 2 attention heads")
    assert_one_line_error(run_script([script, "--config_path", DMD, "--nproc_per_node", "3", "parallel.sp_size=2"]),
                          "parallel.sp_size=2 does not divide the 3 rank(s)")
    assert_one_line_error(run_script([script, "--config_path", DMD, "--gpu_memory_gb", "-1"]), "--gpu_memory_gb")
    assert_one_line_error(run_script([script, "--config_path", DMD, "--gpu_memory_gb", "nan"]), "--gpu_memory_gb nan")
    assert_one_line_error(run_script([script, "--config_path", DMD, "nonsense"]), "unexpected argument 'nonsense'")
    assert_one_line_error(run_script([script, "--config_path", str(tmp_path / "missing.yaml")]), "not found")
