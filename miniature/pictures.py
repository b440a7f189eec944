"""Pictures for the quickstart report: training curves from metrics.jsonl, and a strip of frames per model."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path, title: str = "") -> Path:
    """The figure, titled, laid out and written to `path` (PNG), then closed."""
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def read_metrics(logdir: Path) -> list[dict]:
    path = Path(logdir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


EVAL_KEYS = ("eval/adherence", "eval/seam_ratio", "eval/seam_ratio_pixels", "eval/flicker", "eval/drift")


def training_curves(path: Path, runs: dict[str, Path]) -> Path:
    """One panel per run: every top-level logged loss (generator_loss, critic_loss), against the step; a second
    row with the evaluation during training (adherence, seam ratio, flicker, drift) when a run logged it."""
    plt = _matplotlib()
    evaluated = {name: [r for r in read_metrics(logdir) if any(k in r for k in EVAL_KEYS)] for name, logdir in runs.items()}
    rows = 2 if any(evaluated.values()) else 1
    fig, axes = plt.subplots(rows, len(runs), figsize=(5 * len(runs), 3.5 * rows), squeeze=False)
    for axis, (name, records) in zip(axes[-1] if rows == 2 else [], evaluated.items()):
        for key in EVAL_KEYS:
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                axis.plot(*zip(*points), marker=".", label=key.removeprefix("eval/"))
        axis.set_title(f"{name}: evaluation during training")
        axis.set_xlabel("step")
        if records:
            axis.legend(fontsize=7)
        else:
            axis.text(0.5, 0.5, "not evaluated during training", ha="center", va="center", transform=axis.transAxes)
            axis.set_xticks([])
            axis.set_yticks([])
    for axis, (name, logdir) in zip(axes[0], runs.items()):
        rows = read_metrics(logdir)
        keys = sorted({k for row in rows for k, v in row.items()
                       if k.endswith("_loss") and "/" not in k and isinstance(v, (int, float))})
        for key in keys:
            points = [(row["step"], row[key]) for row in rows if key in row and "step" in row]
            if points:
                axis.plot(*zip(*points), label=key)
        axis.set_title(name)
        axis.set_xlabel("step")
        axis.set_yscale("log")
        if keys:
            axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def frame_strips(path: Path, videos: dict[str, torch.Tensor], num_frames: int = 9, title: str = "") -> Path:
    """A row of evenly spaced frames for each model's video ([T, 3, H, W] in [-1, 1])."""
    plt = _matplotlib()
    fig, axes = plt.subplots(len(videos), num_frames, figsize=(num_frames * 1.1, len(videos) * 1.3), squeeze=False)
    for row, (name, video) in enumerate(videos.items()):
        index = torch.linspace(0, video.shape[0] - 1, num_frames).round().long()
        for col, frame in enumerate(video[index]):
            axis = axes[row][col]
            axis.imshow(((frame.permute(1, 2, 0).clamp(-1, 1) + 1) / 2).numpy(), interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if col == 0:
                axis.set_ylabel(name, fontsize=8)
    return _save(plt, fig, path, title)


def segment_adherence(path: Path, summaries: dict[str, dict], fps: float, title: str = "") -> Path:
    """Long videos over time: each model's per-segment adherence and appearance (miniature.report.long_video_summary),
    those its world judges, against the segment's start in seconds, the first segment's level dashed."""
    plt = _matplotlib()
    judged = [key for key in ("adherence", "appearance") if all(key in s["judged"] for s in summaries.values())]
    fig, axes = plt.subplots(1, len(judged), figsize=(5 * len(judged), 3.5), squeeze=False)
    for axis, key in zip(axes[0], judged):
        for name, summary in summaries.items():
            segments = summary["segments"]
            seconds = [segment["start"] / fps for segment in segments]
            line, = axis.plot(seconds, [segment[key] for segment in segments], marker="o", label=name)
            axis.axhline(segments[0][key], color=line.get_color(), linestyle="--", linewidth=0.8)
        axis.set_title(f"{key} per {next(iter(summaries.values()))['segment_frames']}-frame segment", fontsize=9)
        axis.set_xlabel("segment start (s)")
        axis.set_ylim(0, 1.05)
        axis.legend(fontsize=7)
    return _save(plt, fig, path, title)


def seams_against_adherence(path: Path, points: dict[str, dict[int, tuple[float, float]]], seam_max: float,
                            adherence_min: float, title: str = "") -> Path:
    """Runs as points (seam ratio, adherence), both over the teacher's: one colour per group, each point labelled
    with its seed; the corner where both goals hold shaded, the goals as dashed lines."""
    plt = _matplotlib()
    fig, axis = plt.subplots(figsize=(6, 4.5))
    seams = [x for group in points.values() for x, _ in group.values()]
    adherences = [y for group in points.values() for _, y in group.values()]
    low, top = min(0.9, min(seams) - 0.05), max(1.05, max(adherences) + 0.05)
    axis.fill_between([low, seam_max], adherence_min, top, color="#e8f5e9", zorder=0)  # where both goals hold
    for label, group in points.items():
        axis.scatter(*zip(*group.values()), label=label, s=40, zorder=2)
        for seed, (x, y) in group.items():
            axis.annotate(str(seed), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axis.axhline(adherence_min, color="grey", linestyle="--", linewidth=0.8)
    axis.axvline(seam_max, color="grey", linestyle="--", linewidth=0.8)
    axis.set_xlim(low, max(seams) + 0.1)
    axis.set_ylim(min(adherence_min, min(adherences)) - 0.05, top)
    axis.set_xlabel("seam ratio / the teacher's (lower is better)")
    axis.set_ylabel("adherence / the teacher's")
    axis.legend(fontsize=7)
    return _save(plt, fig, path, title)
