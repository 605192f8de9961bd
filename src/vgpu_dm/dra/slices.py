"""ResourceSlices of the node's pool: how the offer is cut into slices, and publishing them the way the
kubelet plugin helper does — one pool per node, its generation bumped on every change,
``resourceSliceCount`` exact, slices owned by the Node, obsolete slices deleted, and fields the API
server drops (a feature gate off) detected and reported rather than published wrong.

Counter sets (mixed-size GPUs, KEP-4815 partitionable devices) have two layouts: Kubernetes 1.34 keeps
them in the slice of the devices that consume them ("combined"); 1.35+ wants them in slices of their own
in the same pool ("split") and rejects the combined form. Which one a server takes is found out with
dry runs (``dryRun=All``: the server validates and returns the object as it would store it, and stores
nothing), so devices whose counters the server would drop are never published, not even briefly:
split first, then combined. If the server drops the counters of both, partitionable devices are off
(a feature gate): the mixed-size GPUs are withdrawn with a reported problem, and the layouts are tried
again every ``REPROBE`` seconds. If it refuses them (422) for another reason, that reason is reported
and nothing is concluded about the gate.
"""

from __future__ import annotations

import hashlib
import json
import time
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
REPROBE = 600.0  # seconds before the counter layouts are tried again once the server dropped them


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


class SliceInvalid(Exception):
    """The API server refused a slice as invalid (HTTP 422); the message is the server's."""


class SlicePublisher:
    """Publishes one node's pool. ``api`` is a DraApi; the counter-set layout found to work is kept."""

    def __init__(self, api, driver: str, node: str):
        self.api = api
        self.driver = driver
        self.node = node
        self.pool = node
        self.mode: str | None = None  # the counter layout this server takes, once known (PLAIN: none)
        self.why = ""  # why no counter layout was kept
        self._reprobe_at = 0.0  # with PLAIN: when to try the counter layouts again
        self._refused_said = ""

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
        if not offer.counter_sets:
            return self._publish(offer, PLAIN)
        if self.mode in (SPLIT, COMBINED):
            try:
                return self._publish(offer, self.mode)
            except Rejected as exc:
                # Dry runs approved it: the server changed under us (restarted with other gates?).
                _log.warning(f"ResourceSlices, {self.mode} layout no longer accepted: {exc}")
                self.mode = None
                result = self._without_counters(offer, f"{exc}", gate=False)
                _log.error(result.problems[-1])
                return result
        if self.mode == PLAIN and time.monotonic() < self._reprobe_at:
            return self._without_counters(offer, self.why, gate=True)
        why: list[str] = []
        dropped = False
        for mode in (SPLIT, COMBINED):
            try:
                self._dry_run(offer, mode)
            except Rejected as exc:
                dropped = dropped or exc.args[1]
                why.append(f"{mode} layout: {exc.args[0]}")
                continue
            self.mode = mode
            return self._publish(offer, mode)
        if dropped:
            # The fields are dropped, not refused: partitionable devices are off on this cluster.
            first = self.mode != PLAIN
            self.mode, self.why = PLAIN, "; ".join(why)
            self._reprobe_at = time.monotonic() + REPROBE
            result = self._without_counters(offer, self.why, gate=True)
            if first:
                _log.error(result.problems[-1])
            return result
        self.mode = None
        result = self._without_counters(offer, "; ".join(why), gate=False)
        if result.problems[-1] != self._refused_said:  # said once per change; tried at every publish
            self._refused_said = result.problems[-1]
            _log.error(self._refused_said)
        return result

    def _without_counters(self, offer: NodeOffer, why: str, gate: bool) -> Published:
        """Publish the GPUs without counters alone; a problem names the mixed-size GPUs left out."""
        gpus = sorted({f"GPU {c.gpu_index} ({c.gpu})" for c in offer.counter_sets})
        if gate:
            problem = (
                f"{', '.join(gpus)} not offered: they mix framebuffer sizes, which needs partitionable "
                f"devices (feature gate DRAPartitionableDevices, on by default from Kubernetes 1.36, in the "
                f"API server and the scheduler), and the API server did not keep their counters ({why})"
            )
        else:
            problem = (
                f"{', '.join(gpus)} not offered for now: the API server refused their ResourceSlices ({why})"
            )
        plain = NodeOffer(tuple(d for d in offer.devices if not d.mixed), (), offer.problems)
        result = self._publish(plain, PLAIN)
        return result._replace(problems=(*result.problems, problem))

    def _dry_run(self, offer: NodeOffer, mode: str) -> None:
        """Raise Rejected(why, dropped) unless the server would store every slice of ``mode`` as sent."""
        specs, _ = layout(offer, mode)
        for i, body in enumerate(specs):
            spec = {
                "driver": self.driver,
                "pool": {"name": self.pool, "generation": 1, "resourceSliceCount": len(specs)},
                "nodeName": self.node,
                **body,
            }
            try:
                stored = self.api.put_slice(f"{self.slice_name(i)}-probe", spec, {}, None, dry_run=True)
            except SliceInvalid as exc:
                raise Rejected(f"the API server refused it: {exc}", False) from None
            lost = missing_fields(body, stored.get("spec") or {})
            if lost:
                more = " …" if len(lost) > 4 else ""
                raise Rejected(f"the API server would drop {', '.join(lost[:4])}{more}", True)

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
            try:
                stored = self.api.put_slice(name, spec, {FINGERPRINT: digest}, existing.get(name))
            except SliceInvalid as exc:
                if mode == PLAIN:
                    raise  # nothing to do with counters: the caller reports it
                raise Rejected(f"the API server refused it: {exc}") from None
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
