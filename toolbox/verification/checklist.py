"""The whole verification checklist in one call: `check_all(config, ckpt_dir) -> [(item, passed, detail)]`.

Items: config (recipe resolves, geometry derived), model build, KV-cache shapes, frame_seq_length, VAE
round-trip shapes, one causal forward with the right output shape, one training step with finite,
non-zero generator gradients. Each item runs on its own; one that fails (or whose inputs failed) is
reported and the rest go on. `scripts/verify.py all` prints it as PASS/FAIL lines.

Tiny recipes run on a CPU in seconds; real checkpoints (`ckpt_dir`: the generator's weights, a trainer
export folder or an official folder) belong on a GPU. The forward and the training step run on one
block of frames at the recipe's resolution, which checks every shape at a fraction of the cost.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch

from utils.config import Config
from utils.errors import UserError

CheckResult = tuple[str, bool, str]
SEED = 0


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, UserError) else f"{type(err).__name__}: {text}"


class _Checklist:
    """Runs named items in order; an item whose inputs failed is skipped with that reason."""

    def __init__(self) -> None:
        self.results: list[CheckResult] = []
        self.state: dict = {}

    def item(self, name: str, needs: tuple[str, ...], run: Callable[[], str]) -> None:
        missing = [need for need in needs if need not in self.state]
        if missing:
            self.results.append((name, False, f"skipped: needs {', '.join(missing)}"))
            return
        try:
            self.results.append((name, True, run()))
        except Exception as err:  # a checklist reports every failure instead of stopping at the first
            self.results.append((name, False, _one_line(err)))


def check_all(config: Config, ckpt_dir: Optional[str] = None, device: Optional[torch.device] = None) -> list[CheckResult]:
    """Every checklist item as (name, passed, one-line detail)."""
    from pipeline.components import build_dit, build_vae
    from utils.geometry import geometry_for, pixel_frames_for, resolve_recipe
    from wan.modules.kv_cache import KVCache

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    checks = _Checklist()
    state = checks.state

    # 1. Config: the recipe resolves (models, VAE, latent space) and the geometry is derived.
    def config_item() -> str:
        resolved = resolve_recipe(config, check_weights=False)  # ckpt_dir (or a random init) stands for the weights
        state["resolved"] = resolved
        g = resolved.geometry
        return f"{g.model} {g.width}x{g.height}, latent {list(g.latent_shape)}, blocks {list(g.block_sizes)}"

    checks.item("config", (), config_item)

    # 2a. Weights: with --ckpt_dir, every weight file is opened and its keys and shapes compared with the
    #     recipe's generator before any model is built; without it there is nothing to read (SKIP).
    def weights_item() -> str:
        from utils.presets import ARCH_FIELDS, dit_folder
        from wan.loading import Checkpoint, resolve_generator_weights
        from wan.modules.model import WanModel

        arch = state["resolved"].generator.arch
        weights = resolve_generator_weights(ckpt_dir, False, arch)
        path = dit_folder(weights.path)
        checkpoint = Checkpoint(path)
        with torch.device("meta"):
            expected = WanModel(**{k: arch[k] for k in ARCH_FIELDS}).state_dict()
        checkpoint.check_against({name: tuple(t.shape) for name, t in expected.items()})
        files = sorted({entry.file.name for entry in checkpoint.entries.values()})
        return f"{len(checkpoint.entries)} tensors in {len(files)} file(s) under {path}: keys and shapes match the recipe"

    if ckpt_dir is None:
        checks.results.append(("weights", None, "no --ckpt_dir: no weight file read (random init below)"))
    else:
        checks.item("weights", ("resolved",), weights_item)

    # 2. Model build: the causal generator, from ckpt_dir when given.
    def model_item() -> str:
        resolved = state["resolved"]
        if ckpt_dir is not None:
            from wan.loading import resolve_generator_weights
            from wan.modules.causal_model import CausalWanModel

            weights = resolve_generator_weights(ckpt_dir, False, resolved.generator.arch)
            arch = None if weights.path.is_dir() else weights.arch
            model = CausalWanModel.from_pretrained(str(weights.path), dtype=dtype, device=device,
                                                   attention_backend=config.attention_backend, arch=arch)
        else:
            model = build_dit(resolved.generator, causal=True, attention_backend=config.attention_backend, device=device,
                              dtype=dtype, seed=SEED)
        state["generator"] = model
        count = sum(p.numel() for p in model.parameters())
        return f"{type(model).__name__} with {count:,} parameters on {device} ({str(dtype).removeprefix('torch.')})"

    checks.item("model build", ("resolved",), model_item)

    # 3. KV-cache shapes: what the cache allocates is what the geometry says.
    def kv_item() -> str:
        g = state["resolved"].geometry
        cache = KVCache.from_geometry(g, batch_size=g.batch_size, dtype=dtype, device="meta")
        layer_shape = tuple(cache.keys.shape[1:])
        if cache.keys.shape[0] != g.num_layers or layer_shape != tuple(g.kv_cache_shape):
            raise UserError(f"KV cache {list(cache.keys.shape)} != {g.num_layers} layers x {list(g.kv_cache_shape)}")
        return f"{g.num_layers} layers x {list(g.kv_cache_shape)} ({g.cache_frames} frames, sink {g.sink_frames})"

    checks.item("kv cache shapes", ("resolved",), kv_item)

    # 4. frame_seq_length: the patch embedding's tokens per latent frame.
    def tokens_item() -> str:
        g = state["resolved"].geometry
        model = state["generator"]
        frame = torch.zeros(1, g.latent_channels, 1, g.latent_height, g.latent_width, device=device, dtype=dtype)
        with torch.no_grad():
            tokens = math.prod(model.patch_embedding(frame).shape[2:])
        if tokens != g.frame_seq_length:
            raise UserError(f"patch embedding gives {tokens} tokens per frame, geometry says {g.frame_seq_length}")
        return f"{tokens} tokens per latent frame, seq_len {g.seq_len}"

    checks.item("frame_seq_length", ("resolved", "generator"), tokens_item)

    # 5. VAE round trip on one block's worth of frames.

    def vae_item() -> str:
        resolved = state["resolved"]
        g = resolved.geometry
        frames = pixel_frames_for(g.block_sizes[0], g.vae_stride[0])
        short_geometry = geometry_for(dataclasses.replace(config, video=dataclasses.replace(
            config.video, num_frames=frames)), resolved.generator, resolved.vae)
        vae = build_vae(resolved.vae, device=device, dtype=dtype)
        video = torch.rand(1, 3, frames, g.height, g.width, generator=torch.Generator().manual_seed(SEED)) * 2 - 1
        with torch.no_grad():
            latents = vae.encode_to_latent(video.to(device, dtype))
            pixels = vae.decode_to_pixel(latents)
        expected_latent = (1, g.block_sizes[0], g.latent_channels, g.latent_height, g.latent_width)
        if tuple(latents.shape) != expected_latent or tuple(pixels.shape) != (1, frames, 3, g.height, g.width):
            raise UserError(f"VAE round trip gave latents {list(latents.shape)} (expected {list(expected_latent)}) and "
                            f"pixels {list(pixels.shape)} (expected {[1, frames, 3, g.height, g.width]})")
        state["short_geometry"] = short_geometry
        return f"{frames} frames -> latents {list(latents.shape)} -> pixels {list(pixels.shape)}"

    checks.item("vae round trip", ("resolved",), vae_item)

    # 6. One causal forward (block-causal, one block) with the right output shape.
    def forward_item() -> str:
        g = state["short_geometry"]
        model = state["generator"]
        x = torch.randn((1, *g.latent_shape[1:]), generator=torch.Generator().manual_seed(SEED)).to(device, dtype)
        timestep = torch.full((1, g.num_latent_frames), 500.0, device=device)
        context = torch.randn(1, g.text_len, g.text_dim, generator=torch.Generator().manual_seed(SEED)).to(device, dtype)
        with torch.no_grad():
            flow = model.forward_block_causal(x, timestep, context, g.num_frame_per_block)
        if flow.shape != x.shape or not torch.isfinite(flow).all():
            raise UserError(f"forward gave {list(flow.shape)} (finite: {bool(torch.isfinite(flow).all())}), "
                            f"expected {list(x.shape)}")
        return f"forward_block_causal {list(x.shape)} -> {list(flow.shape)}, finite"

    checks.item("one forward", ("generator", "short_geometry"), forward_item)

    # 7. One training step of the recipe's objective: finite loss, finite non-zero generator gradients.
    def train_item() -> str:
        return _training_step(config, state, device, dtype)

    checks.item("one training step", ("resolved", "generator", "short_geometry"), train_item)
    return checks.results


def _training_step(config: Config, state: dict, device: torch.device, dtype: torch.dtype) -> str:
    from model.registry import build_objective, random_batch, step_models

    resolved, generator, g = state["resolved"], state["generator"], state["short_geometry"]
    short_config = dataclasses.replace(config, video=dataclasses.replace(config.video, num_frames=g.num_pixel_frames))
    objective = build_objective(short_config, g)
    batch = random_batch(short_config, g, 1, device, dtype, torch.Generator().manual_seed(SEED))
    models = step_models(short_config, resolved, generator, device=device, dtype=dtype, seed=SEED)
    generator.train().requires_grad_(True)
    generator.zero_grad(set_to_none=True)
    loss, logs = objective.generator_loss(models, batch)
    loss.backward()
    grads = [p.grad for p in generator.parameters() if p.grad is not None]
    loss = loss.detach()
    if not torch.isfinite(loss) or not grads:
        raise UserError(f"training step gave loss {float(loss)} and {len(grads)} parameter gradients")
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(gr.float()) for gr in grads]))
    if not torch.isfinite(norm) or float(norm) == 0.0:
        raise UserError(f"generator gradient norm is {float(norm)}: expected finite and non-zero")
    generator.zero_grad(set_to_none=True)
    generator.eval().requires_grad_(False)
    name = type(objective).__name__
    return f"{name} loss {float(loss):.4g}, gradients on {len(grads)} tensors, norm {float(norm):.3g}"
