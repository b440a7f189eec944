"""Resume under torchrun (2 CPU ranks): a crash mid-save keeps a loadable latest, and 3 steps + a resume to 6
equal 6 uninterrupted steps tensor for tensor (generator, critic, EMA, optimizer states)."""
import os

import pytest
import torch

from tests.train_helpers import PROMPTS, TINY, assert_ok, checkpoint_tensors, metrics, torchrun_train

DMD = os.path.join(TINY, "self_forcing_dmd.yaml")
ARGS = (f"train.data_path={PROMPTS}", "train.max_steps=6", "train.save_iters=3", "train.ema_start_step=1",
        "distill.dfake_gen_update_ratio=2")


@pytest.mark.distributed
@pytest.mark.filterwarnings("ignore:torch.distributed is unavailable")
def test_crash_during_save_then_resume_equals_uninterrupted_run(tmp_path):
    # 1. Run to 6 but die while saving step 6: step 3 stays the latest, the half-written folder is ignored.
    interrupted = tmp_path / "interrupted"
    proc = torchrun_train(DMD, interrupted, *ARGS, env={"SF_TEST_EXIT_DURING_SAVE": "6"})
    assert proc.returncode != 0
    checkpoints = interrupted / "checkpoints"
    assert (checkpoints / "latest.txt").read_text().strip() == "step_000003"
    assert (checkpoints / "step_000006.tmp").is_dir() and not (checkpoints / "step_000006").exists()

    # 2. The same command resumes from step 3 and finishes.
    proc = torchrun_train(DMD, interrupted, *ARGS)
    assert_ok(proc)
    assert "at step 3" in proc.stdout
    assert not (checkpoints / "step_000006.tmp").exists()
    assert [r["step"] for r in metrics(interrupted)][-3:] == [4, 5, 6]

    # 3. An uninterrupted run of 6 steps.
    straight = tmp_path / "straight"
    assert_ok(torchrun_train(DMD, straight, *ARGS))

    resumed = checkpoint_tensors(checkpoints / "step_000006")
    reference = checkpoint_tensors(straight / "checkpoints" / "step_000006")
    assert resumed.keys() == reference.keys()
    for prefix in ("generator.model.", "critic.model.", "ema.shadow.", "generator.optim.", "critic.optim."):
        assert any(key.startswith(prefix) for key in reference), prefix
    for key, tensor in reference.items():
        assert torch.equal(resumed[key], tensor), key
    # and the weights really moved during the run
    first = checkpoint_tensors(checkpoints / "step_000003")
    key = "generator.model.blocks.0.self_attn.q.weight"
    assert not torch.equal(first[key], reference[key])
