"""Is this process in a container? Then the default host root ``/`` is the container, not the host.

The usual deployment (GPU Operator, our DaemonSet) mounts the host's ``/`` at ``/host`` and its
``/sys`` at ``/sys``, often without ``hostPID``. With host root ``/`` the tool would read the
container's ``/proc`` (it always sees at least itself, so no VM would ever be found), and keep its
lock, journal and learned tables where a restart loses them. The host's ``/proc`` mounted at
``/host/proc`` does list the host's processes even without ``hostPID`` (procfs shows the PID namespace
that mounted it), and reading their fd links needs CAP_SYS_PTRACE.

Signs looked for, in this order: ``/.dockerenv`` (Docker), ``/run/.containerenv`` (Podman/CRI-O),
a container runtime in PID 1's cgroup path, and PID 1 not being PID 1 of the host (``/proc/1/sched``
names the task's PID in the host's namespace on kernels that print it).
"""

from __future__ import annotations

import os
import re

_RUNTIMES = ("docker", "kubepods", "containerd", "libpod", "crio", "lxc", "garden")
_SCHED_PID = r"\S.*\((\d+), #threads"


def container_reason(self_root: str = "/") -> str | None:
    """Why this process looks containerised (a short phrase), or None. ``self_root`` is for tests."""

    def path(rel: str) -> str:
        return os.path.join(self_root, rel)

    if os.path.exists(path(".dockerenv")):
        return "/.dockerenv exists"
    if os.path.exists(path("run/.containerenv")):
        return "/run/.containerenv exists"
    try:
        with open(path("proc/1/cgroup"), encoding="utf-8", errors="replace") as fh:
            cgroup = fh.read()
    except OSError:
        cgroup = ""
    for line in cgroup.splitlines():
        where = line.rsplit(":", 1)[-1]
        runtime = next((r for r in _RUNTIMES if r in where), None)
        if runtime:
            return f"PID 1's cgroup is {where} ({runtime})"
    try:
        with open(path("proc/1/sched"), encoding="utf-8", errors="replace") as fh:
            first = fh.readline()
    except OSError:
        first = ""
    m = re.match(_SCHED_PID, first)
    if m and m[1] != "1":
        return f"PID 1 is PID {m[1]} on the host (a separate PID namespace)"
    return None
