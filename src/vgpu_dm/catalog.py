"""The GPU catalog shipped with the package: models, device ids, vGPU types and their max counts.

Loaded lazily (it is only needed for names in ``list``, capacity fallbacks and the simulator).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cache

import yaml

from vgpu_dm.device_id import DeviceID


@dataclass(frozen=True)
class CatalogGPU:
    name: str
    prefix: str  # the <GPU> part of its vGPU type names
    device_ids: tuple[DeviceID, ...]
    arch: str
    framework: str  # mdev-pf | mdev-vf|vendor-vfio
    framebuffer_gb: int
    sriov_vfs: int | None
    vgpu_types: dict[str, int]  # type name → max instances per GPU
    # MIG GPU-instance profile name (``1g.5gb``) → max instances; empty when not MIG-capable or unknown.
    mig_gi_profiles: dict[str, int] = field(default_factory=dict)
    # What 'sim create --gpu' calls it: the prefix, unless another GPU shares that prefix (``DC``).
    sim_name: str = ""
    # Series (Q, C …) whose MIG-backed types need GPU instances with the +gfx attribute.
    mig_gfx_series: tuple[str, ...] = ()

    @property
    def min_vfs(self) -> int:
        return max(self.vgpu_types.values(), default=1)


@cache
def load() -> tuple[CatalogGPU, ...]:
    # Next to this module in the installed package (importlib.resources would cost more start-up time
    # than the read itself).
    with open(os.path.join(os.path.dirname(__file__), "data", "gpu-catalog.yaml"), encoding="utf-8") as fh:
        text = fh.read()
    try:
        loader = yaml.CSafeLoader
    except AttributeError:  # pragma: no cover
        loader = yaml.SafeLoader
    raw = yaml.load(text, Loader=loader)
    gpus = []
    for item in raw["gpus"]:
        ids = item["pci_device_id"]
        ids = [ids] if isinstance(ids, str) else ids
        vfs = item.get("sriov_vfs")
        gpus.append(
            CatalogGPU(
                name=item["name"],
                prefix=str(item["vgpu_type_prefix"]),
                device_ids=tuple(DeviceID.parse(i) for i in ids),
                arch=item["arch"],
                framework=item["framework"],
                framebuffer_gb=int(item["framebuffer_gb"]),
                sriov_vfs=vfs if isinstance(vfs, int) else None,
                vgpu_types={str(k): int(v) for k, v in item["vgpu_types"].items()},
                mig_gi_profiles={str(k): int(v) for k, v in (item.get("mig_gi_profiles") or {}).items()},
                sim_name=str(item.get("sim_name") or item["vgpu_type_prefix"]),
                mig_gfx_series=tuple(str(x) for x in item.get("mig_gfx_series") or ()),
            )
        )
    return tuple(gpus)


def for_device(gpu_id: DeviceID) -> CatalogGPU | None:
    """The catalog entry of a GPU; a subsystem-specific entry beats a generic one."""
    best = None
    for entry in load():
        for dev in entry.device_ids:
            if dev.matches(gpu_id):
                if dev.has_subsystem:
                    return entry
                best = best or entry
    return best


def max_instances(type_name: str, gpu_id: DeviceID | None = None) -> int | None:
    """Max instances of a vGPU type per GPU, if the catalog knows the type.

    The GPU's own model decides (``DC-16Q`` is 6 on an RTX PRO 6000 but 2 on an RTX PRO 4500, which
    share the ``DC-`` prefix); a look-up by name across models is only the fallback for unknown GPUs.
    """
    if gpu_id is not None:
        model = for_device(gpu_id)
        if model is not None:
            return model.vgpu_types.get(type_name)
    for entry in load():
        if type_name in entry.vgpu_types:
            return entry.vgpu_types[type_name]
    return None


def find(name: str) -> CatalogGPU:
    """A catalog GPU by its simulator name (``T4``, ``A100D``, ``RTXPRO6000``), its type prefix when
    only one GPU has it, or its product name; case-insensitive. KeyError says what went wrong."""
    wanted = name.strip().lower()
    entries = load()
    for entry in entries:
        if entry.sim_name.lower() == wanted:
            return entry
    sharing = [e for e in entries if e.prefix.lower() == wanted]
    if len(sharing) == 1:
        return sharing[0]
    if sharing:
        which = ", ".join(f"{e.sim_name} ({e.name})" for e in sharing)
        raise KeyError(f"GPU name {name!r} is the type prefix of {len(sharing)} GPUs; pick one: {which}")
    matches = [e for e in entries if wanted in e.name.lower()]
    exact = [e for e in matches if e.name.lower() == wanted or e.name.lower().endswith(" " + wanted)]
    if len(exact) == 1:
        return exact[0]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise KeyError(f"GPU name {name!r} is ambiguous: {', '.join(e.name for e in matches)}")
    from vgpu_dm.text import did_you_mean

    hint = did_you_mean(name, [e.sim_name for e in entries])
    raise KeyError(f"unknown GPU {name!r}{hint} ('nvidia-vgpu-dm sim gpus' lists the names)")
