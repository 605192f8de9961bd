"""MIG in the simulated driver: MIG mode (current and pending), GPU instances with real placements, and
which GPU instance hosts each MIG-backed vGPU.

Facts modelled (host-interfaces.md): MIG-backed types are creatable only in MIG mode and only while an
instance of their profile has room (2.4, 3.6); time-sliced types are not creatable in MIG mode; an
instance hosts vGPUs of one framebuffer size, several of them when they fit (3.6); placements follow
``nvidia-smi mig -lgipp`` of an H200 (section 11): a profile of G compute slices and M memory slices
(of 8) starts at multiples of M, within the 8 memory and the 7 compute slices; 4-slice GPUs (A30) have
4 of each. Whether a mode change waits for a GPU reset, and whether MIG mode may be switched off while
SR-IOV VFs are enabled on mdev hosts, are host options of the simulator (see ``SimOptions``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vgpu_dm.sim.layout import SimGPU, SimType

# Attribute of a vGPU type name → suffix of the instance profile it needs (host-interfaces.md 5.3).
_SUFFIX = {"": "", "ME": "+me", "NOME": "-me", "MEALL": "+me.all", "GFX": "+gfx"}
_PROFILE = re.compile(r"(\d+)g\.(\d+)gb((?:[+-][a-z.]+)*)")
_MIG_TYPE = re.compile(r".*-(\d)-(\d+)[ABCQ](MEALL|NOME|ME|GFX)?")


class MigError(Exception):
    """A MIG operation the driver refuses; ``str`` is what nvidia-smi/NVML would say."""


@dataclass(frozen=True)
class Shape:
    name: str
    slices: int  # compute slices
    memory_gb: int
    suffix: str
    size: int  # memory slices
    starts: tuple[int, ...]


def shapes(gpu: SimGPU) -> dict[str, Shape]:
    """The GPU's instance profiles with their placements."""
    parsed = {}
    for name in gpu.mig_profiles:
        m = _PROFILE.fullmatch(name)
        if m:
            parsed[name] = (int(m[1]), int(m[2]), m[3])
    if not parsed:
        return {}
    compute = max(g for g, _, _ in parsed.values())  # 7 on A100/H100/H200, 4 on A30
    memory_slices = 8 if compute == 7 else compute
    full_gb = max(gb for _, gb, _ in parsed.values())
    out = {}
    for name, (g, gb, suffix) in parsed.items():
        size = max(1, round(gb * memory_slices / full_gb))
        starts = tuple(
            s for s in range(0, memory_slices, size) if s + size <= memory_slices and s + g <= compute
        )
        out[name] = Shape(name, g, gb, suffix, size, starts)
    return out


def profile_of(gpu: SimGPU, vtype: SimType) -> tuple[str, int] | None:
    """(instance profile, vGPUs per instance) of a MIG-backed type: the smallest profile with its
    slice count and attribute whose memory holds the vGPU."""
    m = _MIG_TYPE.fullmatch(vtype.name)
    if not m:
        return None
    g, gb, suffix = int(m[1]), int(m[2]), _SUFFIX[m[3] or ""]
    fits = []
    for shape in shapes(gpu).values():
        if shape.slices != g or shape.memory_gb < gb or not gb:
            continue
        if shape.suffix == suffix:
            fits.append((shape.memory_gb, shape.name))
        elif not shape.suffix and f"{shape.name}{suffix}" not in gpu.mig_profiles:
            fits.append((shape.memory_gb, shape.name + suffix))
    if not fits:
        return None
    memory, name = min(fits)
    return name, memory // gb


def base_profile(profile: str) -> str:
    m = _PROFILE.fullmatch(profile)
    return f"{m[1]}g.{m[2]}gb" if m else profile


def _occupied(gpu: SimGPU, table: dict[str, Shape]) -> tuple[set[int], set[int]]:
    memory, compute = set(), set()
    for gi in gpu.gpu_instances:
        shape = table.get(gi["profile"]) or table.get(base_profile(gi["profile"]))
        memory.update(range(gi["start"], gi["start"] + shape.size))
        compute.update(range(gi["start"], gi["start"] + shape.slices))
    return memory, compute


def create_instance(gpu: SimGPU, profile: str, at: int | None = None) -> dict:
    """``nvidia-smi mig -cgi <profile>[:<start>] -C``: the first free placement (or ``at``), or MigError."""
    if not gpu.mig_mode:
        raise MigError("MIG mode is not enabled")
    table = shapes(gpu)
    shape = table.get(profile)
    if shape is None and profile.endswith("+gfx") and base_profile(profile) in table:
        shape = table[base_profile(profile)]  # the graphics attribute does not change the size
    if shape is None:
        raise MigError(f"Unknown GPU instance profile {profile!r}")
    limit = gpu.mig_profiles.get(profile, gpu.mig_profiles.get(base_profile(profile), 0))
    if sum(1 for gi in gpu.gpu_instances if gi["profile"] == profile) >= limit:
        raise MigError(f"Insufficient Resources: at most {limit} x {profile}")
    memory, compute = _occupied(gpu, table)
    for start in shape.starts if at is None else [s for s in shape.starts if s == at]:
        if memory.isdisjoint(range(start, start + shape.size)) and compute.isdisjoint(
            range(start, start + shape.slices)
        ):
            gi = {
                "id": max([0, *(g["id"] for g in gpu.gpu_instances)]) + 1,
                "profile": profile,
                "start": start,
            }
            gpu.gpu_instances.append(gi)
            return gi
    raise MigError(f"Insufficient Resources: no free placement for {profile}")


def create_instances(gpu: SimGPU, profiles: list[str]) -> None:
    """Create all of ``profiles``, trying creation orders until one fits (nvidia-mig-parted searches
    for a working order rather than giving up on the first); MigError if none does."""
    start = list(gpu.gpu_instances)
    table = shapes(gpu)

    def size(profile: str) -> int:
        shape = table.get(profile) or table.get(base_profile(profile))
        return shape.size if shape else 0

    def place_all(todo: list[str]) -> bool:
        if not todo:
            return True
        profile, rest = todo[0], todo[1:]
        shape = table.get(profile) or table.get(base_profile(profile))
        if shape is None:
            raise MigError(f"Unknown GPU instance profile {profile!r}")
        tried = set()
        for begin in shape.starts:
            before = list(gpu.gpu_instances)
            try:
                gi = create_instance(gpu, profile, at=begin)
            except MigError:
                continue
            if gi["start"] in tried:
                gpu.gpu_instances = before
                continue
            tried.add(gi["start"])
            if place_all(rest):
                return True
            gpu.gpu_instances = before
        return False

    if not place_all(sorted(profiles, key=lambda p: -size(p))):
        gpu.gpu_instances = start
        raise MigError(f"Insufficient Resources: {', '.join(profiles)} do not fit together")


def destroy_instances(gpu: SimGPU) -> None:
    """Destroy every GPU instance; refused while a vGPU lives in one (the instance is in use)."""
    if gpu.mig_hosts:
        raise MigError(f"In use by another client: {len(gpu.mig_hosts)} vGPU(s) live in GPU instances")
    gpu.gpu_instances = []


def room(gpu: SimGPU, vtype: SimType) -> int:
    """How many more vGPUs of a MIG-backed type the GPU's instances can take now."""
    if not gpu.mig_mode:
        return 0
    where = profile_of(gpu, vtype)
    if where is None:
        return 0
    profile, per_instance = where
    total = 0
    for gi in gpu.gpu_instances:
        if gi["profile"] == profile:
            total += _free_in(gpu, gi, vtype, per_instance)
    return total


def _free_in(gpu: SimGPU, gi: dict, vtype: SimType, per_instance: int) -> int:
    inside = [t for key, gid in gpu.mig_hosts.items() if gid == gi["id"] for t in [_type_of(gpu, key)]]
    if any(t is None or t.framebuffer_gb != vtype.framebuffer_gb for t in inside):
        return 0  # an instance hosts vGPUs of one framebuffer size
    return max(per_instance - len(inside), 0)


def _type_of(gpu: SimGPU, key: str) -> SimType | None:
    type_id = gpu.mig_types.get(key)
    return next((t for t in gpu.types if t.type_id == type_id), None)


def place(gpu: SimGPU, vtype: SimType, key: str) -> int:
    """Put a new MIG-backed vGPU (mdev UUID or VF) into the first instance with room; its GI id."""
    where = profile_of(gpu, vtype)
    if gpu.mig_mode and where:
        for gi in sorted(gpu.gpu_instances, key=lambda g: g["id"]):
            if gi["profile"] == where[0] and _free_in(gpu, gi, vtype, where[1]) > 0:
                gpu.mig_hosts[key] = gi["id"]
                gpu.mig_types[key] = vtype.type_id
                return gi["id"]
    raise MigError(f"no GPU instance has room for {vtype.name}")


def release(gpu: SimGPU, key: str) -> None:
    gpu.mig_hosts.pop(key, None)
    gpu.mig_types.pop(key, None)
