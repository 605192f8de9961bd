"""ResourceSlices of the node's pool: how the offer is cut into slices, and publishing them the way the
kubelet plugin helper does — one pool per node, its generation bumped on every change,
``resourceSliceCount`` exact, slices owned by the Node, obsolete slices deleted, and fields the API
server drops (a feature gate off) detected and reported rather than published wrong.

Counter sets (mixed-size GPUs, KEP-4815 partitionable devices) have two layouts: Kubernetes 1.34 keeps
them in the slice of the devices that consume them ("combined"); 1.35+ wants them in slices of their own
in the same pool ("split") and rejects the combined form. Which one a server takes is found out by
publishing: split first; if the server rejects it or drops the counters, combined; if that fails too,
partitionable devices are off and the mixed-size GPUs are withdrawn with a reported problem.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, NamedTuple

from vgpu_dm import log
from vgpu_dm.dra.devices import CounterSetSpec, DeviceSpec, NodeOffer

_log = log.get("dra")

# resource.k8s.io/v1 limits (Kubernetes 1.36 validation)
MAX_DEVICES = 128
MAX_DEVICES_WITH_COUNTERS = 64  # when any device of the slice consumes counters
MAX_COUNTER_SETS = 8
SPLIT, COMBINED, PLAIN = "split", "combined", "plain"
FINGERPRINT = "vgpu.nvidia.com/slice-content"  # annotation: hash of what this generation publishes


def _chunks(devices: list[DeviceSpec]) -> list[list[DeviceSpec]]:
    """Devices in order, cut at the per-slice limit (64 as soon as a device consumes counters)."""
    out: list[list[DeviceSpec]] = []
    current: list[DeviceSpec] = []
    for device in devices:
        counters = device.mixed or any(d.mixed for d in current)
        if current and len(current) >= (MAX_DEVICES_WITH_COUNTERS if counters else MAX_DEVICES):
            out.append(current)
            current = []
        current.append(device)
    if current:
        out.append(current)
    return out


def layout(offer: NodeOffer, mode: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The ``spec`` bodies (without driver, pool and node) of the pool's slices in ``mode``, and the
    problems of GPUs that cannot be laid out (their devices are left out)."""
    problems: list[str] = []
    if mode in (SPLIT, PLAIN):
        specs: list[dict[str, Any]] = []
        sets = list(offer.counter_sets) if mode == SPLIT else []
        for i in range(0, len(sets), MAX_COUNTER_SETS):
            specs.append({"sharedCounters": [c.to_api() for c in sets[i : i + MAX_COUNTER_SETS]]})
        devices = [d for d in offer.devices if mode == SPLIT or not d.mixed]
        specs += [{"devices": [d.to_api() for d in chunk]} for chunk in _chunks(devices)]
        return specs, problems
    # Combined: a GPU's consuming devices must sit in the slice that holds its counter set.
    groups: list[tuple[list[DeviceSpec], CounterSetSpec | None]] = []
    sets_by_gpu = {c.gpu: c for c in offer.counter_sets}
    for device in offer.devices:
        if groups and groups[-1][0][0].gpu == device.gpu:
            groups[-1][0].append(device)
        else:
            groups.append(([device], sets_by_gpu.get(device.gpu) if device.mixed else None))
    slices: list[tuple[list[DeviceSpec], list[CounterSetSpec]]] = []
    for devices, counter_set in groups:
        if counter_set is not None and len(devices) > MAX_DEVICES_WITH_COUNTERS:
            problems.append(
                f"GPU {devices[0].gpu_index} ({devices[0].gpu}): {len(devices)} devices share a counter set, "
                f"more than the {MAX_DEVICES_WITH_COUNTERS} a ResourceSlice holds in the combined layout"
            )
            continue
        for chunk in _chunks(devices) if counter_set is None else [devices]:
            if slices:
                have, sets = slices[-1]
                limit = MAX_DEVICES_WITH_COUNTERS if (sets or counter_set) else MAX_DEVICES
                if (
                    len(have) + len(chunk) <= limit
                    and len(sets) + (counter_set is not None) <= MAX_COUNTER_SETS
                ):
                    have.extend(chunk)
                    if counter_set is not None:
                        sets.append(counter_set)
                    continue
            slices.append((list(chunk), [counter_set] if counter_set is not None else []))
    specs = []
    for devices, sets in slices:
        spec: dict[str, Any] = {"devices": [d.to_api() for d in devices]}
        if sets:
            spec["sharedCounters"] = [c.to_api() for c in sets]
        specs.append(spec)
    return specs, problems


def missing_fields(sent: Any, got: Any, path: str = "spec") -> list[str]:
    """Paths present in what was sent but absent from what the server stored (fields it dropped)."""
    if isinstance(sent, dict):
        if not isinstance(got, dict):
            return [path]
        out = []
        for key, value in sent.items():
            if key not in got or (got[key] in (None, [], {}) and value not in (None, [], {})):
                out.append(f"{path}.{key}")
            else:
                out += missing_fields(value, got[key], f"{path}.{key}")
        return out
    if isinstance(sent, list):
        if not isinstance(got, list) or len(got) < len(sent):
            return [path]
        out = []
        for i, (a, b) in enumerate(zip(sent, got, strict=False)):
            out += missing_fields(a, b, f"{path}[{i}]")
        return out
    return []


class Published(NamedTuple):
    """What one publish did."""

    mode: str  # SPLIT, COMBINED or PLAIN
    generation: int
    slices: int
    changed: bool
    problems: tuple[str, ...] = ()  # mixed-size GPUs withdrawn, GPUs that did not fit a slice


class Rejected(Exception):
    """The server refused or mangled a layout: try the next one."""


class SlicePublisher:
    """Publishes one node's pool. ``api`` is a DraApi; the counter-set layout found to work is kept."""

    def __init__(self, api, driver: str, node: str):
        self.api = api
        self.driver = driver
        self.node = node
        self.pool = node
        self.mode: str | None = None  # the counter layout this server takes, once known (PLAIN: none)
        self.why = ""  # why no counter layout was kept

    def slice_name(self, index: int) -> str:
        return f"{self.node}-{self.driver.split('.')[0]}-{index}"

    def current(self) -> list[dict[str, Any]]:
        """This pool's slices as the server has them now."""
        return self.api.list_slices(self.node, self.driver)

    def published_devices(self) -> tuple[dict[str, DeviceSpec], dict[str, DeviceSpec]]:
        """Devices this pool has on the server (published by us earlier: e.g. before a restart): those of
        the newest generation, and those of every generation still there."""
        newest_found: dict[str, DeviceSpec] = {}
        every: dict[str, DeviceSpec] = {}
        slices = self.current()
        newest = max((s["spec"]["pool"]["generation"] for s in slices), default=0)
        for s in sorted(slices, key=lambda s: s["spec"]["pool"]["generation"]):
            for device in s["spec"].get("devices") or []:
                spec = DeviceSpec.from_api(device)
                if spec is None:
                    continue
                every[spec.name] = spec
                if s["spec"]["pool"]["generation"] == newest:
                    newest_found[spec.name] = spec
        return newest_found, every

    def publish(self, offer: NodeOffer) -> Published:
        mixed = bool(offer.counter_sets)
        modes = [PLAIN] if not mixed else ([self.mode] if self.mode else [SPLIT, COMBINED])
        why: list[str] = []
        if mixed and self.mode == PLAIN:
            modes, why = [], [self.why]  # found out before: not tried again until the driver restarts
        for mode in modes:
            try:
                result = self._publish(offer, mode)
            except Rejected as exc:
                why.append(f"{mode} layout: {exc}")
                _log.warning(f"ResourceSlices, {mode} layout of counter sets not accepted: {exc}")
                continue
            if mixed:
                self.mode = mode
            return result
        # No layout keeps the counters: partitionable devices are off on this cluster. Publishing the
        # mixed-size GPUs' devices without their counters would let the scheduler overfill them.
        first = self.mode != PLAIN
        self.mode, self.why = PLAIN, "; ".join(why)
        gpus = sorted({f"GPU {c.gpu_index} ({c.gpu})" for c in offer.counter_sets})
        problem = (
            f"{', '.join(gpus)} not offered: they mix framebuffer sizes, which needs partitionable devices "
            f"(feature gate DRAPartitionableDevices, on by default from Kubernetes 1.36, in the API server "
            f"and the scheduler), and the API server did not keep their counters ({'; '.join(why)})"
        )
        if first:
            _log.error(problem)
        plain = NodeOffer(tuple(d for d in offer.devices if not d.mixed), (), offer.problems)
        result = self._publish(plain, PLAIN)
        return result._replace(problems=(*result.problems, problem))

    def _publish(self, offer: NodeOffer, mode: str) -> Published:
        specs, problems = layout(offer, mode)
        existing = {s["metadata"]["name"]: s for s in self.current()}
        digest = hashlib.sha256(json.dumps([mode, specs], sort_keys=True).encode()).hexdigest()[:32]
        names = [self.slice_name(i) for i in range(len(specs))]
        generations = {s["spec"]["pool"]["generation"] for s in existing.values()}
        if (
            set(existing) == set(names)
            and len(generations) == 1
            and all(
                (s["metadata"].get("annotations") or {}).get(FINGERPRINT) == digest
                and s["spec"]["pool"]["resourceSliceCount"] == len(specs)
                for s in existing.values()
            )
        ):
            return Published(mode, generations.pop(), len(specs), False, tuple(problems))
        generation = max(generations, default=0) + 1
        for name, body in zip(names, specs, strict=True):
            spec = {
                "driver": self.driver,
                "pool": {"name": self.pool, "generation": generation, "resourceSliceCount": len(specs)},
                "nodeName": self.node,
                **body,
            }
            stored = self.api.put_slice(name, spec, {FINGERPRINT: digest}, existing.get(name))
            if stored is None:
                raise Rejected("the API server refused the slice (invalid)")
            lost = missing_fields(body, stored.get("spec") or {})
            if lost:
                raise Rejected(
                    f"the API server dropped {', '.join(lost[:4])}" + (" …" if len(lost) > 4 else "")
                )
        for name in set(existing) - set(names):
            self.api.delete_slice(name)
        _log.info(
            f"published {len(offer.devices)} devices in {len(specs)} ResourceSlice(s), pool {self.pool} "
            f"generation {generation} ({mode} layout)"
        )
        return Published(mode, generation, len(specs), True, tuple(problems))
