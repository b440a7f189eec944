"""One logging interface: console lines and <logdir>/metrics.jsonl always, wandb when asked, a tqdm bar.

Only rank 0 writes. The wandb key is read by wandb itself from WANDB_API_KEY; it is never taken from the
config, never logged. At the end, training_curves.png plots the logged losses.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from tqdm import tqdm

from utils.config import Config, to_yaml
from utils.errors import DiskFull, UserError, is_disk_full
from utils.io import atomic_write

CURVE_KEYS = ("generator_loss", "critic_loss", "eval/seam_ratio", "eval/seam_ratio_pixels", "eval/flicker", "eval/drift",
              "eval/adherence")


class TrainLogger:
    def __init__(self, logdir: Path, *, is_main: bool, config: Config, use_wandb: bool, start_step: int, max_steps: int) -> None:
        self.is_main = is_main
        self.logdir = logdir
        self.metrics_path = logdir / "metrics.jsonl"
        self._wandb = None
        self._bar = None
        if not is_main:
            return
        if use_wandb:
            self._wandb = _start_wandb(config, logdir)
        self._bar = tqdm(total=max_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """One record: appended to metrics.jsonl, printed, sent to wandb."""
        if not self.is_main:
            return
        record = {"step": step, **metrics}
        try:
            with open(self.metrics_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as err:
            if is_disk_full(err):
                raise DiskFull(self.metrics_path) from err
            raise
        shown = " ".join(f"{k}={_short(v)}" for k, v in metrics.items())
        tqdm.write(f"step {step}: {shown}")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def message(self, text: str) -> None:
        if self.is_main:
            tqdm.write(text)

    def advance(self, step: int, postfix: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=True)

    def close(self) -> None:
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()
        plot_curves(self.metrics_path, self.logdir / "training_curves.png")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _start_wandb(config: Config, logdir: Path):
    try:
        import wandb
    except ImportError:
        raise UserError("logging.wandb is true but wandb is not installed: pip install wandb, or pass --disable-wandb") from None
    if config.logging.wandb_mode == "online" and not os.environ.get("WANDB_API_KEY"):
        raise UserError("logging.wandb is true in online mode but WANDB_API_KEY is not set: export it, or pass --disable-wandb")
    return wandb.init(
        project=config.logging.wandb_project,
        entity=config.logging.wandb_entity,
        mode=config.logging.wandb_mode,
        dir=str(logdir),
        config={"recipe": to_yaml(config)},
        resume="allow",
    )


def repair_metrics(path: Path, resumed_step: int) -> int:
    """Keep the records of steps up to the resumed one: a half-written last line (a kill mid-write) and the
    records logged after the checkpoint (they will be logged again) are dropped. Returns how many were dropped."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += int(bool(line.strip()))
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= resumed_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        from utils.io import atomic_write_text

        atomic_write_text(path, "".join(line + "\n" for line in kept))
    return dropped


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_curves(metrics_path: Path, out_path: Path, curve_keys: tuple[str, ...] = CURVE_KEYS) -> None:
    """Each logged loss (and evaluation metric) against the step (finite values only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    keys = [k for k in curve_keys if any(k in r for r in records)]
    if not keys:
        return
    figure, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for axis, key in zip(axes[0], keys):
        points = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker=".")
        axis.set_title(key)
        axis.set_xlabel("step")
    figure.tight_layout()
    atomic_write(out_path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)
