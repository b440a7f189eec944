"""Judge generated clips and write the quickstart report: adherence, model evaluations and seconds per video.

The teacher is sampled here (many steps with CFG, the same sampler the ODE pairs use); the students are
judged from the latents and inference_record.json files that inference.py wrote. The speed check times the
teacher and the deployed student back to back in this process.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from miniature.judge import adherence, score_clip
from miniature.world import DEFAULT_WORLD, WorldSpec, parse_caption
from utils.errors import UserError
from utils.io import atomic_write_json, atomic_write_text
from utils.tables import format_table
from utils.temporal import temporal_report

# The teacher check asks whether the run's teacher does what the shipped teacher was validated to do. The bounded
# world's teacher scores 0.885 +- 0.022 on its 96 validation clips (seeds 2000+ and 3000+, never the report's:
# `python scripts/train_miniature_teacher.py --eval-only --out checkpoints/miniature --val-clips 48`); the report's
# 48 clips add a standard error of about 0.031, so a sound run scores at least 0.885 - 1.645 x (0.022^2 + 0.031^2)^0.5
# = 0.82 with 95% probability. The bar was 0.9, set when the teacher had been measured on 12 clips only; no sampler
# setting (steps, CFG, shift, Euler) and no further training moved the teacher past 0.90 on validation
# (docs/EXPERIMENTS.md, 2026-12-04): what it misses is fast motion, which it makes in 4-frame stairs.
# An image-to-video run (--task ti2v|both) judges the teacher of both tasks from first frames: validated the same way
# (`--eval-only --out <folder holding teacher/> --val-clips 48 --image-share 0.5`), 0.907 +- 0.021 on 96 clips, so its
# bar is 0.907 - 1.645 x (0.021^2 + 0.031^2)^0.5 = 0.84.
CRITERIA = {
    "teacher_adherence_min": 0.82,
    "teacher_adherence_min_ti2v": 0.84,
    "student_adherence_ratio_min": 0.9,
    "nfe_ratio_min": 10.0,
    "speedup_min": 5.0,
}
# An image-to-video model holds the given image's latent clean, so its first frame is the VAE's reconstruction of the
# image: its error against the image may exceed the VAE's own by this much only (mean absolute error, [-1, 1] units;
# the PNG's 8-bit rounding is ~0.002).
FIRST_FRAME_TOLERANCE = 0.005
# Goals of the temporal report (issue 16), shown beside the checks: seams no worse than 1.2x the teacher's
# (the teacher makes the whole clip at once, so its "seams" at the student's block boundaries are the baseline),
# and at 4x the training length the last training-length segment at least 0.9x the first: its judge adherence
# in the wrapping world, where every segment has a true trajectory; its appearance (background x shape colour)
# in the bounded world, where the true shape has left the canvas after the first segment.
TEMPORAL_GOALS = {"seam_ratio_vs_teacher_max": 1.2, "long_video_ratio_min": 0.9}
LONG_VIDEO_FACTOR = 4
# What each world can judge in the segments of a long video (the first is what its goal holds to the first segment).
JUDGED_IN_LONG_VIDEOS = {"wrap": ("adherence", "appearance"), "bounded": ("appearance",)}
WORLD_NOTES = {
    "wrap": "The canvas wraps, so the caption's motion goes on in every segment (goal: adherence).",
    "bounded": "In this world the true shape leaves the canvas after the first segment, so motion past it is not "
               "judged (goal: appearance; `--world wrap` judges long videos in full).",
}


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean of per-clip values (0 for a single clip): how far another set of clips of the
    same model could move the mean."""
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0


def temporal_means(videos: Sequence[torch.Tensor], blocks: Sequence[int], stride: int) -> dict:
    """Seam ratio (overall and by boundary) and flicker of each clip at the student's block boundaries, averaged;
    the seam ratio's standard error over the clips beside it."""
    reports = [temporal_report(v, blocks, stride) for v in videos]
    means = {key: sum(r[key] for r in reports) / len(reports) for key in ("seam_ratio", "flicker")}
    by_boundary = [r["seam_ratio_by_boundary"] for r in reports]
    return {**means, "seam_ratio_se": standard_error([r["seam_ratio"] for r in reports]),
            "seam_ratio_by_boundary": [sum(column) / len(column) for column in zip(*by_boundary, strict=True)]}


def ratio_standard_error(numerator: float, numerator_se: float, denominator: float, denominator_se: float) -> float:
    """Standard error of numerator / denominator for two independent means (first-order propagation)."""
    ratio = numerator / denominator
    return abs(ratio) * ((numerator_se / numerator) ** 2 + (denominator_se / denominator) ** 2) ** 0.5


def summarise(name: str, videos: Sequence[torch.Tensor], captions: Sequence[str], nfe: Sequence[float],
              seconds: Sequence[float], forward_calls: Sequence[int], blocks: Sequence[int], stride: int,
              world: WorldSpec = DEFAULT_WORLD, images: Sequence[torch.Tensor] | None = None) -> dict:
    """One model's line of the report; videos are [T, 3, H, W] in [-1, 1].

    nfe: denoiser evaluations each frame of the video goes through (the usual NFE: a forward over a
    3-frame block counts for those frames only); forward_calls: network calls per video. blocks, stride: the
    student's latent frames per block and the VAE's temporal stride, where seams are measured. images: the first
    frames [3, H, W] image-to-video clips started from; their line then has the first frame's error against them.
    """
    parsed = [parse_caption(c) for c in captions]
    scores = [score_clip(v, c, world) for v, c in zip(videos, parsed)]
    return {
        **(first_frame_errors(videos, images) if images is not None else {}),
        "model": name,
        "adherence": adherence(list(videos), parsed, world),
        "adherence_se": standard_error([s["total"] for s in scores]),
        "nfe": sum(nfe) / len(nfe),
        "forward_calls": sum(forward_calls) / len(forward_calls),
        "seconds_per_video": statistics.median(seconds),  # median: the first video carries one-off warm-up costs
        "num_videos": len(videos),
        "per_item": {k: sum(s[k] for s in scores) / len(scores) for k in scores[0]},
        **temporal_means(videos, blocks, stride),
    }


def first_frame_errors(videos: Sequence[torch.Tensor], images: Sequence[torch.Tensor]) -> dict:
    """Mean absolute pixel error (in [-1, 1] units) of each clip's first frame against the image it started from."""
    errors = [float((video[0].float() - image.float()).abs().mean()) for video, image in zip(videos, images, strict=True)]
    return {"first_frame_error": sum(errors) / len(errors), "first_frame_error_se": standard_error(errors)}


def vae_reconstruction_error(vae, images: Sequence[torch.Tensor]) -> dict:
    """The VAE's own first-frame error: each image [3, H, W] encoded alone and decoded, against itself. An
    image-to-video model holds the image's latent clean, so its first frame can be no closer than this."""
    with torch.no_grad():
        decoded = [vae.decode_to_pixel(vae.encode_to_latent(image[None, :, None].float()))[0] for image in images]
    return first_frame_errors(decoded, images)


def long_video_summary(name: str, videos: Sequence[torch.Tensor], captions: Sequence[str], segment_frames: int,
                       world: WorldSpec = DEFAULT_WORLD) -> dict:
    """Clips of LONG_VIDEO_FACTOR x the training length, judged per training-length segment.

    Each segment is judged like a clip of its own, on what the world can judge there (`judged`): in the wrapping
    world the caption's motion goes on in every segment, so adherence (every judge item) and appearance (background x
    shape colour alone, to tell a fading look from lost motion); in the bounded world the true shape leaves the canvas
    after the first segment, so only appearance, held to the first segment's. Drift of colour, contrast and sharpness
    against the first segment in both.
    """
    parsed = [parse_caption(c) for c in captions]
    judged = JUDGED_IN_LONG_VIDEOS["wrap" if world.wrap else "bounded"]
    parts = {"appearance": lambda s: s["background"] * s["shape_colour"], "adherence": lambda s: s["total"]}
    per_segment: list[dict[str, float]] = []
    for start in range(0, len(videos[0]) - segment_frames + 1, segment_frames):
        scores = [score_clip(v[start:start + segment_frames], c, world) for v, c in zip(videos, parsed)]
        per_segment.append({"start": start, **{key: sum(map(parts[key], scores)) / len(scores) for key in judged}})
    drifts = [temporal_report(v, [1], 1, segment_frames)["drift"] for v in videos]
    first, last = per_segment[0], per_segment[-1]
    return {
        "model": name,
        "world": "wrap" if world.wrap else "bounded",
        "judged": list(judged),
        "num_frames": len(videos[0]),
        "segment_frames": segment_frames,
        "segments": per_segment,
        **{f"{key}_ratio": last[key] / first[key] if first[key] else 0.0 for key in judged},
        "drift_per_segment": [sum(d["segments"][i]["drift"] for d in drifts) / len(drifts)
                              for i in range(len(per_segment))],
    }


class TeacherSampler:
    """A teacher (config.teacher: many steps with CFG), loaded once: clip, nfe and seconds per call.

    The recipe's real score is the bidirectional teacher, which makes the whole clip at once, or with
    ode.causal_teacher (causal ODE init) the causal teacher, which makes it block by block against the clean
    blocks before it (pipeline.causal_teacher_sampling), as it makes its ODE pairs.
    """

    def __init__(self, config, device: torch.device):
        from pipeline.components import build_dit, build_text_encoder, build_vae
        from utils.geometry import resolve_recipe

        self.config, self.device = config, device
        self.resolved = resolve_recipe(config, need_scores=True)
        self.causal = config.ode.causal_teacher
        # network calls per unit of nfe: a causal teacher's forward covers one block of frames
        self.calls_per_nfe = self.resolved.geometry.num_blocks if self.causal else 1
        self.teacher = build_dit(self.resolved.real_score, causal=self.causal, attention_backend=config.attention_backend,
                                 device=device).eval()
        self.text_encoder = build_text_encoder(config, device=device).eval()
        self.vae = build_vae(self.resolved.vae, device=device)
        with torch.no_grad():
            self.negative = self.text_encoder.encode([config.text_encoder.negative_prompt])

    @torch.no_grad()
    def latents(self, prompt: str, seed: int, image: torch.Tensor | None = None):
        """The teacher's sample for (prompt, seed): latents [1, F, C, h, w] and nfe (pipeline.teacher_sampling);
        with `image` [3, H, W] in [-1, 1] (image-to-video) its latent is the clean first frame throughout."""
        from pipeline.causal_teacher_sampling import sample_causal_teacher
        from pipeline.teacher_sampling import sample_teacher

        generator = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.randn((1, *self.resolved.geometry.latent_shape[1:]), generator=generator).to(self.device)
        cond = self.text_encoder.encode([prompt])
        common = {"num_train_timesteps": self.config.flow.num_train_timesteps, "boundary": self.resolved.real_score.moe_boundary}
        if self.causal:
            if image is not None:
                raise UserError("the causal teacher samples text-to-video only in the miniature's report")
            return sample_causal_teacher(self.teacher, noise, cond, self.negative, self.config.teacher,
                                         self.resolved.geometry, **common)
        first_frame = None if image is None else self.vae.encode_to_latent(image[None, :, None].to(self.device)).float()
        return sample_teacher(self.teacher, noise, cond, self.negative, self.config.teacher, first_frame=first_frame,
                              **common)

    @torch.no_grad()
    def __call__(self, prompt: str, seed: int, image: torch.Tensor | None = None) -> tuple[torch.Tensor, float, float]:
        """One clip [T, 3, H, W] in [-1, 1], its nfe (denoiser evaluations each frame goes through) and its seconds."""
        start = time.perf_counter()
        sample = self.latents(prompt, seed, image)
        video = self.vae.decode_to_pixel(sample.latent)[0].float().clamp(-1, 1)
        return video.cpu(), sample.nfe / self.calls_per_nfe, time.perf_counter() - start


def sample_teacher_videos(sampler: TeacherSampler, prompts: Sequence[tuple[str, int]],
                          images: Sequence[torch.Tensor] | None = None) -> tuple[list, list, list]:
    """The teacher on the evaluation prompts (from their first-frame images, if given): (clips, nfes, seconds), one
    each per prompt."""
    images = images if images is not None else [None] * len(prompts)
    videos, nfes, seconds = zip(*(sampler(prompt, seed, image) for (prompt, seed), image in zip(prompts, images,
                                                                                                strict=True)))
    return list(videos), list(nfes), list(seconds)


def time_alternately(teacher: Callable[[str, int], float], student: Callable[[str, int], float],
                     prompts: Sequence[tuple[str, int]]) -> dict:
    """Seconds per clip of both models, each prompt timed by the teacher and at once by the student.

    A shared CPU's speed drifts by tens of percent over minutes, so medians taken in separate stages of a run can
    be far apart for identical work; a pair timed seconds apart shares the machine's state. The speedup is the
    median of the per-prompt ratios.
    """
    pairs = [(teacher(prompt, seed), student(prompt, seed)) for prompt, seed in prompts]
    return {
        "teacher_seconds": statistics.median(t for t, _ in pairs),
        "student_seconds": statistics.median(s for _, s in pairs),
        "speedup": statistics.median(t / s for t, s in pairs),
        "num_pairs": len(pairs),
    }


def write_report(out_dir: Path, results: dict, settings: dict, name: str = "report") -> dict:
    """<name>.json (machine-readable, keys teacher / ode_init / dmd) and <name>.md (tables) in out_dir."""
    teacher = results["teacher"]
    # speed: {"student": name, **time_alternately(...)}: that student's speedup from back-to-back pairs
    speed = results.pop("speed", None)
    vae_first_frame = results.pop("vae_first_frame", None)  # image-to-video: the VAE's own first-frame error
    checks = {}
    for student in [k for k in ("dmd", "sid", "dmd_no_ema", "sid_no_ema") if k in results]:
        s = results[student]
        s["nfe_ratio"] = teacher["nfe"] / s["nfe"]
        paired = speed is not None and speed["student"] == student
        s["speedup"] = speed["speedup"] if paired else teacher["seconds_per_video"] / s["seconds_per_video"]
        s["adherence_ratio"] = s["adherence"] / teacher["adherence"] if teacher["adherence"] else 0.0
        if student.endswith("_no_ema"):
            continue  # shown for comparison; the deployed (EMA) student is the one checked
        checks[student] = {
            "student_adherence_ratio": s["adherence_ratio"] >= CRITERIA["student_adherence_ratio_min"],
            "nfe_ratio": s["nfe_ratio"] >= CRITERIA["nfe_ratio_min"],
            "speedup": s["speedup"] >= CRITERIA["speedup_min"],
            **({"first_frame": s["first_frame_error"] <= vae_first_frame["first_frame_error"] + FIRST_FRAME_TOLERANCE}
               if vae_first_frame else {}),
        }
    from_images = settings.get("task") in ("ti2v", "both")  # the teacher row is the teacher from first frames
    checks["teacher_adherence"] = teacher["adherence"] >= CRITERIA[
        "teacher_adherence_min_ti2v" if from_images else "teacher_adherence_min"]
    # a student of both tasks, judged from text alone too (rows <model>_t2v), against the teacher from text alone
    text_teacher = results.get("teacher_t2v")
    for student in [k for k in results if k.endswith("_t2v") and k != "teacher_t2v"]:
        line = results[student]
        line["adherence_ratio"] = line["adherence"] / text_teacher["adherence"] if text_teacher["adherence"] else 0.0
        line["seam_ratio_vs_teacher"] = line["seam_ratio"] / text_teacher["seam_ratio"]
        line["seam_ratio_vs_teacher_se"] = ratio_standard_error(line["seam_ratio"], line["seam_ratio_se"],
                                                                text_teacher["seam_ratio"], text_teacher["seam_ratio_se"])
    long_video = results.pop("long_video", None)
    goals = {}
    for student in [k for k in ("ode_init", "dmd", "sid") if k in results]:
        line = results[student]
        line["seam_ratio_vs_teacher"] = line["seam_ratio"] / teacher["seam_ratio"]
        line["seam_ratio_vs_teacher_se"] = ratio_standard_error(line["seam_ratio"], line["seam_ratio_se"],
                                                                teacher["seam_ratio"], teacher["seam_ratio_se"])
        goals[f"{student}_seams"] = results[student]["seam_ratio_vs_teacher"] <= TEMPORAL_GOALS["seam_ratio_vs_teacher_max"]
    if long_video is not None:
        judged = long_video["judged"][0]
        goals[f"long_video_{judged}"] = long_video[f"{judged}_ratio"] >= TEMPORAL_GOALS["long_video_ratio_min"]
    report = {**results, "criteria": CRITERIA, "checks": checks, "settings": settings, "speed": speed,
              **({"vae_first_frame": vae_first_frame} if vae_first_frame else {}),
              "long_video": long_video, "temporal_goals": TEMPORAL_GOALS, "goals": goals}
    atomic_write_json(out_dir / f"{name}.json", report)
    rows = [(k, f"{v['adherence']:.3f} ± {v['adherence_se']:.3f}", f"{v['nfe']:g}", f"{v['forward_calls']:.0f}",
             f"{v['seconds_per_video']:.3f}", f"{v['seam_ratio']:.3f} ± {v['seam_ratio_se']:.3f}", f"{v['flicker']:.3f}",
             " ".join(f"{n}={x:.2f}" for n, x in v["per_item"].items() if n != "total"))
            for k, v in results.items()]
    lines = [
        "# Quickstart: the miniature Self-Forcing distillation"
        + (f" ({settings['world']} world)" if settings.get("world") else ""),
        "",
        format_table(rows, header=("model", "adherence", "nfe", "forward calls", "s / video", "seam ratio", "flicker",
                                   "judge items")),
        "",
        "nfe: denoiser evaluations each frame goes through (teacher: steps x CFG; causal student: steps + the",
        "context pass, each over one block of frames; causal teacher, when the chain has one: steps x CFG + a",
        "context pass per CFG branch, block by block). forward calls: network calls per video. s / video:",
        "median seconds of sampling + VAE decode, models already loaded, same machine, same run.",
        "seam ratio: frame change across the student's block boundaries over the change inside blocks (the",
        "teacher, made at once, is the baseline); flicker: high-frequency temporal energy (0 steady, 1 alternating).",
        f"± : standard error of the mean over the {teacher['num_videos']} clips. Seam ratio / the teacher's: " + "; ".join(
            f"{k} {v['seam_ratio_vs_teacher']:.3f} ± {v['seam_ratio_vs_teacher_se']:.3f}" for k, v in results.items()
            if "seam_ratio_vs_teacher" in v) + f" (goal <= {TEMPORAL_GOALS['seam_ratio_vs_teacher_max']}).",
        "seam ratio by block boundary, first to last: " + "; ".join(
            f"{k} {' / '.join(f'{x:.2f}' for x in v['seam_ratio_by_boundary'])}" for k, v in results.items()
            if v.get("seam_ratio_by_boundary")) + ".",
        *(_speed_lines(speed) if speed else []),
        *(_first_frame_lines(results, vae_first_frame) if vae_first_frame else []),
        *[f"{k} (the same student from text alone): adherence {v['adherence']:.3f} = {v['adherence_ratio']:.3f}x the "
          f"teacher's from text alone, seams {v['seam_ratio_vs_teacher']:.3f}x its." for k, v in results.items()
          if k.endswith("_t2v") and "adherence_ratio" in v],
        "",
        *(_long_video_lines(long_video) if long_video else []),
        "## Checks",
        "",
        "```",
        json.dumps(checks, indent=2),
        "```",
        "",
        "Temporal goals (reported, not part of the verdict): " + json.dumps(goals),
        "",
        "Pictures: training_curves.png, frames.png, long_video.png, long_video_segments.png; videos under videos/.",
        *(_time_lines(settings) if "seconds_total" in settings else []),
    ]
    atomic_write_text(out_dir / f"{name}.md", "\n".join(lines) + "\n")
    return report


def _first_frame_lines(results: dict, vae: dict) -> list[str]:
    return [
        "Image-to-video: every clip starts from the first frame of the world's own clip for its caption and seed. First "
        "frame against that image (mean absolute error, [-1, 1] units): the VAE's own reconstruction "
        f"{vae['first_frame_error']:.4f}; " + "; ".join(
            f"{k} {v['first_frame_error']:.4f}" for k, v in results.items() if "first_frame_error" in v)
        + f" (check: within {FIRST_FRAME_TOLERANCE} of the VAE's).",
    ]


def _speed_lines(speed: dict) -> list[str]:
    return [
        f"Speed check: the teacher and the {speed['student']} student timed back to back on each of "
        f"{speed['num_pairs']} prompts",
        f"(medians {speed['teacher_seconds']:.3f} s / {speed['student_seconds']:.3f} s): {speed['speedup']:.1f}x, the "
        "median of the per-prompt ratios",
        "(the s / video column comes from separate stages of the run, minutes apart).",
    ]


def _long_video_lines(long_video: dict) -> list[str]:
    segments, judged = long_video["segments"], long_video["judged"]
    rows = [(f"{s['start']}-{s['start'] + long_video['segment_frames'] - 1}", *(f"{s[key]:.3f}" for key in judged),
             f"{d:.4f}") for s, d in zip(segments, long_video["drift_per_segment"])]
    explained = {"adherence": "adherence", "appearance": "appearance (background x shape colour alone)"}
    return [
        f"## Long video: {long_video['model']} rolled out to {long_video['num_frames']} frames "
        f"({LONG_VIDEO_FACTOR}x training, rolling cache)",
        "",
        format_table(rows, header=("frames", *judged, "drift")),
        "",
        "last segment / the first: " + ", ".join(f"{explained[key]} {long_video[key + '_ratio']:.3f}" for key in judged)
        + f". {WORLD_NOTES[long_video['world']]} Drift: change of colour, contrast and sharpness against the first "
        "segment.",
        "",
    ]


def _time_lines(settings: dict) -> list[str]:
    """How long the run took, and each stage (a reused stage: its time when it ran, not part of this run's)."""
    stages = settings.get("stages") or {}
    ran = [f"{name} {t['seconds']:.0f} s" for name, t in stages.items() if not t["reused"]]
    reused = [name for name, t in stages.items() if t["reused"]]
    cores = f" on {settings['cpu_count']} CPU cores" if settings.get("cpu_count") else ""
    return ["", f"Time: {settings['seconds_total'] / 60:.1f} min{cores}"
            + (f" ({', '.join(ran)}; the rest judging)" if ran else "")
            + (f"; reused from an earlier run: {', '.join(reused)}" if reused else "") + "."]
