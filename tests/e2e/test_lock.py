"""The host lock: applies on one host run one at a time, and a held lock is reported with its holder.

Two apply processes started together on the same simulated host (different configs) must both
succeed and leave the host exactly in one config's state, with the writes of exactly one order of
the two runs (first A then B, or first B then A) — never an interleaving. An apply that cannot get
the lock within ``--lock-timeout`` fails without writing and names the pid that holds it; a lock
whose holder was killed is free again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ENTRY_POINT, writes
from tests.simstate import TemplateHost, layouts
from vgpu_dm.host.lock import HostLock
from vgpu_dm.sim.host import SimHostRoot

CONFIG = """\
version: v1
vgpu-configs:
  start:
    - devices: [0, 1]
      vgpu-devices: {"T4-8Q": 2}
    - devices: [2]
      vgpu-devices: {"L40S-24Q": 2}
  small:
    - devices: [0, 1]
      vgpu-devices: {"T4-4Q": 4}
    - devices: [2]
      vgpu-devices: {"L40S-8Q": 6}
  medium:
    - devices: [0, 1]
      vgpu-devices: {"T4-16Q": 1}
    - devices: [2]
      vgpu-devices: {"L40S-16Q": 3}
"""
LAYOUTS = {
    "small": [{"T4-4Q": 4}, {"T4-4Q": 4}, {"L40S-8Q": 6}],
    "medium": [{"T4-16Q": 1}, {"T4-16Q": 1}, {"L40S-16Q": 3}],
}


# -- helpers ---------------------------------------------------------------------------------------


class Host(TemplateHost):
    """A 2 x T4 + L40S template in config "start", copied for each run."""

    def __init__(self, cli, workdir: Path):
        super().__init__(cli, workdir, ["T4", "T4", "L40S"], CONFIG)

    def count(self, *names: str) -> int:
        """Writes made by applying ``names`` in turn to a fresh copy."""
        root = self.fresh()
        for name in names:
            self.apply(root, name)
        assert layouts(root) == LAYOUTS[names[-1]]
        return len(writes(root))

    def spawn(self, root: Path, name: str) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VGPU_DM_")}
        return subprocess.Popen(
            [str(ENTRY_POINT), *self.args(root, name)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


# -- tests -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("gate", [False, True], ids=["started-together", "released-together"])
def test_two_concurrent_applies_serialise(cli, workdir, gate):
    """Both succeed; the host ends in exactly one config, reached by one whole run after the other.

    ``released-together`` holds the lock while both processes start, so both are certainly waiting
    for it at the same moment when it is released.
    """
    host = Host(cli, workdir)
    orders = {
        "medium": host.count("small", "medium"),  # small ran first, medium last
        "small": host.count("medium", "small"),
    }
    rounds = 2 if not gate else 1
    finals = []
    for _ in range(rounds):
        root = host.fresh()
        lock = HostLock(SimHostRoot(root), timeout=5)
        if gate:
            lock.acquire()
        procs = [host.spawn(root, "small"), host.spawn(root, "medium")]
        if gate:
            time.sleep(1.0)  # both processes have started and are polling for the lock
            assert all(p.poll() is None for p in procs), "an apply did not wait for the lock"
            lock.release()
        results = [finish(p) for p in procs]
        for code, err in results:
            assert code == 0, err
            assert "Traceback" not in err
        final = [name for name, layout in LAYOUTS.items() if layouts(root) == layout]
        assert len(final) == 1, f"the host matches neither config: {layouts(root)}"
        (name,) = final
        other = "small" if name == "medium" else "medium"
        assert len(writes(root)) == orders[name], "the two runs' writes interleaved"
        assert not (root / "run/nvidia-vgpu-dm/journal.json").exists()
        ok = cli("assert", "--sim", str(root), "-f", str(host.config), "-c", name)
        assert ok.code == 0, ok.err
        not_ok = cli("assert", "--sim", str(root), "-f", str(host.config), "-c", other)
        assert not_ok.code == 1, not_ok.err
        finals.append(name)
    print(f"\n[lock] {rounds} concurrent rounds ({'gated' if gate else 'free'}), last writer: {finals}")


def test_a_held_lock_makes_apply_give_up_naming_the_holder(cli, workdir):
    host = Host(cli, workdir)
    root = host.fresh()
    with HostLock(SimHostRoot(root), timeout=1):
        started = time.monotonic()
        result = host.apply(root, "small", "--lock-timeout", "0.5", code=1)
        waited = time.monotonic() - started
    assert waited >= 0.5
    assert f"pid {os.getpid()}" in result.err, result.err
    assert "holds the host lock" in result.err and "--lock-timeout" in result.err, result.err
    assert "Traceback" not in result.err
    assert writes(root) == []
    assert not (root / "run/nvidia-vgpu-dm/journal.json").exists()
    # Released: the same apply goes through.
    host.apply(root, "small", "--lock-timeout", "0.5")
    assert layouts(root) == LAYOUTS["small"]


def test_the_lock_of_a_killed_holder_is_free(cli, workdir):
    """flock dies with its holder: another process's lock blocks, and after SIGKILL it is gone."""
    host = Host(cli, workdir)
    root = host.fresh()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from vgpu_dm.host.lock import HostLock\n"
            "from vgpu_dm.sim.host import SimHostRoot\n"
            "HostLock(SimHostRoot(sys.argv[1])).acquire()\n"
            "print('locked', flush=True)\n"
            "time.sleep(60)\n",
            str(root),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = host.apply(root, "small", "--lock-timeout", "0.5", code=1)
        assert f"pid {holder.pid}" in result.err, result.err
        assert writes(root) == []
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    host.apply(root, "small", "--lock-timeout", "0.5")
    assert layouts(root) == LAYOUTS["small"]


def test_assert_and_list_say_an_apply_is_running_while_the_lock_is_held(cli, sim_host, tmp_path):
    """A journal next to a held lock belongs to a live apply, not a crashed one."""
    from vgpu_dm import journal

    root = sim_host("T4")
    config = tmp_path / "c.yaml"
    config.write_text(
        'version: v1\nvgpu-configs:\n  a:\n    - devices: all\n      vgpu-devices: {"T4-1Q": 2}\n'
    )
    host = SimHostRoot(root)
    journal.write(host, journal.Journal(pid=os.getpid(), started=time.time(), config="a", gpus=[]))
    with HostLock(host):
        running = cli("assert", "--sim", str(root), "-f", str(config))
        listed = cli("list", "--sim", str(root))
    assert running.code == 1
    assert f"an apply (pid {os.getpid()}) is changing the host right now" in running.err
    assert "changing the host right now" in listed.err
    crashed = cli("assert", "--sim", str(root), "-f", str(config))
    assert crashed.code == 1 and "found an interrupted apply" in crashed.err
