"""Long tuning (distill.long_rollout_factor): the student rolls out past the training length through its rolling
cache, and the scores see, and the gradient flows through, only the last training-length window; memory stays one
window's whatever the rollout length."""
from __future__ import annotations

import pytest
import torch

from model import Models, build_objective
from pipeline.components import build_dit
from tests.helpers import REPO_ROOT, run_script
from tests.test_objectives import score_batch
from utils.config import load_config
from utils.errors import UserError
from utils.geometry import resolve_recipe

RECIPE = "configs/tiny/self_forcing_dmd.yaml"


class Recorder(torch.nn.Module):
    """A score network that records the shape of what it is asked to score."""

    def __init__(self, model):
        super().__init__()
        self.model, self.frames = model, []

    def predict_flow(self, x, timestep, context):
        self.frames.append(x.shape[1])
        return self.model.predict_flow(x, timestep, context)


def long_setup(factor: int, *overrides: str):
    config = load_config(RECIPE, [f"distill.long_rollout_factor={factor}", *overrides])
    resolved = resolve_recipe(config)
    torch.manual_seed(0)
    generator = build_dit(resolved.generator, causal=True, attention_backend="sdpa")
    real = build_dit(resolved.real_score, causal=False, attention_backend="sdpa").requires_grad_(False)
    critic = build_dit(resolved.critic, causal=False, attention_backend="sdpa")
    return build_objective(config, resolved.geometry), Models(generator, Recorder(real), Recorder(critic)), resolved.geometry


def test_the_scores_see_the_last_window_of_a_longer_rollout():
    objective, models, g = long_setup(3)
    starts = []
    original = models.generator.forward_cached

    def spy(x, timestep, context, kv_cache, start_frame, commit):
        if torch.is_grad_enabled():
            starts.append(start_frame)
        return original(x, timestep, context, kv_cache, start_frame, commit)

    models.generator.forward_cached = spy
    lengths = set()
    for seed in range(6):
        torch.manual_seed(seed)
        starts.clear()
        loss, logs = objective.generator_loss(models, score_batch(g))
        loss.backward()
        length = int(logs["rollout_frames"])
        lengths.add(length)
        assert g.num_latent_frames <= length <= 3 * g.num_latent_frames and length % g.num_frame_per_block == 0
        assert min(starts) >= length - g.num_latent_frames  # gradient only in the last window's blocks
    assert len(lengths) > 1  # the length is drawn
    assert set(models.real_score.frames) == set(models.critic.frames) == {g.num_latent_frames}
    critic_loss, _ = objective.critic_loss(models, score_batch(g))
    assert torch.isfinite(critic_loss) and models.critic.frames[-1] == g.num_latent_frames


def saved_bytes(objective, models, g, frames: int) -> int:
    """Bytes autograd keeps for backward in one generator loss rolled out to `frames` latent frames."""
    objective.fixed_rollout_frames = frames
    total = [0]

    def pack(tensor):
        total[0] += tensor.numel() * tensor.element_size()
        return tensor

    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss, _ = objective.generator_loss(models, score_batch(g))
    del loss
    return total[0]


def test_memory_for_backward_does_not_grow_with_the_rollout_length():
    objective, models, g = long_setup(8)
    short = saved_bytes(objective, models, g, 2 * g.num_latent_frames)
    long = saved_bytes(objective, models, g, 8 * g.num_latent_frames)
    assert short > 0 and long == short  # the history runs without gradient; its keys sit in the fixed-size cache


def test_long_tuning_settings_are_checked():
    with pytest.raises(UserError, match="distill.long_rollout_factor"):
        load_config(RECIPE, ["distill.long_rollout_factor=0"])
    with pytest.raises(UserError, match="RoPE table"):
        long_setup(1000)


def test_long_tuning_resumes_exactly(tmp_path):
    """A long-tuning run trains and logs the lengths it drew; stopped at step 2 and resumed to 4, it draws the same
    lengths and ends with the same weights, critic and optimizer states as one run of 4 steps."""
    import json

    from tests.train_helpers import checkpoint_tensors

    def train(logdir, steps):
        proc = run_script(["train.py", "--config_path", str(REPO_ROOT + "/" + RECIPE), "--logdir", str(logdir),
                           "--disable-wandb", "distill.long_rollout_factor=4", f"train.max_steps={steps}",
                           "train.log_iters=1", "train.save_iters=2", "distill.dfake_gen_update_ratio=1"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]

    straight = train(tmp_path / "straight", 4)
    train(tmp_path / "resumed", 2)
    resumed = train(tmp_path / "resumed", 4)
    lengths = lambda records: [r.get("generator/rollout_frames") for r in records]  # noqa: E731
    assert lengths(resumed) == lengths(straight) and len(set(lengths(straight))) > 1 and None not in lengths(straight)
    assert all(torch.isfinite(torch.tensor(r["generator_loss"])) for r in straight)
    reference = checkpoint_tensors(tmp_path / "straight" / "checkpoints" / "step_000004")
    other = checkpoint_tensors(tmp_path / "resumed" / "checkpoints" / "step_000004")
    assert reference.keys() == other.keys() and any(k.startswith("critic.optim.") for k in reference)
    for key, tensor in reference.items():
        assert torch.equal(other[key], tensor), key
