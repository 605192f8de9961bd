"""The MIG stage of apply: the plan apply executes (MIG included), and carrying out its MIG part.

Planning: a config whose vGPUs already hold is a no-op that runs no program. Otherwise, when the config
involves MIG (MIG-backed types, or a MIG GPU it selects), the MIG state is read (mig/state.py) and the
MIG change is planned with everything else (plan_mig.py); a failing read stops here, before any write.

The stage, after apply has removed the vGPUs of the GPUs whose MIG layout changes (journaled):

1. pending MIG modes left by an earlier run are set back (``nvidia-smi -mig``);
2. SR-IOV VFs off on GPUs whose MIG mode changes: the driver refuses ``-mig 0`` while they are on
   (host-interfaces.md 3.6), and whether ``-mig 1`` works with them on is not known;
3. the mode, with ``nvidia-mig-parted apply --mode-only --skip-reset``; a GPU whose mode is then still
   the old one waits for a reset: the vGPUs of every other GPU are taken down (apply does it, journaled)
   and mig-parted runs again without ``--skip-reset`` — it resets every GPU NVML sees;
4. VFs back on where a MIG GPU needs them, with the vendor-VFIO backend's retries and readiness wait
   (enabling VFs destroys GPU instances, so before them);
5. the instances: ``nvidia-mig-parted apply`` for the changing GPUs (and for GPUs a reset emptied,
   with their previous layout);
6. ``export`` again: mig-parted reports success for a profile a GPU does not offer, so the stage checks
   that every GPU has exactly its layout.

``put_back`` undoes it: the previous mode (a pending toggle set back, unless the caller keeps it for a
reboot), the VFs as they were, the previous instances — and says what it could not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from vgpu_dm import log
from vgpu_dm.errors import ApplyError, HostError, PlanError
from vgpu_dm.host.inventory import HostTools, Inventory
from vgpu_dm.host.pci import GPU
from vgpu_dm.mig.layout import MigLayout
from vgpu_dm.mig.parted import MigParted, MigPartedFailed, MigPartedMissing, indent
from vgpu_dm.plan import GPUPlan, Plan, build_plan, governing_entries
from vgpu_dm.plan_mig import Bystander

if TYPE_CHECKING:
    from vgpu_dm.spec.model import ConfigEntry

_log = log.get("mig")
CONFIG_NAME = "vgpu-device-manager"


class MigStepError(ApplyError):
    """nvidia-mig-parted (or a VF step around it) could not bring the GPUs into the MIG state planned."""


class MigModePending(MigStepError):
    """A MIG mode change waits for a GPU reset that could not be done (or a reboot)."""


class MigUnavailable(HostError):
    """The config needs nvidia-mig-parted (or the NVML it loads), and it is not there."""


def plan_with_mig(
    entries: tuple[ConfigEntry, ...],
    inventory: Inventory,
    source: str = "",
    force: bool = False,
    skip_mig: bool = False,
    strict: bool = True,
    allow_assigned: tuple[str, ...] = (),
) -> Plan:
    """The plan apply carries out (see the module docstring); PlanError/HostError before any write."""
    first = build_plan(entries, inventory, source, force=force, strict=False, allow_assigned=allow_assigned)
    if first.is_noop and not first.all_problems:
        return first
    from vgpu_dm.plan_mig import involved

    if skip_mig or not involved(entries, governing_entries(entries, inventory.gpus), inventory):
        if strict and first.all_problems:
            raise PlanError(first.all_problems)
        return first
    from vgpu_dm.mig import state

    try:
        found = state.read(inventory, MigParted(inventory.host, inventory.tools))
    except MigPartedMissing as exc:
        if any(e.is_mig_backed for e in entries):
            raise MigUnavailable(
                f"the config has MIG-backed vGPU types, whose GPU instances nvidia-mig-parted makes, "
                f"but {exc}; "
                f"install it, point --mig-parted at it, or pass --skip-mig if the GPU instances are already "
                f"there"
            ) from None
        _log.warning(f"{exc}; the MIG mode of the MIG GPUs is left as it is")
        if strict and first.all_problems:
            raise PlanError(first.all_problems) from None
        return first
    return build_plan(
        entries, inventory, source, force=force, strict=strict, mig=found, allow_assigned=allow_assigned
    )


def _config(items: list[dict]) -> dict:
    return {"version": "v1", "mig-configs": {CONFIG_NAME: items}}


def _on(enabled: bool) -> str:
    return "on" if enabled else "off"


class MigStage:
    """The MIG part of one plan, carried out once, and undone on request."""

    def __init__(self, plan: Plan, inventory: Inventory, tools: HostTools, keep_pending: bool = False):
        self.plan = plan
        self.host = inventory.host
        self.tools = tools
        self.keep_pending = (
            keep_pending  # a reboot will make a pending mode change (the agent's --with-reboot)
        )
        self.parted = MigParted(inventory.host, tools)
        self.changes: list[GPUPlan] = list(plan.mig_changes)
        self.vfs_before = {gp.gpu.address: bool(gp.gpu.vfs) for gp in self.changes}
        self.taken_down: list[Bystander] = []  # bystanders whose vGPUs apply removed for a reset
        self.reset = False  # a GPU reset ran (every GPU's instances are gone)
        self.started = False

    # -- helpers ---------------------------------------------------------------------------------------

    def _inventory(self) -> Inventory:
        return Inventory(self.host, self.tools, writable=True)

    def _fresh(self, gpu: GPU) -> GPU:
        return next(g for g in self._inventory().gpus if g.address == gpu.address)

    def _modes(self) -> dict[str, tuple[bool | None, bool | None]]:
        """PCI address → (current, pending) MIG mode, from nvidia-smi."""
        smi = self._inventory().programs.smi
        return {g.address: (g.mig_current, g.mig_pending) for g in smi.nvml_gpus()}

    def _vfs(self, gpu: GPU, on: bool) -> None:
        inventory = self._inventory()
        gpu = next(g for g in inventory.gpus if g.address == gpu.address)
        if on and not gpu.vfs and gpu.sriov_capable and gpu.driver == "nvidia":
            inventory.vfio.enable_vfs(gpu)
        elif not on and gpu.vfs:
            inventory.vfio.disable_vfs(gpu)

    # -- forward ---------------------------------------------------------------------------------------

    def run(self, take_down: Callable[[list[Bystander]], None]) -> None:
        """Carry out the MIG part; MigStepError (MigModePending) when it fails. ``take_down`` removes
        the vGPUs of the bystanders before a GPU reset (apply does it, journaled, and restores them)."""
        self.started = True
        try:
            self._cancel_pending()
            modes = [gp for gp in self.changes if gp.mig.mode_change]
            for gp in modes:
                self._vfs(gp.gpu, on=False)
            if modes:
                self._mode(modes, take_down)
            for gp in self.changes:
                if gp.mig.target.enabled:
                    self._vfs(gp.gpu, on=True)
            self._instances()
            self._verify()
        except MigStepError:
            raise
        except HostError as exc:
            raise MigStepError(str(exc)) from None

    def _cancel_pending(self) -> None:
        if not self.plan.mig:
            return
        smi = self._inventory().programs.smi
        for gpu, _, enabled in self.plan.mig.cancel_pending:
            _log.info(
                f"{gpu.describe()}: a MIG mode change to {_on(not enabled)} left by an earlier run waits "
                f"for a "
                f"GPU reset; setting it back to {_on(enabled)} (nvidia-smi -mig)"
            )
            smi.set_mig_mode(gpu, enabled)

    def _unheld_bystanders(self) -> list[Bystander]:
        """Bystanders with their vGPUs that no VM holds (a held one, only with --force, is left: the reset
        then fails as the GPU is in use, and the change is rolled back; its removal would wait for the VM)."""
        if not self.plan.mig:
            return []
        holders = self._inventory().holders
        people = []
        for by in self.plan.mig.bystanders:
            free = tuple(d for d in by.devices if not holders.holders(d, required=False))
            if free:
                people.append(by._replace(devices=free))
        return people

    def _mode(self, modes: list[GPUPlan], take_down: Callable[[list[Bystander]], None]) -> None:
        for gp in modes:
            _log.info(f"{gp.gpu.describe()}: MIG mode {_on(gp.mig.target.enabled)} (nvidia-mig-parted)")
        self.parted.apply(_config([gp.mig.entry() for gp in modes]), "--mode-only", "--skip-reset")
        now = self._modes()
        pending = [gp for gp in modes if now.get(gp.gpu.address, (None,))[0] != gp.mig.target.enabled]
        if not pending:
            return
        which = ", ".join(gp.gpu.describe() for gp in pending)
        people = self._unheld_bystanders()
        _log.info(
            f"{which}: the MIG mode change waits for a GPU reset; nvidia-mig-parted resets every GPU of "
            f"the host"
            + (
                f" (the vGPUs of {', '.join(b.gpu.describe() for b in people)} are taken down first)"
                if people
                else ""
            )
        )
        if people:
            take_down(people)
            self.taken_down = people
        self.reset = True
        failure = ""
        try:
            self.parted.apply(_config([gp.mig.entry() for gp in pending]), "--mode-only")
        except MigPartedFailed as exc:
            failure = str(exc)
        now = self._modes()
        still = [gp for gp in pending if now.get(gp.gpu.address, (None,))[0] != gp.mig.target.enabled]
        if not still and not failure:
            _log.info(f"{which}: GPU reset done, MIG mode switched")
        if still or failure:
            which = ", ".join(gp.gpu.describe() for gp in still or pending)
            said = f" nvidia-mig-parted said:\n{indent(failure)}" if failure else ""
            raise MigModePending(
                f"{which}: the MIG mode change needs a GPU reset, which could not be done (a reset covers "
                f"every "
                f"GPU of the host and fails while any program or VM holds one of them; stop nvidia-smi, "
                f"DCGM, "
                f"nv-hostengine and the like), or a reboot.{said}"
            )

    def _instances(self) -> None:
        items = []
        for gp in self.changes:
            if gp.mig.target.enabled:
                what = ", ".join(f"{n} x {p}" for p, n in gp.mig.target.devices) or "none"
                _log.info(f"{gp.gpu.describe()}: GPU instances {what} (nvidia-mig-parted)")
                items.append(gp.mig.entry())
        if self.reset and self.plan.mig:
            for by in self.plan.mig.bystanders:
                if by.layout.devices:
                    _log.info(
                        f"{by.gpu.describe()}: its GPU instances again after the reset "
                        f"({by.layout.describe()})"
                    )
                    items.append(by.layout.entry(by.index))
        if items:
            self.parted.apply(_config(items))

    def _expected(self) -> list[tuple[GPU, MigLayout]]:
        wanted = [(gp.gpu, gp.mig.target) for gp in self.changes]
        if self.reset and self.plan.mig:
            wanted += [(b.gpu, b.layout) for b in self.plan.mig.bystanders]
        return wanted

    def _verify(self) -> None:
        from vgpu_dm.mig import state

        found = state.read(self._inventory(), self.parted)
        wrong = []
        for gpu, layout in self._expected():
            seen = found.of(gpu.address)
            got = seen.layout if seen else None
            if got != layout:
                wrong.append(
                    f"{gpu.describe()} has {got.describe() if got else 'nothing NVML shows'}, "
                    f"not {layout.describe()}"
                )
        if wrong:
            raise MigStepError(
                "nvidia-mig-parted reported success, but "
                + "; ".join(wrong)
                + " (it does that for a profile the "
                "GPU does not offer, or instances that do not fit together)"
            )

    # -- back ------------------------------------------------------------------------------------------

    def put_back(self) -> list[str]:
        """Undo the stage, GPU by GPU; one line per GPU that is not back as it was."""
        if not self.started:
            return []
        lines = []
        previous = [(gp.gpu, gp.mig.current, gp.mig) for gp in self.changes]
        if self.reset and self.plan.mig:
            previous += [(b.gpu, b.layout, None) for b in self.plan.mig.bystanders if b.layout.devices]
        for gpu, layout, change in previous:
            try:
                self._put_back_one(gpu, layout, change)
            except HostError as exc:
                lines.append(
                    f"{gpu.describe()}: its MIG state could not be put back ({layout.describe()}): {exc}"
                )
        if not lines:
            try:
                self._check_back(previous)
            except HostError as exc:
                lines.append(str(exc))
        return lines

    def _put_back_one(self, gpu: GPU, layout: MigLayout, change) -> None:
        current, pending = self._modes().get(gpu.address, (None, None))
        if current is not None and current != layout.enabled:
            self._vfs(gpu, on=False)
            index = (
                change.index if change else next(b.index for b in self.plan.mig.bystanders if b.gpu == gpu)
            )
            _log.info(f"{gpu.describe()}: MIG mode back {_on(layout.enabled)} (nvidia-mig-parted)")
            self.parted.apply(_config([layout.entry(index)]), "--mode-only")
            current, pending = self._modes().get(gpu.address, (None, None))
            if current != layout.enabled:
                raise HostError(
                    f"MIG mode is still {_on(bool(current))}: it waits for a GPU reset or a reboot"
                )
        elif pending is not None and pending != layout.enabled and not self.keep_pending:
            _log.info(
                f"{gpu.describe()}: setting its pending MIG mode back to {_on(layout.enabled)} "
                f"(nvidia-smi -mig)"
            )
            self._inventory().programs.smi.set_mig_mode(gpu, layout.enabled)
        if change is not None:
            self._vfs(gpu, on=self.vfs_before.get(gpu.address, False))
        if layout.enabled and layout.devices:
            index = (
                change.index if change else next(b.index for b in self.plan.mig.bystanders if b.gpu == gpu)
            )
            self.parted.apply(_config([layout.entry(index)]))

    def _check_back(self, previous) -> None:
        from vgpu_dm.mig import state

        found = state.read(self._inventory(), self.parted)
        wrong = [
            f"{gpu.describe()}: its MIG state is not back ({layout.describe()} wanted)"
            for gpu, layout, _ in previous
            if (found.of(gpu.address).layout if found.of(gpu.address) else None) != layout
        ]
        if wrong:
            raise HostError("; ".join(wrong))
