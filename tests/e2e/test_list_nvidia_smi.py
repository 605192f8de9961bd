"""What ``list`` asks nvidia-smi for its MIXED column: nothing on a host without a GPU in vGPU mode,
one GPU's block (``-q -i <address>``) when only one GPU can have the mode, one ``-q`` for several
(each nvidia-smi run pays its own start-up and NVML initialisation on a real host).
"""

from __future__ import annotations

import json
import re

import pytest


def smi_runs(err: str) -> list[str]:
    return re.findall(r"run \[([^\]]*nvidia-smi[^\]]*)\] \(simulated\)", err)


@pytest.mark.parametrize(
    ("gpus", "expected"),
    [
        (["T4"], ["'/usr/bin/nvidia-smi', '-q', '-i', '0000:3b:00.0'"]),
        (["T4", "L40S"], ["'/usr/bin/nvidia-smi', '-q', '-i', '0000:3b:00.0'"]),  # the L40S's VFs are off
        (["L40S"], []),
        (["T4", "T4"], ["'/usr/bin/nvidia-smi', '-q'"]),
    ],
    ids=["one-mdev-gpu", "one-gpu-in-vgpu-mode", "none-in-vgpu-mode", "two-gpus"],
)
def test_list_asks_nvidia_smi_only_what_it_needs(cli, sim_host, gpus, expected):
    root = sim_host(*gpus)
    result = cli("list", "--sim", str(root), "-d", "-o", "json")
    assert result.code == 0, result.err
    assert smi_runs(result.err) == expected
    modes = [g["mixed_size"] for g in json.loads(result.out)["gpus"]]
    assert modes == [("off" if g == "T4" else None) for g in gpus]
