"""Train the miniature bidirectional Wan teacher on the procedural world with flow matching.

Writes <out>/teacher/{config.json, model.safetensors} (official names and fields) and
<out>/text_encoder.safetensors (the fixed random text encoder; an existing one is reused so the
teacher always matches the shipped encoder), then samples the judge's evaluation set with
many Euler steps + CFG and prints its adherence.

    python scripts/train_miniature_teacher.py --steps 2500 --out checkpoints/miniature
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from miniature.judge import eval_prompts, score_clip  # noqa: E402
from miniature.vae import MiniatureVAE  # noqa: E402
from miniature.world import DEFAULT_WORLD, all_captions, parse_caption, render  # noqa: E402
from pipeline.teacher_sampling import sample_teacher  # noqa: E402
from utils.config import SamplingConfig  # noqa: E402
from utils.errors import UserError, run_main  # noqa: E402
from utils.io import atomic_save_safetensors, atomic_write_json  # noqa: E402
from utils.presets import arch_to_config_json  # noqa: E402
from wan.modules.model import WanModel  # noqa: E402
from wan.text_encoder import WanTextEncoder  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "miniature"
NUM_TRAIN_TIMESTEPS = 1000
# Training seeds start here so no training clip repeats an evaluation clip (eval seeds are 1000 + i).
TRAIN_SEED_OFFSET = 1_000_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2500, help="optimizer steps")
    parser.add_argument("--out", type=Path, default=Path("checkpoints/miniature"), help="output folder")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    parser.add_argument("--warmup", type=int, default=200, help="linear warm-up steps, then cosine decay to 10%")
    parser.add_argument("--train-shift", type=float, default=3.0, help="sigma shift of the training timestep draw")
    parser.add_argument("--caption-dropout", type=float, default=0.1, help="share of empty prompts (for CFG)")
    parser.add_argument("--ema", type=float, default=0.999, help="EMA decay of the exported weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-steps", type=int, default=40, help="Euler steps of the final evaluation")
    parser.add_argument("--eval-shift", type=float, default=3.0)
    parser.add_argument("--eval-guidance", type=float, default=4.0, help="CFG scale, uncond + g * (cond - uncond)")
    parser.add_argument("--no-eval", action="store_true", help="skip the final adherence evaluation")
    parser.add_argument("--eval-only", action="store_true", help="evaluate the teacher already in --out, no training")
    parser.add_argument("--save-every", type=int, default=500, help="write the EMA teacher every N steps")
    parser.add_argument("--init", type=Path, default=None, help="start from this teacher folder (config.json + weights)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        raise UserError(f"--steps {args.steps} and --batch-size {args.batch_size} must be at least 1")
    if not 0.0 <= args.caption_dropout < 1.0:
        raise UserError(f"--caption-dropout {args.caption_dropout}: expected a share in [0, 1)")
    return args


def read_yaml(path: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]


def load_text_encoder(path: Path, seed: int) -> WanTextEncoder:
    """The shipped encoder when it exists, else a new random one from `seed` written to `path`."""
    preset = read_yaml(CONFIGS / "text_encoder.yaml")
    if path.is_file():
        return WanTextEncoder.from_preset(preset, weights=path)
    encoder = WanTextEncoder.from_preset(preset, seed=seed)
    encoder.save_pretrained(path)
    return encoder




def shifted_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan's timestep shift: more of the draw at high noise, where layout and motion are decided."""
    return shift * u / (1 + (shift - 1) * u)


def learning_rate(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def world_batch(vae: MiniatureVAE, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh world clips as normalised latents [B, F, C, h, w] and their caption indices [B]."""
    captions = all_captions()
    indices = torch.randint(len(captions), (batch_size,), generator=generator)
    seeds = torch.randint(TRAIN_SEED_OFFSET, 2**31 - 1, (batch_size,), generator=generator)
    clips = torch.stack([render(captions[i], int(s)) for i, s in zip(indices.tolist(), seeds.tolist())])
    return vae.encode_to_latent(clips.permute(0, 2, 1, 3, 4)), indices


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        ema_param.lerp_(param, 1.0 - decay)


def save_teacher(model: WanModel, folder: Path) -> None:
    atomic_write_json(folder / "config.json", arch_to_config_json(model.config))
    atomic_save_safetensors(folder / "model.safetensors", model.state_dict())


def train(args: argparse.Namespace, model: WanModel, vae: MiniatureVAE, contexts: torch.Tensor, empty: torch.Tensor) -> WanModel:
    """Flow matching: x_t = (1 - s) x0 + s noise, target v = noise - x0, one sigma per clip."""
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(args.seed + 1)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    progress = tqdm(range(args.steps), desc="teacher", dynamic_ncols=True)
    for step in progress:
        # 1. Data: clean latents, their prompts with caption dropout, noise and sigma.
        x0, caption_index = world_batch(vae, args.batch_size, generator)
        context = contexts[caption_index]
        dropped = torch.rand(args.batch_size, generator=generator) < args.caption_dropout
        context = torch.where(dropped.view(-1, 1, 1), empty.expand_as(context), context)
        noise = torch.randn(x0.shape, generator=generator)
        sigma = shifted_sigma(torch.rand(args.batch_size, generator=generator), args.train_shift).view(-1, 1, 1, 1, 1)
        x_t = (1 - sigma) * x0 + sigma * noise
        timestep = (NUM_TRAIN_TIMESTEPS * sigma.view(-1, 1)).expand(-1, x0.shape[1])

        # 2. Step.
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        loss = (model.predict_flow(x_t, timestep, context) - (noise - x0)).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        update_ema(ema, model, args.ema if step >= args.warmup else 0.0)
        progress.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % args.save_every == 0:
            save_teacher(ema, args.out / "teacher")
    return ema


@torch.no_grad()
def evaluate(args: argparse.Namespace, model: WanModel, vae: MiniatureVAE, encoder: WanTextEncoder) -> dict:
    """Sample the judge's evaluation set with Euler + CFG and score it."""
    prompts = eval_prompts()
    captions = [parse_caption(text) for text, _ in prompts]
    cond = encoder.encode([text for text, _ in prompts])
    uncond = encoder.encode([""]).expand_as(cond)
    latent_shape = vae.latent_shape(DEFAULT_WORLD.num_frames, DEFAULT_WORLD.height, DEFAULT_WORLD.width)
    noise = torch.stack([torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed)) for _, seed in prompts])
    sampling = SamplingConfig(
        sampler="euler", num_steps=args.eval_steps, shift=args.eval_shift, guidance_scale=args.eval_guidance
    )
    sample = sample_teacher(model.eval(), noise, cond, uncond, sampling, num_train_timesteps=NUM_TRAIN_TIMESTEPS)
    videos = vae.decode_to_pixel(sample.latent)
    scores = [score_clip(video, caption) for video, caption in zip(videos, captions)]
    summary = {key: sum(s[key] for s in scores) / len(scores) for key in scores[0]}
    return {"adherence": summary["total"], "mean_scores": summary, "nfe": sample.nfe, "per_clip": scores}


@run_main
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    arch = {k: v for k, v in read_yaml(CONFIGS / "dit.yaml").items() if k != "vae"}
    vae = MiniatureVAE.from_preset(read_yaml(CONFIGS / "vae.yaml"))
    encoder = load_text_encoder(args.out / "text_encoder.safetensors", args.seed)
    if encoder.dim != arch["text_dim"] or encoder.text_len > arch["text_len"]:
        raise UserError(
            f"text encoder dim {encoder.dim} / text_len {encoder.text_len} do not fit dit.yaml "
            f"text_dim {arch['text_dim']} / text_len {arch['text_len']}"
        )

    # The text encoder is frozen: every caption's embedding is computed once.
    contexts = encoder.encode([c.text for c in all_captions()])
    empty = encoder.encode([""])
    teacher_dir = args.out / "teacher"
    if args.eval_only:
        teacher = WanModel.from_pretrained(str(teacher_dir))
    else:
        model = WanModel.from_pretrained(str(args.init)) if args.init else WanModel(**arch)
        if model.config != arch:
            raise UserError(f"--init {args.init} has a different architecture from configs/miniature/dit.yaml")
        num_parameters = sum(p.numel() for p in model.parameters())
        print(f"teacher: {num_parameters:,} parameters, {args.steps} steps of {args.batch_size}", flush=True)
        start = time.time()
        teacher = train(args, model, vae, contexts, empty)
        print(f"trained in {time.time() - start:.0f} s", flush=True)
        save_teacher(teacher, teacher_dir)
        print(f"wrote {teacher_dir}/config.json and model.safetensors", flush=True)

    if not args.no_eval:
        report = evaluate(args, teacher, vae, encoder)
        print(json.dumps({k: v for k, v in report.items() if k != "per_clip"}, indent=2), flush=True)


if __name__ == "__main__":
    main()
