"""Translate a selected vGPU config into the nvidia-mig-parted config that prepares its GPU instances.

A pure function of the config entries and the GPU catalog. Per entry: the same ``devices`` and
``device-filter``; ``mig-enabled: true`` with the GPU-instance profiles and counts its MIG-backed types
need, or ``mig-enabled: false`` when it has none (time-sliced types and ``{}`` need MIG off).

Upstream maps ``<GPU>-<G>-<GB><SERIES>`` to profile ``<G>g.<GB>gb`` with one GPU instance per vGPU. That
holds where the vGPU fills its instance (A100, A30, H100, H200), but not where several vGPUs share one:
on the RTX PRO 6000 Blackwell the 1-slice instance is ``1g.24gb`` and holds three ``DC-1-8Q``
(host-interfaces.md section 3.6). So when the catalog knows the GPU's instance profiles and
``<G>g.<GB>gb`` is not one of them, the type goes into the smallest ``<G>``-slice profile that fits it,
``memory // GB`` vGPUs per instance, and the instance count is rounded up.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from vgpu_dm.errors import ConfigError
from vgpu_dm.spec.model import ConfigEntry
from vgpu_dm.vgpu_type import VGPUType

# vGPU type attribute → GPU-instance profile suffix (host-interfaces.md section 5.3).
PROFILE_SUFFIX = {"": "", "ME": "+me", "NOME": "-me", "MEALL": "+me.all", "GFX": "+gfx"}
_PROFILE = re.compile(r"(?P<g>[1-9][0-9]*)g\.(?P<gb>[0-9]+)gb(?P<suffix>(?:[+-][a-z.]+)*)")


@dataclass(frozen=True)
class GIProfile:
    """A GPU-instance profile name such as ``1g.5gb+me``."""

    slices: int
    memory_gb: int
    suffix: str = ""

    @classmethod
    def parse(cls, text: str) -> GIProfile:
        m = _PROFILE.fullmatch(text)
        if not m:
            raise ValueError(
                f"invalid GPU-instance profile {text!r}: expected <G>g.<GB>gb[+me|-me|+me.all|+gfx]"
            )
        return cls(int(m["g"]), int(m["gb"]), m["suffix"])

    @property
    def name(self) -> str:
        return f"{self.slices}g.{self.memory_gb}gb{self.suffix}"


@dataclass(frozen=True)
class Placement:
    """Where vGPUs of one MIG-backed type live: instances of ``profile``, ``per_instance`` in each."""

    profile: str
    per_instance: int


class TranslationError(ValueError):
    """A MIG-backed type whose GPU-instance profile cannot be told."""


def placement(vtype: VGPUType, profiles: dict[str, int] | None) -> Placement:
    """The GPU-instance profile of a MIG-backed type, given the GPU's profiles (None: not known)."""
    if not vtype.is_mig_backed:
        raise ValueError(f"{vtype.name} is time-sliced and needs no GPU instance")
    suffix = PROFILE_SUFFIX[vtype.attribute]
    exact = f"{vtype.gpu_instance_slices}g.{vtype.framebuffer_gb}gb{suffix}"
    if not profiles or exact in profiles:
        return Placement(exact, 1)
    fitting = sorted(
        (p for p in map(GIProfile.parse, profiles) if not p.suffix),
        key=lambda p: p.memory_gb,
    )
    fitting = [
        p
        for p in fitting
        if p.slices == vtype.gpu_instance_slices
        and vtype.framebuffer_gb
        and p.memory_gb >= vtype.framebuffer_gb
    ]
    if not fitting:
        known = ", ".join(profiles)
        raise TranslationError(
            f"no GPU-instance profile with {vtype.gpu_instance_slices} slice(s) and at least "
            f"{vtype.framebuffer_gb} GB hosts {vtype.name} (the GPU's profiles: {known})"
        )
    base = fitting[0]
    return Placement(base.name + suffix, base.memory_gb // vtype.framebuffer_gb)


def _gpu_profiles(vtype: VGPUType, entry: ConfigEntry) -> dict[str, int] | None:
    """The instance profiles of the GPU model a type belongs to, narrowed by the entry's device-filter."""
    from vgpu_dm import catalog

    bare = vtype.without_attribute()
    names = {vtype.name, bare.name} if bare else {vtype.name}
    models = [m for m in catalog.load() if names & set(m.vgpu_types)] or [
        m for m in catalog.load() if m.prefix == vtype.gpu
    ]
    if entry.device_filter:
        models = [
            m
            for m in models
            if any(
                (f.device, f.vendor) == (d.device, d.vendor)
                for f in entry.device_filter
                for d in m.device_ids
            )
        ] or models
    tables = {tuple(sorted(m.mig_gi_profiles.items())) for m in models if m.mig_gi_profiles}
    if len(tables) > 1:
        which = ", ".join(m.name for m in models if m.mig_gi_profiles)
        raise TranslationError(
            f"{vtype.name} is a type of several GPUs with different GPU-instance profiles ({which}); "
            f"add a device-filter to the entry to say which"
        )
    return dict(tables.pop()) if tables else None


def mig_devices(entry: ConfigEntry) -> dict[str, int]:
    """GPU-instance profile → count that the entry's MIG-backed types need on each selected GPU."""
    # vGPUs of different framebuffer sizes never share an instance (host-interfaces.md section 3.6).
    per_group: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 1])
    for vtype, count in entry.vgpu_devices:
        if not vtype.is_mig_backed:
            continue
        where = placement(vtype, _gpu_profiles(vtype, entry))
        group = per_group[(where.profile, vtype.framebuffer_gb)]
        group[0] += count
        group[1] = where.per_instance
    result: dict[str, int] = {}
    for (profile, _), (count, per_instance) in per_group.items():
        result[profile] = result.get(profile, 0) + math.ceil(count / per_instance)
    return result


def _filter_value(entry: ConfigEntry) -> str | list[str] | None:
    if not entry.device_filter:
        return None
    texts = [str(f) for f in entry.device_filter]
    return texts[0] if len(texts) == 1 else texts


def entry_config(entry: ConfigEntry, devices: Any = None) -> dict[str, Any]:
    """The mig-parted entry for one vGPU config entry (``devices`` overrides the entry's own)."""
    out: dict[str, Any] = {}
    if devices is None:
        flt = _filter_value(entry)
        if flt is not None:
            out["device-filter"] = flt
        devices = "all" if entry.devices is None else list(entry.devices)
    out["devices"] = devices
    wanted = mig_devices(entry)
    out["mig-enabled"] = bool(wanted)
    if wanted:
        out["mig-devices"] = wanted
    return out


def mig_parted_config(name: str, entries: tuple[ConfigEntry, ...], source: str = "") -> dict[str, Any]:
    """The nvidia-mig-parted config (``version: v1``) for the selected vGPU config ``name``."""
    items = []
    problems = []
    for entry in entries:
        try:
            items.append(entry_config(entry))
        except TranslationError as exc:
            where = f"{source}:{entry.line}: " if source else ""
            problems.append(f"{where}{entry.path}.vgpu-devices: {exc}")
    if problems:
        raise ConfigError("\n".join(problems))
    return {"version": "v1", "mig-configs": {name: items}}


def dump(config: dict[str, Any]) -> str:
    """YAML text of a mig-parted config."""
    import yaml

    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
