"""End to end: ``apply``, ``assert`` and ``list`` through the CLI on simulated mdev hosts.

Most tests run the CLI in-process (the ``cli`` fixture); a few run the installed entry point
(``run_cli``) to show the same behaviour from a real process. "Zero writes" always means the
simulated host's control-file write log did not grow, and the host's devices did not change.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, writes
from tests.table import LIST_COLUMNS, parse_table

T4_CONFIG = EXAMPLES / "config-t4.yaml"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
T4_0, T4_1 = "0000:3b:00.0", "0000:5e:00.0"  # the simulator's first two GPU addresses

# The layout each config of examples/config-t4.yaml gives the two GPUs of a 2 x T4 host.
T4_LAYOUTS: dict[str, tuple[dict[str, int], dict[str, int]]] = {
    "default": ({"T4-8Q": 2}, {"T4-8Q": 2}),
    "T4-16Q": ({"T4-16Q": 1}, {"T4-16Q": 1}),
    "T4-8Q": ({"T4-8Q": 2}, {"T4-8Q": 2}),
    "T4-4Q": ({"T4-4Q": 4}, {"T4-4Q": 4}),
    "T4-2Q": ({"T4-2Q": 8}, {"T4-2Q": 8}),
    "T4-1Q": ({"T4-1Q": 16}, {"T4-1Q": 16}),
    "T4-small": ({"T4-1Q": 16}, {"T4-1Q": 16}),
    "T4-medium": ({"T4-4Q": 4}, {"T4-4Q": 4}),
    "T4-large": ({"T4-16Q": 1}, {"T4-16Q": 1}),
    "T4-mixed": ({"T4-1Q": 16}, {"T4-2Q": 8}),
    "T4-none": ({}, {}),
}


# -- helpers -------------------------------------------------------------------------------------
def config(tmp_path: Path, text: str, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def report(cli, root: Path) -> list[dict]:
    result = cli("list", "--json", "--sim", str(root))
    assert result.code == 0, result.err
    return json.loads(result.out)["gpus"]


def layout(cli, root: Path) -> list[dict[str, int]]:
    """Per GPU (index order): vGPU type → count, as ``list --json`` shows it."""
    return [dict(Counter(v["type"] for v in gpu["vgpus"])) for gpu in report(cli, root)]


def uuids(cli, root: Path) -> dict[str, str]:
    """uuid → PF address of every vGPU on the host."""
    return {v["uuid"]: gpu["address"] for gpu in report(cli, root) for v in gpu["vgpus"]}


def split_writes(lines: list[str]) -> tuple[list[str], list[str]]:
    """(uuids removed, uuids created) in a slice of the write log."""
    removed, created = [], []
    for line in lines:
        path, data = line.split("\t")
        if path.endswith("/remove"):
            assert path.startswith("sys/bus/mdev/devices/") and data == "1", line
            removed.append(path.split("/")[-2])
        elif path.endswith("/create"):
            assert "/mdev_supported_types/nvidia-" in path and UUID.fullmatch(data), line
            created.append(data)
        else:  # pragma: no cover - shows the unexpected write in the failure
            raise AssertionError(f"unexpected write {line!r}")
    return removed, created


def expected_changes(old: dict[str, int], new: dict[str, int]) -> tuple[int, int]:
    """(removals, creations) of a minimal change between two single-size layouts of one GPU."""
    removed = sum(n - min(n, new.get(t, 0)) for t, n in old.items())
    created = sum(n - min(n, old.get(t, 0)) for t, n in new.items())
    return removed, created


def apply_ok(cli, root: Path, cfg: str, name: str | None = None) -> list[str]:
    """Apply a config that must succeed; returns the writes it made."""
    before = len(writes(root))
    args = ["apply", "--sim", str(root), "-f", cfg] + (["-c", name] if name else [])
    result = cli(*args)
    assert result.code == 0, result.err
    return writes(root)[before:]


def refused(
    cli, root: Path, command: str, cfg: str, name: str | None = None, stdin: str | None = None, extra=()
):
    """Run a command that must exit 1 and leave the host exactly as it was; returns the result."""
    before_writes = writes(root)
    before_devices = report(cli, root)
    args = [command, "--sim", str(root), "-f", cfg] + (["-c", name] if name else []) + list(extra)
    result = cli(*args, stdin=stdin)
    assert result.code == 1, (result.out, result.err)
    assert writes(root) == before_writes
    assert report(cli, root) == before_devices
    return result


# -- every example config, in turn -----------------------------------------------------------------
def test_every_example_config_in_turn_on_two_t4s(cli, sim_host):
    root = sim_host("T4", "T4")
    previous: tuple[dict[str, int], dict[str, int]] = ({}, {})
    names = list(T4_LAYOUTS)
    for i, name in enumerate(names):
        wanted = T4_LAYOUTS[name]
        before = uuids(cli, root)
        made = apply_ok(cli, root, str(T4_CONFIG), name)
        removed, created = split_writes(made)
        assert len(made) == len(removed) + len(created)
        # Minimal change: per GPU exactly what differs, nothing more.
        want_removed = sum(expected_changes(o, n)[0] for o, n in zip(previous, wanted, strict=True))
        want_created = sum(expected_changes(o, n)[1] for o, n in zip(previous, wanted, strict=True))
        assert (len(removed), len(created)) == (want_removed, want_created), name
        assert set(removed) <= set(before)
        after_apply = len(writes(root))

        assert layout(cli, root) == list(wanted), name
        held = cli("assert", "--sim", str(root), "-f", str(T4_CONFIG), "-c", name)
        assert held.code == 0, (name, held.err)
        assert "currently applied" in held.err

        other = next(n for n in names[i + 1 :] + names if T4_LAYOUTS[n] != wanted)
        failed = cli("assert", "--sim", str(root), "-f", str(T4_CONFIG), "-c", other)
        assert failed.code == 1, (name, other)
        assert "assertion failure: selected configuration not currently applied" in failed.err
        assert len(writes(root)) == after_apply  # assert never writes
        previous = wanted
    assert cli("assert", "--sim", str(root), "-f", str(T4_CONFIG), "-c", "T4-none").code == 0


def test_entry_point_apply_assert_list(run_cli, sim_host):
    root = sim_host("T4", "T4")
    applied = run_cli("apply", "--sim", str(root), "-f", str(T4_CONFIG), "-c", "T4-medium")
    assert applied.code == 0, applied.err
    assert "successfully applied" in applied.err
    assert len(writes(root)) == 8
    listed = run_cli("list", "--json", "--sim", str(root))
    assert listed.code == 0
    assert [len(g["vgpus"]) for g in json.loads(listed.out)["gpus"]] == [4, 4]
    assert run_cli("assert", "--sim", str(root), "-f", str(T4_CONFIG), "-c", "T4-4Q").code == 0
    failed = run_cli("assert", "--sim", str(root), "-f", str(T4_CONFIG), "-c", "T4-large")
    assert failed.code == 1
    assert "has 4 x T4-4Q, config 'T4-large' wants 1 x T4-16Q" in failed.err
    again = run_cli("apply", "--sim", str(root), "-f", str(T4_CONFIG), "-c", "T4-medium")
    assert again.code == 0 and "already applied" in again.err
    assert len(writes(root)) == 8


# -- devices: [i] out of range -------------------------------------------------------------------
OUT_OF_RANGE = """\
version: v1
vgpu-configs:
  bad:
    - devices: [0]
      vgpu-devices:
        "T4-1Q": 16
    - devices: [1, 7]
      vgpu-devices:
        "T4-2Q": 8
"""


def test_out_of_range_index_names_index_and_location(cli, sim_host, tmp_path):
    root = sim_host("T4", "T4")
    apply_ok(cli, root, str(T4_CONFIG), "T4-large")
    cfg = config(tmp_path, OUT_OF_RANGE)
    result = refused(cli, root, "apply", cfg)
    assert f"{cfg}:7: vgpu-configs.bad[1].devices: GPU index 7 does not exist" in result.err
    assert "GPUs 0-1" in result.err
    assert "nothing was changed" in result.err
    # assert refuses as well, and says why.
    checked = refused(cli, root, "assert", cfg)
    assert f"{cfg}:7:" in checked.err and "GPU index 7" in checked.err


def test_out_of_range_index_from_stdin(run_cli, sim_host):
    root = sim_host("T4")
    result = run_cli("apply", "--sim", str(root), "-f", "-", stdin=OUT_OF_RANGE)
    assert result.code == 1
    assert "<stdin>:4: vgpu-configs.bad[0].devices" not in result.err  # index 0 exists
    assert "<stdin>:7: vgpu-configs.bad[1].devices: GPU index 1 does not exist" in result.err
    assert "GPU index 7 does not exist" in result.err
    assert writes(root) == []


# -- device filters --------------------------------------------------------------------------------
def test_device_filters_on_mixed_t4_and_a10_host(cli, sim_host, tmp_path):
    root = sim_host("T4", "T4", "A10")
    gpus = report(cli, root)
    assert [g["device_id"] for g in gpus] == [
        "0x1EB810DE:0x100010DE",
        "0x1EB810DE:0x100110DE",
        "0x223610DE:0x100210DE",
    ]
    cfg = config(
        tmp_path,
        """\
version: v1
vgpu-configs:
  by-model:
    - device-filter: "0x1EB810DE"
      devices: all
      vgpu-devices: {"T4-4Q": 4}
    - device-filter: ["0x223610DE"]
      devices: all
      vgpu-devices: {"A10-6Q": 4}
  by-subsystem:
    - device-filter: "0x1EB810DE:0x100110DE"
      devices: all
      vgpu-devices: {"T4-16Q": 1}
  wrong-subsystem:
    - device-filter: "0x223610DE:0x14A910DE"
      devices: all
      vgpu-devices: {"A10-24Q": 1}
""",
    )
    made = apply_ok(cli, root, cfg, "by-model")
    assert len(made) == 12
    assert layout(cli, root) == [{"T4-4Q": 4}, {"T4-4Q": 4}, {"A10-6Q": 4}]
    # A10 vGPUs sit on four distinct VFs of the A10, never on the PF.
    a10 = report(cli, root)[2]
    parents = [v["parent"] for v in a10["vgpus"]]
    assert len(set(parents)) == 4 and a10["address"] not in parents

    owner = uuids(cli, root)
    removed, created = split_writes(apply_ok(cli, root, cfg, "by-subsystem"))
    assert (len(removed), len(created)) == (4, 1)  # only GPU 1 changes
    assert {owner[u] for u in removed} == {T4_1}
    assert uuids(cli, root)[created[0]] == T4_1
    assert layout(cli, root) == [{"T4-4Q": 4}, {"T4-16Q": 1}, {"A10-6Q": 4}]
    assert cli("assert", "--sim", str(root), "-f", cfg, "-c", "by-subsystem").code == 0
    assert cli("assert", "--sim", str(root), "-f", cfg, "-c", "by-model").code == 1

    # A filter whose subsystem matches no GPU selects nothing: an operator error (issue 8.11) for both
    # apply and assert, naming the config's filter and the host's device ids; no writes.
    before = len(writes(root))
    for command in ("apply", "assert"):
        result = cli(command, "--sim", str(root), "-f", cfg, "-c", "wrong-subsystem")
        assert result.code == 1, result.err
        assert "selects none of this host's 3 NVIDIA GPU(s)" in result.err
        assert "device-filter 0x223610DE:0x14A910DE and devices all" in result.err
        assert "GPU 2 (0000:86:00.0) 0x223610DE:0x100210DE" in result.err
    assert len(writes(root)) == before


A16_FILTERS = """\
version: v1
vgpu-configs:
  a16-sub:
    - device-filter: "0x25B610DE:0x14A910DE"
      devices: all
      vgpu-devices: {"A16-2Q": 8}
  a16-any:
    - device-filter: "0x25B610DE"
      devices: all
      vgpu-devices: {"A16-4Q": 4}
  a2-only:
    - device-filter: "0x25B610DE:0x157E10DE"
      devices: all
      vgpu-devices: {"A2-1Q": 16}
  a2-then-a16:
    - device-filter: ["0x25B610DE:0x157E10DE", "0x25B610DE:0x14A910DE"]
      devices: all
      vgpu-devices: {"A16-1Q": 16}
"""


def test_device_filters_on_a16_host(cli, sim_host, tmp_path):
    root = sim_host("A16", "A16")
    gpus = report(cli, root)
    assert [g["device_id"] for g in gpus] == ["0x25B610DE:0x14A910DE"] * 2
    assert all(g["model"].startswith("NVIDIA A16") for g in gpus)
    cfg = config(tmp_path, A16_FILTERS)
    assert len(apply_ok(cli, root, cfg, "a16-sub")) == 16
    assert layout(cli, root) == [{"A16-2Q": 8}, {"A16-2Q": 8}]
    # A filter for the A2 (same device id, other subsystem) must not select the A16s; selecting no GPU
    # at all is an error (issue 8.11) that changes nothing.
    before = len(writes(root))
    result = cli("apply", "--sim", str(root), "-f", cfg, "-c", "a2-only")
    assert result.code == 1 and "selects none of this host's 2 NVIDIA GPU(s)" in result.err, result.err
    assert len(writes(root)) == before
    assert layout(cli, root) == [{"A16-2Q": 8}, {"A16-2Q": 8}]
    assert len(apply_ok(cli, root, cfg, "a16-any")) == 2 * (8 + 4)
    assert layout(cli, root) == [{"A16-4Q": 4}, {"A16-4Q": 4}]
    # A list matches when any of its filters does.
    apply_ok(cli, root, cfg, "a2-then-a16")
    assert layout(cli, root) == [{"A16-1Q": 16}, {"A16-1Q": 16}]


# -- refusals before any write ---------------------------------------------------------------------
def test_unsupported_type_names_gpu_address_and_type(cli, sim_host, tmp_path):
    root = sim_host("T4", "A10")
    apply_ok(cli, root, str(T4_CONFIG), "T4-medium")  # GPU 0 gets 4 x T4-4Q, the A10 is not selected
    cfg = config(
        tmp_path,
        """\
version: v1
vgpu-configs:
  wrong:
    - devices: all
      vgpu-devices: {"A10-4Q": 2}
""",
    )
    result = refused(cli, root, "apply", cfg)
    assert "GPU 0 (0000:3b:00.0)" in result.err
    assert "vGPU type A10-4Q is not supported on this GPU" in result.err
    assert "T4-1Q" in result.err  # lists what the GPU does offer
    assert "GPU 1 (0000:5e:00.0)" not in result.err  # the A10 takes A10-4Q fine


@pytest.mark.parametrize(
    ("gpu", "vgpus", "message"),
    [
        ("T4", '"T4-1Q": 17', "17 x T4-1Q requested, but the GPU holds at most 16 x T4-1Q"),
        ("T4", '"T4-2Q": 9', "at most 8 x T4-2Q"),
        ("A10", '"A10-4Q": 7', "7 x A10-4Q requested, but the GPU holds at most 6 x A10-4Q"),
        ("T4", '"T4-4Q": 3, "T4-4C": 2', "3 x T4-4Q + 2 x T4-4C requested"),
    ],
)
def test_capacity_overflow_is_refused_without_writes(cli, sim_host, tmp_path, gpu, vgpus, message):
    root = sim_host(gpu)
    cfg = config(
        tmp_path, f"version: v1\nvgpu-configs:\n  big:\n    - devices: all\n      vgpu-devices: {{{vgpus}}}\n"
    )
    result = refused(cli, root, "apply", cfg)
    assert message in result.err
    assert "GPU 0 (" in result.err
    assert refused(cli, root, "assert", cfg).code == 1


def test_a10_parents_are_vfs_and_capacity_counts_them(cli, sim_host, tmp_path):
    root = sim_host("A10")
    cfg = config(
        tmp_path, 'version: v1\nvgpu-configs:\n  c:\n    - devices: all\n      vgpu-devices: {"A10-1Q": 24}\n'
    )
    assert len(apply_ok(cli, root, cfg)) == 24
    parents = [v["parent"] for v in report(cli, root)[0]["vgpus"]]
    assert len(set(parents)) == 24  # one vGPU per VF
    # A type change on VF parents: every VF is busy, so all 24 go before the 6 new ones are made.
    cfg6 = config(
        tmp_path,
        'version: v1\nvgpu-configs:\n  c:\n    - devices: all\n      vgpu-devices: {"A10-4Q": 6}\n',
        "six.yaml",
    )
    removed, created = split_writes(apply_ok(cli, root, cfg6))
    assert (len(removed), len(created)) == (24, 6)
    assert layout(cli, root) == [{"A10-4Q": 6}]


def test_mig_backed_type_on_a100_fails_clearly(cli, sim_host, tmp_path):
    root = sim_host("A100")
    cfg = config(
        tmp_path,
        """\
version: v1
vgpu-configs:
  mig:
    - devices: all
      vgpu-devices: {"A100-1-5C": 7}
  sliced:
    - devices: all
      vgpu-devices: {"A100-5C": 8}
""",
    )
    # Without the MIG step (--skip-mig) MIG mode is off and there are no GPU instances.
    result = refused(cli, root, "apply", cfg, "mig", extra=["--skip-mig"])
    assert "A100-1-5C" in result.err
    assert "MIG" in result.err
    assert "GPU 0 (0000:3b:00.0)" in result.err
    # The same host takes a time-sliced layout.
    assert len(apply_ok(cli, root, cfg, "sliced")) == 8
    assert refused(cli, root, "apply", cfg, "mig", extra=["--skip-mig"]).code == 1


# -- minimal, idempotent changes -------------------------------------------------------------------
ONE_Q = 'version: v1\nvgpu-configs:\n  c:\n    - devices: all\n      vgpu-devices: {{"T4-1Q": {n}}}\n'


def test_reapply_makes_no_writes(cli, sim_host, tmp_path):
    root = sim_host("T4", "T4", "A10")
    made = apply_ok(cli, root, str(T4_CONFIG), "T4-small")
    assert len(made) == 32
    before = report(cli, root)
    assert apply_ok(cli, root, str(T4_CONFIG), "T4-small") == []
    assert report(cli, root) == before
    again = cli("apply", "--sim", str(root), "-f", str(T4_CONFIG), "-c", "T4-small")
    assert again.code == 0 and "already applied" in again.err
    # The example's configs filter on the T4's id: T4-1Q is what T4-small already made.
    assert apply_ok(cli, root, str(T4_CONFIG), "T4-1Q") == []
    # A config that also selects the A10 (devices: all, no filter) is refused as a whole: no writes.
    assert refused(cli, root, "apply", config(tmp_path, ONE_Q.format(n=16), "all.yaml"), "c").code == 1
    assert len(writes(root)) == 32


def test_shrinking_removes_only_the_surplus(cli, sim_host, tmp_path):
    root = sim_host("T4")
    apply_ok(cli, root, config(tmp_path, ONE_Q.format(n=16), "16.yaml"))
    old = set(uuids(cli, root))
    assert len(old) == 16
    made = apply_ok(cli, root, config(tmp_path, ONE_Q.format(n=8), "8.yaml"))
    removed, created = split_writes(made)
    assert (len(removed), len(created)) == (8, 0)
    new = set(uuids(cli, root))
    assert len(new) == 8 and new < old
    assert set(removed) == old - new
    # Growing back creates exactly the missing ones and keeps the 8 survivors.
    made = apply_ok(cli, root, config(tmp_path, ONE_Q.format(n=12), "12.yaml"))
    removed, created = split_writes(made)
    assert (len(removed), len(created)) == (0, 4)
    assert new < set(uuids(cli, root))


def test_type_change_removes_everything_first(cli, sim_host):
    root = sim_host("T4", "T4")
    apply_ok(cli, root, str(T4_CONFIG), "T4-1Q")
    owner = uuids(cli, root)
    made = apply_ok(cli, root, str(T4_CONFIG), "T4-4Q")
    removed, created = split_writes(made)
    assert set(removed) == set(owner) and len(created) == 8
    for address in (T4_0, T4_1):
        kinds = []
        for line in made:
            path = line.split("\t")[0]
            if path.endswith("/remove") and owner[path.split("/")[-2]] == address:
                kinds.append("remove")
            elif path.endswith("/create") and f"/{address}/" in path:
                kinds.append("create")
        assert kinds == ["remove"] * 16 + ["create"] * 4, address
    assert layout(cli, root) == [{"T4-4Q": 4}, {"T4-4Q": 4}]
    assert not set(uuids(cli, root)) & set(owner)


def test_empty_vgpu_devices_clears_one_gpu(cli, sim_host, tmp_path):
    root = sim_host("T4", "T4")
    apply_ok(cli, root, str(T4_CONFIG), "T4-2Q")
    kept = {u for u, a in uuids(cli, root).items() if a == T4_0}
    cfg = config(tmp_path, "version: v1\nvgpu-configs:\n  c:\n    - devices: [1]\n      vgpu-devices: {}\n")
    removed, created = split_writes(apply_ok(cli, root, cfg))
    assert created == [] and len(removed) == 8
    assert layout(cli, root) == [{"T4-2Q": 8}, {}]
    assert set(uuids(cli, root)) == kept
    assert cli("assert", "--sim", str(root), "-f", cfg).code == 0
    assert apply_ok(cli, root, cfg) == []


def test_successful_apply_writes_are_exactly_removed_plus_created(cli, sim_host):
    root = sim_host("T4", "T4", "A10")
    for name in ("T4-mixed", "T4-medium", "T4-large", "T4-mixed", "T4-small", "T4-none"):
        old = set(uuids(cli, root))
        made = apply_ok(cli, root, str(T4_CONFIG), name)
        new = set(uuids(cli, root))
        removed, created = split_writes(made)
        assert set(removed) == old - new and len(removed) == len(old - new), name
        assert set(created) == new - old and len(created) == len(new - old), name
        assert len(made) == len(old - new) + len(new - old)


# -- selection rules -------------------------------------------------------------------------------
def test_config_from_stdin(cli, sim_host):
    root = sim_host("T4", "T4")
    text = T4_CONFIG.read_text()
    result = cli("apply", "--sim", str(root), "-f", "-", "-c", "T4-2Q", stdin=text)
    assert result.code == 0, result.err
    assert layout(cli, root) == [{"T4-2Q": 8}, {"T4-2Q": 8}]
    assert cli("assert", "--sim", str(root), "-f", "-", "-c", "T4-2Q", stdin=text).code == 0
    assert cli("assert", "--sim", str(root), "-f", "-", "-c", "T4-1Q", stdin=text).code == 1


def test_config_from_stdin_entry_point(run_cli, sim_host):
    root = sim_host("T4")
    text = ONE_Q.format(n=4)
    result = run_cli("apply", "--sim", str(root), "-f", "-", stdin=text)
    assert result.code == 0, result.err
    assert len(writes(root)) == 4
    assert run_cli("assert", "--sim", str(root), "-f", "-", stdin=text).code == 0


LATER_WINS = """\
version: v1
vgpu-configs:
  c:
    - devices: all
      vgpu-devices: {"T4-2Q": 8}
    - devices: [1]
      vgpu-devices: {"T4-16Q": 1}
    - device-filter: "0x1EB810DE"
      devices: [0]
      vgpu-devices: {"T4-4Q": 4}
"""


def test_later_entry_wins_without_building_the_earlier_layout(cli, sim_host, tmp_path):
    root = sim_host("T4", "T4", "T4")
    cfg = config(tmp_path, LATER_WINS)
    made = apply_ok(cli, root, cfg)
    assert layout(cli, root) == [{"T4-4Q": 4}, {"T4-16Q": 1}, {"T4-2Q": 8}]
    removed, created = split_writes(made)
    assert removed == [] and len(created) == 4 + 1 + 8  # the overridden layouts were never created
    assert cli("assert", "--sim", str(root), "-f", cfg).code == 0


def test_example_t4_mixed_later_entry_wins(cli, sim_host):
    root = sim_host("T4", "T4")
    apply_ok(cli, root, str(T4_CONFIG), "T4-mixed")
    assert layout(cli, root) == [{"T4-1Q": 16}, {"T4-2Q": 8}]
    assert cli("assert", "--sim", str(root), "-f", str(T4_CONFIG), "-c", "T4-mixed").code == 0


def test_unselected_gpu_is_left_alone_and_assert_holds(cli, sim_host, tmp_path):
    """Deliberate difference from upstream: a GPU no entry selects does not fail the assertion."""
    root = sim_host("T4", "T4")
    apply_ok(
        cli,
        root,
        config(
            tmp_path,
            'version: v1\nvgpu-configs:\n  c:\n    - devices: [1]\n      vgpu-devices: {"T4-16Q": 1}\n',
            "g1.yaml",
        ),
    )
    untouched = {u for u, a in uuids(cli, root).items() if a == T4_1}
    cfg = config(
        tmp_path,
        'version: v1\nvgpu-configs:\n  c:\n    - devices: [0]\n      vgpu-devices: {"T4-1Q": 16}\n',
        "g0.yaml",
    )
    made = apply_ok(cli, root, cfg)
    assert len(made) == 16 and all(T4_0 in line for line in made)
    assert layout(cli, root) == [{"T4-1Q": 16}, {"T4-16Q": 1}]
    assert {u for u, a in uuids(cli, root).items() if a == T4_1} == untouched
    held = cli("assert", "--sim", str(root), "-f", cfg)
    assert held.code == 0, held.err


def test_no_gpus_at_all(cli, sim_host):
    root = sim_host()
    assert cli("assert", "--sim", str(root), "-f", str(T4_CONFIG), "-c", "T4-small").code == 0
    result = cli("apply", "--sim", str(root), "-f", str(T4_CONFIG), "-c", "T4-small")
    assert result.code == 0
    assert writes(root) == []
    # As kubectl's "No resources found": said on stderr, so that stdout holds only data (nothing here,
    # also with --no-headers, and for 'types').
    for command in ("list", "types"):
        for extra in ((), ("--no-headers",), ("-o", "wide")):
            listed = cli(command, "--sim", str(root), *extra)
            assert listed.code == 0, listed.err
            assert listed.out == "" and listed.err.strip() == "no NVIDIA GPUs found", (command, extra)
    assert report(cli, root) == []


# -- list ------------------------------------------------------------------------------------------
def test_list_table_and_json(cli, sim_host, tmp_path):
    root = sim_host("T4", "T4", "A10")
    cfg = config(
        tmp_path,
        """\
version: v1
vgpu-configs:
  c:
    - devices: [0]
      vgpu-devices: {"T4-8Q": 2}
    - devices: [2]
      vgpu-devices: {"A10-12Q": 2}
""",
    )
    apply_ok(cli, root, cfg)
    gpus = report(cli, root)
    assert [(g["index"], g["address"], g["model"], g["framework"]) for g in gpus] == [
        (0, T4_0, "Tesla T4", "mdev"),
        (1, T4_1, "Tesla T4", "mdev"),
        (2, "0000:86:00.0", "NVIDIA A10", "mdev"),
    ]
    assert [g["numa_node"] for g in gpus] == [0, 1, 0]
    assert all(g["driver"] == "nvidia" for g in gpus)
    t4 = gpus[0]["vgpus"]
    assert [v["type"] for v in t4] == ["T4-8Q", "T4-8Q"]
    assert all(UUID.fullmatch(v["uuid"]) and v["parent"] == T4_0 for v in t4)
    assert all(isinstance(v["iommu_group"], int) and isinstance(v["type_id"], int) for v in t4)
    assert len({v["iommu_group"] for v in t4}) == 2
    assert gpus[1]["vgpus"] == []
    a10 = gpus[2]["vgpus"]
    assert [v["type"] for v in a10] == ["A10-12Q"] * 2
    assert all(v["parent"].startswith("0000:86:") and v["parent"] != "0000:86:00.0" for v in a10)

    table = cli("list", "--sim", str(root))
    assert table.code == 0
    rows = parse_table(table.out, LIST_COLUMNS)
    assert len(rows) == 2 + 1 + 2
    # GPU columns are printed once per GPU, on its first row.
    assert [r["GPU"] for r in rows] == ["0", "", "1", "2", ""]
    rows = parse_table(table.out, LIST_COLUMNS, fill=LIST_COLUMNS[:6])
    for v in t4:
        row = next(r for r in rows if r["UUID"] == v["uuid"])
        assert (row["GPU"], row["ADDRESS"], row["VGPU TYPE"], row["PARENT"]) == ("0", T4_0, "T4-8Q", T4_0)
        assert row["MODEL"] == "Tesla T4" and row["MIXED"] == "off" and row["HOLDER"] == "-"
    gpu1 = [r for r in rows if r["GPU"] == "1"]
    assert len(gpu1) == 1 and gpu1[0]["ADDRESS"] == T4_1
    assert [gpu1[0][c] for c in ("VGPU TYPE", "UUID", "PARENT", "HOLDER")] == ["-"] * 4
    for v in a10:
        row = next(r for r in rows if r["UUID"] == v["uuid"])
        assert row["GPU"] == "2" and row["MODEL"] == "NVIDIA A10" and row["PARENT"] == v["parent"]


# -- choosing the host -----------------------------------------------------------------------------
def test_host_root_at_a_simulated_host_is_refused(cli, sim_host):
    root = sim_host("T4")
    for args in (
        ("list", "--host-root", str(root)),
        ("assert", "--host-root", str(root), "-f", str(T4_CONFIG), "-c", "T4-small"),
        ("apply", "--host-root", str(root), "-f", str(T4_CONFIG), "-c", "T4-small"),
    ):
        result = cli(*args)
        assert result.code == 2, args  # a usage error, as any wrong --host-root
        assert f"{root} is a simulated host" in result.err
        assert f"--sim {root}" in result.err and "VGPU_DM_SIM" in result.err
    assert writes(root) == []
    assert layout(cli, root) == [{}]


def test_sim_selected_by_environment(cli, run_cli, sim_host):
    root = sim_host("T4", "T4")
    env = {"VGPU_DM_SIM": str(root)}
    result = cli("apply", "-f", str(T4_CONFIG), "-c", "T4-8Q", env=env)
    assert result.code == 0, result.err
    assert len(writes(root)) == 4
    assert cli("assert", "-f", str(T4_CONFIG), "-c", "default", env=env).code == 0
    listed = cli("list", "--json", env=env)
    assert [len(g["vgpus"]) for g in json.loads(listed.out)["gpus"]] == [2, 2]
    # The installed entry point and the other environment variables agree.
    env_all = {**env, "VGPU_DM_CONFIG_FILE": str(T4_CONFIG), "VGPU_DM_SELECTED_CONFIG": "T4-8Q"}
    held = run_cli("assert", env=env_all)
    assert held.code == 0, held.err
    assert "currently applied" in held.err
