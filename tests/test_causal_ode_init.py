"""Causal ODE init: teacher forcing turns the teacher causal; the causal teacher makes ODE pairs block by block."""
from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import REPO_ROOT, run_script
from tests.train_helpers import write_tiny_ode_lmdb
from utils.config import load_config

TINY_ODE = os.path.join(REPO_ROOT, "configs/tiny/ode.yaml")
PROMPTS = os.path.join(REPO_ROOT, "prompts/tiny_prompts.txt")


def pairs(folder, *overrides):
    result = run_script(["scripts/generate_ode_pairs.py", "--config_path", TINY_ODE, "--caption_path", PROMPTS,
                         "--output_folder", str(folder), "--num_prompts", "2", "ode.num_steps=4",
                         "ode.keep_indices=[0,1,2,3,-1]", *overrides])  # 4 steps at shift 5: the student's steps
    assert result.returncode == 0, result.stderr
    from utils.lmdb_store import read_pair_tensors, scan_pair_folder

    return [read_pair_tensors(info.path) for info in scan_pair_folder(folder)]


def test_one_block_causal_sampling_equals_the_bidirectional_teacher(tmp_path):
    """With the whole video in one block the causal teacher attends like the bidirectional one (same weights)."""
    one_block = "video.num_frame_per_block=6"
    bidirectional = pairs(tmp_path / "bi", one_block)
    causal = pairs(tmp_path / "causal", one_block, "ode.causal_teacher=true")
    for a, b in zip(bidirectional, causal):
        assert torch.allclose(a["ode_latents"].float(), b["ode_latents"].float(), atol=2e-3)
        assert torch.equal(a["ode_timesteps"], b["ode_timesteps"])


def test_block_by_block_sampling_keeps_the_layout_and_earlier_blocks_ignore_later_ones(tmp_path):
    from pipeline.causal_teacher_sampling import sample_causal_teacher
    from pipeline.components import build_dit
    from utils.geometry import resolve_recipe

    config = load_config(TINY_ODE, ["ode.num_steps=6", "ode.keep_indices=[0,3,-1]"])
    recipe = resolve_recipe(config, need_scores=True)
    model = build_dit(recipe.real_score, causal=True, attention_backend="sdpa").eval()
    g = recipe.geometry
    noise = torch.randn((1, *g.latent_shape[1:]), generator=torch.Generator().manual_seed(0))
    cond, uncond = torch.randn(1, g.text_len, g.text_dim), torch.randn(1, g.text_len, g.text_dim)
    sample = sample_causal_teacher(model, noise, cond, uncond, config.ode, g, num_train_timesteps=1000, keep_indices=[0, 3, -1])
    assert sample.trajectory.shape == (1, 3, *g.latent_shape[1:])
    assert torch.equal(sample.trajectory[:, 0], noise)  # point 0 is the start noise of every block
    assert torch.equal(sample.trajectory[:, -1], sample.latent)
    steps = config.ode.num_steps * 2  # CFG: two calls per step
    assert sample.nfe == g.num_blocks * (steps + 2)  # + a context pass per cache per block
    # other noise in the last block changes only the last block
    changed = noise.clone()
    changed[:, -3:] = torch.randn(changed[:, -3:].shape, generator=torch.Generator().manual_seed(1))
    again = sample_causal_teacher(model, changed, cond, uncond, config.ode, g, num_train_timesteps=1000)
    assert torch.allclose(again.latent[:, :3], sample.latent[:, :3], atol=1e-6)
    assert not torch.allclose(again.latent[:, 3:], sample.latent[:, 3:], atol=1e-3)


def test_teacher_forcing_loss_sees_only_the_target_block_and_its_past():
    from model.objective import Batch, Models
    from model.teacher_forcing import TeacherForcing
    from pipeline.components import build_dit
    from utils.geometry import resolve_recipe

    config = load_config(TINY_ODE)
    recipe = resolve_recipe(config, need_scores=False)
    g = recipe.geometry
    model = build_dit(recipe.generator, causal=True, attention_backend="sdpa")
    objective = TeacherForcing(g, 1000, config.flow.timestep_shift)
    latents = torch.randn(1, 2, *g.latent_shape[1:], generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, g.text_len, g.text_dim)

    def loss_of(ode_latents, seed):
        torch.manual_seed(seed)
        loss, logs = objective.generator_loss(Models(generator=model), Batch(prompts=["p"], context=context,
                                                                            ode_latents=ode_latents))
        return loss, logs

    seed = next(s for s in range(50) if (torch.manual_seed(s), torch.randint(0, g.num_blocks, (1,)))[1].item() == 0)
    loss, logs = loss_of(latents, seed)
    assert torch.isfinite(loss) and logs["target_block"] == 0
    later = latents.clone()
    later[:, -1, 3:] += 1.0  # the clean frames of the block after the target
    assert torch.allclose(loss_of(later, seed)[0], loss)
    earlier_seed = next(s for s in range(50) if (torch.manual_seed(s), torch.randint(0, g.num_blocks, (1,)))[1].item() == 1)
    base = loss_of(latents, earlier_seed)[0]
    earlier = latents.clone()
    earlier[:, -1, :3] += 1.0  # the clean context before the target
    assert not torch.allclose(loss_of(earlier, earlier_seed)[0], base)
    loss.backward()
    assert model.patch_embedding.weight.grad is not None


@pytest.mark.slow
def test_the_causal_chain_runs_end_to_end(tmp_path):
    """teacher forcing -> causal teacher export -> ODE pairs from it -> LMDB -> ODE regression."""
    config = load_config(TINY_ODE)
    clean_pairs = write_tiny_ode_lmdb(config, tmp_path / "bidirectional.lmdb")
    tf = run_script(["train.py", "--config_path", TINY_ODE, "--logdir", str(tmp_path / "tf"), "--disable-wandb",
                     "train.trainer=teacher_forcing", f"train.data_path={clean_pairs}", "train.max_steps=3",
                     "train.save_iters=3"])
    assert tf.returncode == 0, tf.stderr
    causal_teacher = tmp_path / "tf" / "latest"
    produced = pairs(tmp_path / "pairs", "ode.causal_teacher=true", f"real_score.checkpoint={causal_teacher}")
    assert len(produced) == 2 and all(torch.isfinite(p["ode_latents"].float()).all() for p in produced)
    lmdb = run_script(["scripts/create_lmdb.py", "--data_path", str(tmp_path / "pairs"), "--lmdb_path",
                       str(tmp_path / "causal.lmdb")])
    assert lmdb.returncode == 0, lmdb.stderr
    ode = run_script(["train.py", "--config_path", TINY_ODE, "--logdir", str(tmp_path / "ode"), "--disable-wandb",
                      f"train.data_path={tmp_path / 'causal.lmdb'}", "train.max_steps=2", "train.save_iters=2"])
    assert ode.returncode == 0, ode.stderr
    assert (tmp_path / "ode" / "latest" / "generator.safetensors").exists()


def test_teacher_sampler_judges_the_causal_teacher_block_by_block():
    """The quickstart's causal-teacher row: with the whole clip in one block the causal teacher's clip is the
    bidirectional teacher's (same weights, same seed); in the recipe's blocks it is another clip, and each frame
    goes through steps x CFG evaluations plus one context pass per CFG branch."""
    from miniature.judge import eval_prompts
    from miniature.report import TeacherSampler

    prompt = eval_prompts()[0][0]
    recipe = os.path.join(REPO_ROOT, "configs/miniature/ode.yaml")
    fast = ["teacher.num_steps=4"]
    one_block = [*fast, "video.num_frame_per_block=9"]
    bidirectional, nfe, _ = TeacherSampler(load_config(recipe, one_block), torch.device("cpu"))(prompt, 7)
    causal_one = TeacherSampler(load_config(recipe, [*one_block, "ode.causal_teacher=true"]), torch.device("cpu"))
    video, causal_nfe, _ = causal_one(prompt, 7)
    assert causal_one.calls_per_nfe == 1
    assert torch.allclose(video, bidirectional, atol=2e-3)
    assert causal_nfe == nfe + 2
    blocks = TeacherSampler(load_config(recipe, [*fast, "ode.causal_teacher=true"]), torch.device("cpu"))
    in_blocks, blocks_nfe, _ = blocks(prompt, 7)
    assert blocks.calls_per_nfe == 3
    assert blocks_nfe == 4 * 2 + 2
    assert not torch.allclose(in_blocks, bidirectional, atol=1e-2)
