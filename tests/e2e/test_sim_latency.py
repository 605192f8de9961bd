"""The simulator's write-latency knob: set through the CLI, kept apart from faults, applied per kind of
write (create vs remove), and either overlapping across GPUs or serialised host-wide.

Only lower bounds on elapsed time are asserted (a sleep cannot end early); how much concurrency gains
is measured by bench/bench_apply_scaling.py, not asserted here.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from tests.conftest import EXAMPLES
from vgpu_dm.sim.host import SimHostRoot
from vgpu_dm.sim.latency import WriteLatency

T4_CONFIG = str(EXAMPLES / "config-t4.yaml")
T4_0, T4_1 = "0000:3b:00.0", "0000:5e:00.0"
T4_1Q = "sys/bus/pci/devices/{}/mdev_supported_types/nvidia-200/create"


def test_create_sets_latency_and_sim_latency_changes_only_what_is_given(cli, workdir: Path):
    root = workdir / "host"
    made = cli(
        "sim", "create", str(root), "--gpu", "T4", "--write-latency-ms", "30", "--remove-latency-ms", "10"
    )
    assert made.code == 0, made.err
    assert "write latency: create 30 ms, remove 10 ms (writes to different GPUs overlap)" in made.out
    assert WriteLatency.load(root) == WriteLatency(create_ms=30, remove_ms=10, serial=False)

    changed = cli("sim", "latency", str(root), "--create-latency-ms", "50", "--serial-writes")
    assert changed.code == 0, changed.err
    assert WriteLatency.load(root) == WriteLatency(create_ms=50, remove_ms=10, serial=True)
    assert "one write at a time" in changed.out

    # Clearing faults keeps the latency: it is a property of the simulated driver, not a fault.
    assert cli("sim", "fault", str(root)).code == 0
    assert WriteLatency.load(root) == WriteLatency(create_ms=50, remove_ms=10, serial=True)
    shown = cli("sim", "latency", str(root))
    assert shown.out.strip() == "write latency: create 50 ms, remove 10 ms (one write at a time)"

    assert cli("sim", "latency", str(root), "--write-latency-ms", "0").out.strip() == "write latency: none"


def test_plain_create_has_no_latency_file(cli, workdir: Path):
    root = workdir / "host"
    assert cli("sim", "create", str(root), "--gpu", "T4").code == 0
    assert not (root / ".vgpu-dm-sim" / "latency.json").exists()
    assert WriteLatency.load(root) == WriteLatency()


def test_sim_latency_refuses_bad_values_and_non_sim_dirs(cli, workdir: Path):
    root = workdir / "host"
    assert cli("sim", "create", str(root), "--gpu", "T4").code == 0
    negative = cli("sim", "latency", str(root), "--write-latency-ms", "-5")
    assert negative.code == 2 and "--write-latency-ms" in negative.err
    plain = workdir / "plain"
    plain.mkdir()
    refused = cli("sim", "latency", str(plain), "--write-latency-ms", "5")
    assert refused.code == 2 and "not a simulated host" in refused.err


def test_creates_and_removes_take_their_own_latency(cli, sim_host):
    root = sim_host("T4")
    WriteLatency(create_ms=0, remove_ms=40).save(root)
    start = time.monotonic()
    assert cli("apply", "--sim", str(root), "-f", T4_CONFIG, "-c", "T4-4Q").code == 0  # 4 creates
    creates = time.monotonic() - start
    start = time.monotonic()
    assert cli("apply", "--sim", str(root), "-f", T4_CONFIG, "-c", "T4-none").code == 0  # 4 removes
    removes = time.monotonic() - start
    assert removes >= 4 * 0.040
    # Creates are instant here, so they cannot have taken the removes' latency 4 times.
    assert creates < removes or creates < 4 * 0.040


def test_vendor_vfio_type_writes_count_as_create_and_remove(cli, sim_host):
    root = sim_host("L40S")
    WriteLatency(create_ms=30, remove_ms=0).save(root)
    host = SimHostRoot(root)
    assert (
        host.latency.seconds_for("sys/bus/pci/devices/0000:3b:00.4/nvidia/current_vgpu_type", "5\n") == 0.030
    )
    assert host.latency.seconds_for("sys/bus/pci/devices/0000:3b:00.4/nvidia/current_vgpu_type", "0\n") == 0
    assert host.latency.seconds_for("sys/bus/mdev/devices/x/remove", "1\n") == 0


def _timed_parallel_creates(root: Path) -> list[tuple[float, float]]:
    """Two threads each create one T4-1Q on their own GPU, through their own host object."""
    barrier = threading.Barrier(2)
    spans: list[tuple[float, float]] = []

    def create(address: str, uuid: str) -> None:
        host = SimHostRoot(root)
        barrier.wait()
        start = time.monotonic()
        host.write_text(T4_1Q.format(address), uuid)
        spans.append((start, time.monotonic()))

    threads = [
        threading.Thread(target=create, args=(T4_0, "00000000-0000-4000-8000-000000000001")),
        threading.Thread(target=create, args=(T4_1, "00000000-0000-4000-8000-000000000002")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (root / "sys/bus/mdev/devices/00000000-0000-4000-8000-000000000001").exists()
    assert (root / "sys/bus/mdev/devices/00000000-0000-4000-8000-000000000002").exists()
    return spans


def test_parallel_writes_overlap_across_gpus(sim_host):
    root = sim_host("T4", "T4")
    WriteLatency(create_ms=400, remove_ms=0, serial=False).save(root)
    (a_start, a_end), (b_start, b_end) = _timed_parallel_creates(root)
    assert max(a_start, b_start) < min(a_end, b_end), "the two slow writes did not overlap"


def test_serial_writes_never_overlap(sim_host):
    root = sim_host("T4", "T4")
    WriteLatency(create_ms=100, remove_ms=0, serial=True).save(root)
    spans = _timed_parallel_creates(root)
    assert max(end for _, end in spans) - min(start for start, _ in spans) >= 2 * 0.100
