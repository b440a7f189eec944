"""Score distillation under torchrun (2 CPU ranks): update ratio for DMD and SiD, NaN/Inf skipped and counted."""
import os

import pytest

from tests.helpers import run_script
from tests.train_helpers import PROMPTS, TINY, assert_ok, metrics, torchrun_train

DMD = os.path.join(TINY, "self_forcing_dmd.yaml")
SID = os.path.join(TINY, "self_forcing_sid.yaml")


@pytest.mark.distributed
def test_dmd_updates_generator_and_critic_in_ratio(tmp_path):
    proc = torchrun_train(DMD, tmp_path, f"train.data_path={PROMPTS}", "train.max_steps=4",
                          "distill.dfake_gen_update_ratio=2")
    assert_ok(proc)
    records = metrics(tmp_path)
    # iterations 0 and 2 train the generator, every iteration the critic
    assert [("generator_loss" in r) for r in records] == [True, False, True, False]
    assert (records[-1]["generator_updates"], records[-1]["critic_updates"]) == (2, 4)
    assert all(r["critic_grad_norm"] > 0 for r in records)
    assert {"seconds_per_step", "tokens_per_s", "peak_memory_gb", "lr", "lr_critic"} <= set(records[-1])
    assert (tmp_path / "latest" / "generator_ema.safetensors").exists()


@pytest.mark.distributed
def test_sid_ratio_and_injected_nan_is_skipped_and_counted(tmp_path):
    # also the memory options: LoRA, activation checkpointing, 2 accumulation micro-steps per rank
    proc = torchrun_train(SID, tmp_path, f"train.data_path={PROMPTS}", "train.max_steps=4",
                          "distill.dfake_gen_update_ratio=3", "train.lora_rank=4", "train.gradient_checkpointing=true",
                          "train.total_batch_size=4", env={"SF_TEST_INJECT_NAN_STEPS": "1"})
    assert_ok(proc)
    records = metrics(tmp_path)
    assert [("generator_loss" in r) for r in records] == [True, False, False, True]
    assert records[1]["nonfinite_skipped"] == 1 and records[-1]["nonfinite_skipped"] == 1
    # iteration 1's critic update was dropped: 3 of 4 critic steps applied, both generator steps
    assert (records[-1]["generator_updates"], records[-1]["critic_updates"]) == (2, 3)
    assert "generator/sid_loss" in records[0]
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "latest" / "generator.safetensors")
    assert "blocks.0.ffn.0.weight" in exported and not any("lora" in key for key in exported)



@pytest.mark.distributed
def test_mixed_precision_on_two_ranks_trains_every_parameter_of_both_models(tmp_path):
    """The published recipes' setting (bf16 through FSDP2) on 2 ranks: the critic, first called frozen in the generator
    step, still gets fp32 gradients for every parameter, its embeddings and head included (both once failed)."""
    import torch

    from tests.train_helpers import checkpoint_tensors

    proc = torchrun_train(DMD, tmp_path, f"train.data_path={PROMPTS}", "train.max_steps=4", "train.save_iters=2",
                          "train.mixed_precision=true", "distill.dfake_gen_update_ratio=1")
    assert_ok(proc)
    before = checkpoint_tensors(tmp_path / "checkpoints" / "step_000002")
    after = checkpoint_tensors(tmp_path / "checkpoints" / "step_000004")
    for model in ("generator", "critic"):
        weights = [key for key in after if key.startswith(f"{model}.model.")]
        assert len(weights) > 60
        unchanged = [key for key in weights if torch.equal(before[key], after[key])]
        assert not unchanged, (model, unchanged)
        assert all(after[key].dtype == torch.float32 for key in weights)


def test_sharded_dits_return_no_view_that_would_lose_fsdp_hooks(tmp_path):
    """FSDP2 warns when a wrapped unit returns a view (an in-place op on it would drop the pre-backward hook and skip
    the all-gather). Every unit of the sharded causal and bidirectional DiTs returns a fresh tensor: no warning."""
    script = tmp_path / "shard.py"
    script.write_text('''
import warnings, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from pipeline.components import build_dit
from trainer.parallel import shard_model
from utils.config import load_config
from utils.geometry import resolve_recipe

dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
recipe = resolve_recipe(load_config("configs/tiny/self_forcing_dmd.yaml"))
g = recipe.geometry
for causal in (True, False):
    model = shard_model(build_dit(recipe.generator, causal=causal, attention_backend="sdpa"), mesh, mixed_precision=False)
    x = torch.randn(1, *g.latent_shape[1:])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flow = model.predict_flow(x, torch.full((1, g.num_latent_frames), 500.0), torch.randn(1, 5, g.text_dim))
        flow.square().mean().backward()
    views = [str(w.message) for w in caught if "view tensor" in str(w.message)]
    assert not views, views
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
print("no view warnings")
dist.destroy_process_group()
''')
    proc = run_script([str(script)])
    assert proc.returncode == 0 and "no view warnings" in proc.stdout, proc.stderr[-3000:]
