"""`verify.py train`: one generator step and one critic step of the recipe's objective at tiny geometry.

The recipe's trainer, objective, rollout and optimizer settings are kept; its models are swapped for the tiny
presets of the same latent space (random weights, CPU), the video for two blocks of a small frame, so the
check runs anywhere in seconds and proves the wiring: losses are finite, gradients reach the trained model,
and the optimizer step changes its weights.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from utils.config import Config, ModelRef, TextEncoderRef, VaeRef
from utils.geometry import Geometry, pixel_frames_for, resolve_recipe

TINY_MODEL_FOR_CHANNELS = {16: "tiny-t2v", 48: "tiny-ti2v"}
TINY_TEXT_ENCODER = "tiny-umt5"
TINY_FRAME_UNITS = (2, 3)  # latent patches per axis (height, width) of the tiny video
TINY_BLOCKS = 2  # rollout blocks of the tiny video

Check = tuple[str, bool, str]


def tiny_variant(config: Config) -> Config:
    """The recipe with tiny random models of its latent space and a two-block tiny video."""
    channels = resolve_recipe(config, need_scores=False, check_weights=False).generator.latent_channels
    tiny = ModelRef(preset=TINY_MODEL_FOR_CHANNELS[channels])
    draft = replace(config, generator=tiny, real_score=tiny, critic=ModelRef(), vae=VaeRef(),
                    text_encoder=TextEncoderRef(preset=TINY_TEXT_ENCODER, negative_prompt=config.text_encoder.negative_prompt))
    recipe = resolve_recipe(draft, need_scores=False, check_weights=False)
    stride_t, stride_h, stride_w = recipe.vae.stride
    _, patch_h, patch_w = recipe.generator.arch["patch_size"]
    latent_frames = TINY_BLOCKS * config.video.num_frame_per_block + int(config.rollout.independent_first_frame)
    video = replace(config.video, height=TINY_FRAME_UNITS[0] * stride_h * patch_h, width=TINY_FRAME_UNITS[1] * stride_w * patch_w,
                    num_frames=pixel_frames_for(latent_frames, stride_t), image_or_video_shape=None)
    train = replace(config.train, batch_size=1, mixed_precision=False, gradient_checkpointing=False, lora_rank=0)
    return replace(draft, video=video, train=train, attention_backend="sdpa")


def _synthetic_batch(config: Config, geometry: Geometry, text_encoder: torch.nn.Module):
    """One prompt; ODE pairs interpolated between a random clean latent and noise at the student's timesteps."""
    from model.objective import Batch
    from model.registry import objective_class
    from pipeline.flow_matching import add_noise, few_step_timesteps

    prompts = ["a red circle moving left on a blue background"]
    latent = torch.randn(geometry.latent_shape)
    first_frame = latent[:, :1] if config.video.task == "ti2v" else None
    ode_latents = ode_timesteps = None
    if objective_class(config).data == "ode_pairs":
        rollout, flow = config.rollout, config.flow
        student = few_step_timesteps(rollout.denoising_step_list, rollout.warp_denoising_step, flow.timestep_shift,
                                     flow.num_train_timesteps)
        ode_timesteps = torch.cat([torch.as_tensor(student, dtype=torch.float32), torch.zeros(1)])
        points = ode_timesteps[:, None].expand(-1, latent.shape[1])  # [P, F]: every frame at the point's timestep
        ode_latents = add_noise(latent[:, None], torch.randn_like(latent)[:, None], points, flow.num_train_timesteps)
    return Batch(prompts=prompts, context=text_encoder.encode(prompts),
                 negative_context=text_encoder.encode_cached(config.text_encoder.negative_prompt),
                 ode_latents=ode_latents, ode_timesteps=ode_timesteps, first_frame=first_frame)


def _train_step(name: str, model: torch.nn.Module, lr: float, loss_fn) -> list[Check]:
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    loss, _ = loss_fn()
    loss.backward()
    grads = [p.grad for p in params if p.grad is not None]
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0
    torch.optim.AdamW(params, lr=lr).step()
    moved = sum(int(not torch.equal(b, p.detach())) for b, p in zip(before, params))
    model.zero_grad(set_to_none=True)
    return [
        (f"{name} loss finite", bool(torch.isfinite(loss)), f"loss {float(loss.detach()):.4g}"),
        (f"gradients reach the {name}", norm > 0 and torch.isfinite(torch.tensor(norm)).item(),
         f"{len(grads)}/{len(params)} tensors with a gradient, norm {norm:.4g}"),
        (f"{name} step changes weights", moved > 0, f"{moved}/{len(params)} tensors changed"),
    ]


def check_train(config: Config, ckpt_dir: str | None = None) -> list[Check]:
    """[(check, passed, detail)] for one generator step and, with a critic, one critic step (ckpt_dir unused)."""
    from model.registry import build_objective, step_models
    from pipeline.components import build_dit, build_text_encoder

    tiny = tiny_variant(config)
    recipe = resolve_recipe(tiny, check_weights=False)
    geometry, seed = recipe.geometry, tiny.train.seed
    objective = build_objective(tiny, geometry)
    generator = build_dit(recipe.generator, causal=True, attention_backend=tiny.attention_backend, seed=seed)
    models = step_models(tiny, recipe, generator, seed=seed)
    torch.manual_seed(seed)
    batch = _synthetic_batch(tiny, geometry, build_text_encoder(tiny, seed=seed))
    what = f"{tiny.train.trainer} ({type(objective).__name__})"
    size = f"{geometry.height}x{geometry.width}, {geometry.num_latent_frames} latent frames"
    items: list[Check] = [("objective", True, f"{what} at {size}")]
    items += _train_step("generator", generator, tiny.optim.lr, lambda: objective.generator_loss(models, batch))
    if objective.has_critic:
        items += _train_step("critic", models.critic, tiny.optim.lr_critic, lambda: objective.critic_loss(models, batch))
    return items
