"""The block-wise KV-cache rollout: equals a hand-written loop, gradient only at the exit step, exit steps
shared across ranks, TI2V first frame, given blocks (video extension), rolling cache for long videos."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from pipeline.components import build_dit
from pipeline.rollout import BlockRollout, draw_exit_steps, rollout_block_sizes
from pipeline.self_forcing_training import SelfForcingRollout
from utils.config import load_config
from utils.errors import UserError
from utils.geometry import resolve_recipe
from wan.modules.kv_cache import KVCache

RECIPE = "configs/tiny/self_forcing_dmd.yaml"


def setup(*overrides: str):
    config = load_config(RECIPE, list(overrides))
    recipe = resolve_recipe(config)
    generator = build_dit(recipe.generator, causal=True, attention_backend="sdpa").eval()
    return config, recipe.geometry, generator


def inputs(geometry, batch=1, num_frames=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    _, frames, channels, height, width = geometry.latent_shape
    noise = torch.randn(batch, num_frames or frames, channels, height, width, generator=g)
    context = torch.randn(batch, 5, geometry.text_dim, generator=g)
    return noise, context


class Spy:
    """Records every forward_cached call of a generator: grad mode, commit, timesteps, input and output."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def forward_cached(self, x, timestep, context, kv_cache, start_frame, commit):
        out = self.model.forward_cached(x, timestep, context, kv_cache, start_frame, commit)
        self.calls.append(dict(grad=torch.is_grad_enabled(), commit=commit, start=start_frame, timestep=timestep.clone(),
                               x_grad_fn=x.grad_fn, out_grad_fn=out.grad_fn))  # fmt: skip
        return out


def hand_written_loop(model, rollout: BlockRollout, noise, context, num_train_timesteps=1000):
    """The rollout spelled out with forward_cached: every step, re-noise with randn, context pass at t = 0."""
    cache = KVCache.from_geometry(rollout.geometry, noise.shape[0], torch.float32, "cpu")
    outputs, start = [], 0
    for size in rollout.geometry.block_sizes:
        x = noise[:, start : start + size]
        for step, t in enumerate(rollout.timesteps.tolist()):
            timestep = torch.full((noise.shape[0], size), t)
            v = model.forward_cached(x, timestep, context, cache, start, commit=False)
            x0 = x - t / num_train_timesteps * v
            if step + 1 < rollout.num_steps:
                s = rollout.timesteps[step + 1].item() / num_train_timesteps
                x = (1 - s) * x0 + s * torch.randn(x0.shape)
        model.forward_cached(x0, torch.zeros(noise.shape[0], size), context, cache, start, commit=True)
        outputs.append(x0)
        start += size
    return torch.cat(outputs, dim=1)


def test_inference_rollout_equals_hand_written_loop():
    config, geometry, model = setup()
    rollout = BlockRollout.from_config(config, geometry)
    noise, context = inputs(geometry, batch=2)
    torch.manual_seed(7)
    output = rollout.run(model, noise, context)
    torch.manual_seed(7)
    with torch.no_grad():
        expected = hand_written_loop(model, rollout, noise, context)
    assert torch.allclose(output.latents, expected, atol=1e-5)
    assert output.nfe == geometry.num_blocks * (rollout.num_steps + 1)  # 4 steps + the context pass per block
    assert not output.latents.requires_grad
    assert torch.equal(output.exit_timesteps, torch.full((2, geometry.num_latent_frames), rollout.timesteps[-1].item()))
    # Training mode exiting every block at the last step, under no_grad, is the same computation.
    torch.manual_seed(7)
    with torch.no_grad():
        exits = rollout.run(model, noise, context, exit_steps=[rollout.num_steps - 1] * geometry.num_blocks)
    assert torch.allclose(exits.latents, expected, atol=1e-5)


def test_gradient_only_through_the_exit_step_and_cache_is_detached():
    config, geometry, model = setup()
    rollout = BlockRollout.from_config(config, geometry)
    noise, context = inputs(geometry)
    spy, cache = Spy(model), KVCache.from_geometry(geometry, 1, torch.float32, "cpu")
    exit_steps = [2, 1]
    output = rollout.run(spy, noise, context, exit_steps=exit_steps, kv_cache=cache)
    # Per block: exit+1 denoising forwards then one context pass; only the exit forward records a graph.
    assert output.nfe == sum(e + 2 for e in exit_steps) == len(spy.calls)
    grad_calls = [c for c in spy.calls if c["grad"]]
    assert [c["start"] for c in grad_calls] == [0, 3]
    assert all(c["out_grad_fn"] is None for c in spy.calls if not c["grad"])
    assert all(c["x_grad_fn"] is None for c in spy.calls)  # no step's input carries a graph from earlier steps
    assert all(not c["grad"] for c in spy.calls if c["commit"])
    assert not cache.keys.requires_grad and not cache.values.requires_grad
    output.latents.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert torch.allclose(output.exit_timesteps[0, :3], rollout.timesteps[2]) and torch.allclose(
        output.exit_timesteps[0, 3:], rollout.timesteps[1])
    # An outer no_grad (the critic's sample) wins over the exit step.
    with torch.no_grad():
        assert not rollout.run(model, noise, context, exit_steps=exit_steps).latents.requires_grad


def test_different_exit_steps_change_the_output():
    config, geometry, model = setup()
    rollout = BlockRollout.from_config(config, geometry)
    noise, context = inputs(geometry)
    results = []
    for exit_step in (0, 3):
        torch.manual_seed(0)
        with torch.no_grad():
            results.append(rollout.run(model, noise, context, exit_steps=[exit_step] * geometry.num_blocks).latents)
    assert (results[0] - results[1]).abs().max() > 1e-3


def test_draw_exit_steps_options():
    torch.manual_seed(0)
    same = draw_exit_steps(7, 4, same_step_across_blocks=True, last_step_only=False)
    assert len(set(same)) == 1 and 0 <= same[0] < 4
    assert draw_exit_steps(7, 4, same_step_across_blocks=False, last_step_only=True) == [3] * 7
    draws = {tuple(draw_exit_steps(7, 4, same_step_across_blocks=False, last_step_only=False)) for _ in range(5)}
    assert len(draws) > 1 and all(0 <= s < 4 for d in draws for s in d)


def _rank_draws(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(100 + rank)  # different RNG on each rank: only the broadcast makes them agree
    draws = [draw_exit_steps(5, 4, same_step_across_blocks=False, last_step_only=False) for _ in range(6)]
    torch.save(draws, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_exit_steps_identical_across_two_ranks(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_rank_draws, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert rank0 == rank1
    assert len({tuple(d) for d in rank0}) > 1  # they are drawn, not constant


@pytest.mark.parametrize("independent_first_frame", [False, True])
def test_ti2v_keeps_the_given_first_frame(independent_first_frame):
    overrides = ["video.num_frames=25", "rollout.independent_first_frame=true"] if independent_first_frame else []
    config, geometry, model = setup(*overrides)
    rollout = BlockRollout.from_config(config, geometry)
    noise, context = inputs(geometry)
    first = torch.randn(1, 1, *noise.shape[2:])
    spy = Spy(model)
    output = rollout.run(spy, noise, context, first_frame=first)
    assert torch.equal(output.latents[:, :1], first)
    assert float(output.exit_timesteps[0, 0]) == 0.0 and bool((output.exit_timesteps[0, 1:] > 0).all())
    # The model always sees the given frame at t = 0; it is written into the cache first.
    assert all(float(c["timestep"][0, 0]) == 0.0 for c in spy.calls if c["start"] == 0)
    if independent_first_frame:
        assert geometry.block_sizes == (1, 3, 3)
        assert spy.calls[0]["commit"] and spy.calls[0]["timestep"].shape == (1, 1)
        assert output.nfe == 1 + 2 * (rollout.num_steps + 1)
    # Later frames depend on the given frame through the cache.
    other = rollout.run(model, noise, context, first_frame=first + 1.0)
    assert (other.latents[:, -1] - output.latents[:, -1]).abs().max() > 1e-4


def test_a_batch_of_both_tasks_rolls_out_each_row_as_its_own_task():
    """Rows that hold a first frame (image-to-video) beside rows that make it (text-to-video): each row equals its own
    single-task rollout, and the held frame is the given latent at t = 0 in every pass of the first block."""
    config, geometry, model = setup("rollout.denoising_step_list=[1000]")  # one step: no fresh re-noising draws
    rollout = BlockRollout.from_config(config, geometry)
    noise, context = inputs(geometry, batch=2)
    first = torch.randn(2, 1, *noise.shape[2:])
    rows = torch.tensor([True, False])
    spy = Spy(model)
    mixed = rollout.run(spy, noise, context, first_frame=first, first_frame_rows=rows)
    image = rollout.run(model, noise[:1], context[:1], first_frame=first[:1])
    text = rollout.run(model, noise[1:], context[1:])
    assert torch.allclose(mixed.latents[:1], image.latents, atol=1e-5) and torch.equal(mixed.latents[:1, :1], first[:1])
    assert torch.allclose(mixed.latents[1:], text.latents, atol=1e-5) and not torch.allclose(mixed.latents[1:, :1], first[1:])
    assert torch.equal(mixed.exit_timesteps[:, 0], torch.tensor([0.0, 1000.0]))
    first_block = [c for c in spy.calls if c["start"] == 0]
    assert first_block and all(c["timestep"][0, 0] == 0 and c["timestep"][1, 0] > 0 for c in first_block if not c["commit"])
    with pytest.raises(UserError, match="every row of the batch must hold it"):
        _, g25, m25 = setup("video.num_frames=25", "rollout.independent_first_frame=true")
        BlockRollout.from_config(config, g25).run(m25, inputs(g25, batch=2)[0], context, first_frame=first,
                                                  first_frame_rows=rows)


def test_given_blocks_extend_a_video_as_if_the_rollout_had_made_them():
    # One denoising step: no fresh re-noising, so a rollout given its own first block must repeat the rest exactly.
    config, geometry, model = setup("rollout.denoising_step_list=[1000]")
    rollout = BlockRollout.from_config(config, geometry)
    noise, context = inputs(geometry)
    made = rollout.run(model, noise, context)
    head = geometry.block_sizes[0]
    spy = Spy(model)
    extended = rollout.run(spy, noise, context, given_blocks=made.latents[:, :head])
    assert torch.equal(extended.latents[:, :head], made.latents[:, :head])
    assert torch.allclose(extended.latents, made.latents, atol=1e-5)
    assert extended.nfe == 1 + (geometry.num_blocks - 1) * 2  # the given block's context pass only, then 1 step + 1
    assert spy.calls[0]["commit"] and float(spy.calls[0]["timestep"].abs().max()) == 0.0
    assert float(extended.exit_timesteps[:, :head].abs().max()) == 0.0 and bool((extended.exit_timesteps[:, head:] > 0).all())
    # The later blocks continue what was given.
    other = rollout.run(model, noise, context, given_blocks=made.latents[:, :head] + 1.0)
    assert (other.latents[:, -1] - made.latents[:, -1]).abs().max() > 1e-4
    for bad in (made.latents[:, :2], made.latents, made.latents[:, :head, :2]):
        with pytest.raises(UserError, match="given_blocks must be"):
            rollout.run(model, noise, context, given_blocks=bad)
    with pytest.raises(UserError, match="not both"):
        rollout.run(model, noise, context, given_blocks=made.latents[:, :head], first_frame=made.latents[:, :1])


def test_long_rollout_rolls_a_sink_window_cache():
    config, geometry, model = setup("rollout.local_attn_size=4", "rollout.sink_size=1")
    rollout = BlockRollout.from_config(config, geometry)
    noise, context = inputs(geometry, num_frames=15)  # 5 blocks through a 4-frame cache
    cache = KVCache.from_geometry(geometry, 1, torch.float32, "cpu")
    output = rollout.run(model, noise, context, kv_cache=cache)
    assert output.latents.shape == noise.shape and torch.isfinite(output.latents).all()
    assert output.nfe == 5 * (rollout.num_steps + 1)
    assert cache.max_frames == geometry.cache_frames == 4
    assert sorted(cache.slot_frames) == [0, 12, 13, 14]  # the sink frame, then the latest block
    # Training on a long rollout: only the last training-length frames keep gradient.
    spy = Spy(model)
    rollout.run(spy, noise, context, exit_steps=[0] * 5, grad_last_frames=geometry.num_latent_frames)
    assert sorted({c["start"] for c in spy.calls if c["grad"]}) == [9, 12]


def test_block_sizes_and_input_errors():
    config, geometry, model = setup()
    assert rollout_block_sizes(geometry, 6) == (3, 3) and rollout_block_sizes(geometry, 12) == (3, 3, 3, 3)
    with pytest.raises(UserError, match="whole blocks"):
        rollout_block_sizes(geometry, 7)
    rollout = BlockRollout.from_config(config, geometry)
    noise, context = inputs(geometry)
    with pytest.raises(UserError, match="exit_steps"):
        rollout.run(model, noise, context, exit_steps=[0])
    with pytest.raises(UserError, match="rollout noise"):
        rollout.run(model, noise[:, :, :8], context)


def test_self_forcing_rollout_sample_and_timestep_range():
    config, geometry, model = setup("rollout.same_step_across_blocks=false")
    trainer_rollout = SelfForcingRollout.from_config(config, geometry)
    noise = trainer_rollout.noise(2, torch.device("cpu"))
    assert tuple(noise.shape) == (2, *geometry.latent_shape[1:])
    _, context = inputs(geometry, batch=2)
    torch.manual_seed(3)
    sample = trainer_rollout.generate(model, noise, context)
    assert sample.latents.requires_grad and len(sample.exit_steps) == geometry.num_blocks
    steps = trainer_rollout.rollout.timesteps.tolist() + [0.0]
    for block, exit_step in enumerate(sample.exit_steps):
        frames = slice(3 * block, 3 * block + 3)
        assert torch.allclose(sample.exit_timesteps[:, frames], torch.tensor(steps[exit_step]))
        assert torch.allclose(sample.next_timesteps[:, frames], torch.tensor(steps[exit_step + 1]))


def _assert_checkpointing_keeps_the_gradients(overrides, num_frames=None, seed=3, exit_steps=None, **run):
    """The generator's gradients from one rollout, with and without activation checkpointing, agree to 1e-5."""
    from trainer.parallel import apply_activation_checkpointing, clean_name

    config, geometry, plain = setup(*overrides)
    _, _, wrapped = setup(*overrides)
    wrapped.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(wrapped)
    rollout = BlockRollout.from_config(config, geometry)
    noise, context = inputs(geometry, num_frames=num_frames, seed=seed)
    grads = []
    for model in (plain, wrapped):
        model.train()
        model.zero_grad()
        renoise = torch.Generator().manual_seed(11)
        out = rollout.run(model, noise, context, exit_steps=exit_steps, noise_generator=renoise, **run)
        (out.latents.square() * torch.linspace(0.5, 2, out.latents.shape[1])[None, :, None, None, None]).mean().backward()
        grads.append({clean_name(n): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, grad in grads[0].items():
        error = ((grads[1][name] - grad).norm() / grad.norm().clamp_min(1e-12)).item()
        assert error < 1e-5, (name, error)


@pytest.mark.parametrize("window", [-1, 4, 7])
def test_generator_gradients_equal_with_and_without_activation_checkpointing(window):
    """Backward recomputes each block against the cache frames its forward saw, also when later blocks have
    rolled them out of the window (full cache: -1; a window of sink + one block; sink + two blocks + one frame)."""
    overrides = ["video.num_frames=33"] + ([f"rollout.local_attn_size={window}", "rollout.sink_size=1"] if window > 0 else [])
    _, geometry, _ = setup(*overrides)
    assert len(geometry.block_sizes) >= 3 and (window < 0 or geometry.cache_frames < geometry.num_latent_frames)
    _assert_checkpointing_keeps_the_gradients(overrides, exit_steps=[1, 2, 0] + [1] * (len(geometry.block_sizes) - 3))


def test_a_long_rollouts_window_gets_the_same_gradients_with_and_without_activation_checkpointing():
    """Long tuning: a window of the training length (so the cache holds a whole training-length video) rolled past
    it; the scored blocks attend to frames that later blocks evict, so the recompute must see copies of them."""
    overrides = ["video.num_frames=33", "rollout.local_attn_size=9", "rollout.sink_size=1"]
    _, geometry, _ = setup(*overrides)
    assert geometry.cache_frames == geometry.num_latent_frames  # a training-length rollout never evicts here
    # 4x: the window's middle block (frames 30-32) attends to slots 0-5 exactly (a view of the storage, were it not
    # copied) and the last block (33-35) overwrites slots 0-2 before the backward
    frames = geometry.num_latent_frames
    _assert_checkpointing_keeps_the_gradients(overrides, num_frames=4 * frames, seed=4, exit_steps=[1, 2, 0, 3] * 3,
                                              grad_last_frames=frames, keep_last_frames=frames)


def test_a_bf16_cache_under_mixed_precision_changes_nothing_and_halves_the_cache():
    """train.mixed_precision: keys and values reach attention in bf16 anyway, so the rollout keeps its cache in bf16."""
    config, geometry, model = setup("train.mixed_precision=true", "rollout.local_attn_size=3")
    bf16 = BlockRollout.from_config(config, geometry)
    fp32 = BlockRollout.from_config(load_config(RECIPE, ["rollout.local_attn_size=3"]), geometry)
    assert bf16.cache_dtype == torch.bfloat16 and fp32.cache_dtype is None
    noise, context = inputs(geometry)
    outputs = []
    for rollout in (bf16, fp32):
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = rollout.run(model, noise, context, exit_steps=[1, 3]).latents
        out.float().square().mean().backward()
        outputs.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
        model.zero_grad(set_to_none=True)
    (a, grads_a), (b, grads_b) = outputs
    assert torch.equal(a, b)
    assert all(torch.equal(x, y) for x, y in zip(grads_a, grads_b))
    cache = KVCache.from_geometry(geometry, 1, bf16.cache_dtype, "cpu")
    assert cache.keys.element_size() == 2


def test_the_pass_hook_names_every_forward_as_it_runs():
    """on_pass is entered around each forward, told its kind: the steps of a block, its context pass, a recache."""
    import contextlib

    from pipeline.rollout import PromptSwitch

    config, geometry, model = setup()
    rollout = BlockRollout.from_config(config, geometry)
    noise, context = inputs(geometry)
    spy, seen = Spy(model), []

    @contextlib.contextmanager
    def on_pass(which):
        before = len(spy.calls)
        yield
        assert len(spy.calls) == before + 1  # exactly one forward inside
        seen.append((which.kind, which.block, which.step, spy.calls[-1]["commit"]))

    def switch(index):
        return PromptSwitch(torch.randn_like(context), recache=True) if index == 1 else None

    output = rollout.run(spy, noise, context, on_pass=on_pass, prompt_switch=switch)
    steps = rollout.num_steps
    expected = [("step", 0, s, False) for s in range(steps)] + [("context", 0, 0, True)]
    expected += [("recache", 1, 0, True)]  # the first block's frames, re-encoded under the new prompt
    for block in range(1, geometry.num_blocks):
        expected += [("step", block, s, False) for s in range(steps)] + [("context", block, 0, True)]
    assert seen == expected and output.nfe == len(seen)
