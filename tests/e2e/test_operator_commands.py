"""plan / apply --dry-run, export and types on simulated hosts of both kernel interfaces."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import EXAMPLES, writes
from tests.simstate import config_text, layouts, snapshot
from tests.table import parse_table
from vgpu_dm.host.lock import LOCK_FILE, HostLock
from vgpu_dm.sim.host import SimHostRoot
from vgpu_dm.sim.layout import create_host
from vgpu_dm.spec import load_spec

T4_CONFIG = str(EXAMPLES / "config-t4.yaml")
L40S_TYPES = {"L40S-1Q": 32, "L40S-4Q": 12, "L40S-8C": 6, "L40S-12Q": 4, "L40S-48Q": 1}
T4_TYPES = {"T4-1Q": 16, "T4-2Q": 8, "T4-4C": 4, "T4-16Q": 1}
A10_TYPES = {"A10-1Q": 24, "A10-4Q": 6, "A10-12C": 2, "A10-24Q": 1}


def plan_json(cli, root: Path, *args: str, code: int = 0) -> dict:
    result = cli("plan", "--sim", str(root), "--json", *args)
    assert result.code == code, result.err
    return json.loads(result.out)


def per_gpu_config(tmp_path: Path, name: str, per_gpu: list[dict[str, int]]) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(config_text({name: per_gpu}))
    return str(path)


# -- plan / apply --dry-run ------------------------------------------------------------------------
def test_plan_shows_creations_writes_nothing_and_takes_no_lock(cli, sim_host):
    root = sim_host("T4", "T4")
    report = plan_json(cli, root, "-f", T4_CONFIG, "-c", "T4-small")
    assert [g["status"] for g in report["gpus"]] == ["change", "change"]
    assert [g["create"] for g in report["gpus"]] == [[{"type": "T4-1Q", "count": 16}]] * 2
    assert all(g["entry"]["path"] == "vgpu-configs.T4-small[0]" for g in report["gpus"])
    assert (report["changes"], report["removals"], report["creations"]) == (2, 0, 32)
    assert report["problems"] == [] and report["journal"] is None
    assert writes(root) == []
    assert not (root / LOCK_FILE).exists()
    assert layouts(root) == [{}, {}]


def test_plan_does_not_wait_for_a_running_apply(cli, sim_host):
    root = sim_host("T4")
    with HostLock(SimHostRoot(root)):
        result = cli("plan", "--sim", str(root), "-f", T4_CONFIG, "-c", "T4-small")
    assert result.code == 0, result.err
    assert "1 GPU(s) would change (0 removal(s), 16 creation(s)); nothing was written" in result.out


def test_plan_names_the_governing_entry_keeps_and_removals(cli, sim_host):
    root = sim_host("T4", "T4")
    assert cli("apply", "--sim", str(root), "-f", T4_CONFIG, "-c", "T4-medium").code == 0
    # T4-mixed: all GPUs 8 x T4-2Q ... then a later entry for GPU 0 wins.
    report = plan_json(cli, root, "-f", T4_CONFIG, "-c", "T4-mixed")
    gpu0, gpu1 = report["gpus"]
    assert gpu0["entry"]["path"] != gpu1["entry"]["path"]
    assert gpu0["entry"]["path"].endswith("[1]") and gpu1["entry"]["path"].endswith("[0]")
    assert all(len(g["remove"]) == 4 and g["remove"][0]["type"] == "T4-4Q" for g in (gpu0, gpu1))
    text = cli("apply", "--dry-run", "--sim", str(root), "-f", T4_CONFIG, "-c", "T4-mixed")
    assert text.code == 0
    assert text.out == cli("plan", "--sim", str(root), "-f", T4_CONFIG, "-c", "T4-mixed").out
    assert "  remove   4 x T4-4Q" in text.out
    keep = plan_json(cli, root, "-f", T4_CONFIG, "-c", "T4-medium")
    assert [g["status"] for g in keep["gpus"]] == ["unchanged", "unchanged"]
    assert keep["gpus"][0]["keep"] == [{"type": "T4-4Q", "count": 4}]
    assert (
        "apply would change nothing"
        in cli("plan", "--sim", str(root), "-f", T4_CONFIG, "-c", "T4-medium").out
    )
    assert len(writes(root)) == 8  # only the apply above wrote


def test_plan_reports_a_vm_holding_a_vgpu_that_would_go(cli, sim_host):
    root = sim_host("T4")
    assert cli("apply", "--sim", str(root), "-f", T4_CONFIG, "-c", "T4-large").code == 0
    (uuid,) = [p.name for p in (root / "sys/bus/mdev/devices").iterdir()]
    pid = int(cli("sim", "hold", str(root), uuid).out.split()[1])
    refused = plan_json(cli, root, "-f", T4_CONFIG, "-c", "T4-small", code=1)
    (gpu,) = refused["gpus"]
    assert gpu["status"] == "problem"
    assert f"is in use by pid {pid} (qemu-system-x86_64)" in gpu["problems"][0]
    forced = plan_json(cli, root, "-f", T4_CONFIG, "-c", "T4-small", "--force")
    assert forced["gpus"][0]["remove"] == [
        {
            "type": "T4-16Q",
            "uuid": uuid,
            "parent": "0000:3b:00.0",
            "holders": [{"pid": pid, "name": "qemu-system-x86_64"}],
            "assigned": [],
            "recreated": False,
        }
    ]
    text = cli("apply", "--dry-run", "--force", "--sim", str(root), "-f", T4_CONFIG, "-c", "T4-small")
    assert f"T4-16Q {uuid} is IN USE by pid {pid} (qemu-system-x86_64)" in text.out
    assert len(writes(root)) == 1  # just the apply's one create


def test_plan_lists_every_problem_and_an_index_the_host_lacks(cli, sim_host, tmp_path):
    root = sim_host("T4")
    cfg = per_gpu_config(tmp_path, "c", [{"T4-1Q": 17}, {"T4-1Q": 1}])
    report = plan_json(cli, root, "-f", cfg, code=1)
    assert len(report["problems"]) == 2
    assert any("GPU index 1 does not exist" in p for p in report["problems"])
    assert report["gpus"][0]["status"] == "problem"
    text = cli("plan", "--sim", str(root), "-f", cfg)
    assert text.code == 1 and "2 problem(s); apply would stop before its first write" in text.out


def test_plan_on_vendor_vfio_shows_enabling_vfs_and_mixed_size_without_doing_it(cli, sim_host, tmp_path):
    root = sim_host("L40S")
    cfg = per_gpu_config(tmp_path, "c", [{"L40S-12Q": 2, "L40S-4Q": 4}])
    report = plan_json(cli, root, "-f", cfg)
    (gpu,) = report["gpus"]
    assert gpu["framework"] == "sriov-vfs-off" and gpu["enable_vfs"] is True
    assert gpu["create"] == [{"type": "L40S-12Q", "count": 2}, {"type": "L40S-4Q", "count": 4}]
    assert (
        json.loads(cli("list", "--json", "--sim", str(root)).out)["gpus"][0]["framework"] == "sriov-vfs-off"
    )
    assert cli("apply", "--sim", str(root), "-f", per_gpu_config(tmp_path, "one", [{"L40S-4Q": 1}])).code == 0
    mixed = plan_json(cli, root, "-f", cfg)["gpus"][0]
    assert mixed["framework"] == "vendor-vfio" and mixed["mixed_size_switch"] == "on"
    assert len(mixed["remove"]) == 1  # the mode changes only on an empty GPU


# -- export ------------------------------------------------------------------------------------------
def test_export_groups_identical_gpus_and_assert_holds(cli, sim_host, tmp_path):
    root = sim_host("T4", "T4", "A10")
    cfg = per_gpu_config(tmp_path, "c", [{"T4-2Q": 8}, {"T4-2Q": 8}, {"A10-4Q": 6}])
    assert cli("apply", "--sim", str(root), "-f", cfg).code == 0
    exported = cli("export", "--sim", str(root), "--name", "saved")
    assert exported.code == 0, exported.err
    spec = load_spec(exported.out, "export")
    (entries,) = spec.configs.values()
    assert list(spec.configs) == ["saved"]
    assert [(e.devices, {t.name: n for t, n in e.vgpu_devices}) for e in entries] == [
        ((0, 1), {"T4-2Q": 8}),
        ((2,), {"A10-4Q": 6}),
    ]
    assert "# GPU 0, 1: Tesla T4" in exported.out
    path = tmp_path / "saved.yaml"
    path.write_text(exported.out)
    assert cli("assert", "--sim", str(root), "-f", str(path)).code == 0


def test_export_of_identical_gpus_says_all_and_of_no_vgpus_says_empty(cli, sim_host):
    root = sim_host("T4", "T4")
    fresh = cli("export", "--sim", str(root))
    assert fresh.out.splitlines()[2:] == [
        "  current:",
        "    # GPU 0, 1: Tesla T4",
        "    - devices: all",
        "      vgpu-devices: {}",
    ]


def test_export_of_a_vendor_vfio_mixed_layout_round_trips(cli, sim_host, tmp_path):
    root = sim_host("L40S", "T4")
    cfg = per_gpu_config(tmp_path, "c", [{"L40S-12Q": 2, "L40S-4Q": 4}, {"T4-4Q": 4}])
    assert cli("apply", "--sim", str(root), "-f", cfg).code == 0
    exported = cli("export", "--sim", str(root), "--name", "odd: name")
    assert '"odd: name":' in exported.out
    path = tmp_path / "e.yaml"
    path.write_text(exported.out)
    assert cli("assert", "--sim", str(root), "-f", str(path), "-c", "odd: name").code == 0
    before = snapshot(root)
    assert cli("apply", "--sim", str(root), "-f", str(path)).code == 0
    assert snapshot(root) == before


def test_export_rejects_a_bad_name_and_warns_about_an_interrupted_apply(cli, sim_host):
    from vgpu_dm import journal

    root = sim_host("T4")
    assert cli("export", "--sim", str(root), "--name", "").code == 2
    assert cli("export", "--sim", str(root), "--name", "a\nb").code == 2
    journal.write(SimHostRoot(root), journal.Journal(pid=7, started=0.0, config="x", gpus=[]))
    warned = cli("export", "--sim", str(root))
    assert warned.code == 0 and "warning: found an interrupted apply (pid 7" in warned.err


# Random layouts on a host with both kernel interfaces (mdev on the PF, mdev on VFs, vendor VFIO).
_layout = st.tuples(
    *(
        st.one_of(
            st.just({}),
            st.sampled_from(sorted(types.items())).flatmap(
                lambda tm: st.integers(1, tm[1]).map(lambda n, t=tm[0]: {t: n})
            ),
        )
        for types in (T4_TYPES, A10_TYPES, L40S_TYPES, T4_TYPES)
    )
)


@pytest.fixture(scope="module")
def mixed_template(tmp_path_factory):
    root = tmp_path_factory.mktemp("export") / "template"
    create_host(root, ["T4", "A10", "L40S", "T4"])
    return root


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=_layout)
def test_export_then_assert_holds_on_random_layouts(cli, mixed_template, tmp_path, layout):
    root = tmp_path / "host"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(mixed_template, root, symlinks=True)
    target = [dict(x) for x in layout]
    cfg = per_gpu_config(tmp_path, "random", target)
    applied = cli("apply", "--sim", str(root), "-f", cfg)
    assert applied.code == 0, applied.err
    exported = cli("export", "--sim", str(root))
    assert exported.code == 0, exported.err
    path = tmp_path / "exported.yaml"
    path.write_text(exported.out)
    assert cli("assert", "--sim", str(root), "-f", str(path)).code == 0
    # The file says exactly what the host has, per GPU.
    (entries,) = load_spec(exported.out, "e").configs.values()
    said: dict[int, dict[str, int]] = {}
    for entry in entries:
        for index in entry.devices if entry.devices is not None else range(4):
            said[index] = {t.name: n for t, n in entry.vgpu_devices}
    assert [said[i] for i in range(4)] == layouts(root) == target
    # Identical layouts share one entry.
    assert len(entries) == len({tuple(sorted(x.items())) for x in target})


# -- types -------------------------------------------------------------------------------------------
TYPE_COLUMNS = ("GPU", "ADDRESS", "MODEL", "FRAMEWORK", "VGPU TYPE", "ID", "MAX", "AVAILABLE", "FB", "SERIES")


def test_types_on_mdev_follow_the_driver(cli, sim_host):
    root = sim_host("T4", "A10")
    report = json.loads(cli("types", "--sim", str(root), "--json").out)["gpus"]
    t4 = {t["name"]: t for t in report[0]["types"]}
    assert t4["T4-1Q"]["max_instances"] == 16 and t4["T4-1Q"]["available"] == 16
    assert (t4["T4-16C"]["framebuffer_gb"], t4["T4-16C"]["series"]) == (16, "C")
    a10 = {t["name"]: t for t in report[1]["types"]}
    assert a10["A10-4Q"]["max_instances"] == 6 and report[1]["framework"] == "mdev"
    # Every free VF offers one; the GPU takes no more than the type's limit.
    assert a10["A10-4Q"]["available"] == 6 and a10["A10-24Q"]["available"] == 1
    assert cli("apply", "--sim", str(root), "-f", T4_CONFIG, "-c", "T4-medium").code == 0
    after = json.loads(cli("types", "--sim", str(root), "--json").out)["gpus"]
    t4 = {t["name"]: t for t in after[0]["types"]}
    assert t4["T4-4Q"]["available"] == 0 and t4["T4-4Q"]["max_instances"] == 4
    table = cli("types", "--sim", str(root))
    rows = parse_table(table.out, TYPE_COLUMNS, fill=TYPE_COLUMNS[:4])
    row = next(r for r in rows if r["GPU"] == "0" and r["VGPU TYPE"] == "T4-1Q")
    assert (row["MAX"], row["FB"], row["SERIES"]) == ("16", "1 GB", "Q (virtual workstation)")
    assert [r["GPU"] for r in parse_table(table.out, TYPE_COLUMNS)].count("0") == 1


def test_types_on_vendor_vfio_before_and_after_vfs_exist(cli, sim_host, tmp_path):
    root = sim_host("L40S")
    before = json.loads(cli("types", "--sim", str(root), "--json").out)["gpus"][0]
    assert before["source"].startswith("catalog")
    assert {t["name"]: t["max_instances"] for t in before["types"]}["L40S-4Q"] == 12
    assert all(t["available"] is None for t in before["types"])
    assert "virtual functions not enabled yet" in cli("types", "--sim", str(root)).out
    cfg = per_gpu_config(tmp_path, "c", [{"L40S-4Q": 5}])
    assert cli("apply", "--sim", str(root), "-f", cfg).code == 0
    after = json.loads(cli("types", "--sim", str(root), "--json").out)["gpus"][0]
    assert after["source"] == "driver" and after["framework"] == "vendor-vfio"
    offered = {t["name"]: t for t in after["types"]}
    # Equal-size mode: only the 4 GB types are creatable next to the 4Q vGPUs.
    assert offered["L40S-4Q"]["available"] == 12 - 5
    assert offered["L40S-4Q"]["type_id"] > 0
    assert Counter(t["available"] > 0 for t in after["types"])[True] == 2  # 4C and 4Q


def test_apply_dry_run_json_and_its_usage(cli, sim_host):
    root = sim_host("T4")
    as_json = cli("apply", "--dry-run", "--json", "--sim", str(root), "-f", T4_CONFIG, "-c", "T4-small")
    assert as_json.code == 0
    assert json.loads(as_json.out)["gpus"][0]["create"] == [{"type": "T4-1Q", "count": 16}]
    alone = cli("apply", "--json", "--sim", str(root), "-f", T4_CONFIG, "-c", "T4-small")
    assert alone.code == 2 and "--json goes with --dry-run" in alone.err
    assert writes(root) == []


def test_plan_says_the_mig_step_comes_first_on_mig_capable_gpus(cli, sim_host):
    root = sim_host("A100")
    example = str(EXAMPLES / "config-example.yaml")
    # The (simulated) nvidia-mig-parted is asked, read-only, what apply's MIG step would change.
    report = plan_json(cli, root, "-f", example, "-c", "A100-1-5C", code=0)
    assert report["gpus"][0]["mig"] == {
        "enabled": True,
        "instances": {"1g.5gb": 7},
        "current": {"enabled": False, "instances": {}},
        "mode_change": True,
    }
    text = cli("plan", "--sim", str(root), "-f", example, "-c", "A100-1-5C")
    assert (
        "mig      MIG mode on, GPU instances 7 x 1g.5gb (nvidia-mig-parted, first; now MIG off)" in text.out
    )
    assert writes(root) == []


# -- list ----------------------------------------------------------------------------------------------
LIST_COLUMNS = (
    "GPU", "ADDRESS", "MODEL", "FRAMEWORK", "MIXED", "MIG",
    "VGPU TYPE", "UUID", "PARENT", "HOLDER", "VM", "MDEVCTL",
)  # fmt: skip


def test_list_shows_holders_mixed_size_mode_and_plain_model_names(cli, sim_host, tmp_path):
    root = sim_host("T4", "L40S", "A16")
    cfg = per_gpu_config(tmp_path, "c", [{"T4-8Q": 2}, {"L40S-12Q": 2, "L40S-4Q": 4}, {}])
    assert cli("apply", "--sim", str(root), "-f", cfg).code == 0
    uuid = json.loads(cli("list", "--json", "--sim", str(root)).out)["gpus"][0]["vgpus"][0]["uuid"]
    pid = int(cli("sim", "hold", str(root), uuid, "--name", "vm-web").out.split()[1])
    table = cli("list", "--sim", str(root))
    rows = parse_table(table.out, LIST_COLUMNS, fill=LIST_COLUMNS[:6])
    held = next(r for r in rows if r["UUID"] == uuid)
    assert held["HOLDER"] == f"{pid} vm-web"
    assert {r["MIXED"] for r in rows if r["GPU"] == "1"} == {"on"}
    assert [r["MODEL"] for r in rows if r["GPU"] == "2"] == ["NVIDIA A16"]  # no "(one of 4 GPUs per board)"
    gpus = json.loads(cli("list", "--json", "--sim", str(root)).out)["gpus"]
    assert gpus[0]["vgpus"][0]["holders"] == [{"pid": pid, "name": "vm-web"}]
    # mdev GPUs have the mode too (apply switches it there as well): issue 18.2.
    assert [g["mixed_size"] for g in gpus] == ["off", "on", "off"]
    plain = sim_host("L40S", mixed_size=False)
    cli("apply", "--sim", str(plain), "-f", per_gpu_config(tmp_path, "one", [{"L40S-4Q": 1}]))
    assert (
        json.loads(cli("list", "--json", "--sim", str(plain)).out)["gpus"][0]["mixed_size"] == "unsupported"
    )
