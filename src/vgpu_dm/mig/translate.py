"""Translate vGPU config entries into the MIG layout their GPUs need (mode and GPU instances), and into
an nvidia-mig-parted config for ``mig-config``. Pure functions of the entries and the GPU catalog.

A MIG-backed type ``<GPU>-<G>-<GB><SERIES>[ATTR]`` lives in a GPU instance with ``<G>`` compute slices
(host-interfaces.md 5.3). Which instance profile, and how many vGPUs share one:

1. The profile named ``<G>g.<GB>gb`` when the GPU has it: one vGPU per instance (A100, A30, H100, H200).
2. Else a ``<G>``-slice profile whose memory differs from ``<GB>`` only by rounding (within 5 %): the
   vGPU names round differently from the instance names on some GPUs (GB200-1-24C sits in 1g.23gb:
   seven of each), one vGPU per instance.
3. Else the smallest ``<G>``-slice profile that holds ``<GB>``, ``memory // GB`` vGPUs per instance
   (RTX PRO 6000: three DC-1-8Q in one 1g.24gb, 3.6); vGPUs of different sizes never share one.

The attribute picks the profile's suffix (``ME`` → ``+me`` …); on GPUs whose catalog entry names a
series in ``mig_gfx_series`` (RTX PRO Blackwell Q-series) the instances get ``+gfx`` without a GFX
suffix in the type name. A GPU whose instance profiles the catalog does not know, a profile (or suffix)
it does not offer and counts beyond its maximum are refused, with a message saying which.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vgpu_dm.errors import ConfigError
from vgpu_dm.mig.layout import MigLayout
from vgpu_dm.spec.model import ConfigEntry
from vgpu_dm.vgpu_type import VGPUType

if TYPE_CHECKING:
    from vgpu_dm.catalog import CatalogGPU

# vGPU type attribute → GPU-instance profile suffix (host-interfaces.md section 5.3).
PROFILE_SUFFIX = {"": "", "ME": "+me", "NOME": "-me", "MEALL": "+me.all", "GFX": "+gfx"}
_PROFILE = re.compile(r"(?P<g>[1-9][0-9]*)g\.(?P<gb>[0-9]+)gb(?P<suffix>(?:[+-][a-z.]+)*)")
# Naming of vGPU types and of instance profiles may round the same memory differently by this much.
ROUNDING = 0.05


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
    """A MIG-backed type whose GPU-instance profile cannot be told, or counts that cannot fit."""


def _unknown(what: str) -> str:
    return (
        f"the MIG GPU-instance profiles of the {what} are not known to this tool (NVIDIA's MIG user guide "
        f"does not list them); create its GPU instances yourself and apply with --skip-mig"
    )


def placement(
    vtype: VGPUType, profiles: dict[str, int] | None, gfx_series: tuple[str, ...] = (), model: str = "GPU"
) -> Placement:
    """The GPU-instance profile of a MIG-backed type on a GPU with these ``profiles`` (None: unknown)."""
    if not vtype.is_mig_backed:
        raise ValueError(f"{vtype.name} is time-sliced and needs no GPU instance")
    if not profiles:
        raise TranslationError(f"{vtype.name}: {_unknown(model)}")
    suffix = PROFILE_SUFFIX[vtype.attribute]
    gfx_implied = not suffix and vtype.series in gfx_series
    if gfx_implied:
        suffix = "+gfx"
    g, gb = vtype.gpu_instance_slices, vtype.framebuffer_gb
    bases = sorted(
        (p for p in map(GIProfile.parse, profiles) if not p.suffix and p.slices == g),
        key=lambda p: p.memory_gb,
    )
    near = [p for p in bases if gb and abs(p.memory_gb - gb) <= ROUNDING * gb]
    if near:
        base, per_instance = min(near, key=lambda p: abs(p.memory_gb - gb)), 1
    else:
        fitting = [p for p in bases if gb and p.memory_gb >= gb]
        if not fitting:
            known = ", ".join(profiles)
            raise TranslationError(
                f"no GPU-instance profile of the {model} with {g} slice(s) and at least {gb} GB hosts "
                f"{vtype.name} (its profiles: {known})"
            )
        base, per_instance = fitting[0], fitting[0].memory_gb // gb
    name = base.name + suffix
    if name not in profiles:
        why = (
            f" ({vtype.series}-series MIG-backed vGPUs on it need graphics instances)" if gfx_implied else ""
        )
        raise TranslationError(
            f"{vtype.name} needs {name} GPU instances{why}, and the {model} has no {name} profile as far as "
            f"this tool knows (its profiles: {', '.join(profiles)})"
        )
    return Placement(name, per_instance)


def layout_for(entry: ConfigEntry, model: CatalogGPU | None) -> MigLayout:
    """The MIG layout the entry needs on one GPU of ``model`` (None: a GPU the catalog does not know).

    Raises TranslationError when it cannot be told or does not fit (every problem in one message).
    """
    mig_types = [(t, n) for t, n in entry.vgpu_devices if t.is_mig_backed]
    if not mig_types:
        return MigLayout(False)
    what = model.name if model else "GPU"
    if model is None or not model.mig_gi_profiles:
        names = ", ".join(t.name for t, _ in mig_types)
        if model is not None and not any(t.name in model.vgpu_types for t, _ in mig_types):
            raise TranslationError(f"{names}: the {what} has no MIG-backed vGPU types")
        raise TranslationError(f"{names}: {_unknown(what)}")
    problems = type_problems(entry, model)
    # vGPUs of different framebuffer sizes never share an instance (host-interfaces.md section 3.6).
    per_group: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 1])
    for vtype, count in mig_types:
        try:
            where = placement(vtype, model.mig_gi_profiles, model.mig_gfx_series, what)
        except TranslationError as exc:
            problems.append(str(exc))
            continue
        group = per_group[(where.profile, vtype.framebuffer_gb)]
        group[0] += count
        group[1] = where.per_instance
    counts: dict[str, int] = {}
    for (profile, _), (count, per_instance) in per_group.items():
        counts[profile] = counts.get(profile, 0) + math.ceil(count / per_instance)
    for profile, need in counts.items():
        limit = model.mig_gi_profiles[profile]
        if need > limit:
            problems.append(
                f"{' + '.join(f'{n} x {t.name}' for t, n in mig_types)} need {need} x {profile} "
                f"GPU instances, "
                f"but the {what} has at most {limit}"
            )
    # Each instance takes its compute slices (<G>g) of the GPU's, which the largest profile has all of:
    # a necessary condition only (placements may still not work out; apply checks the result).
    slices = sum(GIProfile.parse(p).slices * n for p, n in counts.items())
    total = max(GIProfile.parse(p).slices for p in model.mig_gi_profiles)
    if not problems and slices > total:
        problems.append(
            f"{' + '.join(f'{n} x {p}' for p, n in counts.items())} GPU instances need {slices} "
            f"compute slices, "
            f"but the {what} has {total}"
        )
    if problems:
        raise TranslationError("; ".join(problems))
    return MigLayout.of(True, counts)


def type_problems(entry: ConfigEntry, model: CatalogGPU) -> list[str]:
    """Types the model does not have, and counts beyond its catalog maximum (as the plan reports them)."""
    problems = []
    for vtype, count in entry.vgpu_devices:
        bare = vtype.without_attribute()
        known = model.vgpu_types.get(vtype.name)
        if known is None and bare is not None:
            known = model.vgpu_types.get(bare.name)
        if known is None:
            problems.append(f"vGPU type {vtype.name} is not a type of the {model.name}")
        elif count > known:
            problems.append(f"{count} x {vtype.name} requested, but the GPU holds at most {known}")
    return problems


def entry_models(entry: ConfigEntry) -> list[CatalogGPU]:
    """The catalog GPUs an entry's MIG-backed types can mean, narrowed by its device-filter."""
    from vgpu_dm import catalog

    names = set()
    prefixes = set()
    for vtype, _ in entry.vgpu_devices:
        if vtype.is_mig_backed:
            bare = vtype.without_attribute()
            names |= {vtype.name, bare.name} if bare else {vtype.name}
            prefixes.add(vtype.gpu)
    models = [m for m in catalog.load() if names & set(m.vgpu_types)] or [
        m for m in catalog.load() if m.prefix in prefixes
    ]
    if entry.device_filter:
        narrowed = [
            m
            for m in models
            if any(
                (f.device, f.vendor) == (d.device, d.vendor)
                for f in entry.device_filter
                for d in m.device_ids
            )
        ]
        models = narrowed or models
    return models


def _filter_value(entry: ConfigEntry) -> str | list[str] | None:
    if not entry.device_filter:
        return None
    texts = [str(f) for f in entry.device_filter]
    return texts[0] if len(texts) == 1 else texts


def entry_config(entry: ConfigEntry) -> dict[str, Any]:
    """The mig-parted entry for one vGPU config entry, for the GPU model its types name."""
    out: dict[str, Any] = {}
    flt = _filter_value(entry)
    if flt is not None:
        out["device-filter"] = flt
    out["devices"] = "all" if entry.devices is None else list(entry.devices)
    if not entry.is_mig_backed:
        out["mig-enabled"] = False
        return out
    models = entry_models(entry)
    layouts = {}
    for model in models or [None]:
        layouts[model.name if model else ""] = layout_for(entry, model)
    if len(set(layouts.values())) > 1:
        raise TranslationError(
            f"the types are of several GPUs that need different GPU instances ({', '.join(layouts)}); add a "
            f"device-filter to the entry to say which"
        )
    layout = next(iter(layouts.values()))
    out["mig-enabled"] = True
    out["mig-devices"] = layout.as_dict
    return out


def mig_parted_config(name: str, entries: tuple[ConfigEntry, ...], source: str = "") -> dict[str, Any]:
    """The nvidia-mig-parted config (``version: v1``) for the selected vGPU config ``name``; ConfigError
    (located, one line per entry) for what apply would refuse."""
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
