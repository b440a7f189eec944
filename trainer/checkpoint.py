"""Training checkpoints (torch.distributed.checkpoint) and the inference export in <logdir>/latest/.

Layout under <logdir>/checkpoints/:
    step_000123.tmp/   written by every rank (DCP shards + rng_dp{d}.pt), then checkpoint.json by rank 0
                       (the recipe's identity and every file's size), then renamed by rank 0 to
    step_000123/       only once complete; then
    latest.txt         rewritten atomically to name it. A crash at any moment leaves the previous latest whole.
A resume takes the step latest.txt names; when that folder is missing or damaged (a file gone or of another
size than checkpoint.json says, or unloadable), it falls back to the newest earlier complete one with a
warning. Pruning keeps the keep_last newest steps up to the one latest.txt names and never deletes that one.
The export <logdir>/latest/ holds generator.safetensors (+ generator_ema.safetensors once EMA has started)
with official Wan key names, config.json (architecture, for WanModel.from_pretrained) and config.yaml.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from trainer.parallel import clean_name
from utils.dist import barrier
from utils.errors import DiskFull, UserError, is_disk_full
from utils.io import atomic_save_safetensors, atomic_write_json, atomic_write_text

# Test-only: the process exits (as if killed) in the middle of saving this step, after the shards are
# written and before the rename; used by tests/test_train_resume.py to prove a crash keeps latest intact.
EXIT_DURING_SAVE_ENV = "SF_TEST_EXIT_DURING_SAVE"
MANIFEST_NAME = "checkpoint.json"
STEP_FOLDER = re.compile(r"step_(\d+)")


class ModelAndOptimizer(Stateful):
    """One trainable model and its optimizer, as FQN-keyed (possibly sharded) state for DCP."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optim_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def rng_state() -> dict[str, Any]:
    """This rank's random states (torch, CUDA, python; numpy only when it is loaded)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    np = __import__("sys").modules.get("numpy")
    if np is not None:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss)
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every save/load in a single process (no process group); that case is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


CHECKPOINT_FOLDER = "checkpoints"  # <logdir>/checkpoints/step_NNNNNN/
EXPORT_FOLDER = "latest"  # <logdir>/latest/: the inference export


def check_run_folders(logdir: str | Path) -> None:
    """The run's own folders inside --logdir must be folders (or absent): a file in their place would fail the first
    save, after training; refused in one line before anything is built."""
    from utils.errors import UserError

    for name in (CHECKPOINT_FOLDER, EXPORT_FOLDER):
        path = Path(logdir) / name
        if path.exists() and not path.is_dir():
            raise UserError(f"--logdir {logdir} holds a file named {name}, where the run keeps its {name} folder: "
                            "move it, or use another --logdir")


class CheckpointManager:
    """Random states are stored per data-parallel rank (rng_dp{d}.pt, by the first rank of each sequence group, whose
    ranks draw alike), so a run resumed with another sp_size gives each data shard the states it had."""

    def __init__(self, logdir: str | Path, keep_last: int, rank: int, data_rank: Optional[int] = None,
                 writes_rng: bool = True) -> None:
        self.root = Path(logdir) / CHECKPOINT_FOLDER
        self.keep_last = keep_last
        self.rank = rank
        self.data_rank = rank if data_rank is None else data_rank
        self.writes_rng = writes_rng

    def _dir(self, step: int) -> Path:
        return self.root / f"step_{step:06d}"

    def steps(self) -> list[int]:
        """Steps of the finished (renamed) checkpoint folders, ascending."""
        if not self.root.is_dir():
            return []
        found = (STEP_FOLDER.fullmatch(p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def problem(self, step: int) -> Optional[str]:
        """Why step `step` cannot be resumed, or None when its folder is complete."""
        folder = self._dir(step)
        if not folder.is_dir():
            return f"{folder.name} does not exist"
        manifest = folder / MANIFEST_NAME
        if not manifest.exists():  # written before manifests existed: complete if DCP's metadata is there
            return None if (folder / ".metadata").exists() else f"{folder.name} has no {MANIFEST_NAME}"
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError, TypeError):
            return f"{folder.name}/{MANIFEST_NAME} is unreadable"
        for name, size in files.items():
            path = folder / name
            if not path.is_file():
                return f"{folder.name}/{name} is missing"
            if path.stat().st_size != size:
                return f"{folder.name}/{name} has {path.stat().st_size} bytes, {size} were written"
        return None

    def recipe_of(self, step: int) -> Optional[dict[str, Any]]:
        """The recipe identity stored with step `step` (None for checkpoints written before it was stored)."""
        manifest = self._dir(step) / MANIFEST_NAME
        return json.loads(manifest.read_text()).get("recipe") if manifest.exists() else None

    def resume_candidates(self) -> tuple[list[int], Optional[str]]:
        """Steps to try for a resume, best first, and a warning when latest.txt could not be followed.

        Empty for a fresh run. latest.txt's step when complete; else the complete steps before it (any complete
        step when latest.txt is junk or missing while step folders exist). None complete: one-line error.
        """
        pointer = self.root / "latest.txt"
        steps = self.steps()
        if not pointer.exists() and not steps:
            return [], None
        name = pointer.read_text(errors="replace").strip() if pointer.exists() else ""
        match = STEP_FOLDER.fullmatch(name)
        named = int(match.group(1)) if match else None
        if named is not None and self.problem(named) is None:
            return [named] + [s for s in reversed(steps) if s < named and self.problem(s) is None], None
        if not pointer.exists():
            reason = f"{self.root} has no latest.txt"
        elif named is None:
            reason = f"{pointer} holds '{name[:40]}', not a step folder name"
        else:
            reason = f"{pointer} names {name}, but {self.problem(named)}"
        earlier = [s for s in reversed(steps) if (named is None or s < named) and self.problem(s) is None]
        if not earlier:
            raise UserError(f"{reason}, and no earlier complete checkpoint exists: restore it, or remove {self.root} "
                            "to train from the start")
        return earlier, f"{reason}; resuming from the previous complete checkpoint {self._dir(earlier[0]).name}"

    def save(self, step: int, state: dict[str, Any], recipe: Optional[dict[str, Any]] = None) -> None:
        """Collective: every rank writes its shards and its RNG; rank 0 writes the manifest and publishes the folder."""
        tmp = self.root / f"step_{step:06d}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        try:
            with _single_process_quiet():
                dcp.save(state, checkpoint_id=str(tmp))
            if self.writes_rng:
                torch.save(rng_state(), tmp / f"rng_dp{self.data_rank}.pt")
            barrier()
            if self.rank == 0:
                files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
                atomic_write_json(tmp / MANIFEST_NAME, {"step": step, "recipe": recipe, "files": files})
        except Exception as err:  # the half-written folder goes; latest.txt still names the last complete one
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            if is_disk_full(err) and not isinstance(err, DiskFull):
                raise DiskFull(tmp) from err
            raise
        if os.environ.get(EXIT_DURING_SAVE_ENV) == str(step):
            os._exit(17)
        if self.rank == 0:
            final = self._dir(step)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            atomic_write_text(self.root / "latest.txt", final.name + "\n")
            self._prune(step)
        barrier()

    def _prune(self, latest: int) -> None:
        """Keep the keep_last newest steps up to `latest` (which latest.txt names); later ones are stale leftovers."""
        steps = self.steps()
        kept = [s for s in steps if s <= latest][-self.keep_last:]
        for step in steps:
            if step not in kept and step != latest:
                shutil.rmtree(self._dir(step), ignore_errors=True)

    def remove_partial(self) -> None:
        """Rank 0 drops folders a crash left half-written (never named by latest.txt)."""
        if self.rank == 0:
            for partial in self.root.glob("step_*.tmp"):
                shutil.rmtree(partial, ignore_errors=True)
        barrier()

    def load(self, step: int, state: dict[str, Any]) -> None:
        """Collective: restore `state` in place from step `step`, and this rank's RNG."""
        folder = self._dir(step)
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(folder))
        for rng_file in (folder / f"rng_dp{self.data_rank}.pt", folder / f"rng_rank{self.rank}.pt"):  # then: older runs
            if rng_file.exists():
                set_rng_state(torch.load(rng_file, weights_only=True))
                break


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every rank takes part (collective); rank 0 receives the unsharded weights on the CPU.

    Copies: unsharded CPU models hand back their live parameters, which the EMA swap would then overwrite.
    """
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {clean_name(key): value.detach().clone() for key, value in state.items()}


def write_export(folder: Path, weights: dict[str, dict[str, torch.Tensor]], config_json: dict, config_yaml: str) -> None:
    """Rank 0: <folder>/{name}.safetensors for each entry, config.json and config.yaml, swapped in as a whole.

    Everything is written into <folder>.tmp first, so generator and EMA weights of different steps never
    stand side by side; a crash leaves the previous export (or, between the two renames, <folder>.old).
    """
    folder = Path(folder)
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name, tensors in weights.items():
            atomic_save_safetensors(tmp / f"{name}.safetensors", tensors, metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", config_json)
        atomic_write_text(tmp / "config.yaml", config_yaml)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the previous export stays as it was
        raise
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
