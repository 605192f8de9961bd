"""The agent's MIG step (upstream nvidia-k8s-vgpu-dm, reference 8.4), around the in-process apply:
only when the config's MIG state differs from the host's, and only when ``libnvidia-ml.so.1`` is under
the driver root (a config with MIG-backed types fails clearly without it); the selected config is
persisted for the host's nvidia-mig-manager; the host GPU clients are stopped if asked and always
started again; a mode change waiting for a reset reboots the node only with ``--with-reboot``, and
never twice for the same change (the ``rebooting`` state label is the memory across the reboot).
"""

from __future__ import annotations

from dataclasses import dataclass

from vgpu_dm import log
from vgpu_dm.errors import HostError
from vgpu_dm.host.inventory import HostTools, Inventory
from vgpu_dm.host.root import HostRoot
from vgpu_dm.mig import node
from vgpu_dm.spec.model import ConfigEntry

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


@dataclass
class MigChange:
    """The GPUs whose MIG state the config changes (read-only, found before anything is touched)."""

    gpus: list[int]
    wants_mig: bool  # the config has MIG-backed types


def mig_change(
    entries: tuple[ConfigEntry, ...], name: str, inventory: Inventory, source: str
) -> MigChange | None:
    """None when the MIG state already matches (or MIG is not involved); else the GPUs to change.
    Raises PlanError when the change cannot work (the same checks the apply's MIG step makes)."""
    from vgpu_dm.mig.step import _precheck, changing_gpus

    found = changing_gpus(entries, name, inventory, source)
    if found is None:
        return None
    _parted, _per_gpu, changing = found
    _precheck(entries, inventory, source, False, changing)
    return MigChange(changing, any(e.is_mig_backed for e in entries))


def mode_pending(entries, name: str, host: HostRoot, tools: HostTools, source: str) -> list[str]:
    """GPUs (described) whose MIG mode is not what the config needs (``assert --mode-only``)."""
    from vgpu_dm.mig.parted import MigParted
    from vgpu_dm.mig.step import _one
    from vgpu_dm.mig.translate import entry_config
    from vgpu_dm.plan import governing_entries

    inventory = Inventory(host, tools)
    parted = MigParted(host, tools.mig_parted)
    chosen = governing_entries(entries, inventory.gpus)
    return [
        gpu.describe()
        for gpu in inventory.gpus
        if gpu.index in chosen
        and not parted.holds(
            _one(name, [entry_config(chosen[gpu.index], devices=[gpu.index])]), "--mode-only"
        )
    ]


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
