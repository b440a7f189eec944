"""Train the miniature bidirectional Wan teacher on the procedural world with flow matching.

Writes <out>/teacher/{config.json, model.safetensors} (official names and fields) and
<out>/text_encoder.safetensors (the fixed random text encoder; an existing one is reused so the
teacher always matches the shipped encoder). Every --eval-every steps the EMA weights sample a
validation set (the judge's evaluation captions with other seeds) with the recipe's own settings
(configs/miniature/ode.yaml: the unipc `teacher:` section and the euler `ode:` section, CFG against the
negative prompt); the best EMA so far (by the lower of the
two adherences) is the exported teacher, and training stops once both reach --target.

The shipped checkpoints/miniature/teacher was made in three runs on 2 CPU threads (about 40 minutes): the
defaults (uniform sigma, train shift 1) stopped at step 3000 learn colours and clean shapes but leave the
motion to high noise undecided; a fine-tune at train shift 5 (the recipe's sampling shift: most draws at
high noise, where the layout and the direction are decided) then learns the motion; a third run at a lower
learning rate was stopped by hand at step 2500, and its best validation point (step 500, adherence 0.903 with the
recipe's CFG 2) is the shipped teacher:

    python scripts/train_miniature_teacher.py --out /tmp/teacher_stage1 --stop-at 3000 --eval-every 1000
    python scripts/train_miniature_teacher.py --out /tmp/teacher_stage2 --init /tmp/teacher_stage1/teacher \
        --train-shift 5 --steps 3500 --lr 5e-4 --warmup 100
    python scripts/train_miniature_teacher.py --out checkpoints/miniature --init /tmp/teacher_stage2/teacher \
        --train-shift 5 --steps 4000 --lr 3e-4 --warmup 50

(Each run writes a fresh random text encoder into its --out unless one is there: copy
checkpoints/miniature/text_encoder.safetensors into the /tmp folders first. The first two runs were
validated with CFG 4, the recipe's scale at the time; their best point was their last.)

The wrapping world's teacher (checkpoints/miniature/teacher_wrap, `--world wrap`) was fine-tuned from the shipped
teacher in two runs (about 70 minutes on 2 CPU threads). Wrapping is learnt at once; fast shapes (2.4 pixels per
4-frame VAE cell) stay the hard part: their track jumps at cell boundaries. Raising the trend channels' loss
weight and drawing more low-noise timesteps in the second run improved that:

    python scripts/train_miniature_teacher.py --world wrap --out /tmp/wrap_stage1 --init checkpoints/miniature/teacher \
        --train-shift 5 --steps 3000 --lr 5e-4 --warmup 100
    python scripts/train_miniature_teacher.py --world wrap --out checkpoints/miniature --init /tmp/wrap_stage1/teacher_wrap \
        --train-shift 3 --trend-weight 2 --steps 2500 --lr 3e-4 --warmup 50

The teacher of both tasks (checkpoints/miniature/teacher_ti2v, the image-to-video chain's: quickstart --task ti2v|both)
was fine-tuned from the shipped teacher with half its clips image-to-video, as Wan2.2-TI2V-5B is trained (latent frame
0 the clip's own first frame, clean at timestep 0 and out of the loss), in one run of about 16 minutes on one CPU
thread; its last point was its best (validation, 24 clips: text-to-video 0.905, from first frames 0.904; the shipped
teacher from first frames, untrained for it: 0.71 on the 48 evaluation clips):

    python scripts/train_miniature_teacher.py --out /tmp/teacher_ti2v --init checkpoints/miniature/teacher \
        --image-share 0.5 --train-shift 5 --steps 1500 --lr 3e-4 --warmup 50 --eval-every 250
    cp -r /tmp/teacher_ti2v/teacher checkpoints/miniature/teacher_ti2v
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from miniature.judge import VALIDATION_FIRST_SEEDS, eval_prompts, given_image, score_clip
from miniature.vae import MiniatureVAE
from miniature.world import (
    DEFAULT_WORLD,
    TEACHER_FOLDERS,
    WORLDS,
    WorldSpec,
    all_captions,
    parse_caption,
    render,
    world_named,
)
from pipeline.flow_matching import add_noise, flow_target, shift_sigmas
from pipeline.teacher_sampling import sample_teacher
from utils.config import SamplingConfig, load_config
from utils.errors import UserError, run_main
from utils.io import atomic_save_safetensors, atomic_write_json
from utils.presets import arch_to_config_json
from wan.modules.model import WanModel
from wan.text_encoder import WanTextEncoder

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "miniature"
# The distillation recipe whose teacher/ode sampling settings the evaluation uses.
RECIPE = CONFIGS / "ode.yaml"
NUM_TRAIN_TIMESTEPS = 1000
# Training seeds start here so no training clip repeats an evaluation clip (eval seeds are 1000 + i).
TRAIN_SEED_OFFSET = 1_000_000
# Checkpoints are selected on the evaluation captions with other noise (VALIDATION_FIRST_SEEDS: seeds 2000 + i and
# 3000 + i), so the adherence the quickstart reports (seeds 1000 + i) is measured on clips the selection never saw.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5000, help="optimizer steps (the cosine schedule's length)")
    parser.add_argument("--out", type=Path, default=Path("checkpoints/miniature"), help="output folder")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    parser.add_argument("--warmup", type=int, default=200, help="linear warm-up steps, then cosine decay to 10%%")
    parser.add_argument("--train-shift", type=float, default=1.0, help="sigma shift of the training timestep draw")
    parser.add_argument("--trend-weight", type=float, default=1.0,
                        help="loss weight of the VAE's trend channels (they carry the motion inside a 4-frame cell)")
    parser.add_argument("--caption-dropout", type=float, default=0.1, help="share of empty prompts (for CFG)")
    parser.add_argument("--image-share", type=float, default=0.0,
                        help="share of clips trained image-to-video, as Wan2.2-TI2V trains: latent frame 0 clean at "
                             "timestep 0 and out of the loss; above 0 the validation also samples from first frames")
    parser.add_argument("--ema", type=float, default=0.999, help="EMA decay of the exported weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop-at", type=int, default=None, help="stop after this many steps (the schedule still spans --steps)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--eval-every", type=int, default=500, help="evaluate the EMA teacher every N steps")
    parser.add_argument("--target", type=float, default=0.93, help="stop once both recipe adherences reach this")
    parser.add_argument("--val-clips", type=int, default=12,
                        help="validation clips per seed set (2 sets; 12 = the judge's captions once, more narrow the "
                             "selection's noise: 12 clips move a mean by about 0.05)")
    parser.add_argument("--no-eval", action="store_true", help="no evaluation: export the last EMA teacher")
    parser.add_argument("--eval-only", action="store_true", help="evaluate the teacher already in --out, no training")
    parser.add_argument("--init", type=Path, default=None, help="start from this teacher folder (config.json + weights)")
    parser.add_argument("--world", choices=tuple(WORLDS), default="bounded",
                        help="the miniature world of the clips and the judge; the teacher goes to <out>/teacher "
                             "(bounded) or <out>/teacher_wrap (wrap)")
    args = parser.parse_args(argv)
    if min(args.steps, args.batch_size, args.eval_every, args.threads, args.stop_at or 1, args.val_clips) < 1:
        raise UserError("--steps, --batch-size, --eval-every, --threads, --stop-at and --val-clips must be at least 1")
    if not 0.0 <= args.caption_dropout < 1.0:
        raise UserError(f"--caption-dropout {args.caption_dropout}: expected a share in [0, 1)")
    if not 0.0 <= args.image_share <= 1.0:
        raise UserError(f"--image-share {args.image_share}: expected a share in [0, 1]")
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




def learning_rate(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def world_batch(vae: MiniatureVAE, batch_size: int, generator: torch.Generator,
                world: WorldSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh world clips as normalised latents [B, F, C, h, w] and their caption indices [B]."""
    captions = all_captions()
    indices = torch.randint(len(captions), (batch_size,), generator=generator)
    seeds = torch.randint(TRAIN_SEED_OFFSET, 2**31 - 1, (batch_size,), generator=generator)
    clips = torch.stack([render(captions[i], int(s), world) for i, s in zip(indices.tolist(), seeds.tolist())])
    return vae.encode_to_latent(clips.permute(0, 2, 1, 3, 4)), indices


def noisy_clips(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                image_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flow matching's inputs for clean latents x0 [B, F, C, h, w] at one sigma per clip [B]: x_t, the per-frame
    timesteps [B, F] and the loss weight of each frame [B, F, 1, 1, 1]. In image-to-video rows [B] (as Wan2.2-TI2V
    trains) frame 0 is the given image: clean, at timestep 0, and out of the loss."""
    timestep = (NUM_TRAIN_TIMESTEPS * sigma[:, None]).expand(-1, x0.shape[1]).clone()
    x_t = add_noise(x0, noise, timestep, NUM_TRAIN_TIMESTEPS)
    frame_weight = torch.ones(*x0.shape[:2], 1, 1, 1)
    timestep[image_rows, 0] = 0.0
    x_t[image_rows, 0] = x0[image_rows, 0]
    frame_weight[image_rows, 0] = 0.0
    return x_t, timestep, frame_weight


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        ema_param.lerp_(param, 1.0 - decay)


def save_teacher(model: WanModel, folder: Path) -> None:
    atomic_write_json(folder / "config.json", arch_to_config_json(model.config))
    atomic_save_safetensors(folder / "model.safetensors", model.state_dict())


def train(args: argparse.Namespace, model: WanModel, vae: MiniatureVAE, contexts: torch.Tensor, empty: torch.Tensor,
          judge: "RecipeJudge | None") -> WanModel:
    """Flow matching: x_t = (1 - s) x0 + s noise, target v = noise - x0, one sigma per clip.

    Returns the best evaluated EMA teacher (the last one without a judge); each new best is written to
    <out>/teacher at once, so an interrupted run leaves its best teacher behind.
    """
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(args.seed + 1)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    best, best_score = ema, -1.0
    # Per-channel loss weights [C]: degree >= 1 terms of each colour get --trend-weight.
    degree = torch.arange(vae.z_dim) % vae.temporal_terms
    channel_weight = torch.where(degree > 0, args.trend_weight, 1.0).view(1, 1, -1, 1, 1)
    last_step = min(args.steps, args.stop_at or args.steps)
    world = world_named(args.world)
    progress = tqdm(range(last_step), desc="teacher", dynamic_ncols=True, mininterval=10)
    for step in progress:
        # 1. Data: clean latents, their prompts with caption dropout, noise and sigma.
        x0, caption_index = world_batch(vae, args.batch_size, generator, world)
        context = contexts[caption_index]
        dropped = torch.rand(args.batch_size, generator=generator) < args.caption_dropout
        context = torch.where(dropped.view(-1, 1, 1), empty.expand_as(context), context)
        noise = torch.randn(x0.shape, generator=generator)
        # Wan's shift: more of the draw at high noise, where layout and motion are decided
        sigma = shift_sigmas(torch.rand(args.batch_size, generator=generator), args.train_shift)
        image_rows = (torch.rand(args.batch_size, generator=generator) < args.image_share if args.image_share > 0
                      else torch.zeros(args.batch_size, dtype=torch.bool))  # (no draw: the shipped runs' stream)
        x_t, timestep, frame_weight = noisy_clips(x0, noise, sigma, image_rows)

        # 2. Step.
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        error = (model.predict_flow(x_t, timestep, context) - flow_target(x0, noise)).pow(2) * channel_weight
        loss = (error * frame_weight).sum() / (frame_weight.sum() * error[0, 0].numel())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        update_ema(ema, model, args.ema if step >= args.warmup else 0.0)
        progress.set_postfix(loss=f"{loss.item():.4f}")
        # 3. Evaluate the EMA teacher with the recipe's settings; keep the best; stop at the target.
        if judge is not None and ((step + 1) % args.eval_every == 0 or step + 1 == last_step):
            reports = judge.evaluate(ema)
            score = min(report["adherence"] for report in reports.values())
            print(json.dumps({"step": step + 1, "loss": round(loss.item(), 4), **summarise(reports)}), flush=True)
            if score > best_score:
                best, best_score = copy.deepcopy(ema), score
                save_teacher(best, args.out / TEACHER_FOLDERS[args.world])
            if score >= args.target:
                break
    return best if judge is not None else ema


class RecipeJudge:
    """Samples the validation set (the judge's captions, other seeds) with the recipe's `teacher:` and `ode:`
    settings and scores it; with `image_to_video` also with the `teacher:` settings from each clip's given first
    frame (`given_image`), the "teacher_ti2v" setting."""

    def __init__(self, vae: MiniatureVAE, encoder: WanTextEncoder, world: WorldSpec, recipe: Path = RECIPE,
                 clips_per_seed_set: int = 12, image_to_video: bool = False) -> None:
        config = load_config(str(recipe))
        self.settings: dict[str, SamplingConfig] = {"teacher": config.teacher, "ode": config.ode}
        if config.flow.num_train_timesteps != NUM_TRAIN_TIMESTEPS:
            raise UserError(
                f"{recipe}: flow.num_train_timesteps {config.flow.num_train_timesteps}, expected {NUM_TRAIN_TIMESTEPS}"
            )
        self.vae, self.world = vae, world
        prompts = [prompt for first_seed in VALIDATION_FIRST_SEEDS
                   for prompt in eval_prompts(first_seed, clips_per_seed_set)]
        self.captions = [parse_caption(text) for text, _ in prompts]
        self.cond = encoder.encode([text for text, _ in prompts])
        self.uncond = encoder.encode([config.text_encoder.negative_prompt]).expand_as(self.cond)
        latent_shape = vae.latent_shape(DEFAULT_WORLD.num_frames, DEFAULT_WORLD.height, DEFAULT_WORLD.width)
        generators = [torch.Generator().manual_seed(seed) for _, seed in prompts]
        self.noise = torch.stack([torch.randn(latent_shape, generator=g) for g in generators])
        self.first_frames = None
        if image_to_video:
            self.settings["teacher_ti2v"] = config.teacher
            images = torch.stack([given_image(text, seed, world) for text, seed in prompts])  # [N, 3, H, W]
            self.first_frames = vae.encode_to_latent(images[:, :, None])  # [N, 1, C, h, w]

    @torch.no_grad()
    def evaluate(self, model: WanModel) -> dict[str, dict]:
        """{setting: {adherence, mean_scores, nfe, per_clip}} for the `teacher` and `ode` settings."""
        was_training = model.training
        model.eval()
        reports = {}
        for name, sampling in self.settings.items():
            sample = sample_teacher(model, self.noise, self.cond, self.uncond, sampling,
                                    num_train_timesteps=NUM_TRAIN_TIMESTEPS,
                                    first_frame=self.first_frames if name == "teacher_ti2v" else None)
            videos = self.vae.decode_to_pixel(sample.latent)
            scores = [score_clip(video, caption, self.world) for video, caption in zip(videos, self.captions)]
            summary = {key: sum(s[key] for s in scores) / len(scores) for key in scores[0]}
            reports[name] = {"adherence": summary["total"], "mean_scores": summary, "nfe": sample.nfe, "per_clip": scores}
        model.train(was_training)
        return reports


def summarise(reports: dict[str, dict]) -> dict[str, dict]:
    """Mean judge scores per setting, and the total's standard error over the clips, rounded for the log."""
    from miniature.report import standard_error

    return {name: {**{k: round(v, 4) for k, v in report["mean_scores"].items()},
                   "total_se": round(standard_error([clip["total"] for clip in report["per_clip"]]), 4)}
            for name, report in reports.items()}


@run_main
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
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
    teacher_dir = args.out / TEACHER_FOLDERS[args.world]
    judge = None if args.no_eval else RecipeJudge(vae, encoder, world_named(args.world),
                                                  clips_per_seed_set=args.val_clips, image_to_video=args.image_share > 0)
    if args.eval_only:
        teacher = WanModel.from_pretrained(str(teacher_dir))
    else:
        model = WanModel.from_pretrained(str(args.init)) if args.init else WanModel(**arch)
        if model.config != arch:
            raise UserError(f"--init {args.init} has a different architecture from configs/miniature/dit.yaml")
        num_parameters = sum(p.numel() for p in model.parameters())
        print(f"teacher: {num_parameters:,} parameters, {args.steps} steps of {args.batch_size}", flush=True)
        start = time.time()
        teacher = train(args, model, vae, contexts, empty, judge)
        print(f"trained in {time.time() - start:.0f} s", flush=True)
        save_teacher(teacher, teacher_dir)
        print(f"wrote {teacher_dir}/config.json and model.safetensors", flush=True)

    if judge is not None:
        reports = judge.evaluate(teacher)
        print(json.dumps({"final": summarise(reports)}, indent=2), flush=True)


if __name__ == "__main__":
    main()
