"""What the tool asks ``nvidia-smi``: mixed-size (heterogeneous) vGPU mode per GPU, and the full list
of a GPU's vGPU types (which, unlike creatable lists, does not shrink as the GPU fills).

Layout of ``nvidia-smi -q`` (real captures: Tesla P40 / driver 535, H100 NVL / driver 550): the
driver-wide ``vGPU Driver Capability`` block with ``Heterogenous Multi-vGPU : Supported`` comes once,
before ``Attached GPUs``; then one block per GPU (``GPU 00000000:3B:00.0``), whose
``vGPU Device Capability`` says ``Heterogeneous Time-Slice Sizes : Supported|Not Supported`` and whose
``GPU Virtualization Mode`` says ``vGPU Heterogeneous Mode : Enabled|Disabled``. The driver-wide line
reads Supported on GPUs whose own line reads Not Supported, so only the per-GPU block counts.

``host/programs.py`` owns this module: it decides where nvidia-smi runs and hands a ``run`` function in;
nothing here imports it back.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, NamedTuple

from vgpu_dm import log
from vgpu_dm.errors import HostError
from vgpu_dm.host.pci import GPU, address_key
from vgpu_dm.host.root import note_change

if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable

    Runner = Callable[[list[str], str], subprocess.CompletedProcess[str]]

_log = log.get("smi")

_GPU_HEADER = re.compile(r"GPU ([0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-7])\s*")
_SIZES = re.compile(r"\s+Heterogeneous Time-Slice Sizes\s*:\s*(.+?)\s*")
_MODE = re.compile(r"\s+vGPU Heterogeneous Mode\s*:\s*(.+?)\s*")


class NvmlGPU(NamedTuple):
    """A GPU as NVML sees it: its index (NVML's order, which nvidia-mig-parted uses), PCI bus id and
    MIG mode, current and pending (None on a GPU without MIG)."""

    index: int
    address: str  # sysfs form, 0000:3b:00.0
    mig_current: bool | None
    mig_pending: bool | None


NVML_QUERY = "--query-gpu=index,pci.bus_id,mig.mode.current,mig.mode.pending"


def _mode(text: str) -> bool | None:
    word = text.strip().strip("[]").lower()
    if word in ("enabled", "disabled"):
        return word == "enabled"
    if word in ("n/a", "not supported"):
        return None
    raise ValueError(f"MIG mode {text.strip()!r} is neither Enabled, Disabled nor N/A")


def parse_nvml_gpus(text: str) -> list[NvmlGPU]:
    """``nvidia-smi --query-gpu=index,pci.bus_id,mig.mode.current,mig.mode.pending
    --format=csv,noheader`` (``0, 00000000:3B:00.0, Enabled, Enabled``); ValueError if it is not that."""
    gpus = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 4 or not fields[0].isdigit():
            raise ValueError(f"unexpected line {line.strip()!r}")
        key = address_key(fields[1].lower())
        address = f"{key[0]:04x}:{key[1]:02x}:{key[2]:02x}.{key[3]:x}"
        gpus.append(NvmlGPU(int(fields[0]), address, _mode(fields[2]), _mode(fields[3])))
    return gpus


def parse_mixed_size(text: str, address: str) -> tuple[bool, bool]:
    """(supported, enabled) of the GPU at ``address`` from ``nvidia-smi -q`` output.

    Raises ValueError when the output has no block for that GPU.
    """
    want = address_key(address)
    inside = False
    found = False
    supported = enabled = False
    for line in text.splitlines():
        header = _GPU_HEADER.fullmatch(line)
        if header:
            inside = address_key(header[1].lower()) == want
            found = found or inside
            continue
        if not inside:
            continue
        if m := _SIZES.fullmatch(line):
            supported = m[1] == "Supported"
        elif m := _MODE.fullmatch(line):
            enabled = m[1] == "Enabled"
    if not found:
        raise ValueError(f"no 'GPU {address}' block in the output")
    return supported, enabled


def parse_supported_types(text: str) -> dict[int, str]:
    """``nvidia-smi vgpu -s -v`` → {type id: name}; each ``vGPU Type ID : 0x…`` precedes its ``Name``."""
    types: dict[int, str] = {}
    pending: int | None = None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "vGPU Type ID":
            try:
                pending = int(value, 16)
            except ValueError:
                pending = None
        elif key == "Name" and pending is not None:
            types[pending] = value
            pending = None
    return types


class NvidiaSmi:
    """nvidia-smi, run through ``run(argv, what)`` (Programs.run: in the root where it was found)."""

    def __init__(self, run: Runner, path: str = "nvidia-smi"):
        self._run = run
        self.path = path

    def _fail(self, gpu: GPU, what: str, proc) -> HostError:
        out = (proc.stderr or proc.stdout or "").strip()
        return HostError(f"{gpu.describe()}: 'nvidia-smi {what}' failed (exit {proc.returncode}): {out}")

    def mixed_size(self, gpu: GPU) -> tuple[bool, bool]:
        """(supported, enabled) for heterogeneous time-sliced vGPUs on this GPU."""
        proc = self._run([self.path, "-q", "-i", gpu.address], "nvidia-smi")
        if proc.returncode != 0:
            raise self._fail(gpu, f"-q -i {gpu.address}", proc)
        try:
            return parse_mixed_size(proc.stdout, gpu.address)
        except ValueError as exc:
            raise HostError(
                f"{gpu.describe()}: cannot read 'nvidia-smi -q -i {gpu.address}': {exc}"
            ) from None

    def set_mixed_size(self, gpu: GPU, enabled: bool) -> None:
        verb, action = ("enabling", "mixed-size-on") if enabled else ("disabling", "mixed-size-off")
        _log.info(
            f"{gpu.describe()}: {verb} mixed-size (heterogeneous) vGPU mode",
            extra=log.fields(gpu=gpu.index, address=gpu.address, action=action),
        )
        note_change()
        proc = self._run(
            [self.path, "vgpu", "-i", gpu.address, "-shm", "1" if enabled else "0"], "nvidia-smi"
        )
        if proc.returncode != 0:
            raise HostError(
                f"{gpu.describe()}: could not {'enable' if enabled else 'disable'} mixed-size vGPU mode "
                f"(nvidia-smi exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()}"
            )

    def nvml_gpus(self) -> list[NvmlGPU]:
        """The GPUs NVML sees, with their indices and MIG modes; HostError when nvidia-smi fails."""
        proc = self._run([self.path, NVML_QUERY, "--format=csv,noheader"], "nvidia-smi")
        out = (proc.stderr or proc.stdout or "").strip()
        if proc.returncode != 0:
            raise HostError(
                f"'nvidia-smi {NVML_QUERY} --format=csv,noheader' failed (exit {proc.returncode}): {out}"
            )
        try:
            return parse_nvml_gpus(proc.stdout)
        except ValueError as exc:
            raise HostError(f"cannot read 'nvidia-smi {NVML_QUERY}': {exc}") from None

    def set_mig_mode(self, gpu: GPU, enabled: bool) -> None:
        """``nvidia-smi -i <gpu> -mig 0|1``: sets the GPU's pending MIG mode (it takes effect at the next
        reset or reboot where the GPU needs one)."""
        note_change()
        proc = self._run([self.path, "-i", gpu.address, "-mig", "1" if enabled else "0"], "nvidia-smi")
        if proc.returncode != 0:
            raise self._fail(gpu, f"-i {gpu.address} -mig {int(enabled)}", proc)

    def supported_types(self, gpu: GPU) -> dict[int, str]:
        """Every vGPU type of the GPU (ids are hex in this output); HostError when nvidia-smi fails."""
        proc = self._run([self.path, "vgpu", "-s", "-v", "-i", gpu.address], "nvidia-smi")
        if proc.returncode != 0:
            raise self._fail(gpu, f"vgpu -s -v -i {gpu.address}", proc)
        return parse_supported_types(proc.stdout)
