"""Distilling a light decoder (the TAEHV architecture) from the recipe's full VAE decoder, data-free.

The student makes the latents and the full VAE decodes them (the targets), once, into a bank of clips;
the light decoder then learns to map the same latents to the same pixels (mean squared error, random
spatial crops for large frames), resumable and exact; its quality is the PSNR against the full decode on
clips it never saw, its speed both decoders' time on the same latents.

  <out>/bank/clip_NNNNN.safetensors   latents [F, C, h, w] float32, pixels [T, 3, H, W] uint8 (the full decode)
  <out>/checkpoint.pt                 step, weights, optimiser, sampling RNG, settings (atomic, every save_every)
  <out>/metrics.jsonl, loss.png       the training loss
  <out>/light_decoder.safetensors     the export (inference.decoder: light, inference.light_decoder: this file)
  <out>/report.json                   PSNR on the held-out clips, decode seconds of both decoders
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from utils.errors import UserError
from utils.io import atomic_save_safetensors, atomic_write, atomic_write_json
from utils.timing import median_seconds
from wan.light_decoder import LightDecoder

CHECKPOINT_FILE = "checkpoint.pt"
EXPORT_FILE = "light_decoder.safetensors"
METRICS_FILE = "metrics.jsonl"
RESUMABLE_CHANGES = ("steps", "save_every")  # a run may be resumed to train longer (the learning rate is constant)


@dataclass(frozen=True)
class DistillSettings:
    """What a run trains with; a resumed run must name the same, but for RESUMABLE_CHANGES."""

    clips: int
    eval_clips: int
    steps: int
    batch_size: int
    lr: float
    widths: tuple
    crop: int  # latent pixels per side of a random crop; 0: whole frames
    save_every: int
    seed: int


def stages_for(vae_stride: Sequence[int]) -> dict:
    """The decoder's pixel patch and upscaling stages for a VAE stride (t, h, w): Wan's (4, 8, 8) gives the
    published taew2_1 layout, (4, 16, 16) taew2_2's (patch 2)."""
    t, spatial = int(vae_stride[0]), int(vae_stride[1])
    patch = spatial // 8 if spatial > 8 else 1
    doublings_t, doublings_s = round(math.log2(t)), round(math.log2(spatial // patch))
    if 2**doublings_t != t or 2**doublings_s * patch != spatial or doublings_t > 3 or doublings_s > 3:
        raise UserError(f"VAE stride {tuple(vae_stride)}: a light decoder needs power-of-two strides of at most 8x "
                        "time and 8x space (times a pixel patch)")
    return {"patch_size": patch, "time_upscale": tuple(i >= 3 - doublings_t for i in range(3)),
            "space_upscale": tuple(i < doublings_s for i in range(3))}


# ---------------------------------------------------------------------------------------------------- bank
def clip_path(bank: Path, index: int) -> Path:
    return bank / f"clip_{index:05d}.safetensors"


def build_bank(bank: Path, count: int, make_clip: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Clips 0..count-1: make_clip(i) -> (latents [F, C, h, w], pixels [T, 3, H, W] in [-1, 1]). A clip already
    written is kept, so an interrupted bank resumes; each file is written atomically."""
    bank.mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(count) if not clip_path(bank, i).is_file()]
    for index in tqdm(missing, desc="latent bank", disable=not missing):
        latents, pixels = make_clip(index)
        quantised = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        atomic_save_safetensors(clip_path(bank, index), {"latents": latents.float().cpu(), "pixels": quantised.cpu()})


def load_clip(bank: Path, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents [F, C, h, w], pixels [T, 3, H, W] in [-1, 1])."""
    from safetensors.torch import load_file

    stored = load_file(str(clip_path(bank, index)))
    return stored["latents"], stored["pixels"].float() / 127.5 - 1


# ---------------------------------------------------------------------------------------------------- training
def new_decoder(latent_channels: int, vae_stride: Sequence[int], widths: Sequence[int], seed: int) -> LightDecoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LightDecoder(latent_channels=latent_channels, widths=widths, **stages_for(vae_stride))


def sample_batch(bank: Path, settings: DistillSettings, spatial: int, generator: torch.Generator,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of training clips (the first `clips - eval_clips`), cropped alike when settings.crop > 0."""
    picks = torch.randint(0, settings.clips - settings.eval_clips, (settings.batch_size,), generator=generator)
    pairs = [load_clip(bank, int(i)) for i in picks]
    latents, pixels = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    height, width = latents.shape[-2:]
    if settings.crop and settings.crop < min(height, width):
        top = int(torch.randint(0, height - settings.crop + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - settings.crop + 1, (1,), generator=generator))
        latents = latents[..., top:top + settings.crop, left:left + settings.crop]
        pixels = pixels[..., top * spatial:(top + settings.crop) * spatial, left * spatial:(left + settings.crop) * spatial]
    return latents.to(device), pixels.to(device)


def crop_margin(pixels: torch.Tensor, margin: int) -> torch.Tensor:
    return pixels[..., margin:pixels.shape[-2] - margin, margin:pixels.shape[-1] - margin] if margin else pixels


def train(out: Path, settings: DistillSettings, latent_channels: int, vae_stride: Sequence[int],
          device: torch.device) -> LightDecoder:
    """Train (or resume) to settings.steps; checkpoints every settings.save_every steps and at the end."""
    from trainer.logger import plot_curves, repair_metrics

    model = new_decoder(latent_channels, vae_stride, settings.widths, settings.seed).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(settings.seed)
    step = 0
    checkpoint = out / CHECKPOINT_FILE
    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        changed = sorted(k for k, v in state["settings"].items()
                         if k not in RESUMABLE_CHANGES and v != asdict(settings).get(k))
        if changed:
            raise UserError(f"{checkpoint} was trained with other settings ({', '.join(changed)}): give the same "
                            "ones to resume, or another --out")
        model.decoder.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["rng"])
        step = int(state["step"])
        repair_metrics(out / METRICS_FILE, step)
    margin = 2 * model.spatial_upscale if settings.crop else 0  # a crop's border lacks the context beyond it
    bar = tqdm(total=settings.steps, initial=step, desc="light decoder")
    with open(out / METRICS_FILE, "a", encoding="utf-8") as metrics:
        while step < settings.steps:
            latents, target = sample_batch(out / "bank", settings, model.spatial_upscale, generator, device)
            raw = model.run_layers(latents, [None] * len(model.decoder))[:, model.t_upscale - 1:]
            frames = model.to_pixels(raw.flatten(0, 1)).unflatten(0, raw.shape[:2])
            loss = F.mse_loss(crop_margin(frames, margin), crop_margin(target, margin))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            metrics.write(json.dumps({"step": step, "loss": float(loss)}) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.4f}")
            if step % settings.save_every == 0 or step == settings.steps:
                metrics.flush()
                state = {"step": step, "model": model.decoder.state_dict(), "optimizer": optimizer.state_dict(),
                         "rng": generator.get_state(), "settings": asdict(settings)}
                atomic_write(checkpoint, lambda tmp: torch.save(state, tmp))
    bar.close()
    plot_curves(out / METRICS_FILE, out / "loss.png", curve_keys=("loss",))
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------- judging
def psnr(frames: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR of pixels in [-1, 1] (peak-to-peak 2)."""
    mse = float(F.mse_loss(frames.float(), target.float()))
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def evaluate(out: Path, settings: DistillSettings, model: LightDecoder, full_decode: Callable[[torch.Tensor], torch.Tensor],
             device: torch.device) -> dict:
    """PSNR against the full decode on the held-out clips; both decoders' seconds on the first of them."""
    held_out = range(settings.clips - settings.eval_clips, settings.clips)
    values = []
    for index in held_out:
        latents, target = load_clip(out / "bank", index)
        values.append(psnr(model.decode(latents[None].to(device))[0].cpu(), target))
    latents = load_clip(out / "bank", held_out[0])[0][None].to(device)
    with torch.no_grad():
        light_s = median_seconds(lambda: model.decode(latents), device)
        full_s = median_seconds(lambda: full_decode(latents), device)
    spread = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return {"psnr_db": statistics.fmean(values), "psnr_se_db": spread, "psnr_per_clip_db": values,
            "held_out_clips": len(values), "light_decode_s": light_s, "full_decode_s": full_s,
            "frames": int(load_clip(out / "bank", held_out[0])[1].shape[0]), "arch": {
                k: list(v) if isinstance(v, tuple) else v for k, v in model.arch().items()},
            "parameters": sum(p.numel() for p in model.parameters()), "settings": asdict(settings)}


def export(out: Path, model: LightDecoder, report: dict) -> Path:
    path = model.save(out / EXPORT_FILE)
    atomic_write_json(out / "report.json", report)
    return path
