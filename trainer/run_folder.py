"""What guards a run directory: one run at a time (a lock naming its holder), and the recipe a checkpoint
belongs to (compared before a resume, so another recipe never continues or overwrites a run silently).
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

from utils.config import Config
from utils.errors import UserError

LOCK_NAME = "run.lock"


class RunLock:
    """An exclusive flock on <logdir>/run.lock, held for the life of the run (the kernel drops it when the
    process dies, even by kill -9, so a crashed run never blocks the next one). The file names the holder.

    A logdir created only for this run, and found empty when the run gives up, is removed again: a run
    refused for bad input leaves nothing behind.
    """

    def __init__(self, logdir: str | os.PathLike) -> None:
        self.logdir = Path(logdir)
        self.path = self.logdir / LOCK_NAME
        self._handle = None
        self._created_logdir = False

    def acquire(self) -> "RunLock":
        self._created_logdir = not self.logdir.exists()
        self.logdir.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                handle.seek(0)
                holder = handle.read().strip() or "an unknown process"
                handle.close()
                if err.errno in (errno.EAGAIN, errno.EACCES):
                    self._remove_if_created()
                    raise UserError(f"--logdir {self.logdir} is in use by another run ({holder}): wait for it to "
                                    "finish or use another --logdir") from None
                raise
            # the file may have been removed by its previous holder between our open and our lock: retry then
            try:
                same = os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on host {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is None:
            return
        self.path.unlink(missing_ok=True)  # before unlocking: a waiter then sees a new file, never a stale one
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()
        self._handle = None
        self._remove_if_created()

    def _remove_if_created(self) -> None:
        if self._created_logdir:
            try:
                self.logdir.rmdir()  # only when empty
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# --------------------------------------------------------------------------------------------- identity
def recipe_identity(config: Config) -> dict[str, Any]:
    """The recipe fields a checkpoint's meaning and shapes depend on (JSON-ready).

    Learning rates, step counts, logging and the data may change between a run and its resume; the method,
    the architectures and what is trained may not.
    """
    from model.registry import objective_class
    from utils.geometry import resolve_recipe

    recipe = resolve_recipe(config, check_weights=False)
    score = objective_class(config).has_critic
    return {
        "train.trainer": config.train.trainer,
        "distill.distribution_loss": config.distill.distribution_loss if score else None,
        "generator": dict(recipe.generator.arch),
        "critic": dict(recipe.critic.arch) if score and recipe.critic is not None else None,
        "train.lora_rank": config.train.lora_rank,
        "train.lora_alpha": config.train.lora_alpha if config.train.lora_rank else None,
        "train.ema": config.train.ema_weight > 0,
    }


def first_difference(stored: dict[str, Any], current: dict[str, Any]) -> Optional[tuple[str, Any, Any]]:
    """(field, stored value, current value) of the first field that differs, descending into architectures."""
    for key in [*stored, *(k for k in current if k not in stored)]:  # the identity's own order: method first
        old, new = stored.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            inner = first_difference(old, new)
            if inner is not None:
                return (f"{key}.{inner[0]}", inner[1], inner[2])
        elif old != new:
            return key, old, new
    return None


def check_same_recipe(stored: dict[str, Any], current: dict[str, Any], where: str) -> None:
    from utils.config import ALIASES

    stored = {ALIASES.get(key, key): value for key, value in stored.items()}  # runs saved under older names
    difference = first_difference(stored, current)
    if difference is not None:
        field, old, new = difference
        raise UserError(f"{where} was trained with another recipe: {field} is {old} there and {new} here; resume "
                        "with the recipe it was trained with, or use another --logdir")
