"""Distil a light decoder (TAEHV architecture) from the recipe's full VAE decoder, on latents the student makes.

    python scripts/train_light_decoder.py --config_path configs/self_forcing_dmd_5B.yaml --checkpoint logs/dmd/latest \
        --prompts prompts.txt --out outputs/light_decoder [--clips 256] [--eval_clips 16] [--steps 20000] \
        [--batch_size 4] [--lr 3e-4] [--widths 256,128,64,64] [--crop 32] [key=value ...]

Use it when the recipe's VAE has no published light decoder (taew2_1 serves Wan2.1 latents, taew2_2 the 5B's)
or was fine-tuned. Data-free: the student rolls out the prompts (clip i: prompt i mod N of a seeded shuffle of
the file, noise seed --seed + i) and the full VAE decodes them; the light decoder learns those pixels from those
latents. The last --eval_clips clips are held out: report.json gives the PSNR against the full decode on them and
both decoders' time.
A rerun with the same arguments resumes where it stopped (the bank's finished clips, the last checkpoint);
other arguments are refused. The export goes to inference.light_decoder with inference.decoder=light.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from pipeline.causal_inference import CausalInferencePipeline
from pipeline.run_options import DTYPES, check_device, default_dtype
from trainer.light_decoder import CHECKPOINT_FILE, DistillSettings, build_bank, evaluate, export, stages_for, train
from utils.config import load_config, parse_cli
from utils.datasets import read_text_lines
from utils.errors import OneLineArgumentParser, UserError, run_main
from utils.geometry import resolve_recipe
from utils.io import check_output_folder
from wan.loading import recipe_for_checkpoint, resolve_generator_weights


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_path", required=True, help="the student's recipe (its VAE is the one distilled)")
    parser.add_argument("--checkpoint", default=None, help="the student: a trainer export folder or weights file")
    parser.add_argument("--use_ema", action="store_true", help="the export's generator_ema.safetensors")
    parser.add_argument("--prompts", required=True, help="a text file, one prompt per line (shuffled with --seed)")
    parser.add_argument("--out", required=True, help="the run's folder (bank, checkpoint, export, report)")
    parser.add_argument("--clips", type=int, default=64, help="clips the student makes, held-out ones included")
    parser.add_argument("--eval_clips", type=int, default=8, help="the last clips, never trained on (PSNR)")
    parser.add_argument("--steps", type=int, default=2000, help="training steps")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate")
    parser.add_argument("--widths", default="256,128,64,64", help="channels of the four stages (published: 256,128,64,64)")
    parser.add_argument("--crop", type=int, default=0, help="train on random crops of this many latent pixels a side (0: whole)")
    parser.add_argument("--save_every", type=int, default=200, help="checkpoint every this many steps")
    parser.add_argument("--seed", type=int, default=0, help="the clips' noise seeds start here; also the decoder's init")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="the rollout's dtype (the decoder trains in fp32)")
    return parse_cli(parser, argv)


def settings_from(args: argparse.Namespace) -> DistillSettings:
    try:
        widths = tuple(int(w) for w in args.widths.split(","))
    except ValueError:
        widths = ()
    checks = [
        ("--widths", args.widths, len(widths) == 4 and min(widths) > 0, "four positive channel counts, e.g. 256,128,64,64"),
        ("--clips", args.clips, args.clips >= 2, "at least 2 (one to train on, one held out)"),
        ("--eval_clips", args.eval_clips, 1 <= args.eval_clips < args.clips, "1 .. --clips - 1"),
        ("--steps", args.steps, args.steps >= 1, "at least 1"),
        ("--batch_size", args.batch_size, args.batch_size >= 1, "at least 1"),
        ("--lr", args.lr, args.lr > 0, "a positive learning rate"),
        ("--crop", args.crop, args.crop >= 0, "0 (whole frames) or a number of latent pixels"),
        ("--save_every", args.save_every, args.save_every >= 1, "at least 1"),
        ("--seed", args.seed, args.seed >= 0, "0 or more"),
    ]
    for flag, value, ok, expected in checks:
        if not ok:
            raise UserError(f"{flag} {value}: expected {expected}")
    return DistillSettings(clips=args.clips, eval_clips=args.eval_clips, steps=args.steps, batch_size=args.batch_size,
                           lr=args.lr, widths=widths, crop=args.crop, save_every=args.save_every, seed=args.seed)


@run_main
def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    # 1. Every input checked before a model is built.
    settings = settings_from(args)
    prompts = read_text_lines(args.prompts, "--prompts")
    config = recipe_for_checkpoint(load_config(args.config_path, overrides), args.checkpoint)
    inference = dataclasses.replace(config.inference, decoder="full", light_decoder=None, overlap_decode=False)
    config = dataclasses.replace(config, inference=inference)  # the targets are the full VAE's pixels
    resolved = resolve_recipe(config, need_scores=False, check_weights=False)
    resolve_generator_weights(args.checkpoint, args.use_ema, resolved.generator.arch)
    stages_for(resolved.vae.stride)
    out = check_output_folder(args.out, "--out")
    device = check_device(args.device)
    dtype = default_dtype(args.dtype, device)

    # 2. The bank (the student's latents and their full decode), then training, then judging.
    out.mkdir(parents=True, exist_ok=True)
    pipe = CausalInferencePipeline(config, resolved, device, dtype, checkpoint=args.checkpoint, use_ema=args.use_ema)

    # clip i: prompt order[i mod N] of a seeded shuffle, so the held-out clips' prompts are spread over the list
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed)).tolist()

    def make_clip(index: int):
        result = pipe.generate(prompts[order[index % len(prompts)]], seed=args.seed + index)
        return result.latents[0], result.video

    build_bank(out / "bank", settings.clips, make_clip)
    resumed = (out / CHECKPOINT_FILE).is_file()
    model = train(out, settings, resolved.vae.z_dim, resolved.vae.stride, device)
    report = evaluate(out, settings, model, lambda latents: pipe.vae.decode_to_pixel(latents.to(pipe.dtype)), device)
    path = export(out, model, report)
    print(f"{path}: PSNR {report['psnr_db']:.2f} +- {report['psnr_se_db']:.2f} dB against the full decode on "
          f"{report['held_out_clips']} held-out clips; decode {report['light_decode_s'] * 1e3:.1f} ms (light) vs "
          f"{report['full_decode_s'] * 1e3:.1f} ms (full) for {report['frames']} frames"
          + (" (resumed)" if resumed else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
