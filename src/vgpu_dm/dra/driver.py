"""The DRA driver's state and logic: which GPUs it owns, what the node offers, prepare and unprepare.

Every vGPU change goes through apply's one-vGPU verbs (host lock, journal, in-use checks, rollback).
Prepare and unprepare are serialized (one process lock), as the kubelet-plugin helper does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from vgpu_dm import log
from vgpu_dm.apply import ApplyOptions, create_one, recover, remove_one
from vgpu_dm.dra.checkpoint import PREPARED, PREPARING, Checkpoint, ClaimRecord, PreparedDevice
from vgpu_dm.dra.claimfiles import ClaimFiles
from vgpu_dm.dra.devices import DeviceSpec, NodeOffer, build_offer
from vgpu_dm.dra.slices import Published, SlicePublisher
from vgpu_dm.errors import ApplyError, ConfigError, HostError, PlanError, VgpuDmError
from vgpu_dm.host.inventory import HostTools, Inventory
from vgpu_dm.host.lock import HostLock
from vgpu_dm.host.owner import DraOwnership, read_dra_owned, write_dra_owned
from vgpu_dm.host.root import HostRoot
from vgpu_dm.nodeconfig import desired_config
from vgpu_dm.spec import load_spec, read_config_source

_log = log.get("dra")
POD_CLAIM_ANNOTATION = "resource.kubernetes.io/pod-claim-name"


class Settings(NamedTuple):
    driver: str
    node: str
    config_file: str
    default_config: str
    plugin_dir: str  # the kubelet's plugin data dir for this driver (DRA socket, checkpoint, metadata)
    cdi_dir: str
    lock_timeout: float = 20.0  # a prepare must answer within the kubelet's 45 s


class Prepared(NamedTuple):
    devices: list[dict[str, Any]]  # {request_names, pool_name, device_name, cdi_device_ids, share_id}
    error: str = ""


class Driver:
    def __init__(self, settings: Settings, api, host: HostRoot, tools: HostTools | None = None):
        self.s = settings
        self.api = api
        self.host = host
        self.tools = tools or HostTools()
        self.pool = settings.node
        self.lock = threading.RLock()  # prepare, unprepare and publishing take turns
        self.checkpoint = Checkpoint(f"{settings.plugin_dir}/checkpoint.json")
        self.files = ClaimFiles(settings.driver, settings.plugin_dir, settings.cdi_dir)
        self.publisher = SlicePublisher(api, settings.driver, settings.node)
        self.offered: dict[str, DeviceSpec] = {}  # every device published now, by name
        self.problems: tuple[str, ...] = ()
        self.config_name = ""
        self.on_republish: Callable[[], None] = lambda: None  # wakes the publisher loop
        self._frozen_said: dict[str, tuple] = {}  # GPU → the held-back devices last logged

    def _options(self) -> ApplyOptions:
        return ApplyOptions(lock_timeout=self.s.lock_timeout, jobs=1)

    # -- start -----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Reconcile the checkpoint with the host, then publish. Before the gRPC servers start."""
        with self.lock:
            with HostLock(self.host, timeout=self.s.lock_timeout):
                recover(self.host, self.tools)  # a prepare killed mid-write leaves apply's journal
            self.offered = self.publisher.published_devices()  # what a previous run published
            for record in list(self.checkpoint.claims.values()):
                if record.state != PREPARED:
                    _log.warning(
                        f"claim {record.namespace}/{record.name} ({record.uid}) was being prepared when the "
                        f"driver stopped; forgetting it (its vGPU, if made, is removed as an orphan)"
                    )
                    self.checkpoint.drop(record.uid)
            self._remove_orphans()
            for record in list(self.checkpoint.claims.values()):
                try:
                    self._ensure(record)
                except VgpuDmError as exc:
                    _log.error(f"claim {record.namespace}/{record.name}: {exc}")
            self.republish()

    def _owned(self) -> DraOwnership:
        record = read_dra_owned(self.host)
        if record is None or record.driver != self.s.driver:
            if record is not None and record.gpus:
                raise HostError(
                    f"the host's DRA ownership record names driver {record.driver}, not {self.s.driver}: "
                    f"another DRA driver owns GPUs here"
                )
            return DraOwnership(self.s.driver, self.s.node, {})
        return record

    def _remove_orphans(self) -> None:
        """vGPUs on our GPUs that no prepared claim holds: made by a prepare that never finished."""
        owned = self._owned()
        if not owned.gpus:
            return
        known = {d.key for d in self.checkpoint.devices()}
        inventory = Inventory(self.host, self.tools)
        for gpu in inventory.gpus:
            if gpu.address not in owned.gpus:
                continue
            for device in inventory.devices(gpu):
                if device.key in known:
                    continue
                _log.warning(
                    f"{gpu.describe()}: removing orphan {device.type_name} {device.key} (no claim has it)"
                )
                try:
                    remove_one(
                        self.host,
                        self.tools,
                        gpu.address,
                        device.key,
                        options=self._options(),
                        label="dra orphan",
                    )
                except VgpuDmError as exc:
                    _log.error(f"{gpu.describe()}: orphan {device.key} stays: {exc}")

    # -- what the node offers --------------------------------------------------------------------------

    def republish(self) -> Published | None:
        """Read the node's label and the config, take or give back GPUs, publish the pool."""
        labels = self.api.node_labels()
        name = desired_config(labels, self.s.default_config)
        with self.lock:
            try:
                data, source = read_config_source(self.s.config_file)
                self.config_name, entries = load_spec(data, source).select(name)
            except ConfigError as exc:
                # Keep what is published: withdrawing devices over a typo would strand pending pods.
                _log.error(f"config {name!r}: {exc}; the published devices stay as they are")
                self.problems = (f"config {name!r}: {exc}",)
                return None
            inventory = Inventory(self.host, self.tools)
            owned = self._owned()
            prepared = {d.device: d for d in self.checkpoint.devices()}
            refuse = {}
            for gpu in inventory.gpus:
                if gpu.address in owned.gpus:
                    continue
                devices = inventory.devices(gpu)
                if devices:
                    refuse[gpu.address] = (
                        f"it has vGPUs the DRA driver did not create ({', '.join(d.key for d in devices[:4])}"
                        f"{' …' if len(devices) > 4 else ''}); remove them (e.g. nvidia-vgpu-dm apply with a "
                        f"config that leaves the GPU empty) before the DRA driver can offer it"
                    )
            offer, offers = build_offer(entries, inventory, refuse)
            if any(o.framework == "sriov-vfs-off" for o in offers.values()):
                # Which framework a GPU uses shows only once its VFs exist; enabling them is harmless.
                self._enable_vfs([o.gpu for o in offers.values() if o.framework == "sriov-vfs-off"])
                inventory = Inventory(self.host, self.tools)
                offer, offers = build_offer(entries, inventory, refuse)
            offer = self._keep_allocated(offer, prepared)
            new_owned = dict(owned.gpus)
            for address in offer.gpus():
                new_owned.setdefault(address, time.time())
            held = offer.gpus() | {d.gpu for d in prepared.values()}
            for address in list(new_owned):
                if address not in held:
                    del new_owned[address]  # nothing offered and nothing prepared: back to static layouts
            if new_owned != owned.gpus:
                write_dra_owned(self.host, DraOwnership(self.s.driver, self.s.node, new_owned))
            result = self.publisher.publish(offer)
            withdrawn = result.mode == "plain" and bool(offer.counter_sets)  # counters not kept
            self.offered = {d.name: d for d in offer.devices if not (d.mixed and withdrawn)}
            kept = {d.gpu for d in self.offered.values()} | {d.gpu for d in prepared.values()}
            if set(new_owned) - kept:
                # Offered nothing after all (the server dropped their counters): not ours to hold.
                new_owned = {a: t for a, t in new_owned.items() if a in kept}
                write_dra_owned(self.host, DraOwnership(self.s.driver, self.s.node, new_owned))
            self.problems = offer.problems + result.problems
            for problem in offer.problems:
                _log.warning(problem)
            return result

    def _enable_vfs(self, gpus: list) -> None:
        with HostLock(self.host, timeout=self.s.lock_timeout):
            inventory = Inventory(self.host, self.tools, writable=True)
            for gpu in gpus:
                try:
                    inventory.vfio.enable_vfs(gpu)
                except HostError as exc:
                    _log.error(f"{gpu.describe()}: {exc}")

    def _keep_allocated(self, offer: NodeOffer, prepared: dict[str, PreparedDevice]) -> NodeOffer:
        """A GPU whose allocated devices the new offer does not contain keeps exactly those devices
        (and nothing new) until they are released: devices are never withdrawn from under a claim."""
        allocated = set(prepared)
        try:
            allocated |= self.api.allocated_devices(self.s.driver, self.pool)
        except Exception as exc:
            _log.warning(f"could not list ResourceClaims ({exc}); keeping the prepared devices only")
        new = offer.by_name()
        held = [self.offered[name] for name in sorted(allocated) if name in self.offered]
        moved = {
            old.gpu
            for old in held
            if old.name not in new or new[old.name]._replace(attributes={}) != old._replace(attributes={})
        }
        frozen: dict[str, list[DeviceSpec]] = {}
        for old in held:
            if old.gpu in moved:
                frozen.setdefault(old.gpu, []).append(old)
        if not frozen:
            self._frozen_said.clear()
            return offer
        for gpu, kept in frozen.items():
            said = (self.config_name, tuple(d.name for d in kept))
            if self._frozen_said.get(gpu) == said:
                continue
            self._frozen_said[gpu] = said
            _log.warning(
                f"GPU {kept[0].gpu_index} ({gpu}): {len(kept)} allocated device(s) of the previous layout "
                f"({', '.join(d.name for d in kept)}) stay published alone until released; the GPU follows "
                f"config {self.config_name!r} afterwards"
            )
        devices = [d for d in offer.devices if d.gpu not in frozen]
        old_sets = {d.gpu: d for d in self.offered.values() if d.mixed}
        counter_sets = [c for c in offer.counter_sets if c.gpu not in frozen]
        for gpu, kept in frozen.items():
            devices.extend(kept)
            if gpu in old_sets:
                from vgpu_dm.dra.devices import CounterSetSpec

                fb = next((c.framebuffer_gb for c in offer.counter_sets if c.gpu == gpu), None)
                counter_sets.append(
                    CounterSetSpec(gpu, kept[0].gpu_index, fb or sum(d.framebuffer_gb for d in kept))
                )
        devices.sort(key=lambda d: (d.gpu_index, d.name))
        return offer._replace(devices=tuple(devices), counter_sets=tuple(counter_sets))

    # -- prepare ---------------------------------------------------------------------------------------

    def prepare(self, namespace: str, uid: str, name: str) -> Prepared:
        try:
            claim = self.api.get_claim(namespace, name)
        except Exception as exc:
            return Prepared([], f"reading ResourceClaim {namespace}/{name}: {exc}")
        if claim is None:
            return Prepared([], f"ResourceClaim {namespace}/{name} not found")
        meta = claim.get("metadata") or {}
        if meta.get("uid") != uid:
            return Prepared(
                [],
                f"ResourceClaim {namespace}/{name} was replaced: it has UID {meta.get('uid')}, "
                f"the kubelet asked for {uid}",
            )
        allocation = (claim.get("status") or {}).get("allocation")
        if not allocation:
            return Prepared([], f"ResourceClaim {namespace}/{name} is not allocated")
        results = [
            r
            for r in (allocation.get("devices") or {}).get("results") or []
            if r.get("driver") == self.s.driver and r.get("pool") == self.pool
        ]
        with self.lock:
            try:
                record = self.checkpoint.get(uid)
                if record is not None and record.state == PREPARED:
                    record = self._ensure(record)
                else:
                    record = self._prepare(namespace, uid, name, meta, results)
                return Prepared(self._answer(record))
            except Exception as exc:  # any failure is this claim's alone: the kubelet retries it
                return Prepared([], f"ResourceClaim {namespace}/{name}: {_reason(exc)}")

    def _prepare(self, namespace: str, uid: str, name: str, meta: dict, results: list[dict]) -> ClaimRecord:
        wanted = []
        owned = self._owned()
        for result in results:
            spec = self.offered.get(result["device"])
            if spec is None:
                raise HostError(f"device {result['device']} is not offered by this node's DRA driver")
            if spec.gpu not in owned.gpus:
                raise HostError(f"GPU {spec.gpu} of device {spec.name} is not owned by the DRA driver")
            request = str(result.get("request", "")).split("/")[0]  # strip a subrequest
            wanted.append(
                PreparedDevice(
                    request,
                    spec.name,
                    spec.gpu,
                    spec.type_name,
                    spec.framework,
                    share_id=result.get("shareID"),
                )
            )
        pod_claim = (meta.get("annotations") or {}).get(POD_CLAIM_ANNOTATION)
        record = ClaimRecord(uid, namespace, name, PREPARING, tuple(wanted), pod_claim)
        self.checkpoint.put(record)  # before the first vGPU exists: a crash leaves an orphan we can find
        made: list[PreparedDevice] = []
        try:
            for want in wanted:
                made.append(self._create(want, f"dra claim {namespace}/{name} ({uid})"))
            record = record._replace(state=PREPARED, devices=tuple(made))
            self.files.write(record, self.pool)
            self.checkpoint.put(record)  # before the kubelet hears of it
        except BaseException:
            # Whatever failed — a vGPU, a file, the checkpoint — the claim is left as if never prepared,
            # so a kubelet retry does not leave one more vGPU behind each time.
            try:
                self.files.remove(record)
            except OSError as exc:
                _log.error(f"could not remove the files of a failed prepare: {_reason(exc)}")
            for device in reversed(made):
                try:
                    remove_one(
                        self.host,
                        self.tools,
                        device.gpu,
                        device.key,
                        options=self._options(),
                        label="dra undo",
                    )
                except Exception as exc:
                    _log.error(f"could not remove {device.key} after a failed prepare: {_reason(exc)}")
            self.checkpoint.drop(uid)
            raise
        _log.info(
            f"prepared claim {namespace}/{name}: "
            + ", ".join(f"{d.type_name} {d.key} on {d.gpu} ({d.device})" for d in made)
        )
        return record

    def _create(self, want: PreparedDevice, label: str) -> PreparedDevice:
        spec = self.offered.get(want.device)
        mixed = bool(spec and spec.mixed)
        try:
            device = create_one(
                self.host,
                self.tools,
                want.gpu,
                want.type_name,
                mixed_size=mixed,
                options=self._options(),
                label=label,
            )
        except (PlanError, ApplyError) as exc:
            raise HostError(f"creating {want.type_name} on {want.gpu} for {want.device}: {exc}") from None
        return want._replace(
            framework=device.framework,
            key=device.key,
            iommu_group=device.iommu_group or _group(self.host, device),
        )

    def _ensure(self, record: ClaimRecord) -> ClaimRecord:
        """A prepared claim again: its vGPUs must still be there (a reboot loses them: make them again)."""
        inventory = Inventory(self.host, self.tools)
        by_gpu = {g.address: g for g in inventory.gpus}
        devices = []
        changed = False
        for device in record.devices:
            gpu = by_gpu.get(device.gpu)
            present = gpu is not None and any(d.key == device.key for d in inventory.devices(gpu))
            if present:
                devices.append(device)
                continue
            _log.warning(
                f"claim {record.namespace}/{record.name}: vGPU {device.key} is gone; creating it again"
            )
            devices.append(self._create(device, f"dra claim {record.namespace}/{record.name} ({record.uid})"))
            changed = True
        if changed:
            record = record._replace(devices=tuple(devices))
            self.checkpoint.put(record)
        self.files.write(record, self.pool)
        return record

    def _answer(self, record: ClaimRecord) -> list[dict[str, Any]]:
        ids = self.files.cdi_ids(record)
        return [
            {
                "request_names": [d.request],
                "pool_name": self.pool,
                "device_name": d.device,
                "cdi_device_ids": ids[d.device],
                "share_id": d.share_id,
            }
            for d in record.devices
        ]

    # -- unprepare -------------------------------------------------------------------------------------

    def unprepare(self, namespace: str, uid: str, name: str) -> str:
        """ "" on success (also for a claim this driver never prepared), else why (the kubelet retries)."""
        with self.lock:
            record = self.checkpoint.get(uid)
            if record is None:
                return ""
            left = []
            problems = []
            for device in record.devices:
                if not device.key:
                    continue
                try:
                    remove_one(
                        self.host,
                        self.tools,
                        device.gpu,
                        device.key,
                        options=self._options(),
                        label=f"dra unprepare {namespace}/{name} ({uid})",
                    )
                except VgpuDmError as exc:
                    left.append(device)
                    problems.append(str(exc))
            if left:
                self.checkpoint.put(record._replace(devices=tuple(left)))
                return f"ResourceClaim {namespace}/{name}: " + "; ".join(problems)
            self.files.remove(record)
            self.checkpoint.drop(uid)
            _log.info(
                f"unprepared claim {namespace}/{name}: removed {', '.join(d.key for d in record.devices)}"
            )
        self.on_republish()  # a GPU waiting for its allocations to go may switch layout now
        return ""


def _group(host: HostRoot, device) -> int | None:
    from vgpu_dm.host.mdev import MDEV_DEVICES
    from vgpu_dm.host.pci import PCI_DEVICES, link_name

    where = f"{MDEV_DEVICES}/{device.uuid}" if device.uuid else f"{PCI_DEVICES}/{device.parent}"
    group = link_name(host, f"{where}/iommu_group")
    return int(group) if group and group.isdigit() else None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, VgpuDmError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}" + (f": {exc.filename}" if exc.filename else "")
    return f"{type(exc).__name__}: {exc}"
