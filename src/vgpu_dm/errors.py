"""Typed errors raised below the front ends; the CLI maps them to log lines and exit codes."""

from __future__ import annotations

from typing import NamedTuple


class VgpuDmError(Exception):
    """Base of every error this project raises on purpose."""


# NamedTuple rather than a frozen dataclass: far cheaper to define at import (README, Performance).
class Problem(NamedTuple):
    """One located problem in a config file."""

    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(VgpuDmError):
    """The config file (or the selection made from it) is invalid; carries every problem found."""

    def __init__(self, problems: list[Problem] | str):
        if isinstance(problems, str):
            self.problems: list[Problem] = []
            text = problems
        else:
            self.problems = list(problems)
            text = "\n".join(str(p) for p in self.problems)
        super().__init__(text)


class HostError(VgpuDmError):
    """Reading or changing the host failed, or the host is not in a state we can work with."""


# What holds a vGPU that a plan would remove (HeldProblem.kind).
IN_USE = "in-use"  # a process (a running VM) has it open
ASSIGNED = "assigned"  # a defined libvirt VM names it


class HeldProblem(str):
    """A plan problem about a vGPU that a VM holds or is assigned. As a ``str`` it is the whole text the
    CLI prints; ``what`` is the fact without ``advice`` (what a CLI user can do: its flags), so another
    front end can give its own advice; ``kind`` is IN_USE or ASSIGNED."""

    what: str
    advice: str
    kind: str

    def __new__(cls, what: str, advice: str, kind: str) -> HeldProblem:
        self = super().__new__(cls, f"{what}: {advice}")
        self.what, self.advice, self.kind = what, advice, kind
        return self

    def __reduce__(self):
        return (HeldProblem, (self.what, self.advice, self.kind))


class PlanError(VgpuDmError):
    """The selected config cannot be applied to this host; nothing was written."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class ApplyError(VgpuDmError):
    """A write failed while applying a plan."""

    # Lines of the message that were already logged as they happened (--keep-going reports a failed
    # GPU in its place among the others); a front end need not print them again.
    logged: tuple[str, ...] = ()


class ApplyInterrupted(ApplyError):
    """A stop was requested (SIGINT/SIGTERM, or the agent's stop event) while applying; the writes of
    this run were rolled back and the message says what state every GPU is in."""
