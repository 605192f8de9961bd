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


# -- -o / --json / --no-headers ----------------------------------------------------------------------
# kubectl's conventions: -o json|yaml for machines (the same data: an object whose "gpus" list has one
# object per GPU; null where a field does not apply), -o wide for a table with more columns,
# --no-headers for a table without its header line. --json is kept as an alias of -o json.


def output_options(formats: tuple[str, ...] = ("json", "yaml", "wide"), headers: bool = True):
    """Decorator adding -o/--output, --json and (for tables) --no-headers to a command."""

    def decorate(func):
        if headers:
            func = click.option(
                "--no-headers",
                is_flag=True,
                help="Table output without its header line (for scripts).",
            )(func)
        func = click.option("--json", "as_json", is_flag=True, help="Same as -o json.")(func)
        return click.option(
            "-o",
            "--output",
            type=click.Choice(formats),
            help=f"Output format: {', '.join(formats)} (default: text for people).",
        )(func)

    return decorate


def output_format(output: str | None, as_json: bool, no_headers: bool = False) -> str:
    """The one format asked for: "text", "wide", "json" or "yaml"; UsageError for a contradiction."""
    if as_json and output not in (None, "json"):
        raise click.UsageError(f"--json and -o {output} both given: choose one output format")
    chosen = "json" if as_json else output or "text"
    if no_headers and chosen in ("json", "yaml"):
        raise click.UsageError(f"--no-headers goes with the table output, not -o {chosen}")
    return chosen


def dump(data, fmt: str) -> str:
    """``data`` as JSON (2-space indent) or YAML (keys in their order)."""
    if fmt == "yaml":
        import yaml

        dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
        return yaml.dump(data, Dumper=dumper, sort_keys=False, allow_unicode=True).rstrip("\n")
    import json

    return json.dumps(data, indent=2)


def table(header: tuple[str, ...], rows: list[tuple[str, ...]], headers: bool = True) -> str:
    """Columns padded to their widest cell, two spaces apart, trailing blanks stripped."""
    from vgpu_dm.log import printable

    rows = [tuple(printable(c) for c in r) for r in rows]
    shown = [header, *rows] if headers else rows
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in shown)


def cell(value) -> str:
    """A table cell: "-" for None (not applicable or unknown)."""
    return "-" if value is None else str(value)
