"""``--uuid-mode stable``: mdev UUIDs derived from the machine id, GPU, type and ordinal.

Applying, clearing (``vgpu-devices: {}``) and re-applying gives every mdev back its UUID, as does the
same config on another host with the same machine id and GPU addresses (a reinstall); GPUs and
types get UUIDs of their own; a changed machine id gives other UUIDs; a missing machine id is a
clear error before any write. The default (random, as upstream) gives new UUIDs after a re-apply.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import writes
from vgpu_dm.sim.driver import mdev_devices
from vgpu_dm.sim.layout import SimState, create_host
from vgpu_dm.uuids import stable_uuid

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
T4_0, T4_1 = "0000:3b:00.0", "0000:5e:00.0"
CONFIG = """\
version: v1
vgpu-configs:
  four:
    - devices: all
      vgpu-devices: {"T4-4Q": 4}
  two:
    - devices: all
      vgpu-devices: {"T4-4Q": 2}
  eights:
    - devices: all
      vgpu-devices: {"T4-8Q": 2}
  clear:
    - devices: all
      vgpu-devices: {}
  mixed-hosts:
    - devices: [0]
      vgpu-devices: {"T4-4Q": 4}
    - devices: [1]
      vgpu-devices: {"L40S-12Q": 2}
"""


# -- helpers ---------------------------------------------------------------------------------------


def uuids(root: Path) -> dict[str, set[tuple[str, str]]]:
    """PF address → {(type, uuid)} of its mdevs, read from the simulator's tree."""
    state = SimState.load(root)
    return {g.address: {(t.name, u) for _, u, t in mdev_devices(root, g)} for g in state.gpus}


def flat(root: Path) -> set[str]:
    return {u for devices in uuids(root).values() for _, u in devices}


@pytest.fixture
def t4s(cli, workdir):
    """Factory: a fresh host (2 x T4 unless GPUs are given) and the config file; returns (root, config)."""
    config = workdir / "config.yaml"
    config.write_text(CONFIG)
    count = iter(range(100))

    def make(*gpus: str) -> tuple[Path, Path]:
        root = workdir / f"host{next(count)}"
        create_host(root, list(gpus or ("T4", "T4")))
        return root, config

    return make


def apply(cli, root: Path, config: Path, name: str, *extra: str, code: int = 0):
    result = cli("apply", "--sim", str(root), "-f", str(config), "-c", name, *extra)
    assert result.code == code, result.err
    assert "Traceback" not in result.err
    return result


def machine(root: Path) -> str:
    return (root / "etc/machine-id").read_text().strip()


# -- tests -----------------------------------------------------------------------------------------
def test_clear_and_reapply_gives_the_same_uuids(cli, t4s):
    root, config = t4s()
    apply(cli, root, config, "four", "--uuid-mode", "stable")
    first = uuids(root)
    assert all(len(v) == 4 for v in first.values())
    apply(cli, root, config, "clear", "--uuid-mode", "stable")
    assert flat(root) == set()
    apply(cli, root, config, "four", "--uuid-mode", "stable")
    assert uuids(root) == first
    # They are the documented derivation: machine id, GPU address, type, ordinal.
    for gpu in (T4_0, T4_1):
        expected = {("T4-4Q", stable_uuid(machine(root), gpu, "T4-4Q", i)) for i in range(4)}
        assert first[gpu] == expected


def test_every_gpu_and_type_gets_uuids_of_its_own(cli, t4s):
    root, config = t4s()
    apply(cli, root, config, "four", "--uuid-mode", "stable")
    fours = uuids(root)
    assert len(flat(root)) == 8  # none shared between the two GPUs
    apply(cli, root, config, "eights", "--uuid-mode", "stable")
    eights = flat(root)
    assert len(eights) == 4
    assert not eights & {u for v in fours.values() for _, u in v}
    apply(cli, root, config, "four", "--uuid-mode", "stable")
    assert uuids(root) == fours


def test_shrink_and_grow_gives_back_the_same_uuids(cli, t4s):
    root, config = t4s()
    apply(cli, root, config, "four", "--uuid-mode", "stable")
    four = uuids(root)
    apply(cli, root, config, "two", "--uuid-mode", "stable")
    two = uuids(root)
    assert all(two[g] < four[g] and len(two[g]) == 2 for g in four)
    apply(cli, root, config, "four", "--uuid-mode", "stable")
    assert uuids(root) == four


def test_same_machine_id_same_uuids_on_a_new_host_other_id_other_uuids(cli, t4s):
    first, config = t4s()
    apply(cli, first, config, "four", "--uuid-mode", "stable")
    reinstalled, _ = t4s()
    apply(cli, reinstalled, config, "four", "--uuid-mode", "stable")
    assert uuids(reinstalled) == uuids(first)
    other, _ = t4s()
    (other / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    apply(cli, other, config, "four", "--uuid-mode", "stable")
    assert not flat(other) & flat(first)


def test_uuid_mode_from_the_environment(cli, t4s):
    root, config = t4s()
    result = cli(
        "apply", "--sim", str(root), "-f", str(config), "-c", "four", env={"VGPU_DM_UUID_MODE": "stable"}
    )
    assert result.code == 0, result.err
    assert uuids(root)[T4_0] == {("T4-4Q", stable_uuid(machine(root), T4_0, "T4-4Q", i)) for i in range(4)}


@pytest.mark.parametrize("damage", ["missing", "empty"])
def test_missing_machine_id_is_a_clear_error_without_writes(cli, t4s, damage):
    root, config = t4s()
    if damage == "missing":
        (root / "etc/machine-id").unlink()
    else:
        (root / "etc/machine-id").write_text("\n")
    result = apply(cli, root, config, "four", "--uuid-mode", "stable", code=1)
    assert "--uuid-mode stable" in result.err and "etc/machine-id" in result.err, result.err
    assert writes(root) == []
    assert flat(root) == set()
    assert not (root / "run/nvidia-vgpu-dm/journal.json").exists()
    # Random mode does not need it.
    apply(cli, root, config, "four")
    assert len(flat(root)) == 8


def test_missing_machine_id_fails_before_the_host_is_touched_at_all(cli, t4s):
    root, config = t4s("T4", "L40S")  # the L40S boots with its VFs disabled
    (root / "etc/machine-id").unlink()
    apply(cli, root, config, "mixed-hosts", "--uuid-mode", "stable", code=1)
    assert writes(root) == []
    assert SimState.load(root).gpus[1].vfs == [], "VFs were enabled although the apply failed"


def test_default_random_mode_gives_new_uuids_after_clear_and_reapply(cli, t4s):
    root, config = t4s()
    apply(cli, root, config, "four")
    first = flat(root)
    assert len(first) == 8 and all(UUID.fullmatch(u) for u in first)
    apply(cli, root, config, "clear")
    apply(cli, root, config, "four")
    second = flat(root)
    assert len(second) == 8
    assert not first & second
    stable = {stable_uuid(machine(root), g, "T4-4Q", i) for g in (T4_0, T4_1) for i in range(4)}
    assert not (first | second) & stable
