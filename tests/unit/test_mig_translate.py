"""vGPU config → nvidia-mig-parted config: every attribute, mixed entries, shared GPU instances."""

from __future__ import annotations

import re

import pytest
import yaml

from vgpu_dm import catalog
from vgpu_dm.errors import ConfigError
from vgpu_dm.mig.translate import (
    GIProfile,
    Placement,
    TranslationError,
    dump,
    mig_parted_config,
    placement,
)
from vgpu_dm.spec import load_spec
from vgpu_dm.vgpu_type import VGPUType


def translate(text: str, name: str | None = None) -> dict:
    spec = load_spec(text, "test.yaml")
    selected, entries = spec.select(name)
    return mig_parted_config(selected, entries, spec.source)


def one_entry(types: str, extra: str = "") -> dict:
    cfg = translate(
        f"version: v1\nvgpu-configs:\n  c:\n    - devices: all{extra}\n      vgpu-devices: {types}\n"
    )
    return cfg["mig-configs"]["c"][0]


@pytest.mark.parametrize(
    ("vtype", "profile"),
    [
        ("A100-1-5C", "1g.5gb"),
        ("A100-1-5CME", "1g.5gb+me"),
        ("A100-2-10C", "2g.10gb"),
        ("A100-7-40C", "7g.40gb"),
        ("H100-3-40C", "3g.40gb"),
        ("A30-2-12CME", "2g.12gb+me"),
        ("H200-1-18C", "1g.18gb"),
        ("H200-2-35C", "2g.35gb"),
        ("H200-7-141C", "7g.141gb"),
        ("DC-1-24QGFX", "1g.24gb+gfx"),
        # RTX PRO 6000 Q-series (graphics) types need +gfx instances without the GFX suffix.
        ("DC-1-24Q", "1g.24gb+gfx"),
        ("DC-1-24C", "1g.24gb"),
        ("DC-1-24CGFX", "1g.24gb+gfx"),
        ("B200X-1-23C", "1g.23gb"),
        ("B300X-3-135C", "3g.135gb"),
        ("H100L-1-12CME", "1g.12gb+me"),
        ("GH200L-2-36C", "2g.36gb"),
        # The vGPU and instance names of the GB200 round the same memory differently (24 vs 23 GB).
        ("GB200-1-24C", "1g.23gb"),
        ("GB200-7-189C", "7g.186gb"),
        ("A800-1-10C", "1g.10gb"),
    ],
)
def test_profile_of_each_attribute(vtype: str, profile: str) -> None:
    assert one_entry(f'{{"{vtype}": 1}}') == {
        "devices": "all",
        "mig-enabled": True,
        "mig-devices": {profile: 1},
    }


def test_counts_are_per_gpu_instances_one_vgpu_each() -> None:
    entry = one_entry('{"A100-1-5C": 3, "A100-2-10C": 1, "A100-1-5CME": 1}')
    assert entry["mig-devices"] == {"1g.5gb": 3, "2g.10gb": 1, "1g.5gb+me": 1}


def test_several_vgpus_share_one_instance_on_rtx_pro_6000() -> None:
    # 12 x DC-1-8Q live on four 1g.24gb instances (host-interfaces.md 3.6), not on twelve "1g.8gb";
    # Q-series on the RTX PRO 6000 needs graphics (+gfx) instances.
    assert one_entry('{"DC-1-8Q": 12}')["mig-devices"] == {"1g.24gb+gfx": 4}
    # Rounded up: five 8 GB vGPUs need two 24 GB instances.
    assert one_entry('{"DC-1-8Q": 5}')["mig-devices"] == {"1g.24gb+gfx": 2}
    assert one_entry('{"DC-2-12QGFX": 8}')["mig-devices"] == {"2g.48gb+gfx": 2}
    assert one_entry('{"DC-4-32C": 3}')["mig-devices"] == {"4g.96gb": 1}


def test_vgpus_of_different_sizes_never_share_an_instance() -> None:
    # DC-1-8Q x 2 and DC-1-12Q x 1 both go into 1g.24gb+gfx, but each size needs its own instance.
    assert one_entry('{"DC-1-8Q": 2, "DC-1-12Q": 1}')["mig-devices"] == {"1g.24gb+gfx": 2}
    # Same size and instance profile, different series: they may share.
    assert one_entry('{"DC-1-8QGFX": 2, "DC-1-8CGFX": 1}')["mig-devices"] == {"1g.24gb+gfx": 1}
    # A compute type needs no graphics instance: it gets a plain one.
    assert one_entry('{"DC-1-8Q": 2, "DC-1-8C": 1}')["mig-devices"] == {"1g.24gb+gfx": 1, "1g.24gb": 1}


@pytest.mark.parametrize(
    ("types", "message"),
    [
        ('{"A100-1-5C": 8}', "8 x A100-1-5C requested, but the GPU holds at most 7"),
        ('{"A100-1-5C": 7, "A100-2-10C": 1}', "need 9 compute slices, but the NVIDIA A100 PCIe 40GB has 7"),
        ('{"A100-3-20C": 2, "A100-4-20C": 1}', "need 10 compute slices"),
        ('{"DC-1-8Q": 13}', "need 5 x 1g.24gb+gfx GPU instances, but the NVIDIA RTX PRO 6000"),
        ('{"B200X-1-23CNOME": 1}', "has no 1g.23gb-me profile as far as this tool knows"),
        ('{"6000D-1-42C": 1}', "MIG GPU-instance profiles of the NVIDIA RTX 6000D are not known"),
        ('{"DC-1-16Q": 2}', "needs 1g.16gb+gfx GPU instances (Q-series MIG-backed vGPUs on it need graphics"),
        ('{"ZZ9-3-30C": 1}', "MIG GPU-instance profiles of the GPU are not known"),
        ('{"T4-1-16C": 1}', "the Tesla T4 has no MIG-backed vGPU types"),
    ],
)
def test_what_apply_refuses_is_refused(types: str, message: str) -> None:
    """mig-config refuses what apply refuses: counts beyond the GPU's maximum, profiles and suffixes the
    GPU does not offer, GPUs whose MIG profiles are not known (issue 18 item 8)."""
    text = f"version: v1\nvgpu-configs:\n  c:\n    - devices: all\n      vgpu-devices: {types}\n"
    with pytest.raises(ConfigError, match=re.escape(message)):
        translate(text)


def test_time_sliced_and_empty_entries_turn_mig_off_and_filters_are_kept() -> None:
    text = """\
version: v1
vgpu-configs:
  mixed:
    - device-filter: "0x20F110DE"
      devices: [0, 2]
      vgpu-devices: {"A100-1-5C": 7}
    - device-filter: ["0x20F110DE", "0x233510DE:0x18BF10DE"]
      devices: [1]
      vgpu-devices: {"A100-40C": 1}
    - devices: all
      vgpu-devices: {}
    - device-filter: "0x233510DE"
      devices: all
      vgpu-devices: {"H200X-1-18C": 2}
"""
    cfg = translate(text)
    assert cfg == {
        "version": "v1",
        "mig-configs": {
            "mixed": [
                {
                    "device-filter": "0x20F110DE",
                    "devices": [0, 2],
                    "mig-enabled": True,
                    "mig-devices": {"1g.5gb": 7},
                },
                {
                    "device-filter": ["0x20F110DE", "0x233510DE:0x18BF10DE"],
                    "devices": [1],
                    "mig-enabled": False,
                },
                {"devices": "all", "mig-enabled": False},
                {
                    "device-filter": "0x233510DE",
                    "devices": "all",
                    "mig-enabled": True,
                    "mig-devices": {"1g.18gb": 2},
                },
            ]
        },
    }
    # The YAML form reads back to the same data (quoted filter strings stay strings).
    assert yaml.safe_load(dump(cfg)) == cfg


def test_every_catalog_mig_type_fits_its_max_count() -> None:
    """Instances per vGPU x instances per GPU must give the catalog's max count, for every MIG type."""
    checked = 0
    for model in catalog.load():
        if not model.mig_gi_profiles:
            continue
        for name, maximum in model.vgpu_types.items():
            vtype = VGPUType.parse(name)
            if not vtype.is_mig_backed:
                continue
            try:
                where = placement(vtype, model.mig_gi_profiles, model.mig_gfx_series, model.name)
            except TranslationError as exc:
                # Known unknowns only: the RTX PRO 4500's graphics instances.
                assert "RTX PRO 4500" in model.name and "+gfx" in str(exc), (model.name, name, exc)
                continue
            base = GIProfile.parse(where.profile)
            count = (
                model.mig_gi_profiles.get(where.profile)
                or model.mig_gi_profiles[GIProfile(base.slices, base.memory_gb).name]
            )
            assert where.per_instance * count == maximum, (model.name, name, where)
            checked += 1
    assert checked > 60


def test_placement_errors() -> None:
    with pytest.raises(TranslationError, match="no GPU-instance profile of the GPU with 3 slice"):
        placement(VGPUType.parse("DC-3-8Q"), {"1g.24gb": 4, "2g.48gb": 2})
    with pytest.raises(TranslationError, match="at least 50 GB"):
        placement(VGPUType.parse("DC-1-50Q"), {"1g.24gb": 4})
    with pytest.raises(ValueError, match="time-sliced"):
        placement(VGPUType.parse("A100-40C"), None)
    with pytest.raises(TranslationError, match="not known"):
        placement(VGPUType.parse("A100-1-5C"), None)
    assert placement(VGPUType.parse("A100-1-5C"), {"1g.5gb": 7}) == Placement("1g.5gb", 1)
    with pytest.raises(ValueError, match="invalid GPU-instance profile"):
        GIProfile.parse("1g5gb")


def test_untranslatable_type_is_a_located_config_error() -> None:
    text = "version: v1\nvgpu-configs:\n  c:\n    - devices: all\n      vgpu-devices: {DC-3-8Q: 1}\n"
    with pytest.raises(
        ConfigError, match=r"test.yaml:4: vgpu-configs.c\[0\].vgpu-devices: vGPU type DC-3-8Q is"
    ):
        translate(text)


def test_cli_prints_yaml(cli, tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        'version: v1\nvgpu-configs:\n  A100-1-5C:\n    - devices: all\n      vgpu-devices: {"A100-1-5C": 7}\n'
    )
    result = cli("mig-config", "-f", str(path))
    assert result.code == 0
    assert yaml.safe_load(result.out) == {
        "version": "v1",
        "mig-configs": {"A100-1-5C": [{"devices": "all", "mig-enabled": True, "mig-devices": {"1g.5gb": 7}}]},
    }


def test_cli_errors(cli, tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "version: v1\nvgpu-configs:\n  a:\n    - devices: all\n      vgpu-devices: {DC-3-8Q: 1}\n"
    )
    result = cli("mig-config", "-f", str(path), "-c", "a")
    assert result.code == 2
    assert "vgpu-configs.a[0].vgpu-devices: vGPU type DC-3-8Q is not a type of" in result.err
    assert cli("mig-config", "-f", str(path), "-c", "nope").code == 2
