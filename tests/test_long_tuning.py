"""Long tuning (distill.long_rollout_factor): the student rolls out past the training length through its rolling
cache, and the scores see, and the gradient flows through, only the last training-length window; memory stays one
window's whatever the rollout length."""
from __future__ import annotations

import contextlib

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
    """A score network that records the shape of what it is asked to score, and under which text."""

    def __init__(self, model):
        super().__init__()
        self.model, self.frames, self.contexts = model, [], []

    def predict_flow(self, x, timestep, context):
        self.frames.append(x.shape[1])
        self.contexts.append(context)
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
    with pytest.raises(UserError, match="independent_first_frame false"):
        long_setup(2, "rollout.independent_first_frame=true", "video.num_frames=25")
    with pytest.raises(UserError, match="prompt_switch_share.*0 unless distill.long_rollout_factor > 1"):
        load_config(RECIPE, ["distill.prompt_switch_share=0.5"])
    with pytest.raises(UserError, match=r"prompt_switch_share.*a share in \[0, 1\]"):
        load_config(RECIPE, ["distill.long_rollout_factor=2", "distill.prompt_switch_share=1.5"])


def test_a_switch_in_a_long_rollout_is_the_streaming_switch():
    """Long tuning's switch, made while only the window is kept, is the switch inference makes while keeping every
    frame: the same frames re-cached under the new prompt (sink and recent window), the same window after it."""
    from pipeline.rollout import PromptSwitch

    objective, models, g = long_setup(3)
    sampler, frames = objective.rollout, 3 * g.num_latent_frames
    blocks = sampler.rollout.block_sizes(frames)
    switch_block = len(blocks) - len(g.block_sizes)  # where the last training-length window starts
    exit_steps = [1] * len(blocks)
    noise = torch.randn(1, frames, *g.latent_shape[2:], generator=torch.Generator().manual_seed(3))
    context, other = score_batch(g).context, torch.randn(1, 4, g.text_dim, generator=torch.Generator().manual_seed(4))

    def run(switch_context, keep, passes=None):
        torch.manual_seed(0)  # the re-noising noise
        hook = None if switch_context is None else (
            lambda index: PromptSwitch(switch_context) if index == switch_block else None)
        on_pass = None if passes is None else (lambda which: passes.append(which) or contextlib.nullcontext())
        with torch.no_grad():
            return sampler.rollout.run(models.generator, noise, context, exit_steps=exit_steps, prompt_switch=hook,
                                       keep_last_frames=g.num_latent_frames if keep else None, on_pass=on_pass).latents

    passes = []
    window = run(other, keep=True, passes=passes)
    streaming = run(other, keep=False)[:, -g.num_latent_frames:]
    assert window.shape[1] == g.num_latent_frames and torch.equal(window, streaming)
    assert not torch.allclose(window, run(None, keep=True))  # the switch changed the window
    recaches = [p for p in passes if p.kind == "recache"]
    assert recaches and {p.block for p in recaches} == {switch_block}
    first_step = next(i for i, p in enumerate(passes) if p.kind == "step" and p.block == switch_block)
    assert passes.index(recaches[0]) < first_step  # re-cached before the window's first block


def test_switched_rollouts_are_scored_under_the_new_prompt():
    objective, models, g = long_setup(3, "distill.prompt_switch_share=1.0")
    batch = score_batch(g)
    batch.switch_context = torch.randn_like(batch.context)
    seen = set()
    for seed in range(6):
        torch.manual_seed(seed)
        models.real_score.contexts.clear()
        models.critic.contexts.clear()
        loss, logs = objective.generator_loss(models, batch)
        switched, longer = logs["prompt_switched"], logs["rollout_frames"] > g.num_latent_frames
        assert switched == float(longer)  # share 1: every longer rollout switches at its window; none at 1x
        expected = batch.switch_context if switched else batch.context
        real, critic = models.real_score.contexts, models.critic.contexts
        assert len(real) == 2 and real[0] is expected and real[1] is batch.negative_context  # CFG: the same negative
        assert len(critic) == 1 and critic[0] is expected
        seen.add(switched)
    assert seen == {0.0, 1.0}
    batch.switch_context = None
    objective.fixed_rollout_frames = 2 * g.num_latent_frames
    with pytest.raises(UserError, match="no switch prompt"):
        objective.generator_loss(models, batch)


def test_switches_go_to_each_prompts_own_next_prompts(tmp_path):
    """distill.switch_prompts: a row switches to one of its own prompt's next prompts (LongLive's continuations),
    drawn from the seed (the same draws again from a fresh sampler); a prompt without one is refused, naming it."""
    from trainer.data import BatchSource
    from trainer.data_position import ShardedSampler
    from utils.datasets import TextPromptDataset, read_switch_prompts

    class Encoder:
        def __init__(self):
            self.seen = []

        def encode(self, prompts):
            self.seen.append(list(prompts))
            return torch.zeros(len(prompts), 2, 4)

        def encode_cached(self, prompt):
            return torch.zeros(1, 2, 4)

    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    (tmp_path / "next.txt").write_text("a cat\tthe cat sits\na cat\tthe cat jumps\na dog\tthe dog barks\n")
    dataset = TextPromptDataset(tmp_path / "prompts.txt")
    nexts = read_switch_prompts(tmp_path / "next.txt", dataset.prompts)
    assert nexts == [["the cat sits", "the cat jumps"], ["the dog barks"]]

    def draws():
        encoder = Encoder()
        source = BatchSource(dataset, ShardedSampler(2, 2, 0, 1, seed=5), encoder, "", torch.device("cpu"), ti2v=False,
                             switch_prompts=True, next_prompts=nexts)
        pairs = []
        for _ in range(12):
            batch_prompts = source.next().prompts
            pairs += list(zip(batch_prompts, encoder.seen[-1]))  # encode(prompts), then encode(their next prompts)
            assert encoder.seen[-2] == batch_prompts
        return pairs

    pairs = draws()
    assert all(after in dict(zip(dataset.prompts, nexts))[before] for before, after in pairs)
    assert {after for before, after in pairs if before == "a cat"} == {"the cat sits", "the cat jumps"}
    assert draws() == pairs  # drawn from the seed, epoch and item alone
    (tmp_path / "some.txt").write_text("a cat\tthe cat sits\n")
    with pytest.raises(UserError, match="no next prompt for 1 training prompt.*'a dog'"):
        read_switch_prompts(tmp_path / "some.txt", dataset.prompts)
    with pytest.raises(UserError, match="distill.switch_prompts.*unset unless distill.prompt_switch_share > 0"):
        load_config(RECIPE, [f"distill.switch_prompts={tmp_path / 'next.txt'}"])


def test_long_tuning_resumes_exactly(tmp_path):
    """A long-tuning run with prompt switches trains and logs the lengths and switches it drew; stopped at step 2 and
    resumed to 4, it draws the same lengths, switches and switch prompts, and ends with the same weights, critic and
    optimizer states as one run of 4 steps."""
    import json

    from tests.train_helpers import checkpoint_tensors

    def train(logdir, steps):
        proc = run_script(["train.py", "--config_path", str(REPO_ROOT + "/" + RECIPE), "--logdir", str(logdir),
                           "--disable-wandb", "distill.long_rollout_factor=4", "distill.prompt_switch_share=0.5",
                           f"train.max_steps={steps}",
                           "train.log_iters=1", "train.save_iters=2", "distill.dfake_gen_update_ratio=1"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]

    straight = train(tmp_path / "straight", 4)
    train(tmp_path / "resumed", 2)
    resumed = train(tmp_path / "resumed", 4)
    lengths = lambda records: [r.get("generator/rollout_frames") for r in records]  # noqa: E731
    assert lengths(resumed) == lengths(straight) and len(set(lengths(straight))) > 1 and None not in lengths(straight)
    switches = lambda records: [r.get("generator/prompt_switched") for r in records]  # noqa: E731
    assert switches(resumed) == switches(straight) and set(switches(straight)) == {0.0, 1.0}
    assert all(torch.isfinite(torch.tensor(r["generator_loss"])) for r in straight)
    reference = checkpoint_tensors(tmp_path / "straight" / "checkpoints" / "step_000004")
    other = checkpoint_tensors(tmp_path / "resumed" / "checkpoints" / "step_000004")
    assert reference.keys() == other.keys() and any(k.startswith("critic.optim.") for k in reference)
    for key, tensor in reference.items():
        assert torch.equal(other[key], tensor), key
