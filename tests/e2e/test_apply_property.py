"""Property: whatever the host and the config, apply either reaches the config or changes nothing.

Hypothesis draws simulated hosts (1-3 GPUs from T4, A10, L40S: mdev on the PF, mdev on VFs, vendor
VFIO) and configs (entries for single GPUs, for several, or for ``all``, with types from each GPU's
catalog in valid or too-large counts, several sizes at once, and out-of-range GPU indexes), applies a
first config, then a second one with possibly an injected write fault and possibly ``--keep-going``.
After every apply:

* exit 0: ``assert`` holds and every selected GPU carries exactly what its governing entry asks for;
* exit 1: the host is exactly as before (same GPUs, types, UUIDs, parents) — or with ``--keep-going``,
  each GPU is either exactly as before or at its target;
* GPUs no entry selects are never touched, no journal is left behind, and there is never a traceback.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.conftest import writes
from tests.simstate import Device, snapshot
from vgpu_dm import catalog
from vgpu_dm.sim.layout import SimState, create_host

MODELS = ("T4", "A10", "L40S")
TYPES = {m: catalog.find(m).vgpu_types for m in MODELS}
ERRNOS = (errno.EIO, errno.EBUSY, errno.ENOSPC, errno.EINVAL)


@dataclass(frozen=True)
class Entry:
    devices: tuple[int, ...] | None  # None = all
    layout: tuple[tuple[str, int], ...]  # type → count; empty = no vGPUs

    def yaml(self) -> str:
        devices = "all" if self.devices is None else "[" + ", ".join(map(str, self.devices)) + "]"
        body = ", ".join(f'"{t}": {n}' for t, n in self.layout)
        return f"    - devices: {devices}\n      vgpu-devices: {{{body}}}\n"


def config_text(entries: list[Entry]) -> str:
    return "version: v1\nvgpu-configs:\n  drawn:\n" + "".join(e.yaml() for e in entries)


def targets(entries: list[Entry], gpu_count: int) -> dict[int, dict[str, int]]:
    """GPU index → the layout its governing (last selecting) entry asks for."""
    chosen: dict[int, dict[str, int]] = {}
    for entry in entries:
        for index in range(gpu_count) if entry.devices is None else entry.devices:
            if index < gpu_count:
                chosen[index] = dict(entry.layout)
    return chosen


@st.composite
def layouts(draw, model: str) -> tuple[tuple[str, int], ...]:
    """Mostly one type of ``model``, sometimes none or two; now and then max+1 of a type (never fits)."""
    how_many = draw(st.sampled_from((0, 1, 1, 1, 1, 1, 1, 2, 2)))
    names = draw(
        st.lists(st.sampled_from(sorted(TYPES[model])), min_size=how_many, max_size=how_many, unique=True)
    )
    layout = []
    for name in names:
        most = TYPES[model][name]
        too_many = draw(st.integers(0, 9)) == 0
        layout.append((name, most + 1 if too_many else draw(st.integers(1, most))))
    return tuple(layout)


@st.composite
def configs(draw, gpus: list[str]) -> list[Entry]:
    entries: list[Entry] = []
    if draw(st.integers(0, 4)) == 0:  # an "all" entry first, usually overridden for other models
        entries.append(Entry(None, draw(layouts(draw(st.sampled_from(gpus))))))
    for index, model in enumerate(gpus):
        if draw(st.integers(0, 5)) > 0:
            entries.append(Entry((index,), draw(layouts(model))))
    if draw(st.integers(0, 5)) == 0:  # several GPUs at once, sometimes a GPU that does not exist
        indexes = draw(st.lists(st.integers(0, len(gpus)), min_size=1, max_size=2, unique=True))
        entries.append(Entry(tuple(sorted(indexes)), draw(layouts(gpus[indexes[0] % len(gpus)]))))
    if not entries:
        entries.append(Entry((0,), draw(layouts(gpus[0]))))
    return entries


@st.composite
def scenarios(draw):
    gpus = draw(st.lists(st.sampled_from(MODELS), min_size=1, max_size=3))
    first = draw(configs(gpus))
    second = draw(configs(gpus))
    fault = draw(st.sampled_from((0, 0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16)))
    code = draw(st.sampled_from(ERRNOS))
    keep_going = draw(st.booleans())
    return gpus, first, second, fault, code, keep_going


def scratch() -> Path:
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="vgpu-dm-prop-", dir=base))


def check_apply(cli, root: Path, config: Path, entries: list[Entry], keep_going: bool, fault: int) -> str:
    """Run apply, check the property for its outcome and return a word for the outcome."""
    state = SimState.load(root)
    addresses = [g.address for g in state.gpus]
    wanted = targets(entries, len(addresses))
    before, logged = snapshot(root), len(writes(root))
    extra = ["--keep-going"] if keep_going else []
    result = cli("apply", "--sim", str(root), "-f", str(config), *extra)
    assert "Traceback" not in result.err + result.out
    assert result.code in (0, 1), result.err
    assert not (root / "run/nvidia-vgpu-dm/journal.json").exists(), result.err
    after = snapshot(root)

    def of(devices: list[Device], index: int) -> list[Device]:
        return [d for d in devices if d[0] == addresses[index]]

    for index in range(len(addresses)):
        if index not in wanted:
            assert of(after, index) == of(before, index), f"GPU {index} is not selected but changed"
    if result.code == 0:
        if fault:
            assert "injected fault" not in result.err
        for index, layout in wanted.items():
            assert dict(Counter(d[1] for d in of(after, index))) == layout, (index, result.err)
        check = cli("assert", "--sim", str(root), "-f", str(config))
        assert check.code == 0, check.err
    elif not keep_going:
        assert after == before, f"a failed apply changed the host:\n{result.err}"
    else:
        for index, layout in wanted.items():
            unchanged = of(after, index) == of(before, index)
            at_target = dict(Counter(d[1] for d in of(after, index))) == layout
            assert unchanged or at_target, (index, result.err)
    if result.code == 0:
        return "applied"
    if "step failed: " not in result.err:
        assert len(writes(root)) == logged, f"refused, yet wrote:\n{result.err}"
        return "refused before any write"
    return "injected write fault" if "injected fault" in result.err else "the driver refused a write"


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=scenarios())
def test_apply_reaches_the_config_or_changes_nothing(cli, scenario):
    gpus, first, second, fault, code, keep_going = scenario
    work = scratch()
    try:
        root = work / "host"
        create_host(root, gpus)
        config = work / "config.yaml"

        config.write_text(config_text(first))
        event(f"first apply: {check_apply(cli, root, config, first, keep_going=False, fault=0)}")

        config.write_text(config_text(second))
        if fault:
            armed = cli(
                "sim", "fault", str(root), "--fail-write", str(fault), "--errno", errno.errorcode[code]
            )
            assert armed.code == 0, armed.err
        outcome = check_apply(cli, root, config, second, keep_going=keep_going, fault=fault)
        event(f"second apply: {outcome}" + (" (--keep-going)" if keep_going else ""))
    finally:
        shutil.rmtree(work, ignore_errors=True)
