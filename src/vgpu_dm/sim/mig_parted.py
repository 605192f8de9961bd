"""A stand-in for ``nvidia-mig-parted`` on a simulated host: ``assert``, ``apply`` and ``export`` with
its flags (``-f/--config-file`` or ``MIG_PARTED_CONFIG_FILE``, ``-c/--selected-config``,
``-m/--mode-only``, ``-a/--valid-config``, ``-s/--skip-reset``), its v1 config format, and its order of
work (NVIDIA/mig-parted ``cmd/nvidia-mig-parted``): mode first (existing instances cleared, mode set, all
GPUs reset if a change is pending and ``--skip-reset`` is not given), then instances per GPU, where a GPU
that already has the wanted instances is skipped. GPUs are indexed in PCI address order.

The fault ``mig_parted`` of the simulated host makes it fail: ``reset`` = the GPU reset fails because
a client holds the GPU (the mode change stays pending), ``fail`` = an error before anything changes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import yaml

from vgpu_dm.device_id import DeviceID, InvalidDeviceID
from vgpu_dm.sim import mig
from vgpu_dm.sim.driver import refresh_gpu
from vgpu_dm.sim.faults import Faults
from vgpu_dm.sim.layout import SimGPU, SimState

ASSERT_FAILED = "Assertion failure: selected configuration not currently applied"


class Failed(Exception):
    """mig-parted exits 1 with this message."""


def _options(args: list[str], env: dict[str, str]) -> tuple[str, dict[str, object]]:
    flags: dict[str, object] = {
        "config": env.get("MIG_PARTED_CONFIG_FILE", ""),
        "selected": env.get("MIG_PARTED_SELECTED_CONFIG", ""),
        "mode_only": False,
        "valid": False,
        "skip_reset": False,
    }
    args = [a for a in args if a not in ("-d", "--debug")]
    if not args or args[0] not in ("assert", "apply", "export"):
        raise Failed("usage: nvidia-mig-parted [--debug] assert|apply|export [options]")
    command, rest = args[0], args[1:]
    i = 0
    while i < len(rest):
        arg = rest[i]
        name, eq, value = arg.partition("=")
        if name in ("-f", "--config-file", "-c", "--selected-config"):
            if not eq:
                i += 1
                if i >= len(rest):
                    raise Failed(f"flag needs an argument: {name}")
                value = rest[i]
            flags["config" if name in ("-f", "--config-file") else "selected"] = value
        elif arg in ("-m", "--mode-only"):
            flags["mode_only"] = True
        elif arg in ("-a", "--valid-config") and command == "assert":
            flags["valid"] = True
        elif arg in ("-s", "--skip-reset") and command == "apply":
            flags["skip_reset"] = True
        else:
            raise Failed(f"flag provided but not defined: {arg}")
        i += 1
    return command, flags


def _load(flags: dict[str, object], stdin: str | None) -> list[dict]:
    path = str(flags["config"])
    if not path:
        raise Failed("missing required flags 'config-file'")
    try:
        text = (stdin or "") if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise Failed(f"error parsing config file: read error: {exc}") from None
    try:
        spec = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise Failed(f"error parsing config file: unmarshal error: {exc}") from None
    if (
        not isinstance(spec, dict)
        or spec.get("version") != "v1"
        or not isinstance(spec.get("mig-configs"), dict)
    ):
        raise Failed("error parsing config file: unmarshal error: expected version v1 and mig-configs")
    configs = spec["mig-configs"]
    selected = str(flags["selected"])
    if not selected:
        if len(configs) != 1:
            raise Failed(
                "error selecting MIG config: missing required flag 'selected-config' when more than one "
                "config available"
            )
        selected = next(iter(configs))
    if selected not in configs:
        raise Failed(f"error selecting MIG config: selected mig-config not present: {selected}")
    entries = configs[selected]
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise Failed("error parsing config file: unmarshal error: a mig-config is a list of entries")
    for entry in entries:
        unknown = set(entry) - {"devices", "device-filter", "mig-enabled", "mig-devices"}
        if unknown or "devices" not in entry or "mig-enabled" not in entry:
            raise Failed(f"error parsing config file: unmarshal error: bad entry {entry}")
    return entries


def _gpus(state: SimState) -> list[SimGPU]:
    def order(gpu: SimGPU) -> int:
        return int(gpu.address.replace(":", "").replace(".", ""), 16)

    return sorted(state.gpus, key=order)


def _selects(entry: dict, index: int, gpu: SimGPU) -> bool:
    devices = entry["devices"]
    if devices != "all" and index not in (devices or []):
        return False
    flt = entry.get("device-filter")
    if not flt:
        return True
    own = DeviceID(gpu.device, 0x10DE, gpu.subsystem_device, 0x10DE)
    try:
        return any(DeviceID.parse(f).matches(own) for f in ([flt] if isinstance(flt, str) else flt))
    except InvalidDeviceID:
        return False


def _walk(state: SimState, entries: list[dict]):
    for entry in entries:
        for index, gpu in enumerate(_gpus(state)):
            if _selects(entry, index, gpu):
                yield entry, index, gpu


def _wanted(entry: dict) -> Counter:
    return Counter({str(k): int(v) for k, v in (entry.get("mig-devices") or {}).items() if int(v) > 0})


def _assert(state: SimState, entries: list[dict], mode_only: bool) -> None:
    for entry, _, gpu in _walk(state, entries):
        enabled = bool(entry["mig-enabled"])
        if not gpu.mig_profiles:
            if enabled:
                raise Failed(ASSERT_FAILED)
            continue
        if gpu.mig_mode != enabled:
            raise Failed(ASSERT_FAILED)
        if not mode_only and enabled:
            have = Counter(gi["profile"] for gi in gpu.gpu_instances)
            if have != _wanted(entry):
                raise Failed(ASSERT_FAILED)


def _apply_mode(state: SimState, entries: list[dict], skip_reset: bool, faults: Faults) -> None:
    try:
        _assert(state, entries, mode_only=True)
        return
    except Failed:
        pass
    pending = []
    for entry, _, gpu in _walk(state, entries):
        enabled = bool(entry["mig-enabled"])
        if not gpu.mig_profiles:
            if enabled and entry["devices"] != "all":
                raise Failed("cannot set MIG mode on non MIG-capable GPU")
            continue
        if gpu.mig_mode:
            try:
                mig.destroy_instances(gpu)
            except mig.MigError as exc:
                raise Failed(f"error clearing existing MIG configurations: {exc}") from None
        if not enabled and gpu.vfs and state.options["mig_off_with_vfs"] == "refuse":
            raise Failed(
                f"error setting MIG mode: GPU {gpu.address}: Not Supported (SR-IOV virtual functions "
                f"are enabled; disable them first)"
            )
        if enabled == gpu.mig_mode:
            gpu.mig_pending = None
        elif state.options["mig_reset"] == "immediate":
            gpu.mig_mode, gpu.mig_pending = enabled, None
        else:
            gpu.mig_pending = enabled
            pending.append(gpu)
    if not pending or skip_reset:
        return
    if faults.mig_parted == "reset":
        raise Failed(
            "error resetting all GPUs: exit status 255\n"
            f"GPU 0000{pending[0].address[4:]}: The following processes are using this GPU; stop them "
            f"before a reset: nv-hostengine (injected fault)"
        )
    for gpu in pending:
        gpu.mig_mode, gpu.mig_pending = bool(gpu.mig_pending), None
        gpu.gpu_instances = []


def _apply_config(state: SimState, entries: list[dict]) -> None:
    for entry, _, gpu in _walk(state, entries):
        enabled = bool(entry["mig-enabled"])
        if not gpu.mig_profiles:
            if enabled and entry["devices"] != "all":
                raise Failed("cannot set MIG config on non MIG-capable GPU")
            continue
        if enabled and not gpu.mig_mode:
            raise Failed("unable to apply MIG config with MIG mode disabled")
        if not enabled:
            if gpu.mig_mode:
                raise Failed(
                    "MIG mode is currently enabled, but the configuration specifies it should be disabled"
                )
            continue
        wanted = _wanted(entry)
        if Counter(gi["profile"] for gi in gpu.gpu_instances) == wanted:
            continue
        try:
            mig.destroy_instances(gpu)
            # Largest instances first: they have the fewest placements.
            mig.create_instances(gpu, list(wanted.elements()))
        except mig.MigError as exc:
            if not gpu.mig_hosts:
                gpu.gpu_instances = []
            raise Failed(f"error setting MIGConfig: GPU {gpu.address}: {exc}") from None


def _export(state: SimState) -> str:
    items = []
    for index, gpu in enumerate(_gpus(state)):
        item: dict = {"devices": [index], "mig-enabled": bool(gpu.mig_profiles) and gpu.mig_mode}
        if item["mig-enabled"]:
            item["mig-devices"] = dict(Counter(gi["profile"] for gi in gpu.gpu_instances))
        items.append(item)
    return yaml.safe_dump({"version": "v1", "mig-configs": {"current": items}}, sort_keys=False)


def run(base: Path, argv: list[str], stdin: str | None = None, env: dict[str, str] | None = None):
    """Run the simulated mig-parted on the host at ``base``; a CompletedProcess like the real one."""
    env = dict(os.environ if env is None else env)
    out: list[str] = []
    try:
        command, flags = _options(list(argv[1:]), env)
        if command == "export":
            state = SimState.load(base)
            return subprocess.CompletedProcess(argv, 0, _export(state), "")
        entries = _load(flags, stdin)
        if flags["valid"]:
            return subprocess.CompletedProcess(argv, 0, "Selected MIG configuration is valid\n", "")
        state = SimState.load(base)
        if command == "assert":
            _assert(state, entries, bool(flags["mode_only"]))
            what = "MIG mode settings from configuration" if flags["mode_only"] else "MIG configuration"
            return subprocess.CompletedProcess(argv, 0, f"Selected {what} currently applied\n", "")
        faults = Faults.load(base)
        if faults.mig_parted == "fail":
            raise Failed("error applying MIG configuration with hooks: NVML: Unknown Error (injected fault)")
        try:
            _apply_mode(state, entries, bool(flags["skip_reset"]), faults)
            if not flags["mode_only"]:
                _apply_config(state, entries)
        finally:
            state.save(base)
            for gpu in state.gpus:
                refresh_gpu(base, gpu)
        out.append("MIG configuration applied successfully\n")
        return subprocess.CompletedProcess(argv, 0, "".join(out), "")
    except Failed as exc:
        return subprocess.CompletedProcess(argv, 1, "".join(out), f'level=fatal msg="{exc}"\n')


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
    proc = run(Path(root), ["nvidia-mig-parted", *sys.argv[1:]], stdin)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    sys.exit(proc.returncode)
