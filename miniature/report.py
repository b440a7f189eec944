"""Judge generated clips and write the quickstart report: adherence, model evaluations and seconds per video.

The teacher is sampled here (many steps with CFG, the same sampler the ODE pairs use); the students are
judged from the mp4s and inference_record.json files that inference.py wrote.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Sequence

import torch

from miniature.judge import adherence, score_clip
from miniature.world import parse_caption
from utils.io import atomic_write_json, atomic_write_text
from utils.tables import format_table

CRITERIA = {
    "teacher_adherence_min": 0.9,
    "student_adherence_ratio_min": 0.9,
    "nfe_ratio_min": 10.0,
    "speedup_min": 5.0,
}


def summarise(name: str, videos: Sequence[torch.Tensor], captions: Sequence[str], nfe: Sequence[float],
              seconds: Sequence[float], forward_calls: Sequence[int]) -> dict:
    """One model's line of the report; videos are [T, 3, H, W] in [-1, 1].

    nfe: denoiser evaluations each frame of the video goes through (the usual NFE: a forward over a
    3-frame block counts for those frames only); forward_calls: network calls per video.
    """
    parsed = [parse_caption(c) for c in captions]
    scores = [score_clip(v, c) for v, c in zip(videos, parsed)]
    return {
        "model": name,
        "adherence": adherence(list(videos), parsed),
        "nfe": sum(nfe) / len(nfe),
        "forward_calls": sum(forward_calls) / len(forward_calls),
        "seconds_per_video": statistics.median(seconds),  # median: the first video carries one-off warm-up costs
        "num_videos": len(videos),
        "per_item": {k: sum(s[k] for s in scores) / len(scores) for k in scores[0]},
    }


@torch.no_grad()
def sample_teacher_videos(config, prompts: Sequence[tuple[str, int]], device: torch.device) -> tuple[list, list, list]:
    """Sample the bidirectional teacher (config.teacher: many steps with CFG) on the evaluation prompts."""
    from pipeline.components import build_dit, build_text_encoder, build_vae
    from pipeline.teacher_sampling import sample_teacher
    from utils.geometry import resolve_recipe

    resolved = resolve_recipe(config, need_scores=True)
    teacher = build_dit(resolved.real_score, causal=False, attention_backend=config.attention_backend, device=device).eval()
    text_encoder = build_text_encoder(config, device=device).eval()
    vae = build_vae(resolved.vae, device=device)
    shape = resolved.geometry.latent_shape[1:]
    negative = text_encoder.encode([config.text_encoder.negative_prompt])
    videos, nfes, seconds = [], [], []
    for prompt, seed in prompts:
        start = time.perf_counter()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.randn((1, *shape), generator=generator).to(device)
        cond = text_encoder.encode([prompt])
        sample = sample_teacher(teacher, noise, cond, negative, config.teacher,
                                num_train_timesteps=config.flow.num_train_timesteps, boundary=resolved.real_score.moe_boundary)
        video = vae.decode_to_pixel(sample.latent)[0].float().clamp(-1, 1)
        seconds.append(time.perf_counter() - start)
        videos.append(video.cpu())
        nfes.append(sample.nfe)  # every teacher forward covers the whole video
    return videos, nfes, seconds


def write_report(out_dir: Path, results: dict, settings: dict, name: str = "report") -> dict:
    """<name>.json (machine-readable, keys teacher / ode_init / dmd) and <name>.md (tables) in out_dir."""
    teacher = results["teacher"]
    checks = {}
    for student in [k for k in ("dmd", "sid", "dmd_no_ema", "sid_no_ema") if k in results]:
        s = results[student]
        s["nfe_ratio"] = teacher["nfe"] / s["nfe"]
        s["speedup"] = teacher["seconds_per_video"] / s["seconds_per_video"]
        s["adherence_ratio"] = s["adherence"] / teacher["adherence"] if teacher["adherence"] else 0.0
        if student.endswith("_no_ema"):
            continue  # shown for comparison; the deployed (EMA) student is the one checked
        checks[student] = {
            "student_adherence_ratio": s["adherence_ratio"] >= CRITERIA["student_adherence_ratio_min"],
            "nfe_ratio": s["nfe_ratio"] >= CRITERIA["nfe_ratio_min"],
            "speedup": s["speedup"] >= CRITERIA["speedup_min"],
        }
    checks["teacher_adherence"] = teacher["adherence"] >= CRITERIA["teacher_adherence_min"]
    report = {**results, "criteria": CRITERIA, "checks": checks, "settings": settings}
    atomic_write_json(out_dir / f"{name}.json", report)
    rows = [(k, f"{v['adherence']:.3f}", f"{v['nfe']:g}", f"{v['forward_calls']:.0f}", f"{v['seconds_per_video']:.3f}",
             " ".join(f"{n}={x:.2f}" for n, x in v["per_item"].items() if n != "total"))
            for k, v in results.items()]
    lines = [
        "# Quickstart: the miniature Self-Forcing distillation",
        "",
        format_table(rows, header=("model", "adherence", "nfe", "forward calls", "s / video", "judge items")),
        "",
        "nfe: denoiser evaluations each frame goes through (teacher: steps x CFG; causal student: steps + the",
        "context pass, each over one block of frames). forward calls: network calls per video. s / video:",
        "median seconds of sampling + VAE decode, models already loaded, same machine, same run.",
        "",
        "## Checks",
        "",
        "```",
        json.dumps(checks, indent=2),
        "```",
        "",
        "Pictures: training_curves.png, frames.png; videos under videos/.",
    ]
    atomic_write_text(out_dir / f"{name}.md", "\n".join(lines) + "\n")
    return report
