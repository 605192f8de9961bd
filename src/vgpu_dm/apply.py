"""Carry out a plan, carefully: under the host lock, after recovering from an interrupted run, with an
intent journal written before the first write, and with exact rollback when a write fails — every GPU
ends either in its target state or exactly in its previous one (same types, same UUIDs, same VFs).

GPUs are independent, so up to ``ApplyOptions.jobs`` of them are changed at once (one thread each; the
time goes into the driver's writes, not Python). Everything else stays single: one lock, one journal
written before the first write, one report in plan order. A failed GPU makes the others stop before
their next write, then every GPU changed so far is rolled back (with ``keep_going`` only the failed one).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, NamedTuple

from vgpu_dm import journal, log
from vgpu_dm.errors import ApplyError, ApplyInterrupted, HostError, PlanError, VgpuDmError
from vgpu_dm.explain import log_discovery, log_plan
from vgpu_dm.host.holders import HolderIndex
from vgpu_dm.host.inventory import HostTools, Inventory
from vgpu_dm.host.lock import HostLock
from vgpu_dm.host.model import MDEV, VENDOR_VFIO, TypeInfo, VGPUDevice
from vgpu_dm.host.pci import GPU
from vgpu_dm.host.root import HostRoot
from vgpu_dm.plan import GPUPlan, Plan, build_plan, plan_create_one, plan_remove_one, refuse_dra_owned
from vgpu_dm.spec.model import ConfigEntry
from vgpu_dm.uuids import RANDOM, STABLE, UUIDSource, machine_id

if TYPE_CHECKING:
    from vgpu_dm.hooks.spec import HooksFile

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
    # How many GPUs are changed at once: 1 = one after another; 0 = automatic (one per GPU being
    # changed, up to AUTO_JOBS). The CLI's --jobs defaults to 0; library callers opt in.
    jobs: int = 1
    # While a forced removal waits for a VM to release the device, say so this often (seconds).
    watchdog_interval: float = 5.0
    # libvirt domains (names, UUIDs or "all") that are not running and whose vGPUs may be removed.
    allow_assigned: tuple[str, ...] = ()
    # The operator's hooks, run at the stage boundaries of apply_config.
    hooks: HooksFile | None = None
    # "mdevctl": after applying, make mdevctl's definitions of the GPUs the config selects match them.
    persist: str | None = None
    # Called with the GPUs about to change right before the first change of the host (set by
    # apply_config: it runs the pre-change hooks once).
    before_change: Callable[[Iterable[GPU]], None] | None = None
    # A MIG mode change that waits for a GPU reset keeps its pending mode when the run fails (the
    # caller reboots for it: the agent's --with-reboot); otherwise the pending mode is set back.
    keep_pending_mig: bool = False
    # Called once when the MIG stage has succeeded (MIG mode and GPU instances are as the config needs),
    # before vGPUs are put back or made and SR-IOV VFs enabled; not when there is no MIG stage or it
    # fails. The Kubernetes agent starts the host units it stopped for the MIG change here, as upstream.
    after_mig: Callable[[], None] | None = None


# Automatic --jobs: one thread per GPU being changed, at most this many. Each thread mostly waits for
# the driver; 8 covers the common 8-GPU server in one round while bounding threads on larger hosts.
AUTO_JOBS = 8


def workers_for(jobs: int, gpus: int) -> int:
    """Threads for ``gpus`` changing GPUs at ``jobs`` (0 = automatic)."""
    limit = AUTO_JOBS if jobs <= 0 else jobs
    return max(1, min(limit, gpus))


class _Stop(Exception):
    """Raised at a stop point when ``ApplyOptions.stop`` is set; carries the step not started."""


class _Abort(Exception):
    """Raised at a stop point when another GPU of this run failed (without keep_going)."""


def _stop_point(options: ApplyOptions, step: str, abort: threading.Event | None = None) -> None:
    if options.stop is not None and options.stop.is_set():
        raise _Stop(step)
    if abort is not None and abort.is_set():
        raise _Abort(step)


@dataclass
class _Undo:
    """Writes made so far on one GPU, so they can be reversed exactly."""

    plan: GPUPlan
    removed: list[VGPUDevice] = field(default_factory=list)
    created: list[VGPUDevice] = field(default_factory=list)
    mixed_size_on: bool = False  # this run switched the GPU to mixed-size mode
    mixed_size_off: bool = False  # this run switched the GPU back to equal-size mode


@dataclass
class _Outcome:
    """How one GPU's part of the run ended."""

    undo: _Undo
    started: bool = False  # its summary was logged and it reached its first write
    stopped_at: str = ""  # the step not started because of a stop request
    failure: str = ""  # "step failed: …" when a write failed
    rolled_back: list[str] = field(default_factory=list)  # keep_going: this GPU's own rollback report
    clean: bool = True  # its own rollback (keep_going) restored it fully


def _count(names: list[str]) -> str:
    return ", ".join(f"{c} x {n}" for n, c in Counter(names).items())


def summary(gp: GPUPlan) -> str:
    parts = [
        ("", f"{gp.mig.current.describe()} -> {gp.mig.target.describe()}" if gp.mig else ""),
        ("keep", _count([d.type_name for d in gp.keep])),
        ("remove", _count([d.type_name for d in gp.remove])),
        ("create", _count([t.name for t in gp.create])),
    ]
    return f"{gp.gpu.describe()}: " + "; ".join(f"{verb} {what}".strip() for verb, what in parts if what)


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
    """Plan and carry out the selected config; returns the plan that was executed.

    With ``options.hooks``, the hooks run under the host lock: apply-start first, pre-change right
    before the first change, post-change after it, apply-exit last (vgpu_dm.hooks.runner).
    """
    options = options or ApplyOptions()
    tools = tools or HostTools()
    with HostLock(host, timeout=options.lock_timeout, stop=options.stop):
        if options.hooks is None:
            return _apply_locked(entries, host, tools, source, options, config_name)
        from vgpu_dm.hooks.runner import FAILED, INTERRUPTED, SUCCESS, UNCHANGED, HookSession

        session = HookSession(options.hooks, host, source, config_name, options.stop)
        options = replace(options, before_change=session.before_change)
        try:
            session.apply_start()
            plan = _apply_locked(entries, host, tools, source, options, config_name)
        except BaseException as exc:
            late = session.finish(INTERRUPTED if isinstance(exc, ApplyInterrupted) else FAILED, exc)
            if late and isinstance(exc, VgpuDmError):
                raise _followed_by(exc, [f"after that: {line}" for line in late]) from None
            for line in late:
                _log.error(line)
            raise
        session.finish(UNCHANGED if plan.is_noop else SUCCESS)
        return plan


def _followed_by(error: VgpuDmError, lines: list[str]) -> VgpuDmError:
    """``error`` (same type, for the front ends' exit codes) with ``lines`` after its own message."""
    import copy

    longer = copy.copy(error)
    if isinstance(longer, PlanError):
        longer.problems = [*longer.problems, *lines]
    longer.args = ("\n".join([str(error), *lines]), *error.args[1:])
    return longer


def _apply_locked(
    entries: tuple[ConfigEntry, ...],
    host: HostRoot,
    tools: HostTools | None,
    source: str,
    options: ApplyOptions,
    config_name: str,
) -> Plan:
    if options.stop is not None and options.stop.is_set():
        raise ApplyInterrupted("apply interrupted before it changed anything; every GPU is unchanged")
    host.check_before_changes()
    # First of all, the MIG step included: a GPU the DRA driver owns is no static layout's to change.
    refuse_dra_owned(entries, Inventory(host, tools))
    if options.persist:
        from vgpu_dm.persist import check_persist

        check_persist(options.persist, entries, Inventory(host, tools))
    if options.before_change is not None:
        # The first change may be a recovery, the MIG step or enabling VFs; whichever it is, the first
        # call (the pre-change hooks) names every GPU the run is going to change.
        announce, first = (
            _gpus_to_change(entries, host, tools, source, options, config_name),
            options.before_change,
        )
        options = replace(options, before_change=lambda gpus: first([*announce, *gpus]))
    recover(
        host,
        tools,
        force=options.force,
        watchdog_interval=options.watchdog_interval,
        before_change=options.before_change,
    )
    from vgpu_dm.apply_mig import plan_with_mig

    inventory = Inventory(host, tools, writable=True)
    log_discovery(inventory)
    plan = plan_with_mig(
        entries,
        inventory,
        source,
        force=options.force,
        skip_mig=options.skip_mig,
        allow_assigned=options.allow_assigned,
    )
    log_plan(plan)
    if options.persist:
        from vgpu_dm.persist import check_plan

        check_plan(plan, inventory, options.force, options.allow_assigned)  # before VFs are enabled
    if options.uuid_mode == STABLE and any(gp.framework != VENDOR_VFIO for gp in plan.changed):
        machine_id(host)  # fail before anything is touched, sriov-manage included
    # One number per GPU this run changes, kept from the first write to the last.
    touched = [gp.gpu for gp in plan.changed]
    if plan.mig:  # GPUs a reset may empty are taken down and put back
        touched += [b.gpu for b in plan.mig.bystanders if b.devices]
    numbers = Numbers({gpu.address: i for i, gpu in enumerate(touched, 1)}, len(touched))
    if plan.mig_changes or (plan.mig and plan.mig.cancel_pending):
        final = _apply_with_mig(plan, entries, inventory, tools, source, options, config_name, numbers)
    else:
        final = plan = _apply_vgpus(plan, entries, inventory, tools, source, options, config_name, numbers)
    if options.persist:
        from vgpu_dm.persist import sync_mdevctl

        # The definitions follow what is on the GPUs now (after a no-op apply too).
        sync_mdevctl(final, Inventory(host, tools), options.force, options.allow_assigned)
    return plan


def _gpus_to_change(
    entries: tuple[ConfigEntry, ...],
    host: HostRoot,
    tools: HostTools | None,
    source: str,
    options: ApplyOptions,
    config_name: str,
) -> list[GPU]:
    """Read-only, before the first change: the GPUs this run will change — those of an interrupted
    run's journal (recovered first), those whose MIG layout changes, and those the plan for the host
    as it is changes. What cannot be read here is left to the later calls, which add their GPUs."""
    inventory = Inventory(host, tools)
    by_address = {g.address: g for g in inventory.gpus}
    found: dict[str, GPU] = {}
    try:
        interrupted = journal.read(host)
        for jgpu in interrupted.gpus if interrupted else ():
            if jgpu.gpu in by_address:
                found[jgpu.gpu] = by_address[jgpu.gpu]
        from vgpu_dm.apply_mig import plan_with_mig

        plan = plan_with_mig(
            entries,
            inventory,
            source,
            force=options.force,
            skip_mig=options.skip_mig,
            strict=False,
            allow_assigned=options.allow_assigned,
        )
        for gp in plan.changed:
            found.setdefault(gp.gpu.address, gp.gpu)
        for by in plan.mig.bystanders if plan.mig else ():
            if by.devices:  # taken down and put back if the MIG change needs a GPU reset
                found.setdefault(by.gpu.address, by.gpu)
    except (ValueError, OSError, HostError) as exc:
        _log.debug(f"the GPUs this run changes are named as it reaches them: {exc}")
    return list(found.values())


def _settle_mdevctl(inventory: Inventory, enabled: list[GPU]) -> None:
    """mdevctl may start its definitions on VFs just enabled, some time after sriov-manage returned:
    wait for that before the plan is made on them (host/mdevctl.py settle_autostart)."""
    addresses = {g.address for g in enabled}
    parents = [vf for g in inventory.gpus if g.address in addresses for vf in g.vfs]
    if parents and inventory.host.exists("etc/mdevctl.d"):
        from vgpu_dm.host.mdevctl import settle_autostart

        for warning in settle_autostart(inventory.host, parents):
            _log.warning(warning)


class Numbers(NamedTuple):
    """``[i/n]`` of each GPU in a run's log lines."""

    of: dict[str, int]
    total: int

    def label_of(self, line: str) -> str:
        """``[i/n] `` of the GPU a "GPU <i> (<address>): …" line is about ("" if none)."""
        head = line.split(": ", 1)[0]
        for address, number in self.of.items():
            if head.endswith(f"({address})"):
                return f"[{number}/{self.total}] "
        return ""

    def label(self, gpu: GPU, fallback: int, count: int) -> str:
        if gpu.address in self.of:
            return f"[{self.of[gpu.address]}/{self.total}]"
        return f"[{fallback}/{count}]"


def _apply_vgpus(
    plan: Plan,
    entries: tuple[ConfigEntry, ...],
    inventory: Inventory,
    tools: HostTools,
    source: str,
    options: ApplyOptions,
    config_name: str,
    numbers: Numbers | None = None,
) -> Plan:
    """The vGPU part: SR-IOV VFs first where the plan needs them, then the vGPUs (and mdevctl's
    definitions checked against them); returns the plan carried out."""
    host = inventory.host
    pending = [gp.gpu for gp in plan.changed if gp.enable_vfs]
    if pending:
        # VFs are a prerequisite, not a vGPU change: enable them, then plan again on what appeared.
        if options.before_change is not None:
            options.before_change([gp.gpu for gp in plan.changed])
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
            try:
                inventory.vfio.enable_vfs(gpu)
            except HostError as exc:
                if enabled:
                    raise HostError(
                        f"{exc}\n(SR-IOV VFs were enabled on {', '.join(enabled)}; that is harmless)"
                    ) from None
                raise
            enabled.append(gpu.describe())
        inventory = Inventory(host, tools, writable=True)
        _settle_mdevctl(inventory, pending)
        log_discovery(inventory)
        plan = build_plan(
            entries, inventory, source, force=options.force, allow_assigned=options.allow_assigned
        )
        plan = plan._replace(vfs_enabled=frozenset(g.address for g in pending))
        log_plan(plan)
        still = [gp.gpu.describe() for gp in plan.changed if gp.enable_vfs]
        if still:
            raise HostError(f"virtual functions did not appear after sriov-manage -e: {', '.join(still)}")
    if options.persist:
        from vgpu_dm.persist import check_plan

        check_plan(plan, inventory, options.force, options.allow_assigned)
    else:
        from vgpu_dm.persist import mdevctl_conflicts

        plan = plan._replace(notes=(*plan.notes, *mdevctl_conflicts(plan, inventory)))
    for note in plan.notes:
        _log.warning(note)
    if not plan.is_noop:
        execute(plan, inventory, options, config_name, numbers)
    return plan


def _removal_plan(gpus: list[tuple[GPU, str, tuple[VGPUDevice, ...], object]]) -> Plan:
    """A plan that only removes these devices (with the journal and exact rollback of any removal)."""
    return Plan(
        gpus=tuple(
            GPUPlan(gpu, fw, None, {}, remove=devices, mig=mig)  # type: ignore[arg-type]
            for gpu, fw, devices, mig in gpus
            if devices
        )
    )


def _restore_devices(
    host: HostRoot, tools: HostTools, removed: list[tuple[GPU, tuple[VGPUDevice, ...]]]
) -> list[str]:
    """Put removed devices back as they were (same UUIDs or VFs); one line per GPU."""
    inventory = Inventory(host, tools, writable=True)
    by_address = {g.address: g for g in inventory.gpus}
    lines = []
    for old, devices in removed:
        if not devices:
            continue
        gpu = by_address.get(old.address)
        backend = inventory.backend_for(gpu) if gpu else None
        problems = []
        for device in devices:
            try:
                if gpu is None or backend is None:
                    raise HostError("the GPU has no vGPU parents now")
                _restore(gpu, backend, device)
            except (OSError, HostError) as exc:
                problems.append(f"{device.type_name} {device.key}: {_reason(exc)}")
        if problems:
            lines.append(f"{old.describe()}: NOT all vGPUs restored ({'; '.join(problems)}); run apply again")
        else:
            lines.append(f"{old.describe()}: its {len(devices)} vGPU(s) were put back as they were")
    return lines


def _apply_with_mig(
    plan: Plan,
    entries: tuple[ConfigEntry, ...],
    inventory: Inventory,
    tools: HostTools,
    source: str,
    options: ApplyOptions,
    config_name: str,
    numbers: Numbers,
) -> Plan:
    """The MIG stage (apply_mig.py) between the removals it needs and the vGPUs of the new layout;
    returns the plan of those vGPUs."""
    from vgpu_dm.apply_mig import MigStage, MigStepError

    host = inventory.host
    for note in plan.notes:
        _log.warning(note)
    if options.before_change is not None:
        options.before_change([gp.gpu for gp in plan.changed])
    stage = MigStage(plan, inventory, tools, keep_pending=options.keep_pending_mig)
    changing = [(gp.gpu, gp.framework, gp.remove, gp.mig) for gp in plan.mig_changes]
    removed: list[tuple[GPU, tuple[VGPUDevice, ...]]] = []
    if options.stop is not None and options.stop.is_set():
        raise ApplyInterrupted("apply interrupted before it changed anything; every GPU is unchanged")
    first = _removal_plan(changing)
    if first.gpus:
        # The journal and exact rollback of any removal; a failure here leaves every GPU as it was.
        execute(first, inventory, options, config_name, numbers, done="vGPUs removed; the MIG change is next")
        removed = [(gpu, devices) for gpu, _, devices, _ in changing]

    def take_down(people) -> None:
        fresh = Inventory(host, tools, writable=True)
        execute(
            _removal_plan([(b.gpu, b.devices[0].framework, b.devices, None) for b in people]),
            fresh,
            options,
            config_name,
            numbers,
            done="vGPUs taken down for the GPU reset; they come back as they were",
        )
        removed.extend((b.gpu, b.devices) for b in people)
        # Until they are back, the journal keeps them: a run killed in between leaves them for the next
        # apply's recovery to put back (same UUIDs or VFs), also on GPUs the config does not select.
        journal.write(
            host,
            journal.Journal(
                pid=os.getpid(),
                started=time.time(),
                config=config_name,
                gpus=[
                    journal.JournalGPU(
                        gpu=b.gpu.address,
                        framework=b.devices[0].framework,
                        before=[journal.device_record(d) for d in b.devices],
                        remove=[d.key for d in b.devices],
                        create=[],
                    )
                    for b in people
                ],
            ),
        )

    def undo(exc: Exception) -> list[str]:
        lines = stage.put_back()
        lines += _restore_devices(host, tools, removed)
        if not any("NOT all" in line for line in lines):
            journal.clear(host)
        return [str(exc), *lines]

    try:
        stage.run(take_down)
    except MigStepError as exc:
        raise type(exc)("\n".join(undo(exc))) from None
    except ApplyInterrupted as exc:
        raise ApplyInterrupted("\n".join(undo(exc))) from None
    except ApplyError as exc:  # a bystander's removal failed (execute rolled it back)
        raise ApplyError("\n".join(undo(exc))) from None
    if options.after_mig is not None:
        options.after_mig()
    # GPUs a reset emptied get their vGPUs back as they were before the new ones are planned.
    back = [(b.gpu, b.devices) for b in stage.taken_down]
    restored = _restore_devices(host, tools, back)
    for line in restored:
        (_log.error if "NOT all" in line else _log.info)(f"{numbers.label_of(line)}{line}")
    if back and not any("NOT all" in line for line in restored):
        journal.clear(host)
    try:
        fresh = Inventory(host, tools, writable=True)
        log_discovery(fresh)
        after = build_plan(entries, fresh, source, force=options.force, allow_assigned=options.allow_assigned)
        log_plan(after)
        return _apply_vgpus(after, entries, fresh, tools, source, options, config_name, numbers)
    except (ApplyError, PlanError, HostError) as exc:
        restorable = [(g, d) for g, d in removed if all(g.address != b.gpu.address for b in stage.taken_down)]
        lines = stage.put_back() + _restore_devices(host, tools, restorable)
        kind = ApplyInterrupted if isinstance(exc, ApplyInterrupted) else ApplyError
        raise kind("\n".join([str(exc), "the MIG change is undone:", *lines])) from None


def execute(
    plan: Plan,
    inventory: Inventory,
    options: ApplyOptions | None = None,
    config_name: str = "",
    numbers: Numbers | None = None,
    done: str = "done",
) -> None:
    """Apply every changing GPU of ``plan``; raises ApplyError after rolling back on failure.
    ``done`` ends each GPU's log lines."""
    options = options or ApplyOptions()
    host = inventory.host
    if options.before_change is not None:
        options.before_change([gp.gpu for gp in plan.changed])
    existing = {d.uuid for g in inventory.gpus for d in inventory.devices(g) if d.uuid}
    uuids = UUIDSource(options.uuid_mode, host, existing)
    new_uuids = {
        gp.gpu.address: [
            (gp.pin(n)[0] or uuids.next(gp.gpu.address, t.name)) if gp.framework == MDEV else None
            for n, t in enumerate(gp.create)
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
                    mixed_before=(False if gp.enable_mixed_size else True if gp.disable_mixed_size else None),
                    create=[
                        {"type": t.name, "uuid": u}
                        for t, u in zip(gp.create, new_uuids[gp.gpu.address], strict=True)
                    ],
                )
                for gp in plan.changed
            ],
        ),
    )
    backends = {}
    for gp in plan.changed:
        backend = inventory.backend_for(gp.gpu)
        if backend is None:  # pragma: no cover - the plan only changes GPUs that have a backend
            raise HostError(f"{gp.gpu.describe()}: no vGPU backend")
        backends[gp.gpu.address] = backend
    workers = workers_for(options.jobs, len(plan.changed))
    abort = threading.Event()  # a GPU failed: the others start no new write
    total = plan.writes
    written = 0
    counting = threading.Lock()

    def wrote(action: str, gpu: GPU, device: VGPUDevice) -> None:
        nonlocal written
        with counting:  # one progress call at a time, in order, whichever thread wrote
            written += 1
            _log.debug(
                f"{gpu.describe()}: {action}d {device.type_name} {device.key}",
                extra=log.fields(
                    gpu=gpu.index, address=gpu.address, action=action, type=device.type_name, uuid=device.uuid
                ),
            )
            if options.progress is not None:
                options.progress(written, total)

    changed_plans = list(plan.changed)
    # Devices a VM holds (only --force plans remove them): their removal waits for the VM, watched.
    held = frozenset(
        d.key for gp in changed_plans for d in gp.remove if inventory.holders.holders(d, required=False)
    )

    def run(numbered: tuple[int, GPUPlan]) -> _Outcome:
        number, gp = numbered
        where = (
            numbers.label(gp.gpu, number, len(changed_plans))
            if numbers
            else f"[{number}/{len(changed_plans)}]"
        )
        backend, uuids = backends[gp.gpu.address], new_uuids[gp.gpu.address]
        outcome = _apply_gpu(
            gp, backend, uuids, options, abort, wrote, where, host, held, options.watchdog_interval, done
        )
        if outcome.failure and options.keep_going:
            outcome.rolled_back, outcome.clean = _rollback(
                [outcome.undo], inventory, plan_vfs=plan.vfs_enabled
            )
            # Said now, in its place among the GPUs' lines (GPU order with --jobs 1), not after the
            # GPUs that came later.
            for line in (outcome.failure, *outcome.rolled_back):
                _log.error(
                    f"{where} {line}",
                    extra=log.fields(gpu=gp.gpu.index, address=gp.gpu.address, action="failed"),
                )
        return outcome

    outcomes = _map(run, list(enumerate(changed_plans, 1)), workers)
    failures = [line for o in outcomes if o.failure for line in (o.failure, *o.rolled_back)]
    unclean = {o.undo.plan.gpu.address for o in outcomes if not o.clean}
    # GPUs whose changes are still in place (keep_going already put a failed GPU back by itself).
    changed = [o.undo for o in outcomes if o.started and not (o.failure and options.keep_going)]
    stopped = next((o.stopped_at for o in outcomes if o.stopped_at), "")
    if stopped:
        _log.warning(f"stop requested: not starting '{stopped}'; rolling back the changes of this run")
        report, clean = _rollback(changed, inventory, workers, plan.vfs_enabled)
        if not clean:
            unclean.update(u.plan.gpu.address for u in changed)
        if unclean:
            _keep_journal_only(host, unclean)
        else:
            journal.clear(host)
        interrupted = ApplyInterrupted(
            "\n".join(
                [f"apply interrupted before step: {stopped}", *failures, *report, *_untouched(plan, outcomes)]
            )
        )
        if options.keep_going:
            interrupted.logged = tuple(failures)  # each was logged when its GPU failed
        raise interrupted
    if failures and not options.keep_going:
        report, clean = _rollback(changed, inventory, workers, plan.vfs_enabled)
        if clean:
            journal.clear(host)
        raise ApplyError("\n".join([*failures, *report, *_untouched(plan, outcomes)]))
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
        failed = ", ".join(o.undo.plan.gpu.describe() for o in outcomes if o.failure)
        error = ApplyError(
            "\n".join([*failures, f"--keep-going: the other GPUs kept their new devices (failed: {failed})"])
        )
        error.logged = tuple(failures)  # each was logged when its GPU failed
        raise error


def _map(func, items: list, workers: int) -> list:
    """``[func(x) for x in items]``, on up to ``workers`` threads; results in the order of ``items``."""
    if workers <= 1 or len(items) <= 1:
        return [func(item) for item in items]
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    with ThreadPoolExecutor(
        max_workers=workers, thread_name_prefix="vgpu-dm-gpu", initializer=_leave_signals_to_main
    ) as pool:
        futures = [pool.submit(func, item) for item in items]
        pending = set(futures)
        while pending:
            # Wake up now and then: Python runs signal handlers (the CLI's stop request) only in the
            # main thread, and only between bytecodes.
            _, pending = wait(pending, timeout=0.05, return_when=FIRST_COMPLETED)
        return [f.result() for f in futures]


def _leave_signals_to_main() -> None:
    """Block SIGINT/SIGTERM in a worker so the kernel hands them to the main thread.

    A process-directed signal goes to any thread that does not block it. Caught by a worker, it only
    flags the interpreter, and the stop request waits until the main thread's next wake-up while the
    other workers keep writing; caught by the main thread, it interrupts its wait at once.
    """
    import signal

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def _apply_gpu(
    gp: GPUPlan,
    backend,
    uuids: list[str | None],
    options: ApplyOptions,
    abort: threading.Event,
    wrote: Callable[[str, GPU, VGPUDevice], None],
    where: str,
    host: HostRoot | None = None,
    held: frozenset[str] = frozenset(),
    watchdog: float = 5.0,
    done: str = "done",
) -> _Outcome:
    """Remove, switch mode, create on one GPU; the writes made are recorded for rollback.

    A failed write sets ``abort`` (unless keep_going) so that the other GPUs start no new write.
    """
    outcome = _Outcome(_Undo(gp))
    undo = outcome.undo
    step = f"start on {gp.gpu.describe()}"
    with log.gpu_context(gp.gpu.describe()):
        try:
            _stop_point(options, step, abort)
            outcome.started = True
            _log.info(
                f"{where} {summary(gp)}",
                extra=log.fields(gpu=gp.gpu.index, address=gp.gpu.address, action="change"),
            )
            for device in gp.remove:
                step = f"remove {device.type_name} {device.key} from {gp.gpu.describe()}"
                _stop_point(options, step, abort)
                remove_watched(backend, device, host, watchdog if device.key in held else None)
                undo.removed.append(device)
                wrote("remove", gp.gpu, device)
            if gp.enable_mixed_size:
                step = f"enable mixed-size vGPU mode on {gp.gpu.describe()}"
                _stop_point(options, step, abort)
                backend.set_mixed_size(gp.gpu, True)
                undo.mixed_size_on = True
            if gp.disable_mixed_size:
                step = f"switch {gp.gpu.describe()} back to equal-size vGPU mode"
                _stop_point(options, step, abort)
                backend.set_mixed_size(gp.gpu, False)
                undo.mixed_size_off = True
            for ordinal, (vtype, uuid) in enumerate(zip(gp.create, uuids, strict=True)):
                step = f"create {vtype.name} #{ordinal + 1} of {len(gp.create)} on {gp.gpu.describe()}"
                _stop_point(options, step, abort)
                _, pinned = gp.pin(ordinal)
                if pinned:
                    # The same VF or parent as the vGPU it recreates (a VM definition names it).
                    extra = {"parent": pinned}
                elif gp.skip_vfs or gp.last_vfs:
                    extra = {"avoid": gp.skip_vfs, "last": gp.last_vfs}
                else:
                    extra = {}
                undo.created.append(backend.create(gp.gpu, vtype, ordinal=ordinal, uuid=uuid, **extra))
                wrote("create", gp.gpu, undo.created[-1])
            _log.info(
                f"{where} {gp.gpu.describe()}: {done}",
                extra=log.fields(gpu=gp.gpu.index, address=gp.gpu.address, action="done"),
            )
        except _Stop:
            outcome.stopped_at = step
        except _Abort:
            pass  # another GPU failed; the caller rolls this one back with the rest
        except (OSError, HostError) as exc:
            outcome.failure = f"step failed: {step}: {_reason(exc)}"
            if not options.keep_going:
                abort.set()
        except BaseException:
            abort.set()  # a bug: stop the other GPUs too; the journal lets the next apply recover
            raise
    return outcome


def remove_watched(backend, device: VGPUDevice, host: HostRoot, interval: float | None) -> None:
    """Remove ``device``; with an ``interval``, log that often which process the removal waits for.

    The kernel does not refuse to remove an mdev a VM holds: vfio_unregister_group_dev() waits,
    uninterruptibly after the first signal, until the VM closes it. Only --force gets here with a held
    device, and then the operator must see what the tool is stuck on.
    """
    if interval is None:
        backend.remove(device)
        return
    finished = threading.Event()
    # Read now: once the remove has begun, the kernel has taken the device out of sysfs and deleted
    # its cdev (vfio_unregister_group_dev) while the VM still holds it.
    nodes = HolderIndex(host).nodes(device)

    def watch() -> None:
        waited = 0.0
        while not finished.wait(interval):
            waited += interval
            holders = HolderIndex(host).holders(device, required=False, nodes=nodes)
            who = ", ".join(map(str, holders)) or "its VM"
            _log.warning(
                f"still waiting after {waited:g} s for {who} to release {device.type_name} {device.key}: "
                f"the kernel completes the removal only once the VM lets go of the device"
            )

    watchdog = threading.Thread(target=watch, name=f"watchdog-{device.key}", daemon=True)
    watchdog.start()
    try:
        backend.remove(device)
    finally:
        finished.set()
        watchdog.join()


def _keep_journal_only(host: HostRoot, addresses: set[str]) -> None:
    """Keep the journal only for GPUs a rollback could not restore, so the next apply retries them."""
    kept = journal.read(host)
    if kept is not None:
        journal.write(host, kept._replace(gpus=[g for g in kept.gpus if g.gpu in addresses]))


def _untouched(plan: Plan, outcomes: list[_Outcome]) -> list[str]:
    touched = {o.undo.plan.gpu.address for o in outcomes if o.started}
    return [
        f"{gp.gpu.describe()}: not started, {_unchanged(plan.vfs_enabled, gp.gpu)}"
        for gp in plan.changed
        if gp.gpu.address not in touched
    ]


def _restore(gpu: GPU, backend, device: VGPUDevice) -> VGPUDevice:
    info = TypeInfo(device.type_name, device.type_id, device.type_name, 1)
    return backend.create(gpu, info, uuid=device.uuid, parent=device.parent)


def _rollback(
    done: list[_Undo], inventory: Inventory, workers: int = 1, plan_vfs: frozenset[str] = frozenset()
) -> tuple[list[str], bool]:
    """Reverse the recorded writes of each GPU, newest first (GPUs on up to ``workers`` threads);
    returns one line of state per GPU, in reverse order of ``done``, and "all clean"."""
    results = _map(lambda undo: _rollback_gpu(undo, inventory, plan_vfs), list(done), workers)
    return [line for line, _ in reversed(results)], all(clean for _, clean in results)


def _rollback_gpu(
    undo: _Undo, inventory: Inventory, plan_vfs: frozenset[str] = frozenset()
) -> tuple[str, bool]:
    gpu = undo.plan.gpu
    backend = inventory.backend_for(gpu)
    problems = []
    with log.gpu_context(gpu.describe()):
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
        if undo.mixed_size_off and not problems:
            try:
                backend.set_mixed_size(gpu, True)
            except HostError as exc:
                problems.append(f"could not switch mixed-size mode back on: {exc}")
        for device in reversed(undo.removed):
            try:
                _restore(gpu, backend, device)
            except (OSError, HostError) as exc:
                problems.append(f"could not restore {device.type_name} {device.key}: {_reason(exc)}")
    if problems:
        return f"{gpu.describe()}: NOT fully restored ({'; '.join(problems)}); the next apply retries", False
    if undo.removed or undo.created or undo.mixed_size_on or undo.mixed_size_off:
        return f"{gpu.describe()}: rolled back to its previous devices{_vfs_note(plan_vfs, gpu)}", True
    return f"{gpu.describe()}: {_unchanged(plan_vfs, gpu)}", True


def _vfs_note(vfs_enabled: frozenset[str], gpu: GPU) -> str:
    if gpu.address in vfs_enabled:
        return " (its SR-IOV VFs, which this run enabled with sriov-manage, stay enabled; that is harmless)"
    return ""


def _unchanged(vfs_enabled: frozenset[str], gpu: GPU) -> str:
    if gpu.address in vfs_enabled:
        return "no vGPU changed, but this run enabled its SR-IOV VFs with sriov-manage (harmless; they stay)"
    return "unchanged"


def recover(
    host: HostRoot,
    tools: HostTools | None = None,
    force: bool = False,
    watchdog_interval: float = 5.0,
    before_change: Callable[[Iterable[GPU]], None] | None = None,
) -> bool:
    """Undo what an interrupted apply left half-done; returns True if there was something to recover."""
    try:
        found = journal.read(host, quarantine=True)
    except ValueError as exc:
        _log.warning(str(exc))
        return False
    if found is None:
        return False
    _log.warning(f"found {found.describe()}; putting those GPUs back to their devices from before it")
    inventory = Inventory(host, tools, writable=True)
    by_address = {g.address: g for g in inventory.gpus}
    if before_change is not None:
        before_change([by_address[g.gpu] for g in found.gpus if g.gpu in by_address])
    problems: list[str] = []
    try:
        for jgpu in found.gpus:
            gpu = by_address.get(jgpu.gpu)
            backend = inventory.backend_for(gpu) if gpu else None
            if gpu is None or backend is None:
                problems.append(f"GPU {jgpu.gpu} from the journal is gone or not in vGPU mode; skipped")
                continue
            _recover_gpu(gpu, backend, jgpu, inventory, force, problems, watchdog_interval)
    finally:
        for problem in problems:
            _log.warning(problem)
    journal.clear(host)
    return True


def _recover_gpu(
    gpu: GPU,
    backend,
    jgpu: journal.JournalGPU,
    inventory: Inventory,
    force: bool,
    problems: list[str],
    watchdog_interval: float = 5.0,
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
        if holders and device.framework == VENDOR_VFIO:
            # The driver refuses (EPERM) to destroy a vGPU a VM has open; keep it, as without --force.
            problems.append(f"{what}; the driver cannot remove it while the VM runs, so it stays")
            grabbed = True
            continue
        if holders:
            _log.warning(f"--force: removing {what}; waiting for the VM to release it")
        remove_watched(backend, device, inventory.host, watchdog_interval if holders else None)
    if grabbed:
        return
    if jgpu.mixed_before is not None:
        # The run switched the mode (with the GPU empty); switch it back before the old devices return.
        try:
            _, enabled = backend.mixed_size(gpu)
            if enabled != jgpu.mixed_before:
                backend.set_mixed_size(gpu, jgpu.mixed_before)
        except HostError as exc:
            problems.append(f"{gpu.describe()}: could not put mixed-size mode back: {exc}")
    for device in before:
        if (device.key, device.type_id) not in current_keys:
            _restore(gpu, backend, device)


# -- One vGPU at a time (the DRA driver's prepare and unprepare) -------------------------------------
# Exactly apply's path for a one-vGPU plan: host lock, recovery of an interrupted run, intent journal,
# in-use checks, rollback of a failed write.


def create_one(
    host: HostRoot,
    tools: HostTools | None,
    gpu_address: str,
    type_name: str,
    *,
    mixed_size: bool = False,
    options: ApplyOptions | None = None,
    label: str = "",
) -> VGPUDevice:
    """Create one vGPU of ``type_name`` on the GPU at ``gpu_address``, keeping its other vGPUs; returns
    the new device (read back from the host, with its IOMMU group). ``label`` names the run in the
    journal. Raises PlanError (nothing written), ApplyError (rolled back) or HostError."""
    options = options or ApplyOptions()
    with HostLock(host, timeout=options.lock_timeout, stop=options.stop):
        host.check_before_changes()
        recover(host, tools, force=False, watchdog_interval=options.watchdog_interval)
        inventory = Inventory(host, tools, writable=True)
        plan = plan_create_one(inventory, gpu_address, type_name, mixed_size)
        if plan.gpus[0].enable_vfs:
            inventory.vfio.enable_vfs(plan.gpus[0].gpu)
            inventory = Inventory(host, tools, writable=True)
            plan = plan_create_one(inventory, gpu_address, type_name, mixed_size)
            if plan.gpus[0].enable_vfs:
                raise HostError(f"virtual functions did not appear after sriov-manage -e: {gpu_address}")
        gpu = plan.gpus[0].gpu
        before = {d.key for d in inventory.devices(gpu)}
        execute(plan, inventory, options, label)
        after = Inventory(host, tools).devices(gpu)
        new = [d for d in after if d.key not in before]
        if len(new) != 1:
            raise HostError(
                f"{gpu.describe()}: expected one new {type_name} after creating it, found "
                f"{len(new)} ({', '.join(d.key for d in new) or 'none'})"
            )
        return new[0]


def remove_one(
    host: HostRoot,
    tools: HostTools | None,
    gpu_address: str,
    key: str,
    *,
    options: ApplyOptions | None = None,
    label: str = "",
) -> bool:
    """Remove the vGPU ``key`` (mdev UUID or VF address) from the GPU at ``gpu_address``; False when it
    was gone already. A vGPU a VM holds raises PlanError (unless ``options.force``), nothing written."""
    options = options or ApplyOptions()
    with HostLock(host, timeout=options.lock_timeout, stop=options.stop):
        host.check_before_changes()
        recover(host, tools, force=False, watchdog_interval=options.watchdog_interval)
        inventory = Inventory(host, tools, writable=True)
        plan = plan_remove_one(inventory, gpu_address, key, force=options.force)
        if plan.is_noop:
            return False
        for note in plan.notes:
            _log.warning(note)
        execute(plan, inventory, options, label)
        return True
