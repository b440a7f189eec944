"""Errors meant for people, and the wrapper that turns them into one line and exit status 2."""
from __future__ import annotations

import argparse
import errno
import functools
import os
import shutil
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., object])

USER_ERROR_EXIT_CODE = 2
FAULT_EXIT_CODE = 1  # the machine failed the run (a full disk), not the user's input
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class UserError(Exception):
    """A problem with the user's input (config, checkpoint, data, image, command line).

    The message is one line that names what is wrong and what was expected.
    """


class DiskFull(Exception):
    """A write ran out of space (or quota); names where, and the space left there."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        super().__init__(f"no space left on the device writing {self.path} ({_free_space(self.path)} free there); "
                         "free some space and run the same command again (finished work is kept)")


def _free_space(path: str) -> str:
    probe = path
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    try:
        free = shutil.disk_usage(probe or ".").free
    except OSError:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024
    return "unknown"


def is_disk_full(error: BaseException) -> bool:
    """An out-of-space failure, raised directly or wrapped by a library (safetensors, DCP, lmdb, ffmpeg)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, DiskFull) or isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def run_main(main: F) -> F:
    """Decorate an entry point: a UserError prints `error: <message>` and exits with status 2, no traceback; a full
    disk prints one line naming the path and the space left and exits with status 1."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            _close_progress_bars()
            message = " ".join(str(err).split())  # always one line
            print(f"error: {message}", file=sys.stderr, flush=True)
            sys.exit(USER_ERROR_EXIT_CODE)
        except Exception as err:
            if not is_disk_full(err):
                raise
            _close_progress_bars()
            found = err if isinstance(err, DiskFull) else DiskFull(getattr(err, "filename", None) or os.getcwd())
            print(f"error: {found}", file=sys.stderr, flush=True)
            sys.exit(FAULT_EXIT_CODE)

    return wrapper  # type: ignore[return-value]


def _close_progress_bars() -> None:
    """End any progress bar left open by the failure, so the error starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is not None:
        for bar in list(getattr(tqdm.tqdm, "_instances", ())):
            bar.close()


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (through UserError, exit 2) instead of a usage block."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{message} (see {self.prog} --help)")
