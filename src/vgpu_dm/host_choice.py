"""Which host object a front end works on: the real host below a root directory, or a simulated one.

The front ends (``nvidia-vgpu-dm``, the Kubernetes agent, the DRA driver) choose; the host layer never
imports the simulator (design.md), so the one choice lives here, beside both. The simulator is
imported only when a simulated host is asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vgpu_dm.host.root import HostRoot


def open_host_or_sim(host_root: str = "/", sim: str | None = None) -> HostRoot:
    """The simulated host in ``sim`` when given, else the real host at ``host_root``; NotAHostRoot
    when the directory is not one."""
    if sim:
        from vgpu_dm.sim.host import SimHostRoot

        return SimHostRoot(sim)
    from vgpu_dm.host.root import open_host

    return open_host(host_root)
