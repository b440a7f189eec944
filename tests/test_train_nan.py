"""A NaN/Inf streak under torchrun (2 CPU ranks) stops the run with one clear message and the last good checkpoint."""
import os

import pytest

from tests.train_helpers import PROMPTS, TINY, metrics, torchrun_train

DMD = os.path.join(TINY, "self_forcing_dmd.yaml")


@pytest.mark.distributed
def test_nan_streak_stops_with_a_clear_message_and_keeps_latest(tmp_path):
    proc = torchrun_train(DMD, tmp_path, f"train.data_path={PROMPTS}", "train.max_steps=6", "train.save_iters=2",
                          "train.max_consecutive_nonfinite=2", env={"SF_TEST_INJECT_NAN_STEPS": "2,3,4,5"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "2 iterations in a row had a NaN/Inf loss or gradient" in proc.stderr
    assert (tmp_path / "checkpoints" / "latest.txt").read_text().strip() == "step_000002"
    assert metrics(tmp_path)[-1]["nonfinite_skipped"] == 2
