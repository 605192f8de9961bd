"""The agent's host side of a MIG change (upstream nvidia-k8s-vgpu-dm, reference 8.4): the host GPU
clients file (``--gpu-clients-file``), whose units are stopped around a MIG change and always started
again. The change itself is part of the plan and apply's MIG stage (apply_mig.py).
"""

from __future__ import annotations

from vgpu_dm import log
from vgpu_dm.errors import HostError
from vgpu_dm.host.root import HostRoot
from vgpu_dm.mig import node

_log = log.get("k8s")


class GpuClientsError(ValueError):
    """The --gpu-clients-file is unreadable or not upstream's format."""


def load_gpu_clients(path: str) -> list[str]:
    """Upstream's GPU clients file: ``version: v1`` and ``systemd-services: [unit, ...]``; every name
    must be a plain systemd unit name (they are passed to ``systemctl`` on the host)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except OSError as exc:
        raise GpuClientsError(f"{path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise GpuClientsError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or "version" not in data:
        raise GpuClientsError(f"{path}: expected a mapping with 'version'")
    if data["version"] != "v1":
        raise GpuClientsError(f"{path}: version {data['version']!r}: expected 'v1'")
    unknown = sorted(set(data) - {"version", "systemd-services"})
    if unknown:
        raise GpuClientsError(f"{path}: unknown key(s) {', '.join(map(str, unknown))}")
    services = data.get("systemd-services") or []
    if not isinstance(services, list) or not all(isinstance(x, str) for x in services):
        raise GpuClientsError(f"{path}: 'systemd-services' must be a list of unit names")
    bad = [u for u in services if not node.valid_unit(u)]
    if bad:
        raise GpuClientsError(
            f"{path}: 'systemd-services': not systemd unit names: {', '.join(map(repr, bad))} "
            f"(expected e.g. nvidia-dcgm.service)"
        )
    return list(services)


def stop_clients(host: HostRoot, path: str | None, also: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Stop the running units of the GPU clients file, then those of ``also`` (the kubelet around a MIG
    mode change, as upstream appends it last); returns those stopped, in order."""
    units: list[str] = []
    if path:
        try:
            units = load_gpu_clients(path)
        except GpuClientsError as exc:
            raise HostError(str(exc)) from None
    units += [u for u in also if u not in units]
    return node.stop_clients(host, units)
