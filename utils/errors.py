"""Errors meant for people, and the wrapper that turns them into one line and exit status 2."""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., object])

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """A problem with the user's input (config, checkpoint, data, image, command line).

    The message is one line that names what is wrong and what was expected.
    """


def run_main(main: F) -> F:
    """Decorate an entry point: a UserError prints `error: <message>` and exits with status 2, no traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            message = " ".join(str(err).split())  # always one line
            print(f"error: {message}", file=sys.stderr, flush=True)
            sys.exit(USER_ERROR_EXIT_CODE)

    return wrapper  # type: ignore[return-value]


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (through UserError, exit 2) instead of a usage block."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{message} (see {self.prog} --help)")
