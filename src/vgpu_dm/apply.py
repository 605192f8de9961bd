"""Carry out a plan, carefully: under the host lock, after recovering from an interrupted run, with an
intent journal written before the first write, and with exact rollback when a write fails — every GPU
ends either in its target state or exactly in its previous one (same types, same UUIDs, same VFs).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from vgpu_dm import journal, log
from vgpu_dm.errors import ApplyError, ApplyInterrupted, HostError
from vgpu_dm.explain import log_discovery, log_plan
from vgpu_dm.host.inventory import HostTools, Inventory
from vgpu_dm.host.lock import HostLock
from vgpu_dm.host.model import MDEV, VENDOR_VFIO, TypeInfo, VGPUDevice
from vgpu_dm.host.pci import GPU
from vgpu_dm.host.root import HostRoot
from vgpu_dm.plan import GPUPlan, Plan, build_plan
from vgpu_dm.spec.model import ConfigEntry
from vgpu_dm.uuids import RANDOM, STABLE, UUIDSource, machine_id

_log = log.get("apply")


@dataclass(frozen=True)
class ApplyOptions:
    force: bool = False  # remove vGPUs even when a VM holds them
    keep_going: bool = False  # a failed GPU is rolled back alone; the others keep their change
    uuid_mode: str = RANDOM
    lock_timeout: float = 60.0
    # Set by a signal handler (CLI) or the Kubernetes agent to stop: checked before every write, never
    # in the middle of one; the run then rolls back what it changed and raises ApplyInterrupted.
    stop: threading.Event | None = None
    # Do not run nvidia-mig-parted: MIG mode and GPU instances are left as they are.
    skip_mig: bool = False
    # Called as progress(writes done, writes planned) after each write (the CLI's bar on a terminal).
    progress: Callable[[int, int], None] | None = None


class _Stop(Exception):
    """Raised at a stop point when ``ApplyOptions.stop`` is set; carries the step not started."""


def _stop_point(options: ApplyOptions, step: str) -> None:
    if options.stop is not None and options.stop.is_set():
        raise _Stop(step)


@dataclass
class _Undo:
    """Writes made so far on one GPU, so they can be reversed exactly."""

    plan: GPUPlan
    removed: list[VGPUDevice] = field(default_factory=list)
    created: list[VGPUDevice] = field(default_factory=list)
    mixed_size_on: bool = False  # this run switched the GPU to mixed-size mode


def _count(names: list[str]) -> str:
    return ", ".join(f"{c} x {n}" for n, c in Counter(names).items())


def summary(gp: GPUPlan) -> str:
    parts = [
        ("keep", _count([d.type_name for d in gp.keep])),
        ("remove", _count([d.type_name for d in gp.remove])),
        ("create", _count([t.name for t in gp.create])),
    ]
    return f"{gp.gpu.describe()}: " + "; ".join(f"{verb} {what}" for verb, what in parts if what)


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.errno:
        return f"{exc.strerror} (errno {exc.errno})"
    return str(exc)


def apply_config(
    entries: tuple[ConfigEntry, ...],
    host: HostRoot,
    tools: HostTools | None = None,
    source: str = "",
    options: ApplyOptions | None = None,
    config_name: str = "",
) -> Plan:
    """Plan and carry out the selected config; returns the plan that was executed."""
    options = options or ApplyOptions()
    with HostLock(host, timeout=options.lock_timeout, stop=options.stop):
        if options.stop is not None and options.stop.is_set():
            raise ApplyInterrupted("apply interrupted before it changed anything; every GPU is unchanged")
        recover(host, tools, force=options.force)
        if not options.skip_mig:
            # MIG mode and GPU instances first: the vGPUs are planned on what they offer afterwards.
            from vgpu_dm.mig.step import prepare_mig

            prepare_mig(entries, config_name, host, tools, source, options.force, options)
        inventory = Inventory(host, tools)
        log_discovery(inventory)
        plan = build_plan(entries, inventory, source, force=options.force)
        log_plan(plan)
        if options.uuid_mode == STABLE and any(gp.framework != VENDOR_VFIO for gp in plan.changed):
            machine_id(host)  # fail before anything is touched, sriov-manage included
        pending = [gp.gpu for gp in plan.changed if gp.enable_vfs]
        if pending:
            # VFs are a prerequisite, not a vGPU change: enable them, then plan again on what appeared.
            enabled: list[str] = []
            for gpu in pending:
                if options.stop is not None and options.stop.is_set():
                    raise ApplyInterrupted(
                        "\n".join(
                            [
                                "apply interrupted before it changed any vGPU",
                                *(f"{a}: SR-IOV virtual functions were enabled (harmless)" for a in enabled),
                                "every other GPU is unchanged",
                            ]
                        )
                    )
                inventory.vfio.enable_vfs(gpu)
                enabled.append(gpu.describe())
            inventory = Inventory(host, tools)
            log_discovery(inventory)
            plan = build_plan(entries, inventory, source, force=options.force)
            log_plan(plan)
            still = [gp.gpu.describe() for gp in plan.changed if gp.enable_vfs]
            if still:
                raise HostError(f"virtual functions did not appear after sriov-manage -e: {', '.join(still)}")
        for note in plan.notes:
            _log.warning(note)
        if plan.is_noop:
            return plan
        execute(plan, inventory, options, config_name)
        return plan


def execute(
    plan: Plan, inventory: Inventory, options: ApplyOptions | None = None, config_name: str = ""
) -> None:
    """Apply every changing GPU of ``plan``; raises ApplyError after rolling back on failure."""
    options = options or ApplyOptions()
    host = inventory.host
    existing = {d.uuid for g in inventory.gpus for d in inventory.devices(g) if d.uuid}
    uuids = UUIDSource(options.uuid_mode, host, existing)
    new_uuids = {
        gp.gpu.address: [
            uuids.next(gp.gpu.address, t.name) if gp.framework == MDEV else None for t in gp.create
        ]
        for gp in plan.changed
    }
    journal.write(
        host,
        journal.Journal(
            pid=os.getpid(),
            started=time.time(),
            config=config_name,
            gpus=[
                journal.JournalGPU(
                    gpu=gp.gpu.address,
                    framework=gp.framework,
                    before=[journal.device_record(d) for d in (*gp.keep, *gp.remove)],
                    remove=[d.key for d in gp.remove],
                    create=[
                        {"type": t.name, "uuid": u}
                        for t, u in zip(gp.create, new_uuids[gp.gpu.address], strict=True)
                    ],
                )
                for gp in plan.changed
            ],
        ),
    )
    done: list[_Undo] = []
    failures: list[str] = []
    unclean: set[str] = set()
    total = plan.writes
    written = 0

    def wrote(action: str, gpu: GPU, device: VGPUDevice) -> None:
        nonlocal written
        written += 1
        _log.debug(
            f"{gpu.describe()}: {action}d {device.type_name} {device.key}",
            extra=log.fields(
                gpu=gpu.index, address=gpu.address, action=action, type=device.type_name, uuid=device.uuid
            ),
        )
        if options.progress is not None:
            options.progress(written, total)

    changed = plan.changed
    for number, gp in enumerate(changed, 1):
        backend = inventory.backend_for(gp.gpu)
        if backend is None:  # pragma: no cover - the plan only changes GPUs that have a backend
            raise HostError(f"{gp.gpu.describe()}: no vGPU backend")
        _log.info(
            f"[{number}/{len(changed)}] {summary(gp)}",
            extra=log.fields(gpu=gp.gpu.index, address=gp.gpu.address, action="change"),
        )
        undo = _Undo(gp)
        done.append(undo)
        step = ""
        try:
            for device in gp.remove:
                step = f"remove {device.type_name} {device.key} from {gp.gpu.describe()}"
                _stop_point(options, step)
                backend.remove(device)
                undo.removed.append(device)
                wrote("remove", gp.gpu, device)
            if gp.enable_mixed_size:
                step = f"enable mixed-size vGPU mode on {gp.gpu.describe()}"
                _stop_point(options, step)
                backend.set_mixed_size(gp.gpu, True)
                undo.mixed_size_on = True
            for ordinal, (vtype, uuid) in enumerate(zip(gp.create, new_uuids[gp.gpu.address], strict=True)):
                step = f"create {vtype.name} #{ordinal + 1} of {len(gp.create)} on {gp.gpu.describe()}"
                _stop_point(options, step)
                undo.created.append(backend.create(gp.gpu, vtype, ordinal=ordinal, uuid=uuid))
                wrote("create", gp.gpu, undo.created[-1])
            _log.info(
                f"[{number}/{len(changed)}] {gp.gpu.describe()}: done",
                extra=log.fields(gpu=gp.gpu.index, address=gp.gpu.address, action="done"),
            )
        except _Stop:
            _log.warning(f"stop requested: not starting '{step}'; rolling back the changes of this run")
            report, clean = _rollback(done, inventory)
            if not clean:
                unclean.update(u.plan.gpu.address for u in done)
            if unclean:
                _keep_journal_only(host, unclean)
            else:
                journal.clear(host)
            raise ApplyInterrupted(
                "\n".join(
                    [f"apply interrupted before step: {step}", *failures, *report, *_untouched(plan, done)]
                )
            ) from None
        except (OSError, HostError) as exc:
            failure = f"step failed: {step}: {_reason(exc)}"
            if not options.keep_going:
                report, clean = _rollback(done, inventory)
                if clean:
                    journal.clear(host)
                raise ApplyError("\n".join([failure, *report, *_untouched(plan, done)])) from None
            report, clean = _rollback([undo], inventory)
            done.remove(undo)
            failures.append(failure)
            failures.extend(report)
            if not clean:
                unclean.add(gp.gpu.address)
    if options.stop is not None and options.stop.is_set():
        _log.warning(
            "the stop request came during the last write: the plan is complete, nothing to roll back"
        )
    if unclean:
        # Those GPUs are neither here nor there: leave them in the journal for the next apply.
        _keep_journal_only(host, unclean)
    else:
        journal.clear(host)
    if failures:
        raise ApplyError("\n".join([*failures, "--keep-going: the other GPUs kept their new devices"]))


def _keep_journal_only(host: HostRoot, addresses: set[str]) -> None:
    """Keep the journal only for GPUs a rollback could not restore, so the next apply retries them."""
    kept = journal.read(host)
    if kept is not None:
        journal.write(host, replace(kept, gpus=[g for g in kept.gpus if g.gpu in addresses]))


def _untouched(plan: Plan, done: list[_Undo]) -> list[str]:
    touched = {u.plan.gpu.address for u in done}
    return [
        f"{gp.gpu.describe()}: not started, unchanged" for gp in plan.changed if gp.gpu.address not in touched
    ]


def _restore(gpu: GPU, backend, device: VGPUDevice) -> VGPUDevice:
    info = TypeInfo(device.type_name, device.type_id, device.type_name, 1)
    return backend.create(gpu, info, uuid=device.uuid, parent=device.parent)


def _rollback(done: list[_Undo], inventory: Inventory) -> tuple[list[str], bool]:
    """Reverse the recorded writes, newest first; returns one line of state per GPU and "all clean"."""
    lines = []
    clean = True
    for undo in reversed(done):
        gpu = undo.plan.gpu
        backend = inventory.backend_for(gpu)
        problems = []
        for device in reversed(undo.created):
            try:
                backend.remove(device)
            except (OSError, HostError) as exc:
                problems.append(f"could not remove new {device.type_name} {device.key}: {_reason(exc)}")
        if undo.mixed_size_on and not problems:
            try:
                backend.set_mixed_size(gpu, False)
            except HostError as exc:
                # The old devices have one size and fit in mixed-size mode too; only the mode differs.
                _log.warning(f"{gpu.describe()}: mixed-size mode stays on: {exc}")
        for device in reversed(undo.removed):
            try:
                _restore(gpu, backend, device)
            except (OSError, HostError) as exc:
                problems.append(f"could not restore {device.type_name} {device.key}: {_reason(exc)}")
        if problems:
            clean = False
            lines.append(
                f"{gpu.describe()}: NOT fully restored ({'; '.join(problems)}); the next apply retries"
            )
        elif undo.removed or undo.created:
            lines.append(f"{gpu.describe()}: rolled back to its previous devices")
        else:
            lines.append(f"{gpu.describe()}: unchanged")
    return lines, clean


def recover(host: HostRoot, tools: HostTools | None = None, force: bool = False) -> bool:
    """Undo what an interrupted apply left half-done; returns True if there was something to recover."""
    try:
        found = journal.read(host)
    except ValueError as exc:
        _log.warning(str(exc))
        return False
    if found is None:
        return False
    _log.warning(f"found {found.describe()}; putting those GPUs back to their devices from before it")
    inventory = Inventory(host, tools)
    by_address = {g.address: g for g in inventory.gpus}
    problems: list[str] = []
    try:
        for jgpu in found.gpus:
            gpu = by_address.get(jgpu.gpu)
            backend = inventory.backend_for(gpu) if gpu else None
            if gpu is None or backend is None:
                problems.append(f"GPU {jgpu.gpu} from the journal is gone or not in vGPU mode; skipped")
                continue
            _recover_gpu(gpu, backend, jgpu, inventory, force, problems)
    finally:
        for problem in problems:
            _log.warning(problem)
    journal.clear(host)
    return True


def _recover_gpu(
    gpu: GPU, backend, jgpu: journal.JournalGPU, inventory: Inventory, force: bool, problems: list[str]
) -> None:
    before = [journal.record_device(r) for r in jgpu.before]
    before_keys = {(d.key, d.type_id) for d in before}
    current = backend.devices(gpu)
    current_keys = {(d.key, d.type_id) for d in current}
    grabbed = False
    for device in current:
        if (device.key, device.type_id) in before_keys:
            continue
        holders = inventory.holders.holders(device, required=not force)
        what = (
            f"{gpu.describe()}: {device.type_name} {device.key} is in use by {', '.join(map(str, holders))}"
        )
        if holders and not force:
            # A VM took a device the interrupted apply made: keep it, and do not squeeze the old
            # devices back next to it; the plan that follows finishes the GPU instead.
            problems.append(f"{what}; left in place, and the GPU's previous devices were not put back")
            grabbed = True
            continue
        if holders:
            _log.warning(f"--force: removing {what}")
        backend.remove(device)
    if grabbed:
        return
    for device in before:
        if (device.key, device.type_id) not in current_keys:
            _restore(gpu, backend, device)
