"""CausalWanModel: block-causal training mode == cached block-by-block rollout; rolling cache semantics."""
from __future__ import annotations

import pytest
import torch

from tests.dit_helpers import relative_error, tiny_model
from utils.errors import UserError
from wan.modules.causal_model import CausalWanModel
from wan.modules.kv_cache import KVCache
from wan.modules.model import WanModel

TOLERANCE = 1e-5
HEIGHT, WIDTH = 4, 6  # latent, non-square
FRAME_TOKENS = (HEIGHT // 2) * (WIDTH // 2)


def make_cache(model: CausalWanModel, batch: int, max_frames: int, sink_frames: int = 0) -> KVCache:
    config = model.config
    return KVCache(
        num_layers=config["num_layers"], batch_size=batch, max_frames=max_frames, frame_seq_length=FRAME_TOKENS,
        num_heads=config["num_heads"], head_dim=model.head_dim, dtype=torch.float32, device="cpu",
        sink_frames=sink_frames,
    )  # fmt: skip


def inputs(model, batch=2, frames=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, frames, model.config["in_dim"], HEIGHT, WIDTH, generator=generator)
    timestep = torch.rand(batch, frames, generator=generator) * 1000
    context = torch.randn(batch, 5, model.config["text_dim"], generator=generator)
    return x, timestep, context


def rollout(model, x, timestep, context, cache, block):
    outputs = []
    for start in range(0, x.shape[1], block):
        end = start + block
        outputs.append(model.forward_cached(x[:, start:end], timestep[:, start:end], context, cache, start, commit=True))
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("preset", ["tiny-t2v", "tiny-ti2v"])
def test_block_causal_equals_cached_rollout(preset):
    model = tiny_model(CausalWanModel, preset=preset)
    x, timestep, context = inputs(model)
    with torch.no_grad():
        whole = model.forward_block_causal(x, timestep, context, num_frame_per_block=2)
        stepped = rollout(model, x, timestep, context, make_cache(model, 2, max_frames=6), block=2)
    assert relative_error(stepped, whole) < TOLERANCE
    # The mask matters: full bidirectional attention gives a different answer.
    assert relative_error(model.predict_flow(x, timestep, context), whole) > 1e-3


def test_one_block_equals_bidirectional_model():
    causal = tiny_model(CausalWanModel, seed=2)
    bidirectional = tiny_model(WanModel, seed=2)
    x, timestep, context = inputs(causal, frames=3)
    with torch.no_grad():
        whole = causal.forward_block_causal(x, timestep, context, num_frame_per_block=3)
        assert relative_error(whole, bidirectional.predict_flow(x, timestep, context)) < TOLERANCE
        cached = causal.forward_cached(x, timestep, context, make_cache(causal, 2, 3), start_frame=0, commit=False)
        assert relative_error(cached, whole) < TOLERANCE


def test_commit_false_reads_the_same_window_and_keeps_every_cached_frame():
    model = tiny_model(CausalWanModel, seed=4)
    x, timestep, context = inputs(model, frames=6)
    cache = make_cache(model, 2, max_frames=4, sink_frames=1)
    with torch.no_grad():
        rollout(model, x[:, :4], timestep[:, :4], context, cache, block=2)  # cache now full
        keys, values, frames = cache.keys.clone(), cache.values.clone(), list(cache.slot_frames)
        probe = model.forward_cached(x[:, 4:], timestep[:, 4:], context, cache, 4, commit=False)
        # The probe wrote its scratch keys into the slots of the frames it evicts (1, 2); the frames it keeps
        # (0 = sink, 3) and the bookkeeping are untouched.
        kept = [slot for slot, frame in enumerate(frames) if frame in (0, 3)]
        tokens = [slice(slot * FRAME_TOKENS, (slot + 1) * FRAME_TOKENS) for slot in kept]
        for part in tokens:
            assert torch.equal(cache.keys[:, :, part], keys[:, :, part])
            assert torch.equal(cache.values[:, :, part], values[:, :, part])
        assert cache.slot_frames == frames and cache.next_frame == 4
        again = model.forward_cached(x[:, 4:], timestep[:, 4:], context, cache, 4, commit=False)
        # A one-frame block here would keep frame 2, whose slot holds scratch now: refused, never read silently.
        with pytest.raises(RuntimeError, match="overwritten by an uncommitted forward"):
            model.forward_cached(x[:, 4:5], timestep[:, 4:5], context, cache, 4, commit=False)
        committed = model.forward_cached(x[:, 4:], timestep[:, 4:], context, cache, 4, commit=True)
    assert torch.equal(probe, again)
    assert torch.allclose(probe, committed, atol=1e-6)
    assert cache.slot_frames == [0, 4, 5, 3] and cache.next_frame == 6  # frames 1, 2 evicted, sink kept


def test_in_place_attention_reads_the_storage_without_a_copy():
    model = tiny_model(CausalWanModel, seed=5)
    x, timestep, context = inputs(model, frames=6)
    cache = make_cache(model, 2, max_frames=4, sink_frames=1)
    seen = []
    with torch.no_grad():
        for start in (0, 2, 4):  # growing, then rolling (frames 1, 2 evicted into slots 1, 2)
            plan = cache.plan(start, 2)
            view = cache.layer_view(0, plan, commit=True)
            k = torch.randn(2, 2 * FRAME_TOKENS, model.config["num_heads"], model.head_dim)
            keys, values = view(k, k.clone())
            seen.append(keys.shape[1] // FRAME_TOKENS)
            assert keys.data_ptr() == cache.keys[0].data_ptr() and values.data_ptr() == cache.values[0].data_ptr()
            cache.commit(plan)
    assert seen == [2, 4, 4]


def test_the_gradient_path_copies_each_evicted_frame_once_and_shares_it():
    """A cache that evicts: every gradient-path block attends to copies of the frames it saw, made once per frame and
    shared by the later blocks that see it (a long rollout's window keeps one copy per frame, not one per block), and
    a copy keeps what the forward saw after the slot is overwritten."""
    model = tiny_model(CausalWanModel, seed=8)
    cache = make_cache(model, 2, max_frames=4, sink_frames=1)
    heads, dim = model.config["num_heads"], model.head_dim
    views, inputs_seen = [], []
    for start in (0, 1, 2, 3, 4, 5):  # one-frame blocks: frames 1, 2, ... roll out of a window of sink + 3
        plan = cache.plan(start, 1)
        view = cache.layer_view(0, plan, commit=True)
        k = torch.randn(2, FRAME_TOKENS, heads, dim, requires_grad=True)
        keys, _ = view(k, k * 2)
        views.append(view)
        inputs_seen.append(keys.detach().clone())
        cache.commit(plan)
    copies = cache._frame_copies[0]
    assert sorted(copies) == [0, 1, 2, 3, 4]  # every frame a later block saw, once (frame 5 was seen by no later block)
    for view in views[1:]:  # each block's pieces are the shared copies themselves (one object per frame)
        assert all(any(mine is piece for piece in copies.values()) for mine in view._kept)
    assert views[0]._kept is None and sum(len(view._kept) for view in views[1:]) == 12  # 12 frames seen, 5 copies
    # frame 1 was evicted by frame 4 (its slot rewritten), yet a recompute of block 3 sees what its forward saw
    again, _ = views[3](torch.zeros(2, FRAME_TOKENS, heads, dim, requires_grad=True), torch.zeros(2, FRAME_TOKENS, heads, dim))
    assert torch.equal(again[:, :-FRAME_TOKENS], inputs_seen[3][:, :-FRAME_TOKENS])
    cache.reset()
    assert cache._frame_copies[0] == {}


@pytest.mark.parametrize("max_frames,sink", [(6, 0), (4, 0), (4, 1), (3, 1)])
def test_in_place_path_equals_the_gradient_path(max_frames, sink):
    """The no-grad in-place path and the gradient path (gather + append) attend to the same keys: full cache,
    window, window + sink, and a window of one block plus a sink."""
    model = tiny_model(CausalWanModel, seed=7)
    x, timestep, context = inputs(model, frames=6)
    with torch.no_grad():
        in_place = rollout(model, x, timestep, context, make_cache(model, 2, max_frames, sink), block=1 if max_frames == 3 else 2)
    with torch.enable_grad():
        gradient = rollout(model, x, timestep, context, make_cache(model, 2, max_frames, sink), block=1 if max_frames == 3 else 2)
    assert gradient.requires_grad
    assert relative_error(in_place, gradient.detach()) < TOLERANCE


def test_rolled_cache_equals_attention_over_exactly_its_window():
    """One layer, so a frame's keys depend only on its own input: the rolled window can be rebuilt from scratch."""
    model = tiny_model(CausalWanModel, seed=6, num_layers=1)
    x, timestep, context = inputs(model, frames=7)
    with torch.no_grad():
        # Rolling: 4 frames of cache, 1 sink, blocks of 1 frame; frame 6 sees frames 0 (sink), 4, 5 and itself.
        rolled = rollout(model, x, timestep, context, make_cache(model, 2, max_frames=4, sink_frames=1), block=1)
        scratch = make_cache(model, 2, max_frames=7)
        for frame in (0, 4, 5):
            model.forward_cached(x[:, frame : frame + 1], timestep[:, frame : frame + 1], context, scratch, frame, True)
        expected = model.forward_cached(x[:, 6:], timestep[:, 6:], context, scratch, 6, commit=False)
        global_attention = rollout(model, x, timestep, context, make_cache(model, 2, max_frames=7), block=1)
    assert relative_error(rolled[:, 6:], expected) < TOLERANCE
    assert relative_error(rolled[:, :4], global_attention[:, :4]) < TOLERANCE  # before the cache fills: identical
    assert relative_error(rolled[:, 6:], global_attention[:, 6:]) > 1e-4  # the evicted frames did matter


def test_cached_keys_are_detached_and_gradients_reach_the_block():
    model = tiny_model(CausalWanModel, seed=8)
    x, timestep, context = inputs(model, frames=4)
    cache = make_cache(model, 2, max_frames=4)
    model.forward_cached(x[:, :2], timestep[:, :2], context, cache, 0, commit=True)
    assert not cache.keys.requires_grad
    out = model.forward_cached(x[:, 2:], timestep[:, 2:], context, cache, 2, commit=False)
    out.square().mean().backward()
    for name in ("self_attn.k.weight", "cross_attn.k.weight", "cross_attn.v.weight"):
        assert model.blocks[0].get_parameter(name).grad.abs().sum() > 0, name


def test_cross_attention_cache_is_per_context():
    model = tiny_model(CausalWanModel, seed=9)
    x, timestep, context = inputs(model, frames=2)
    cache = make_cache(model, 2, max_frames=4)
    with torch.no_grad():
        first = model.forward_cached(x, timestep, context, cache, 0, commit=False)
        other = model.forward_cached(x, timestep, torch.randn_like(context), cache, 0, commit=False)
        again = model.forward_cached(x, timestep, context, cache, 0, commit=False)
    assert not torch.allclose(first, other, atol=1e-4)
    assert torch.allclose(first, again, atol=1e-6)


def test_cache_from_geometry_and_mismatch_errors():
    from utils.config import ModelRef, VaeRef
    from utils.geometry import compute_geometry
    from utils.presets import resolve_model, resolve_vae

    spec = resolve_model("generator", ModelRef(preset="tiny-t2v"), check_weights=False)
    vae = resolve_vae(VaeRef(), spec, check_weights=False)
    geometry = compute_geometry(spec, vae, height=vae.stride[1] * 4, width=vae.stride[2] * 6, num_frames=vae.stride[0] * 5 + 1,
                                num_frame_per_block=2, local_attn_size=4, sink_size=1)  # fmt: skip
    cache = KVCache.from_geometry(geometry, batch_size=2, dtype=torch.float32, device="cpu")
    assert geometry.frame_seq_length == FRAME_TOKENS and geometry.cache_frames == 4
    assert tuple(cache.keys.shape) == (geometry.num_layers, 2, *geometry.kv_cache_shape[1:])
    assert cache.sink_frames == 1
    model = tiny_model(CausalWanModel)
    x, timestep, context = inputs(model, frames=2)
    with pytest.raises(UserError, match="KV cache"):
        model.forward_cached(x[:1], timestep[:1], context[:1], cache, 0, commit=False)  # batch 1 vs cache batch 2
    with pytest.raises(UserError, match="timestep"):
        model.forward_block_causal(x, timestep[:, :1], context, num_frame_per_block=1)


def test_benchmark_script_runs_a_recipe():
    from tests.helpers import run_script

    proc = run_script(["scripts/benchmark.py", "dit", "--config_path", "configs/tiny/self_forcing_dmd.yaml", "--dtype", "fp32",
                       "--device", "cpu", "--warmup", "0", "--repeats", "1"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "ms / forward, denoise (commit=False)" in proc.stdout and "ms / forward, context (commit=True)" in proc.stdout


def test_flex_backend_matches_sdpa_and_flash_needs_the_package():
    import importlib.util
    import warnings

    sdpa = tiny_model(CausalWanModel, seed=12)
    flex = tiny_model(CausalWanModel, seed=12, attention_backend="flex")
    x, timestep, context = inputs(sdpa, frames=4)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention on CPU warns that it is unfused
        expected = sdpa.forward_block_causal(x, timestep, context, num_frame_per_block=2)
        assert relative_error(flex.forward_block_causal(x, timestep, context, num_frame_per_block=2), expected) < TOLERANCE
    if importlib.util.find_spec("flash_attn") is None and importlib.util.find_spec("flash_attn_interface") is None:
        with pytest.raises(UserError, match="flash-attn"):
            tiny_model(CausalWanModel, attention_backend="flash")
    with pytest.raises(UserError, match="attention_backend"):
        tiny_model(CausalWanModel, attention_backend="xformers")


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("window,sink,blocks,ti2v", [
    (None, 0, (2, 2, 2, 2), False),  # full cache
    (4, 0, (2, 2, 2, 2), False),  # rolling window
    (5, 1, (2, 2, 2, 2), False),  # window + sink
    (5, 1, (2, 2, 2, 2), True),  # TI2V: frame 0 clean at t = 0
    (5, 1, (1, 2, 2, 2, 1), False),  # independent first frame: unequal blocks
])
def test_training_mask_equals_the_cached_rollout(backend, window, sink, blocks, ti2v):
    """The training forward over the whole sequence sees exactly what the block-by-block cached forward sees,
    rolling window and sink included (the ODE stage trains what the rollout and inference run)."""
    import warnings

    model = tiny_model(CausalWanModel, preset="tiny-ti2v" if ti2v else "tiny-t2v", seed=21, attention_backend=backend)
    x, timestep, context = inputs(model, frames=sum(blocks))
    if ti2v:
        timestep[:, 0] = 0.0
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention on CPU warns that it is unfused
        whole = model.forward_block_causal(x, timestep, context, 2, window_frames=window, sink_frames=sink,
                                           block_sizes=blocks)
        cache = make_cache(model, 2, max_frames=window or sum(blocks), sink_frames=sink)
        outputs, start = [], 0
        for size in blocks:
            part = slice(start, start + size)
            outputs.append(model.forward_cached(x[:, part], timestep[:, part], context, cache, start, commit=True))
            start += size
        if window is not None:  # the window mattered: full block-causal attention differs
            full = model.forward_block_causal(x, timestep, context, 2, block_sizes=blocks)
            assert relative_error(full, whole) > 1e-4
    assert relative_error(torch.cat(outputs, dim=1), whole) < TOLERANCE
