"""One reconcile of the node: make the host follow one config name, upstream's flow done carefully.

validate the file and name → plan against the host, MIG included (no operand touched yet: an invalid
config, a config that does not fit, a failing nvidia-mig-parted, or a VM holding a vGPU ends here) →
already applied: ``success``, nothing paused → else ``pending``, pause the sandbox operands that are on,
wait until their pods left this node, run the pre-apply steps, for a MIG change the host side
(mig-manager state file, host GPU clients stopped), apply in-process (MIG mode and instances, then
vGPUs, under the host lock, journal, rollback, in-use protection), GPU clients started again → restore
the operand labels, always → ``success`` or ``failed``, and an Event.

A MIG mode change that waits for a GPU reset ends, with --with-reboot, in ``rebooting`` and a host
reboot — never while any vGPU on the host is held by a VM (``failed``, saying who holds it), and never
twice for one change: after the reboot the agent applies again (Hopper/Blackwell may switch the mode at
once, or may have lost it at boot), and a change still waiting for a reset then ends in ``failed``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from vgpu_dm import journal, log
from vgpu_dm.apply import ApplyOptions, apply_config, summary
from vgpu_dm.apply_mig import MigModePending, MigUnavailable, plan_with_mig
from vgpu_dm.errors import (
    ASSIGNED,
    IN_USE,
    ApplyError,
    ApplyInterrupted,
    ConfigError,
    HeldProblem,
    HostError,
    PlanError,
    VgpuDmError,
)
from vgpu_dm.host.inventory import HostTools, Inventory
from vgpu_dm.host.programs import DriverFile, Programs
from vgpu_dm.host.root import HostRoot
from vgpu_dm.host_choice import open_host_or_sim
from vgpu_dm.k8s import labels as L
from vgpu_dm.k8s.kube import Kube, Stopped, describe
from vgpu_dm.k8s.metrics import Metrics
from vgpu_dm.k8s.mig import stop_clients as stop_gpu_clients
from vgpu_dm.k8s.settings import Settings
from vgpu_dm.mig import node as mig_node
from vgpu_dm.plan import refuse_dra_owned
from vgpu_dm.spec import load_spec, read_config_source
from vgpu_dm.spec.model import ConfigEntry

_log = log.get("k8s")

# Outcome results (metric label values).
SUCCESS, FAILED, INTERRUPTED, UNCHANGED = "success", "failed", "interrupted", "unchanged"
REBOOTING = "rebooting"  # the node is being rebooted for a MIG mode change


def _held_kinds(problems: list[str]) -> set[str]:
    """What holds the vGPUs of a refused plan (IN_USE, ASSIGNED); "" for any other problem."""
    return {p.kind if isinstance(p, HeldProblem) else "" for p in problems}


def refusal(problems: list[str]) -> tuple[str, bool]:
    """The Event reason for a plan that cannot go ahead, and whether a retry may succeed by itself:
    vGPUs that running VMs hold, or that defined VMs are assigned, may be freed by their owners."""
    kinds = _held_kinds(problems)
    if kinds == {IN_USE}:
        return "VGPUDeviceInUse", True
    if kinds and kinds <= {IN_USE, ASSIGNED}:
        return "VGPUDeviceAssigned", True
    return "VGPUConfigNotApplicable", False


@dataclass
class Outcome:
    result: str  # SUCCESS, UNCHANGED, FAILED or INTERRUPTED
    reason: str  # the Event reason
    message: str
    transient: bool = False  # a retry may succeed without anything changing in the config

    @property
    def state(self) -> str:
        return {SUCCESS: L.SUCCESS, UNCHANGED: L.SUCCESS, FAILED: L.FAILED, REBOOTING: L.REBOOTING}.get(
            self.result, L.PENDING
        )


@dataclass
class Change:
    """What a pre-apply step (e.g. MIG) gets: the config being applied and the host."""

    config_name: str
    entries: tuple[ConfigEntry, ...]
    source: str
    host: HostRoot
    tools: HostTools
    settings: Settings
    kube: Kube
    stop: threading.Event
    notes: list[str] = field(default_factory=list)
    mig: bool = False  # the plan changes MIG mode or GPU instances
    mode_change: bool = False  # ... the MIG mode of a GPU among them (a GPU reset may follow)
    prior_state: str | None = None  # the state label before this reconcile (``rebooting`` after a reboot)
    skip_mig: bool = False
    stopped_clients: list[str] = field(default_factory=list)
    hooks: object = None  # the hooks file read for this reconcile (vgpu_dm.hooks.HooksFile)


PreApplyStep = Callable[[Change], None]


def _first_lines(text: str, n: int = 6) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    more = f" (+{len(lines) - n} more lines)" if len(lines) > n else ""
    return "; ".join(lines[:n]) + more


class Reconciler:
    def __init__(
        self,
        settings: Settings,
        kube: Kube,
        metrics: Metrics,
        stop: threading.Event,
        pre_apply: list[PreApplyStep] | None = None,
    ):
        self.settings = settings
        self.kube = kube
        self.metrics = metrics
        self.stop = stop
        # Steps run after the operands are paused and their pods gone, before the vGPU apply.
        self.pre_apply: list[PreApplyStep] = list(pre_apply or [])

    def host(self) -> HostRoot:
        return open_host_or_sim(self.settings.host_root, self.settings.sim)

    def tools(self) -> HostTools:
        """The driver's files are looked for in --driver-root-ctr-path first, then in the host root,
        each on its own (host/locate.py): under the GPU Operator that directory always exists, and is
        empty on a node whose vGPU manager is installed on the host. A simulated host is no different."""
        s = self.settings
        return HostTools(driver_root=s.driver_root or None, driver_root_on_host=s.driver_install_dir)

    def driver_files(self) -> list[DriverFile]:
        """nvidia-smi, sriov-manage and libnvidia-ml.so.1: which root serves each (logged at start)."""
        return Programs(self.host(), self.tools()).report()

    # -- the flow --------------------------------------------------------------------------------------

    def reconcile(self, value: str) -> Outcome:
        """Make the host follow config ``value``; sets the state label and records an Event."""
        outcome = self._reconcile(value)
        self._finish(value, outcome)
        return outcome

    def _reconcile(self, value: str) -> Outcome:
        s = self.settings
        try:
            data, source = read_config_source(s.config_file)
            spec = load_spec(data, source)
            name, entries = spec.select(value)
        except ConfigError as exc:
            return Outcome(FAILED, "InvalidVGPUConfig", f"config {value!r}: {_first_lines(str(exc))}")
        hooks = None
        if s.hooks_file:
            from vgpu_dm.hooks import read_hooks_file

            try:
                hooks = read_hooks_file(s.hooks_file)
            except ConfigError as exc:
                return Outcome(FAILED, "InvalidHooksFile", f"hooks file: {_first_lines(str(exc))}")
        try:
            host = self.host()
            tools = self.tools()
            interrupted_run = journal.read(host)
            inventory = Inventory(host, tools)
            # Before the MIG plan and before any operand is paused.
            refuse_dra_owned(entries, inventory)
            # The plan apply will carry out, MIG included: whatever would stop it stops here.
            plan = plan_with_mig(entries, inventory, source, force=False)
        except MigUnavailable as exc:
            return Outcome(FAILED, "MIGNotAvailable", f"config {name!r}: {_first_lines(str(exc))}")
        except PlanError as exc:
            return _plan_failed(name, exc)
        except (OSError, HostError, ValueError) as exc:
            return Outcome(FAILED, "HostError", f"reading the host: {_first_lines(describe_host(exc))}", True)
        if plan.is_noop and interrupted_run is None:
            _log.info(f"Selected vGPU device configuration {name!r} is currently applied")
            return Outcome(
                UNCHANGED, "VGPUConfigApplied", f"config {name!r} is already applied; nothing changed"
            )

        _log.info(f"applying vGPU config {name!r}")
        mig = bool(plan.mig_changes or (plan.mig and plan.mig.cancel_pending))
        change = Change(name, entries, source, host, tools, s, self.kube, self.stop, mig=mig, hooks=hooks)
        change.mode_change = any(gp.mig.mode_change for gp in plan.mig_changes)
        try:
            if mig:
                change.prior_state = self.kube.labels().get(L.STATE_LABEL)
            self.kube.patch_labels({L.STATE_LABEL: L.PENDING})
            self.metrics.set_state(L.PENDING)
        except Stopped:
            return Outcome(INTERRUPTED, "VGPUConfigInterrupted", "stopped before the change began")
        except Exception as exc:
            return Outcome(FAILED, "KubernetesError", f"setting state pending: {describe(exc)}", True)
        try:
            return self._change(change)
        finally:
            self.restore_operands()

    def _change(self, change: Change) -> Outcome:
        name = change.config_name
        try:
            paused = self._pause_operands()
            left = self._wait_operands_gone(paused)
            if left:
                return Outcome(
                    FAILED,
                    "OperandPodsStillRunning",
                    f"config {name!r} not applied: after {self.settings.operand_timeout:g} s these operand "
                    f"pods are still on the node: {', '.join(sorted(left))}",
                    transient=True,
                )
            for step in self.pre_apply:
                step(change)
            if change.mig:
                early = self._mig_prepare(change)
                if early:
                    return early
            started = time.monotonic()
            try:
                plan = apply_config(
                    change.entries,
                    change.host,
                    change.tools,
                    change.source,
                    self._apply_options(
                        change.skip_mig,
                        change.hooks,
                        keep_pending_mig=self._reboots_for(change),
                        after_mig=lambda: self._start_host_clients(change),
                    ),
                    name,
                )
            finally:
                self.metrics.apply_duration.observe(time.monotonic() - started)
                # Started right after the MIG stage (after_mig); here when that stage failed or never
                # ended, whatever the apply did (also before a reboot: harmless, and in order).
                self._start_host_clients(change)
        except Stopped:
            return Outcome(
                INTERRUPTED,
                "VGPUConfigInterrupted",
                f"config {name!r}: stopped before the apply; host unchanged",
            )
        except ApplyInterrupted as exc:
            return Outcome(INTERRUPTED, "VGPUConfigInterrupted", f"config {name!r}: {_first_lines(str(exc))}")
        except PlanError as exc:
            return _plan_failed(name, exc)
        except ConfigError as exc:
            return Outcome(FAILED, "InvalidVGPUConfig", f"config {name!r}: {_first_lines(str(exc))}")
        except MigModePending as exc:
            if change.prior_state == L.REBOOTING:
                # The reboot did not switch the mode: another one would not either (no reboot loop).
                return Outcome(
                    FAILED,
                    "MIGModeChangeFailed",
                    f"config {name!r}: MIG mode change failed after reboot: {_first_lines(str(exc), 2)}; "
                    f"not rebooting again",
                )
            if self.settings.with_reboot:
                return self._reboot(change, exc)
            # Waits for a GPU reset or a reboot: retrying before that cannot help.
            return Outcome(
                FAILED,
                "MIGModeChangePending",
                f"config {name!r}: {_first_lines(str(exc))} (start the agent with --with-reboot to let it "
                f"reboot the node for this)",
            )
        except (ApplyError, HostError, OSError) as exc:
            return Outcome(
                FAILED,
                "VGPUConfigFailed",
                f"config {name!r}: {_first_lines(describe_host(exc))}",
                transient=True,
            )
        except VgpuDmError as exc:
            return Outcome(FAILED, "VGPUConfigFailed", f"config {name!r}: {_first_lines(str(exc))}")
        changed = [summary(gp) for gp in plan.changed] + change.notes
        what = "; ".join(changed) if changed else "no vGPU changed"
        _log.info("Selected vGPU device configuration successfully applied")
        return Outcome(SUCCESS, "VGPUConfigApplied", f"config {name!r} applied: {what}")

    def _apply_options(
        self,
        skip_mig: bool = False,
        hooks=None,
        keep_pending_mig: bool = False,
        after_mig: Callable[[], None] | None = None,
    ) -> ApplyOptions:
        # The stop event (SIGTERM) lets apply finish or roll back the GPU it is on, then raise
        # ApplyInterrupted; it also ends a wait for the host lock.
        return ApplyOptions(
            lock_timeout=self.settings.lock_timeout,
            stop=self.stop,
            skip_mig=skip_mig,
            jobs=self.settings.jobs,
            hooks=hooks,
            keep_pending_mig=keep_pending_mig,
            after_mig=after_mig,
        )

    # -- MIG -------------------------------------------------------------------------------------------

    def _mig_prepare(self, change: Change) -> Outcome | None:
        """The host side of a MIG change before the apply; an Outcome when it must end here."""
        s, name = self.settings, change.config_name
        if mig_node.persist_selected_config(change.host, s.host_mig_manager_state_file, name):
            _log.info(f"host nvidia-mig-manager now selects {name!r} ({s.host_mig_manager_state_file})")
        if s.with_shutdown_host_gpu_clients:
            self._stop_host_clients(change)
        return None

    def _stop_host_clients(self, change: Change) -> None:
        """-w: stop the running units of --gpu-clients-file and, when a MIG mode changes, the kubelet
        (-k) last; as upstream, then wait --gpu-clients-settle seconds before a mode change. _change
        starts whatever was stopped again, in reverse order, whatever happens next."""
        s = change.settings
        mode_change = change.mode_change
        also = [s.host_kubelet_systemd_service] if mode_change else []
        change.stopped_clients = stop_gpu_clients(change.host, s.gpu_clients_file, also)
        if change.stopped_clients:
            change.notes.append(
                f"host GPU clients stopped and started again: {', '.join(change.stopped_clients)}"
            )
        if mode_change and change.stopped_clients and s.gpu_clients_settle > 0:
            _log.info(f"waiting {s.gpu_clients_settle:g} s for the stopped host services to settle")
            if self.stop.wait(s.gpu_clients_settle):
                self._start_host_clients(change)
                raise Stopped("waiting for the stopped host services to settle")

    def _start_host_clients(self, change: Change) -> None:
        """Start the host units stopped for the MIG change again (once: it forgets them)."""
        for problem in mig_node.start_clients(change.host, change.stopped_clients):
            _log.error(problem)
            change.notes.append(problem)
        change.stopped_clients = []

    def _reboots_for(self, change: Change) -> bool:
        """Whether a MIG mode change waiting for a reset will be followed by a reboot (then its pending
        mode is kept for the reboot to make, instead of being set back)."""
        return self.settings.with_reboot and change.prior_state != L.REBOOTING

    def _held_vgpus(self, change: Change) -> list[str]:
        """Every vGPU on the host a VM holds, and any other VFIO device a process has open (a GPU
        passed through whole): a reboot would kill those VMs. Raises HostError when that cannot be told
        (then the agent cannot vouch for a reboot either)."""
        inventory = Inventory(change.host, change.tools)
        held = []
        seen: set[str] = set()
        for gpu in inventory.gpus:
            for device in inventory.devices(gpu):
                holders = inventory.holders.holders(device, required=True)
                seen.update(inventory.holders.nodes(device))
                if holders:
                    who = ", ".join(str(h) for h in holders)
                    held.append(f"{gpu.describe()}: {device.type_name} {device.key} is in use by {who}")
        for node, pids in sorted(inventory.holders.open_nodes().items()):
            if node not in seen and node != "/dev/vfio/vfio":
                who = ", ".join(f"pid {pid} ({inventory.holders.name(pid)})" for pid in pids)
                held.append(f"{node} is open by {who}")
        return held

    def _reboot(self, change: Change, exc: MigModePending) -> Outcome:
        """State ``rebooting``, an Event, then ``chroot <host> reboot`` — unless a VM holds a vGPU. The
        label is the memory that stops a second reboot for the same change (see _change)."""
        name = change.config_name
        try:
            held = self._held_vgpus(change)
        except (OSError, HostError) as err:
            held = [f"cannot tell which vGPUs VMs are using ({describe_host(err)})"]
        if held:
            return Outcome(
                FAILED,
                "MIGRebootBlocked",
                f"config {name!r}: the MIG mode change needs a reboot, and the node is not rebooted while a "
                f"VM holds a vGPU: {_first_lines('; '.join(held), 3)}; stop or migrate the VMs, then set the "
                f"label again (the mode change waits for a reset or a reboot)",
            )
        text = f"config {name!r}: rebooting the node for a MIG mode change: {_first_lines(str(exc), 1)}"
        try:
            self.kube.patch_labels({L.STATE_LABEL: L.REBOOTING}, ignore_stop=True)
            self.metrics.set_state(L.REBOOTING)
        except Exception as err:
            return Outcome(FAILED, "KubernetesError", f"{text}: cannot set state rebooting: {describe(err)}")
        self.kube.event("MIGRebooting", text, warning=True, ignore_stop=True)
        _log.warning(text)
        try:
            mig_node.reboot(change.host)
        except HostError as err:
            return Outcome(FAILED, "RebootFailed", f"config {name!r}: {err}")
        return Outcome(REBOOTING, "MIGRebooting", text)

    # -- operands ----------------------------------------------------------------------------------------

    def _pause_operands(self) -> list[str]:
        """Pause the operands that are on; returns the operand labels now paused."""
        current = self.kube.change_labels(_noting(L.pause_patch, "pausing operands"), "pause the operands")
        return L.paused(current)

    def _wait_operands_gone(self, paused: list[str]) -> set[str]:
        """Wait for the pods of the paused operands only: an operand switched off (``false``) or not
        managed through its label (absent) is not ours to wait for; its DaemonSet would never remove a
        pod for us, so waiting would only run into the timeout."""
        deadline = time.monotonic() + self.settings.operand_timeout
        left: set[str] = set()
        for label in paused:
            left |= self.kube.wait_pods_gone(L.OPERANDS[label], deadline)
        return left

    def restore_operands(self) -> None:
        """Operand labels at paused go back to ``true``. Goes on while stopping (bounded), because a
        node left with paused operands has no device plugin."""
        try:
            # Decided on the node being written: an operand an admin set to ``false`` meanwhile stays so.
            self.kube.change_labels(
                _noting(L.restore_patch, "restoring operands"), "restore the operands", ignore_stop=True
            )
        except Exception as exc:
            _log.error(f"could not restore the operand labels of node {self.kube.node}: {describe(exc)}")

    # -- result ------------------------------------------------------------------------------------------

    def _finish(self, value: str, outcome: Outcome) -> None:
        self.metrics.applies.labels(outcome.result).inc()
        if outcome.result == REBOOTING:
            return  # label and Event were written before the reboot began
        log_line = f"config {value!r}: {outcome.result}: {outcome.message}"
        (_log.info if outcome.result in (SUCCESS, UNCHANGED) else _log.error)(log_line)
        if outcome.result != INTERRUPTED:
            try:
                self.kube.patch_labels({L.STATE_LABEL: outcome.state}, ignore_stop=True)
                self.metrics.set_state(outcome.state)
                if outcome.state == L.SUCCESS:
                    self.metrics.last_success.set_to_current_time()
            except Exception as exc:
                _log.error(f"could not set {L.STATE_LABEL}={outcome.state}: {describe(exc)}")
        if outcome.result == UNCHANGED:
            # Nothing happened: an Event would be an API write and etcd storage on every node for
            # every no-op reconcile (each start, each label set to the value it already has).
            return
        self.kube.event(
            outcome.reason,
            outcome.message,
            warning=outcome.result in (FAILED, INTERRUPTED),
            ignore_stop=True,
        )


# What the operator can do about a held vGPU. The CLI's advice in the problems names its flags (--force,
# --allow-assigned), which the agent does not have: the agent's Events say this instead.
IN_USE_ADVICE = (
    "The agent never removes a vGPU that a VM is using: stop the VM or migrate it off this node, and "
    "the agent retries by itself; or remove the vGPU with 'nvidia-vgpu-dm apply --force' on the host "
    "(the VM loses it)"
)
ASSIGNED_ADVICE = (
    "The agent never removes a vGPU that a libvirt VM is defined to use: change or undefine the VM (or "
    "move it off this node), and the agent retries by itself; or remove the vGPU with 'nvidia-vgpu-dm "
    "apply --allow-assigned VM' on the host (that VM will not start until its definition is changed)"
)


def _plan_failed(name: str, exc: PlanError) -> Outcome:
    reason, transient = refusal(exc.problems)
    kinds = _held_kinds(exc.problems)
    if not kinds <= {IN_USE, ASSIGNED}:
        return Outcome(FAILED, reason, f"config {name!r}: {_first_lines(str(exc))}", transient=transient)
    facts = "\n".join(p.what for p in exc.problems if isinstance(p, HeldProblem))
    advice = " ".join(a for k, a in ((IN_USE, IN_USE_ADVICE), (ASSIGNED, ASSIGNED_ADVICE)) if k in kinds)
    return Outcome(FAILED, reason, f"config {name!r} not applied: {_first_lines(facts)}. {advice}", transient)


def _noting(decide: Callable[[dict[str, str]], dict[str, str]], saying: str):
    """``decide``, logging what it chose on the node that is written (a retry after a 409 decides again,
    so what is logged is the last decision)."""

    def noted(labels):
        changes = decide(dict(labels))
        if changes:
            _log.info(f"{saying}: {', '.join(sorted(changes))}")
        return changes

    return noted


def describe_host(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"host I/O error: {exc.strerror}{where}"
    return str(exc)
