"""Writing a command's result to standard output, so that a failing stdout (a full disk, a closed
pipe) is told apart from a failing host.
"""

from __future__ import annotations

import os
import sys

import click


class StdoutError(OSError):
    """Writing to standard output failed (the host was not involved)."""


def emit(text: str) -> None:
    """Print one result block; a failure to write becomes StdoutError."""
    try:
        click.echo(text)
    except OSError as exc:
        # Point stdout at /dev/null so Python's flush at exit does not fail a second time.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass
        raise StdoutError(exc.errno, exc.strerror or str(exc)) from None
