"""generate-config: per-type configs and the documented default, from the catalog and from a host."""

from __future__ import annotations

import pytest

from tests.conftest import EXAMPLES
from tests.simstate import layouts
from vgpu_dm.cli.generate_cmd import default_type
from vgpu_dm.spec import load_spec

EXAMPLE = EXAMPLES / "config-example.yaml"


def test_the_example_file_is_what_generate_config_makes_now(cli):
    result = cli("generate-config", "--gpu", "all")
    assert result.code == 0, result.err
    assert EXAMPLE.read_text() == result.out, (
        "examples/config-example.yaml is stale: regenerate it with "
        "'nvidia-vgpu-dm generate-config --gpu all > examples/config-example.yaml'"
    )


def test_the_example_has_one_config_per_catalog_type_and_a_default():
    from vgpu_dm import catalog

    spec = load_spec(EXAMPLE.read_bytes(), str(EXAMPLE))
    types = {t for e in catalog.load() for t in e.vgpu_types}
    assert set(spec.configs) == types | {"default"}
    (entry,) = [e for e in spec.configs["T4-1Q"]]
    assert {t.name: n for t, n in entry.vgpu_devices} == {"T4-1Q": 16}
    assert [str(f) for f in entry.device_filter] == ["0x1EB810DE"]


@pytest.mark.parametrize(
    ("types", "expected"),
    [
        ({"T4-1Q": 16, "T4-8C": 2, "T4-8Q": 2, "T4-16Q": 1}, "T4-8Q"),  # fits twice, Q before C
        ({"H200-70C": 2, "H200-141C": 1, "H200-1-18C": 7}, "H200-70C"),  # no Q: C; MIG-backed never
        ({"X-48Q": 1, "X-24C": 1}, "X-48Q"),  # nothing fits twice: the largest
        ({"A100-1-5C": 7}, None),  # only MIG-backed types
    ],
)
def test_the_default_rule(types, expected):
    assert default_type(types) == expected


def test_default_and_per_type_configs_apply_on_hosts_of_both_frameworks(cli, sim_host):
    root = sim_host("T4", "A10", "L40S", "A16")
    for name, layout in [
        ("default", [{"T4-8Q": 2}, {"A10-12Q": 2}, {"L40S-24Q": 2}, {"A16-8Q": 2}]),
        ("L40S-4Q", [{"T4-8Q": 2}, {"A10-12Q": 2}, {"L40S-4Q": 12}, {"A16-8Q": 2}]),
        ("T4-1Q", [{"T4-1Q": 16}, {"A10-12Q": 2}, {"L40S-4Q": 12}, {"A16-8Q": 2}]),
    ]:
        result = cli("apply", "--sim", str(root), "-f", str(EXAMPLE), "-c", name)
        assert result.code == 0, (name, result.err)
        assert layouts(root) == layout, name


def test_generate_from_a_live_host_uses_what_the_driver_offers(cli, sim_host, tmp_path):
    root = sim_host("T4", "T4", "L40S")
    result = cli("generate-config", "--sim", str(root))
    assert result.code == 0, result.err
    spec = load_spec(result.out.encode(), "gen")
    assert "(from the host's GPUs)" in result.out.splitlines()[0]
    # Two T4s of one model share one entry; the L40S (VFs still off) comes from the catalog.
    assert [str(f) for e in spec.configs["default"] for f in e.device_filter] == ["0x1EB810DE", "0x26B910DE"]
    assert {t.name: n for t, n in spec.configs["L40S-48Q"][0].vgpu_devices} == {"L40S-48Q": 1}
    path = tmp_path / "gen.yaml"
    path.write_text(result.out)
    for name in ("default", "T4-2Q", "L40S-8Q"):
        applied = cli("apply", "--sim", str(root), "-f", str(path), "-c", name)
        assert applied.code == 0, (name, applied.err)
        assert cli("assert", "--sim", str(root), "-f", str(path), "-c", name).code == 0


def test_generate_refuses_unknown_gpus_and_hosts_without_vgpu_gpus(cli, tmp_path):
    unknown = cli("generate-config", "--gpu", "RTX9999")
    assert unknown.code == 2 and "unknown GPU 'RTX9999'" in unknown.err
    empty = tmp_path / "empty"
    assert cli("sim", "create", str(empty), "--gpu", "T4").code == 0
    for gpu in (empty / "sys/class/mdev_bus").iterdir():
        gpu.unlink()  # the vGPU manager is not loaded: no mdev parents
    none = cli("generate-config", "--sim", str(empty))
    assert none.code == 1 and "no GPUs in vGPU mode" in none.err


def test_generate_config_as_json_is_the_same_config_file(cli, tmp_path):
    """-o json, as export has: the same configs as the YAML (without its comments), a file -f reads."""
    import json

    import yaml

    text = cli("generate-config", "--gpu", "T4", "--gpu", "L40S", "--gpu", "RTX6000P", "--gpu", "RTX8000P")
    as_json = cli("generate-config", "--gpu", "T4", "--gpu", "L40S", "--gpu", "RTX6000P", "--gpu", "RTX8000P",
                  "-o", "json")  # fmt: skip
    assert text.code == as_json.code == 0, as_json.err
    assert json.loads(as_json.out) == yaml.safe_load(text.out)
    saved = tmp_path / "generated.json"
    saved.write_text(as_json.out)
    assert cli("assert", "--valid-config", "-f", str(saved), "-c", "default").code == 0
    none = cli("generate-config", "--gpu", "RTX6000P", "--gpu", "RTX8000P", "-o", "json")
    assert json.loads(none.out)["vgpu-configs"]["default"] == [{"devices": "all", "vgpu-devices": {}}]


def test_sim_gpus_as_json_and_yaml(cli):
    import json

    import yaml

    names = [line.split()[0] for line in cli("sim", "gpus").out.splitlines()]
    as_json = json.loads(cli("sim", "gpus", "-o", "json").out)
    assert [g["name"] for g in as_json["gpus"]] == names
    assert yaml.safe_load(cli("sim", "gpus", "-o", "yaml").out) == as_json
    t4 = as_json["gpus"][0]
    assert t4 == {
        "name": "T4",
        "model": "Tesla T4",
        "device_ids": ["0x1EB810DE"],
        "architecture": "Turing",
        "frameworks": ["mdev-pf"],
        "framebuffer_gb": 16,
        "mig_capable": False,
    }
    assert cli("sim", "gpus", "--json").out == cli("sim", "gpus", "-o", "json").out
