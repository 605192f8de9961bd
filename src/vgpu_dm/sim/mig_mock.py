"""The real ``nvidia-mig-parted`` for a simulated host: the v0.15.0 binary built on a persistent mock NVML
(shared/mig-parted-mock), named by ``VGPU_DM_SIM_MIG_PARTED``.

Before each call the simulator writes the mock's state file from its own MIG state (the GPUs NVML sees,
their MIG mode current and pending, GPU instances, whether something holds them) and reads it back
afterwards, so that sysfs (the vGPU types a GPU offers) and NVML agree. The command logic, messages,
exit codes, the reset of every GPU and the merged export are then the real program's.

The mock reports a GPU's PCI device id from its model, so only GPUs with a model of the same id and the
same instance profiles are delegated (``MOCK_MODELS``); a host with any other MIG GPU uses the simulated
mig-parted (sim/mig_parted.py). GPUs without MIG are written as ``mig_capable: false``.

Faults of ``sim fault --mig-parted`` reach the binary through its own interfaces: ``nvml`` points it at
a state file that does not exist (NVML initialisation fails), ``reset`` gives it an ``nvidia-smi`` that
fails the reset, ``apply`` a hooks file whose pre-apply-config hook fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from vgpu_dm.sim.layout import SimGPU, SimState

ENV = "VGPU_DM_SIM_MIG_PARTED"
STATE = "mig-parted-mock.json"
# PCI device id → the mock model that reports it (shared/mig-parted-mock/README.md "Models"; ids read
# from the binary's own 'GPU <i>: 0x…' debug lines).
MOCK_MODELS = {
    0x20F1: "A100-PCIE-40GB",
    0x20B0: "A100-SXM4-40GB",
    0x20B5: "A100-PCIE-80GB",
    0x20B2: "A100-SXM4-80GB",
    0x20B7: "A30-PCIE-24GB",
    0x2330: "H100-SXM5-80GB",
}
# NVML GPU-instance profile ids (nvml.h GPU_INSTANCE_PROFILE_*), for instances the simulated mig-parted
# made: by slices, +me (REV1), and the 1-slice profile with twice the memory (REV2).
_GI_PROFILE_IDS = {1: 0, 2: 1, 3: 2, 4: 3, 7: 4, 8: 5, 6: 6}
_CI_PROFILE_IDS = {1: 0, 2: 1, 3: 2, 4: 3, 7: 4, 8: 5, 6: 6}


def binary() -> str | None:
    """The real mig-parted to delegate to, if one is configured."""
    path = os.environ.get(ENV, "").strip()
    return path or None


def usable(state: SimState) -> bool:
    """Whether every MIG GPU NVML sees has a mock model (same device id, same instance profiles)."""
    return all(not g.mig_profiles or g.device in MOCK_MODELS for g in state.nvml_gpus())


def _gi_record(gpu: SimGPU, gi: dict) -> dict:
    if "nvml" in gi:
        return gi["nvml"]
    import re

    m = re.fullmatch(r"(\d+)g\.(\d+)gb(.*)", gi["profile"])
    slices, memory, suffix = int(m[1]), int(m[2]), m[3]
    smallest = min(int(re.match(r"\d+g\.(\d+)", p)[1]) for p in gpu.mig_profiles if p.startswith("1g."))
    if suffix == "+me":
        profile_id = 7 if slices == 1 else 8
    elif slices == 1 and memory > smallest:
        profile_id = 9
    else:
        profile_id = _GI_PROFILE_IDS[slices]
    from vgpu_dm.sim.mig import shapes

    size = shapes(gpu).get(gi["profile"])
    ci_slices = 1 if profile_id in (7, 9) else slices
    return {
        "id": gi["id"],
        "profile_id": profile_id,
        "placement": {"start": gi["start"], "size": size.size if size else 1},
        "compute_instances": [
            {
                "id": 0,
                "profile_id": _CI_PROFILE_IDS[ci_slices],
                "eng_profile_id": 0,
                "placement": {"start": 0, "size": ci_slices},
            }
        ],
    }


def write_state(directory: Path, state: SimState, busy: set[str]) -> Path:
    """The mock's state file (in ``directory``), from the simulator's MIG state."""
    gpus = []
    for gpu in state.nvml_gpus():
        mode = "enabled" if gpu.mig_mode else "disabled"
        pending = mode if gpu.mig_pending is None else ("enabled" if gpu.mig_pending else "disabled")
        gpus.append(
            {
                "model": MOCK_MODELS.get(gpu.device, "A100-PCIE-40GB"),
                "pci_bus_id": gpu.address,
                "subsystem_id": f"0x{gpu.subsystem_device:04X}10DE",
                "mig_capable": bool(gpu.mig_profiles),
                "mode_change": "immediate" if state.mode_change(gpu) == "immediate" else "reset-required",
                "mig_mode": {"current": mode, "pending": pending},
                "busy": gpu.address in busy,
                "gpu_instances": [_gi_record(gpu, gi) for gi in gpu.gpu_instances]
                if gpu.mig_profiles
                else [],
            }
        )
    path = directory / STATE
    path.write_text(json.dumps({"driver_version": state.driver_version, "gpus": gpus}, indent=1))
    return path


class Violation(Exception):
    """The binary did something the simulated driver says a real one refuses."""


def read_state(base: Path, path: Path, state: SimState) -> None:
    """Take the mock's MIG state back into ``state``. A GPU the binary reset loses its vGPUs when the
    host says a reset destroys them (``reset_with_vgpus: destroy``; otherwise such a GPU was busy and
    the reset failed). Raises Violation when a GPU instance that hosts a vGPU was destroyed."""
    from vgpu_dm.sim.reboot import drop_vgpus

    raw = json.loads(path.read_text())
    reset = {
        address
        for entry in raw.get("reset_log") or []
        if entry.get("result") == "success"
        for address in entry["command"][-1].split(",")
    }
    by_address = {g.address: g for g in state.gpus}
    for record in raw["gpus"]:
        gpu = by_address[record["pci_bus_id"]]
        if gpu.address in reset and state.options["reset_with_vgpus"] == "destroy":
            drop_vgpus(base, gpu)
        gpu.mig_mode = record["mig_mode"]["current"] == "enabled"
        pending = record["mig_mode"].get("pending") or record["mig_mode"]["current"]
        gpu.mig_pending = None if (pending == "enabled") == gpu.mig_mode else pending == "enabled"
        before = {gi["id"]: (gi["profile"], gi["start"]) for gi in gpu.gpu_instances}
        after = [
            {"id": gi["id"], "profile": gi["profile"], "start": gi["placement"]["start"], "nvml": gi}
            for gi in record.get("gpu_instances") or []
        ]
        now = {gi["id"]: (gi["profile"], gi["start"]) for gi in after}
        lost = [gid for gid in set(gpu.mig_hosts.values()) if before.get(gid) != now.get(gid)]
        if lost:
            raise Violation(
                f"simulator: nvidia-mig-parted destroyed GPU instance(s) {lost} of GPU {gpu.address}, which "
                f"host vGPUs; a real driver refuses that (In use by another client)"
            )
        gpu.gpu_instances = after


def _fault_env(directory: Path, fault: str, env: dict[str, str]) -> None:
    if fault == "nvml":
        env["MIG_PARTED_MOCK_STATE"] = str(directory / "no-such-mig-parted-state.json")
    elif fault == "reset":
        from vgpu_dm.sim.mig_parted import RESET_FAULT_OUTPUT

        script = directory / "nvidia-smi-reset-fails"
        text = RESET_FAULT_OUTPUT.format(ids="$3")
        script.write_text(f'#!/bin/sh\necho "{text}"\nexit 255\n')
        script.chmod(0o755)
        env["MIG_PARTED_MOCK_NVIDIA_SMI"] = str(script)
    elif fault == "apply":
        hooks = directory / "mig-parted-hooks-fail.yaml"
        hooks.write_text(
            "version: v1\nhooks:\n  pre-apply-config:\n  - command: /bin/false\n    workdir: /\n"
        )
        env["MIG_PARTED_HOOKS_FILE"] = str(hooks)


def run(
    base: Path, state: SimState, argv: list[str], stdin: str | None, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run the real binary for the simulated host at ``base`` (under the simulator's driver lock)."""
    from vgpu_dm.sim.faults import Faults
    from vgpu_dm.sim.mig_parted import busy_gpus, save, vf_refusal

    program = binary()
    assert program is not None
    fault = Faults.load(base).mig_parted
    refused = vf_refusal(state, argv, stdin)
    if refused is not None and fault != "nvml":
        return refused
    # The mock's files live only for this call (a simulated host may be read-only for a read command).
    with tempfile.TemporaryDirectory(prefix="vgpu-dm-mig-parted-") as scratch:
        path = write_state(Path(scratch), state, busy_gpus(base, state))
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "MIG_PARTED_MOCK_STATE": str(path)}
        _fault_env(Path(scratch), fault, env)
        proc = subprocess.run(
            [program, *argv[1:]],
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )
        proc.args = list(argv)
        if argv[1:2] != ["apply"] or fault == "nvml":
            return proc
        try:
            read_state(base, path, state)
        except Violation as exc:
            return subprocess.CompletedProcess(argv, 1, proc.stdout, f"{proc.stderr}{exc}\n")
    save(base, state)
    return proc
