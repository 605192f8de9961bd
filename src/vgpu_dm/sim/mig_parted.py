"""The simulated ``nvidia-mig-parted`` (v0.15.0 command logic), for simulated hosts where the real binary
cannot run: no ``VGPU_DM_SIM_MIG_PARTED`` is set, or a MIG GPU of the host is a model the binary's mock
NVML does not have (see sim/mig_mock.py). A test runs the same sequences against both and compares them
(tests/host/test_mig_parted_agreement.py).

What it follows, read in NVIDIA/mig-parted ``cmd/nvidia-mig-parted`` and observed with the real binary
(shared/mig-parted-mock/README.md):

- GPUs are the ones NVML sees (not those bound to vfio-pci), indexed in PCI order; ``devices`` and
  ``device-filter`` select among them.
- ``assert`` checks the mode of the GPUs the config selects, then that *every* GPU NVML sees matches
  (``not all GPUs match the specified config``); every failure prints the same ``Assertion failure``.
- ``apply``: if any selected GPU is in the wrong mode, every selected GPU has its instances cleared and
  its mode set; a pending change resets *all* GPUs (``nvidia-smi -r -i <all>``), which fails when any
  of them is busy; then each selected GPU whose instances differ is cleared and rebuilt, trying orders
  until one fits. A profile the GPU does not offer builds nothing and still succeeds.
- ``export`` merges GPUs with equal layouts (``devices: all`` / ``device-filter``) as upstream does.
- Every failure is one ``level=fatal`` line on stderr and exit 1.

Faults (``sim fault --mig-parted``): ``nvml`` = NVML cannot be initialised; ``reset`` = the GPU reset
fails; ``apply`` = apply fails after its mode step (a failing pre-apply-config hook).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from vgpu_dm.device_id import DeviceID, InvalidDeviceID
from vgpu_dm.sim import mig
from vgpu_dm.sim.layout import SimGPU, SimState

ASSERT_FAILED = "assertion failure: selected configuration not currently applied"
NVML_FAILED = "error initializing NVML: ERROR_UNKNOWN"
RESET_FAULT_OUTPUT = "Unable to reset GPU {ids}: In use by another client (injected fault)"
_PROFILE = re.compile(r"(?:[1-9][0-9]*c\.)?[1-9][0-9]*g\.[0-9]+gb(?:\+me|-me|\+me\.all|\+gfx)?")
_COMMANDS = {
    "assert": {"-f": "config", "--config-file": "config", "-c": "selected", "--selected-config": "selected"},
    "apply": {
        "-f": "config",
        "--config-file": "config",
        "-c": "selected",
        "--selected-config": "selected",
        "-k": "hooks",
        "--hooks-file": "hooks",
    },
    "export": {"-o": "format", "--output-format": "format", "-l": "label", "--config-label": "label"},
}
_SWITCHES = {
    "assert": {"-m": "mode_only", "--mode-only": "mode_only", "-a": "valid", "--valid-config": "valid"},
    "apply": {
        "-m": "mode_only",
        "--mode-only": "mode_only",
        "-s": "skip_reset",
        "--skip-reset": "skip_reset",
    },
    "export": {},
}
_ENV = {
    "config": "MIG_PARTED_CONFIG_FILE",
    "selected": "MIG_PARTED_SELECTED_CONFIG",
    "hooks": "MIG_PARTED_HOOKS_FILE",
    "mode_only": "MIG_PARTED_MODE_CHANGE_ONLY",
    "valid": "MIG_PARTED_VALID_CONFIG",
    "skip_reset": "MIG_PARTED_SKIP_RESET",
    "format": "MIG_PARTED_OUTPUT_FORMAT",
    "label": "MIG_PARTED_CONFIG_LABEL",
}


class Fatal(Exception):
    """mig-parted logs this at fatal level and exits 1."""


def log_line(level: str, msg: str) -> str:
    """A logrus text line as mig-parted prints it (message quoted when it needs to be)."""
    import json

    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    text = msg if re.fullmatch(r"[A-Za-z0-9_./@^+-]+", msg) else json.dumps(msg, ensure_ascii=False)
    return f'time="{stamp}" level={level} msg={text}\n'


def _capitalize(msg: str) -> str:
    return msg[:1].upper() + msg[1:]


# -- command line ---------------------------------------------------------------------------------------


def _options(args: list[str], env: dict[str, str]) -> tuple[str, dict[str, Any]]:
    args = [a for a in args if a not in ("-d", "--debug")]
    if not args or args[0] not in _COMMANDS:
        raise Fatal(f"no such command: {args[0] if args else '(none)'}")
    command, rest = args[0], args[1:]
    values, switches = _COMMANDS[command], _SWITCHES[command]
    flags: dict[str, Any] = {"format": "yaml", "label": "current"}
    for key in (*values.values(), *switches.values()):
        if _ENV[key] in env:
            flags[key] = env[_ENV[key]] if key in values.values() else env[_ENV[key]].lower() == "true"
    i = 0
    while i < len(rest):
        name, eq, value = rest[i].partition("=")
        if name in values:
            if not eq:
                i += 1
                if i >= len(rest):
                    raise Fatal(f"flag needs an argument: {name}")
                value = rest[i]
            flags[values[name]] = value
        elif name in switches:
            flags[switches[name]] = not eq or value.lower() == "true"
        else:
            raise Fatal(f"flag provided but not defined: {name}")
        i += 1
    return command, flags


def _parse(flags: dict[str, Any], stdin: str | None) -> list[dict[str, Any]]:
    """The selected config's entries, checked as mig-parted's v1 decoder checks them."""
    import yaml

    path = flags.get("config") or ""
    if not path:
        raise Fatal("missing required flags 'config-file'")
    if path == "-":
        text = stdin or ""
    else:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise Fatal(
                f"error parsing config file: read error: open {path}: {exc.strerror.lower()}"
            ) from None
    bad = "error parsing config file: unmarshal error: error unmarshaling JSON: while decoding JSON: "
    try:
        spec = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise Fatal(f"error parsing config file: unmarshal error: {exc}") from None
    if not isinstance(spec, dict):
        raise Fatal(bad + "expected an object")
    unknown = sorted(set(spec) - {"version", "mig-configs"})
    if unknown:
        raise Fatal(bad + f"unexpected field: {unknown[0]}")
    configs = spec.get("mig-configs") or {}
    for entries in configs.values():
        for entry in entries or []:
            _check_entry(entry, bad)
    selected = flags.get("selected") or ""
    if len(configs) > 1 and not selected:
        raise Fatal(
            "error selecting MIG config: missing required flag 'selected-config' when more than one config "
            "available"
        )
    if len(configs) == 1 and not selected:
        selected = next(iter(configs))
    if selected not in configs:
        raise Fatal(f"error selecting MIG config: selected mig-config not present: {selected}")
    return list(configs[selected] or [])


def _check_entry(entry: Any, bad: str) -> None:
    if not isinstance(entry, dict):
        raise Fatal(bad + "expected an object")
    unknown = sorted(set(entry) - {"devices", "device-filter", "mig-enabled", "mig-devices"})
    if unknown:
        raise Fatal(bad + f"unexpected field: {unknown[0]}")
    if "devices" not in entry:
        raise Fatal(bad + "missing required field 'devices'")
    if "mig-enabled" not in entry:
        raise Fatal(bad + "missing required field 'mig-enabled'")
    if entry["mig-enabled"] and "mig-devices" not in entry:
        raise Fatal(bad + "missing required field 'mig-devices' when 'mig-enabled' is true")
    devices = entry.get("mig-devices") or {}
    for name in devices:
        if not _PROFILE.fullmatch(str(name)):
            raise Fatal(
                bad + f"error validating values in 'mig-devices' field: invalid format for '{name}': "
                f"cannot parse fields of '{name}'"
            )
    if devices and not any(int(v) for v in devices.values()):
        raise Fatal(
            bad + "error validating values in 'mig-devices' field: all counts for all MigProfiles are 0"
        )


# -- GPUs as NVML sees them ------------------------------------------------------------------------------


def _device_id(gpu: SimGPU) -> DeviceID:
    return DeviceID(gpu.device, 0x10DE, gpu.subsystem_device, 0x10DE)


def _selects(entry: dict[str, Any], index: int, gpu: SimGPU) -> bool:
    flt = entry.get("device-filter")
    if flt:
        try:
            if not any(
                DeviceID.parse(f).matches(_device_id(gpu)) for f in ([flt] if isinstance(flt, str) else flt)
            ):
                return False
        except InvalidDeviceID:
            return False
    devices = entry["devices"]
    return devices == "all" or index in (devices or [])


def _walk(state: SimState, entries: list[dict[str, Any]]):
    gpus = state.nvml_gpus()
    for entry in entries:
        for index, gpu in enumerate(gpus):
            if _selects(entry, index, gpu):
                yield entry, index, gpu


def _layout(gpu: SimGPU) -> Counter:
    return Counter(gi["profile"] for gi in gpu.gpu_instances)


def _wanted(entry: dict[str, Any]) -> Counter:
    return Counter({str(k): int(v) for k, v in (entry.get("mig-devices") or {}).items() if int(v) > 0})


# -- assert -----------------------------------------------------------------------------------------------


def _assert_mode(state: SimState, entries: list[dict[str, Any]]) -> None:
    for entry, _, gpu in _walk(state, entries):
        enabled = bool(entry["mig-enabled"])
        if not gpu.mig_profiles:
            if enabled:
                raise Fatal("unable to assert MIG mode enabled on non MIG-capable GPU")
            continue
        if gpu.mig_mode != enabled:
            raise Fatal("current mode different than mode being asserted")


def _assert_config(state: SimState, entries: list[dict[str, Any]]) -> None:
    matched: dict[int, bool] = {}
    for entry, index, gpu in _walk(state, entries):
        enabled = bool(entry["mig-enabled"])
        if (not gpu.mig_profiles and not enabled) or (not enabled and not gpu.mig_mode):
            matched[index] = True
        else:
            matched[index] = _layout(gpu) == _wanted(entry)
    if sum(matched.values()) != len(state.nvml_gpus()):
        raise Fatal("not all GPUs match the specified config")


# -- apply ------------------------------------------------------------------------------------------------


def set_mode(state: SimState, gpu: SimGPU, enabled: bool, busy: set[str]) -> None:
    """NVML's SetMigMode as the simulated driver answers it: the pending mode becomes ``enabled``;
    it takes effect at once when the host changes modes immediately and nothing holds the GPU."""
    if gpu.mig_mode and not enabled and gpu.gpu_instances:
        raise Fatal("error setting MIG mode: ERROR_IN_USE")
    if (
        gpu.vfs
        and state.options[f"mig_{'on' if enabled else 'off'}_with_vfs"] == "refuse"
        and enabled != gpu.mig_mode
    ):
        # Refused by the driver while SR-IOV VFs are enabled (host-interfaces.md 3.6; "on" unconfirmed).
        raise Fatal("error setting MIG mode: ERROR_NOT_SUPPORTED")
    if enabled == gpu.mig_mode:
        gpu.mig_pending = None
    elif state.mode_change(gpu) == "immediate" and gpu.address not in busy:
        gpu.mig_mode, gpu.mig_pending = enabled, None
    else:
        gpu.mig_pending = enabled


def busy_gpus(base: Path, state: SimState) -> set[str]:
    """GPUs something holds: a VM has one of its vGPUs open, or (``reset_with_vgpus: refuse``) it has
    any vGPU at all. A busy GPU is not reset, and a MIG mode change on it stays pending."""
    from vgpu_dm.sim.driver import mdev_devices, vfio_nodes
    from vgpu_dm.sim.processes import holders_of
    from vgpu_dm.sim.vfio_driver import placed_vfs

    busy = set()
    for gpu in state.gpus:
        if gpu.framework == "vendor-vfio":
            devices = [base / "sys/devices/pci0000:00" / vf for vf in placed_vfs(base, gpu)]
        else:
            devices = [base / "sys/bus/mdev/devices" / uuid for _, uuid, _ in mdev_devices(base, gpu)]
        nodes = [n for d in devices for n in vfio_nodes(d)]
        if (nodes and holders_of(base, nodes)) or (devices and state.options["reset_with_vgpus"] == "refuse"):
            busy.add(gpu.address)
    return busy


def reset_output(ids: str) -> str:
    return RESET_FAULT_OUTPUT.format(ids=ids)


def _reset_all(base: Path, state: SimState, busy: set[str], fault: bool) -> None:
    """``nvidia-smi -r -i <every GPU NVML sees>``: all or nothing, failing while any of them is busy."""
    gpus = state.nvml_gpus()
    ids = ",".join(g.address for g in gpus)
    if fault:
        raise Fatal("error resetting all GPUs: exit status 255", reset_output(ids))
    held = [g for g in gpus if g.address in busy]
    if held:
        from vgpu_dm.sim.vfio_driver import smi_address

        lines = "".join(f"  GPU {smi_address(g.address)}: In use by another client\n" for g in held)
        raise Fatal(
            "error resetting all GPUs: exit status 255",
            f"The following GPUs could not be reset:\n{lines}\n{len(held)} device(s) in use",
        )
    for gpu in gpus:
        if state.options["reset_with_vgpus"] == "destroy":
            from vgpu_dm.sim.reboot import drop_vgpus

            drop_vgpus(base, gpu)  # only unheld vGPUs are left: a held one makes its GPU busy
        if gpu.mig_pending is not None:
            gpu.mig_mode, gpu.mig_pending = gpu.mig_pending, None
        gpu.gpu_instances = []


def _apply_mode(
    base: Path,
    state: SimState,
    entries: list[dict[str, Any]],
    flags: dict[str, Any],
    busy: set[str],
    fault: bool,
) -> None:
    try:
        _assert_mode(state, entries)
        return
    except Fatal:
        pass
    pending = False
    for entry, _, gpu in _walk(state, entries):
        enabled = bool(entry["mig-enabled"])
        if not gpu.mig_profiles:
            if entry["devices"] == "all" or not enabled:
                continue
            raise Fatal("cannot set MIG mode on non MIG-capable GPU")
        if gpu.mig_mode:
            try:
                mig.destroy_instances(gpu)
            except mig.MigError as exc:
                raise Fatal(f"error clearing existing MIG configurations: {exc}") from None
        set_mode(state, gpu, enabled, busy)
        pending = pending or gpu.mig_pending is not None
    if pending and not flags.get("skip_reset"):
        _reset_all(base, state, busy, fault)


def _apply_config(state: SimState, entries: list[dict[str, Any]]) -> None:
    for entry, _, gpu in _walk(state, entries):
        enabled = bool(entry["mig-enabled"])
        if not gpu.mig_profiles:
            if entry["devices"] == "all" or not enabled:
                continue
            raise Fatal("cannot set MIG config on non MIG-capable GPU")
        if enabled and not gpu.mig_mode:
            raise Fatal("unable to apply MIG config with MIG mode disabled")
        if not enabled:
            if gpu.mig_mode:
                raise Fatal(
                    "MIG mode is currently enabled, but the configuration specifies it should be disabled"
                )
            continue
        wanted = _wanted(entry)
        if _layout(gpu) == wanted:
            continue
        try:
            mig.destroy_instances(gpu)
        except mig.MigError as exc:
            raise Fatal(f"error setting MIGConfig: error clearing MigConfig: {exc}") from None
        if any(p not in gpu.mig_profiles for p in wanted):
            continue  # mig-parted builds nothing for a profile the GPU does not offer, and succeeds
        try:
            mig.create_instances(gpu, list(wanted.elements()))
        except mig.MigError:
            raise Fatal(
                "error setting MIGConfig: error attempting multiple config orderings: all orderings failed"
            ) from None


def vf_refusal(
    state: SimState, argv: list[str], stdin: str | None
) -> subprocess.CompletedProcess[str] | None:
    """For the real binary, which knows nothing of SR-IOV: the failure of an ``apply`` whose mode step
    would switch MIG mode on a GPU with VFs enabled where the simulated driver refuses that (the
    binary would have changed the GPUs before that one; this refuses before any)."""
    try:
        command, flags = _options(list(argv[1:]), {})
        if command != "apply":
            return None
        entries = _parse(flags, stdin)
        _assert_mode(state, entries)
        return None
    except Fatal:
        pass
    for entry, _, gpu in _walk(state, entries):
        enabled = bool(entry["mig-enabled"])
        which = "on" if enabled else "off"
        if (
            gpu.mig_profiles
            and gpu.vfs
            and enabled != gpu.mig_mode
            and state.options[f"mig_{which}_with_vfs"] == "refuse"
        ):
            msg = "Error applying MIG configuration with hooks: error setting MIG mode: ERROR_NOT_SUPPORTED"
            return subprocess.CompletedProcess(argv, 1, "", log_line("fatal", msg))
    return None


# -- export -----------------------------------------------------------------------------------------------


def export_items(state: SimState) -> list[dict[str, Any]]:
    """The merged entries of ``nvidia-mig-parted export`` (upstream's mergeMigConfigSpecs)."""
    specs = []
    for index, gpu in enumerate(state.nvml_gpus()):
        enabled = bool(gpu.mig_profiles) and gpu.mig_mode
        layout = dict(sorted(_layout(gpu).items())) if enabled else {}
        specs.append(
            {"filter": [f"0x{gpu.device:04X}10DE"], "devices": [index], "enabled": enabled, "layout": layout}
        )
    merged: list[dict[str, Any]] = []
    for spec in specs:
        for item in merged:
            if item["enabled"] == spec["enabled"] and item["layout"] == spec["layout"]:
                item["devices"] = sorted({*item["devices"], *spec["devices"]})
                item["filter"] = sorted({*item["filter"], *spec["filter"]})
                break
        else:
            merged.append({**spec, "filter": list(spec["filter"]), "devices": list(spec["devices"])})
    per_filter: dict[str, set[int]] = {}
    for spec in specs:
        per_filter.setdefault(spec["filter"][0], set()).update(spec["devices"])
    out = []
    for item in merged:
        covered = set().union(*(per_filter[f] for f in item["filter"]))
        entry: dict[str, Any] = {}
        if len(per_filter) > 1 and len(merged) > 1:
            entry["device-filter"] = item["filter"][0] if len(item["filter"]) == 1 else item["filter"]
        entry["devices"] = "all" if set(item["devices"]) == covered else item["devices"]
        entry["mig-enabled"] = item["enabled"]
        entry["mig-devices"] = item["layout"]
        out.append(entry)
    return out


def _export_text(items: list[dict[str, Any]], label: str, fmt: str) -> str:
    import json

    if fmt == "json":
        return json.dumps({"version": "v1", "mig-configs": {label: items}}, indent=2)
    lines = ["version: v1", "mig-configs:", f"  {label}:"]
    for item in items:
        first = True
        for key, value in item.items():
            lead = "  - " if first else "    "
            first = False
            if key == "device-filter":
                text = (
                    json.dumps(value)
                    if isinstance(value, str)
                    else "[" + ", ".join(map(json.dumps, value)) + "]"
                )
            elif key == "devices":
                text = value if value == "all" else "[" + ", ".join(map(str, value)) + "]"
            elif key == "mig-enabled":
                text = "true" if value else "false"
            else:
                if not value:
                    lines.append(f"{lead}{key}: {{}}")
                    continue
                lines.append(f"{lead}{key}:")
                lines.extend(f"      {p}: {n}" for p, n in value.items())
                continue
            lines.append(f"{lead}{key}: {text}")
    return "\n".join(lines) + "\n"


# -- entry ------------------------------------------------------------------------------------------------


def run(base: Path, argv: list[str], stdin: str | None = None, env: dict[str, str] | None = None):
    """Run the simulated mig-parted on the host at ``base``; a CompletedProcess like the real one's."""
    from vgpu_dm.sim.faults import Faults

    env = dict(os.environ if env is None else env)
    out: list[str] = []
    err: list[str] = []
    try:
        command, flags = _options(list(argv[1:]), env)
        fault = Faults.load(base).mig_parted
        if command == "export":
            if fault == "nvml":
                raise Fatal(NVML_FAILED)
            state = SimState.load(base)
            text = _export_text(export_items(state), flags["label"], flags["format"])
            return subprocess.CompletedProcess(argv, 0, text, "")
        entries = _parse(flags, stdin)
        if flags.get("valid"):
            return subprocess.CompletedProcess(argv, 0, "Selected MIG configuration is valid\n", "")
        state = SimState.load(base)
        if command == "assert":
            try:
                if fault == "nvml":
                    raise Fatal(NVML_FAILED)
                _assert_mode(state, entries)
                if not flags.get("mode_only"):
                    _assert_config(state, entries)
            except Fatal:
                raise Fatal(ASSERT_FAILED) from None
            what = "MIG mode settings from configuration" if flags.get("mode_only") else "MIG configuration"
            return subprocess.CompletedProcess(argv, 0, f"Selected {what} currently applied\n", "")
        try:
            if fault == "nvml":
                raise Fatal(NVML_FAILED)
            before = state_snapshot(state)
            try:
                busy = busy_gpus(base, state)
                _apply_mode(base, state, entries, flags, busy, fault == "reset")
                if not flags.get("mode_only"):
                    try:
                        _assert_config(state, entries)
                    except Fatal:
                        if fault == "apply":
                            raise Fatal("error running pre-apply-config hook: exit status 1") from None
                        _apply_config(state, entries)
            finally:
                if state_snapshot(state) != before:
                    save(base, state)
        except Fatal as exc:
            if len(exc.args) > 1:
                err.append(log_line("error", "\n" + exc.args[1] + "\n"))
            raise Fatal(f"error applying MIG configuration with hooks: {exc.args[0]}") from None
        out.append("MIG configuration applied successfully\n")
        return subprocess.CompletedProcess(argv, 0, "".join(out), "".join(err))
    except Fatal as exc:
        return subprocess.CompletedProcess(
            argv, 1, "".join(out), "".join(err) + log_line("fatal", _capitalize(exc.args[0]))
        )


def state_snapshot(state: SimState) -> list[tuple]:
    return [(g.address, g.mig_mode, g.mig_pending, [dict(gi) for gi in g.gpu_instances]) for g in state.gpus]


def save(base: Path, state: SimState) -> None:
    from vgpu_dm.sim.driver import refresh_gpu

    state.save(base)
    for gpu in state.gpus:
        refresh_gpu(base, gpu)


def entry_point() -> None:
    """``nvidia-mig-parted-sim``: the simulated mig-parted on the host selected by ``VGPU_DM_SIM``."""
    from vgpu_dm.host.root import SIM_MARKER

    root = os.environ.get("VGPU_DM_SIM")
    if not root or not Path(root, SIM_MARKER, "host.json").is_file():
        sys.stderr.write(
            "nvidia-mig-parted-sim: set VGPU_DM_SIM to a simulated host (nvidia-vgpu-dm sim create)\n"
        )
        sys.exit(2)
    stdin = sys.stdin.read() if "-" in sys.argv else None
    from vgpu_dm.sim.host import SimHostRoot

    proc = SimHostRoot(root).run(["nvidia-mig-parted", *sys.argv[1:]], input=stdin)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    sys.exit(proc.returncode)
