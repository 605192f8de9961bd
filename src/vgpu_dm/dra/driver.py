"""The DRA driver's state and logic: which GPUs it owns, what the node offers, prepare and unprepare.

Every vGPU change goes through apply's one-vGPU verbs (host lock, journal, in-use checks, rollback).
Prepare and unprepare take turns (one process lock, as the kubelet-plugin helper does; no wait for it
is unbounded); publishing never takes it, and no lock is held across an API call. Ownership of a GPU
is decided and recorded under the host lock, as apply checks it.

Every call of the kubelet has a deadline (45 s): a prepare spends it on reading the claim, waiting its
turn and the host lock, and answers with an error of its own — which the kubelet retries — rather than
late. What a prepare finished is in the checkpoint, so the retry only answers.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from vgpu_dm import log
from vgpu_dm.apply import ApplyOptions, create_one, recover, remove_one
from vgpu_dm.dra.allocations import Allocations
from vgpu_dm.dra.checkpoint import PREPARED, PREPARING, Checkpoint, ClaimRecord, PreparedDevice
from vgpu_dm.dra.claimfiles import ClaimFiles
from vgpu_dm.dra.devices import CounterSetSpec, DeviceSpec, NodeOffer, build_offer
from vgpu_dm.dra.slices import PLAIN, Published, SlicePublisher
from vgpu_dm.errors import ApplyError, ConfigError, HostError, PlanError, VgpuDmError
from vgpu_dm.host.inventory import HostTools, Inventory
from vgpu_dm.host.lock import HostLock
from vgpu_dm.host.owner import DraOwnership, read_dra_owned, write_dra_owned
from vgpu_dm.host.root import HostRoot
from vgpu_dm.nodeconfig import desired_config
from vgpu_dm.spec import load_spec, read_config_source

_log = log.get("dra")
POD_CLAIM_ANNOTATION = "resource.kubernetes.io/pod-claim-name"
KUBELET_TIMEOUT = 45.0  # the kubelet's deadline for one NodePrepareResources / NodeUnprepareResources
ANSWER_MARGIN = 2.0  # kept back from a call's deadline to build and send the answer
WRITE_TIME = 3.0  # at least this much must be left to start changing a vGPU


class Settings(NamedTuple):
    driver: str
    node: str
    config_file: str
    default_config: str
    plugin_dir: str  # the kubelet's plugin data dir for this driver (DRA socket, checkpoint, metadata)
    cdi_dir: str
    lock_timeout: float = 20.0  # longest wait for the host lock (another apply) or for our turn


class Prepared(NamedTuple):
    devices: list[dict[str, Any]]  # {request_names, pool_name, device_name, cdi_device_ids, share_id}
    error: str = ""


class OutOfTime(HostError):
    """The kubelet's deadline would pass: answer now (it retries)."""


class Driver:
    def __init__(
        self,
        settings: Settings,
        api,
        host: HostRoot,
        tools: HostTools | None = None,
        allocations: Allocations | None = None,
    ):
        self.s = settings
        self.api = api
        self.host = host
        self.tools = tools or HostTools()
        self.pool = settings.node
        self.lock = threading.Lock()  # prepare and unprepare take turns (bounded waits)
        self._publishing = threading.Lock()  # one republish at a time
        self.checkpoint = Checkpoint(f"{settings.plugin_dir}/checkpoint.json")
        self.files = ClaimFiles(settings.driver, settings.plugin_dir, settings.cdi_dir)
        self.publisher = SlicePublisher(api, settings.driver, settings.node)
        # Which devices of the pool claims have allocated (fed by the ResourceClaim watch; unknown until
        # it has listed them).
        self.allocations = allocations or Allocations(settings.driver, settings.node)
        self.offered: dict[str, DeviceSpec] = {}  # every device of the newest generation, by name
        # Every device this node published, or is about to publish, in any generation: the scheduler
        # may have allocated one from an older generation just before a republish.
        self.known: dict[str, DeviceSpec] = {}
        self.problems: tuple[str, ...] = ()
        self.config_name = ""
        self.on_republish: Callable[[], None] = lambda: None  # wakes the publisher loop
        self._frozen_said: dict[str, tuple] = {}  # GPU → the held-back devices last logged
        self._said_problems: tuple[str, ...] = ()
        self.stop: threading.Event | None = None  # set at SIGTERM: ends the publisher's host-lock waits

    # -- turns, time and locks --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _turn(self, what: str, deadline: float | None = None) -> Iterator[None]:
        wait = self.s.lock_timeout if deadline is None else max(0.0, deadline - time.monotonic())
        if not self.lock.acquire(timeout=min(wait, self.s.lock_timeout)):
            raise OutOfTime(
                f"{what}: another prepare or unprepare of this driver is still running; gave up "
                f"waiting for it after {min(wait, self.s.lock_timeout):.0f} s (the kubelet retries)"
            )
        try:
            yield
        finally:
            self.lock.release()

    def _host_lock(self) -> HostLock:
        return HostLock(self.host, timeout=self.s.lock_timeout, stop=self.stop)

    def _lock_wait(self, deadline: float | None) -> float:
        """How long the next host-lock wait may last: --lock-timeout, and within the call's deadline
        with time left for the write itself."""
        if deadline is None:
            return self.s.lock_timeout
        left = deadline - time.monotonic() - WRITE_TIME
        if left <= 0:
            raise OutOfTime(
                "not enough of the kubelet's deadline is left to change a vGPU (the kubelet retries)"
            )
        return min(self.s.lock_timeout, left)

    def _options(self, deadline: float | None = None) -> ApplyOptions:
        return ApplyOptions(lock_timeout=self._lock_wait(deadline), jobs=1)

    # -- start -----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Reconcile the checkpoint with the host, then publish. Before the gRPC servers start."""
        newest, every = self.publisher.published_devices()  # what a previous run published
        with self._turn("start"):
            self.offered = newest
            self.known = {**every, **newest}
            with self._host_lock():
                recover(self.host, self.tools)  # a prepare killed mid-write leaves apply's journal
            for record in list(self.checkpoint.claims.values()):
                if record.state != PREPARED:
                    _log.warning(
                        f"claim {record.namespace}/{record.name} ({record.uid}) was being prepared when the "
                        f"driver stopped; forgetting it (its vGPU, if made, is removed as an orphan)"
                    )
                    self.checkpoint.drop(record.uid)
            # Files of claims killed between writing them and recording the claim as prepared.
            for path in self.files.sweep(self.checkpoint.claims.values()):
                _log.warning(f"removed {path}: it belongs to no prepared claim")
            self._remove_orphans()
            for record in list(self.checkpoint.claims.values()):
                try:
                    self._ensure(record)
                except Exception as exc:
                    _log.error(f"claim {record.namespace}/{record.name}: {_reason(exc)}")
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
        """Read the node's label and the config, take or give back GPUs, publish the pool.

        Never under the prepare/unprepare lock. The decision — inventory, which GPUs are ours, what each
        offers — is made under the host lock and recorded before publishing; the API calls and
        sriov-manage are outside it (sriov-manage under the host lock alone)."""
        with self._publishing:
            labels = self.api.node_labels()
            name = desired_config(labels, self.s.default_config)
            try:
                data, source = read_config_source(self.s.config_file)
                self.config_name, entries = load_spec(data, source).select(name)
            except ConfigError as exc:
                # Keep what is published: withdrawing devices over a typo would strand pending pods.
                _log.error(f"config {name!r}: {exc}; the published devices stay as they are")
                self.problems = (f"config {name!r}: {exc}",)
                return None
            self._enable_vfs(entries)
            allocated = self.allocations.devices()
            # Under the host lock no prepare changes a vGPU (it creates under that lock too), and
            # apply checks ownership under it: the decision and its record are consistent with both.
            with self._host_lock():
                offer, owned = self._decide(entries, allocated)
                self.known.update(offer.by_name())
            result = self.publisher.publish(offer)
            withdrawn = result.mode == PLAIN and bool(offer.counter_sets)  # counters not kept
            self.offered = {d.name: d for d in offer.devices if not (d.mixed and withdrawn)}
            kept = {d.gpu for d in self.offered.values()}
            if set(owned) - kept:
                # Offered nothing after all (the server dropped their counters): not ours to hold,
                # unless a claim was prepared there meanwhile.
                with self._host_lock():
                    record = self._owned()
                    held = kept | {d.gpu for d in self.checkpoint.devices()}
                    left = {a: t for a, t in record.gpus.items() if a in held}
                    if left != record.gpus:
                        write_dra_owned(self.host, DraOwnership(self.s.driver, self.s.node, left))
            if offer.problems != self._said_problems:  # said once per change, not at every resync
                self._said_problems = offer.problems
                for problem in offer.problems:
                    _log.warning(problem)
            self.problems = offer.problems + result.problems
            return result

    def _refusals(self, inventory: Inventory, owned: DraOwnership) -> dict[str, str]:
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
        return refuse

    def _decide(self, entries, allocated: frozenset[str] | None) -> tuple[NodeOffer, dict[str, float]]:
        """Under the host lock: what to offer, and the ownership record written for it. A prepare may
        record a claim meanwhile; its devices are in the checkpoint from before its vGPU exists."""
        inventory = Inventory(self.host, self.tools)
        owned = self._owned()
        prepared = {d.device: d for d in self.checkpoint.devices()}
        offer, _ = build_offer(entries, inventory, self._refusals(inventory, owned))
        offer = self._keep_allocated(offer, prepared, allocated)
        new_owned = dict(owned.gpus)
        for address in offer.gpus():
            new_owned.setdefault(address, time.time())
        held = offer.gpus() | {d.gpu for d in prepared.values()}
        for address in list(new_owned):
            if address not in held:
                del new_owned[address]  # nothing offered and nothing prepared: back to static layouts
        if new_owned != owned.gpus:
            write_dra_owned(self.host, DraOwnership(self.s.driver, self.s.node, new_owned))
        return offer, new_owned

    def _enable_vfs(self, entries) -> None:
        """SR-IOV GPUs the config offers whose VFs are off: which framework they use shows only once the
        VFs exist, and enabling them is harmless. Under the host lock (sriov-manage may take minutes),
        never under our own."""
        inventory = Inventory(self.host, self.tools)
        _, offers = build_offer(entries, inventory, self._refusals(inventory, self._owned()))
        wanted = {o.gpu.address for o in offers.values() if o.framework == "sriov-vfs-off"}
        if not wanted:
            return
        with self._host_lock():
            inventory = Inventory(self.host, self.tools, writable=True)
            for gpu in inventory.gpus:
                if gpu.address not in wanted or not inventory.vfio.needs_vfs(gpu):
                    continue
                try:
                    inventory.vfio.enable_vfs(gpu)
                except HostError as exc:
                    _log.error(f"{gpu.describe()}: {exc}")

    def _keep_allocated(
        self, offer: NodeOffer, prepared: dict[str, PreparedDevice], allocated: frozenset[str] | None
    ) -> NodeOffer:
        """A GPU whose allocated devices the new offer does not contain keeps exactly those devices
        (and nothing new) until they are released: devices are never withdrawn from under a claim.
        With ``allocated`` unknown (the claims watch has not listed them), a GPU whose layout changes
        keeps every device it has published until they are known."""
        new = offer.by_name()
        if allocated is None:
            held = list(self.offered.values())
        else:
            names = sorted(set(prepared) | allocated)
            held = [d for d in (self.offered.get(n) or self.known.get(n) for n in names) if d is not None]
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
            said = (self.config_name, allocated is None, tuple(d.name for d in kept))
            if self._frozen_said.get(gpu) == said:
                continue
            self._frozen_said[gpu] = said
            if allocated is None:
                _log.warning(
                    f"GPU {kept[0].gpu_index} ({gpu}): which of its {len(kept)} published device(s) are "
                    f"allocated is not known yet (the ResourceClaim watch has not listed them); they stay "
                    f"published and the GPU follows config {self.config_name!r} once that is known"
                )
            else:
                _log.warning(
                    f"GPU {kept[0].gpu_index} ({gpu}): {len(kept)} allocated device(s) of the previous "
                    f"layout ({', '.join(d.name for d in kept)}) stay published alone until released; the "
                    f"GPU follows config {self.config_name!r} afterwards"
                )
        devices = [d for d in offer.devices if d.gpu not in frozen]
        counter_sets = [c for c in offer.counter_sets if c.gpu not in frozen]
        for gpu, kept in frozen.items():
            devices.extend(kept)
            if any(d.mixed for d in kept):
                # The GPU's own counters (the new offer has them unless the GPU left the config).
                same = next((c for c in offer.counter_sets if c.gpu == gpu), None)
                old = next(d for d in kept if d.mixed)
                counter_sets.append(
                    same
                    or CounterSetSpec(
                        gpu,
                        old.gpu_index,
                        sum(d.framebuffer_gb for d in kept),
                        sum(d.uses_vf for d in kept) or None,
                    )
                )
        devices.sort(key=lambda d: (d.gpu_index, d.name))
        return offer._replace(devices=tuple(devices), counter_sets=tuple(counter_sets))

    # -- prepare ---------------------------------------------------------------------------------------

    def prepare(self, namespace: str, uid: str, name: str, deadline: float | None = None) -> Prepared:
        """Prepare one claim; ``deadline`` (monotonic) is the kubelet's for this call."""
        deadline = (deadline if deadline is not None else time.monotonic() + KUBELET_TIMEOUT) - ANSWER_MARGIN
        try:
            claim = self.api.get_claim(namespace, name, deadline=deadline)
        except Exception as exc:
            return Prepared([], f"reading ResourceClaim {namespace}/{name}: {_reason(exc)}")
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
        try:
            if any(r.get("device") not in self.known for r in results):
                self._learn_published()  # allocated from a generation published before a restart
            with self._turn(f"ResourceClaim {namespace}/{name}", deadline):
                record = self.checkpoint.get(uid)
                if record is not None and record.state == PREPARED:
                    record = self._ensure(record, deadline)
                else:
                    record = self._prepare(namespace, uid, name, meta, results, deadline)
                return Prepared(self._answer(record))
        except Exception as exc:  # any failure is this claim's alone: the kubelet retries it
            return Prepared([], f"ResourceClaim {namespace}/{name}: {_reason(exc)}")

    def _learn_published(self) -> None:
        _newest, every = self.publisher.published_devices()
        for spec in every.values():
            self.known.setdefault(spec.name, spec)

    def _prepare(
        self, namespace: str, uid: str, name: str, meta: dict, results: list[dict], deadline: float | None
    ) -> ClaimRecord:
        wanted = []
        owned = self._owned()
        for result in results:
            if result.get("adminAccess"):
                raise HostError(
                    f"device {result['device']} is allocated with admin access, which a vGPU does not "
                    f"support: a vGPU exists only for the claim it was made for (request the device "
                    f"without adminAccess)"
                )
            # The allocation is the scheduler's: any device this node published, in any generation.
            spec = self.offered.get(result["device"]) or self.known.get(result["device"])
            if spec is None:
                raise HostError(f"device {result['device']} was never offered by this node's DRA driver")
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
                made.append(self._create(want, f"dra claim {namespace}/{name} ({uid})", deadline))
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

    def _create(self, want: PreparedDevice, label: str, deadline: float | None = None) -> PreparedDevice:
        spec = self.offered.get(want.device) or self.known.get(want.device)
        mixed = bool(spec and spec.mixed)
        try:
            device = create_one(
                self.host,
                self.tools,
                want.gpu,
                want.type_name,
                mixed_size=mixed,
                options=self._options(deadline),
                label=label,
            )
        except (PlanError, ApplyError) as exc:
            raise HostError(f"creating {want.type_name} on {want.gpu} for {want.device}: {exc}") from None
        return want._replace(
            framework=device.framework,
            key=device.key,
            iommu_group=device.iommu_group if device.iommu_group is not None else _group(self.host, device),
        )

    def _ensure(self, record: ClaimRecord, deadline: float | None = None) -> ClaimRecord:
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
            label = f"dra claim {record.namespace}/{record.name} ({record.uid})"
            devices.append(self._create(device, label, deadline))
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

    def unprepare(self, namespace: str, uid: str, name: str, deadline: float | None = None) -> str:
        """ "" on success (also for a claim this driver never prepared), else why (the kubelet retries)."""
        deadline = (deadline if deadline is not None else time.monotonic() + KUBELET_TIMEOUT) - ANSWER_MARGIN
        try:
            with self._turn(f"ResourceClaim {namespace}/{name}", deadline):
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
                            options=self._options(deadline),
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
        except Exception as exc:
            return f"ResourceClaim {namespace}/{name}: {_reason(exc)}"
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
