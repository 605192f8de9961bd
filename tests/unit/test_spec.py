"""The v1 config file: every format rule with valid and invalid files, located messages, and selection."""

from __future__ import annotations

import json
import time
from textwrap import dedent

import pytest
import yaml

from vgpu_dm.device_id import DeviceID
from vgpu_dm.errors import ConfigError, Problem
from vgpu_dm.spec import MAX_CONFIG_BYTES, ConfigEntry, Spec, load_spec, read_config_source
from vgpu_dm.spec.loader import MAX_NODES, load_spec_file
from vgpu_dm.vgpu_type import VGPUType

EXAMPLE = "examples/config-t4.yaml"
T4 = DeviceID(0x1EB8, 0x10DE, 0x12A2, 0x10DE)
BAD_TYPE = (
    "expected <GPU>-<GB><SERIES> (e.g. T4-1Q, RTX6000-Ada-2Q) or "
    "<GPU>-<G>-<GB><SERIES>[ME|NOME|MEALL|GFX] (e.g. A100-1-5CME), series one of A, B, C, Q"
)
HEAD = "version: v1\nvgpu-configs:\n  a:\n"  # then the entries of config "a"
QUOTE_HINT = '(an unquoted 0x... is read as a number by YAML; quote it: "0x1EB810DE")'


def load(text: str | bytes, source: str = "f.yaml") -> Spec:
    return load_spec(dedent(text) if isinstance(text, str) else text, source)


def problems(text: str | bytes, source: str = "f.yaml") -> list[str]:
    """The located messages load_spec reports for ``text`` (which must be invalid)."""
    with pytest.raises(ConfigError) as exc:
        load(text, source)
    assert exc.value.problems, "a config error must carry located problems"
    lines = [str(p) for p in exc.value.problems]
    assert str(exc.value) == "\n".join(lines)
    return lines


def wanted(spec: Spec, name: str, index: int = 0) -> dict[str, int]:
    return {t.name: n for t, n in spec.configs[name][index].vgpu_devices}


# -- valid files ---------------------------------------------------------------------------------------


def test_example_file_loads(pytestconfig: pytest.Config) -> None:
    spec = load_spec_file(pytestconfig.rootpath / EXAMPLE)
    assert spec.source.endswith("config-t4.yaml")
    assert list(spec.configs)[:3] == ["default", "T4-16Q", "T4-8Q"]
    assert "T4-small" in spec.configs
    assert wanted(spec, "T4-small") == {"T4-1Q": 16}
    small = spec.configs["T4-small"][0]
    assert small.devices is None
    assert small.device_filter == (DeviceID(0x1EB8, 0x10DE),)
    mixed = spec.configs["T4-mixed"]
    assert len(mixed) == 2
    assert mixed[1].devices == (0,)
    assert mixed[1].path == "vgpu-configs.T4-mixed[1]"
    assert spec.configs["T4-none"][0].vgpu_devices == ()


def test_parsed_entry_fields() -> None:
    spec = load(
        """\
        version: v1
        vgpu-configs:
          mig:
            - device-filter: ["0x20B510DE", "0x25B610DE:0x14A910DE"]
              devices: [2, 0]
              vgpu-devices:
                "A100D-1-10C": 4
                "A100D-2-20CME": 1
        """
    )
    (entry,) = spec.configs["mig"]
    assert isinstance(entry, ConfigEntry)
    assert entry.devices == (2, 0)
    assert entry.device_filter == (DeviceID(0x20B5, 0x10DE), DeviceID(0x25B6, 0x10DE, 0x14A9, 0x10DE))
    assert entry.vgpu_devices == (
        (VGPUType.parse("A100D-1-10C"), 4),
        (VGPUType.parse("A100D-2-20CME"), 1),
    )
    assert entry.is_mig_backed
    assert entry.wanted() == {VGPUType.parse("A100D-1-10C"): 4, VGPUType.parse("A100D-2-20CME"): 1}
    assert entry.path == "vgpu-configs.mig[0]"
    assert entry.line == 4


@pytest.mark.parametrize(
    "text",
    ["", "\n", "# only a comment\n", "---\n", "---\n...\n", "~\n", "null\n", "version: v1\n"],
)
def test_empty_document_or_only_version_is_valid_with_no_configs(text: str) -> None:
    spec = load(text)
    assert spec.configs == {}
    with pytest.raises(ConfigError, match="defines no vgpu-configs"):
        spec.select(None)
    with pytest.raises(
        ConfigError, match=r"selected vgpu-config not present: 'x' \(configs in the file: none\)"
    ):
        spec.select("x")


@pytest.mark.parametrize("version", ["v1", '"v1"', "'v1'", "!!str v1"])
def test_version_v1_in_any_quoting(version: str) -> None:
    spec = load(f"version: {version}\nvgpu-configs:\n  a: [{{devices: all, vgpu-devices: {{}}}}]\n")
    assert list(spec.configs) == ["a"]


def test_str_input_and_bom_are_accepted() -> None:
    text = "version: v1\nvgpu-configs:\n  a: [{devices: all, vgpu-devices: {T4-1Q: 16}}]\n"
    assert wanted(load_spec(text), "a") == {"T4-1Q": 16}
    assert wanted(load_spec(b"\xef\xbb\xbf" + text.encode()), "a") == {"T4-1Q": 16}
    assert load_spec(text).source == "<config>"


def test_empty_vgpu_devices_is_valid() -> None:
    spec = load(
        """\
        version: v1
        vgpu-configs:
          none:
            - devices: all
              vgpu-devices: {}
        """
    )
    assert spec.configs["none"][0].vgpu_devices == ()
    assert spec.configs["none"][0].wanted() == {}
    assert not spec.configs["none"][0].is_mig_backed


@pytest.mark.parametrize(
    ("filter_yaml", "expected"),
    [
        ('"0x1EB810DE"', (DeviceID(0x1EB8, 0x10DE),)),
        ("'0x1eb810de'", (DeviceID(0x1EB8, 0x10DE),)),
        ('"0x25B610DE:0x14A910DE"', (DeviceID(0x25B6, 0x10DE, 0x14A9, 0x10DE),)),
        ('["0x1EB810DE", "0x1DB410DE"]', (DeviceID(0x1EB8, 0x10DE), DeviceID(0x1DB4, 0x10DE))),
    ],
)
def test_device_filter_string_or_list(filter_yaml: str, expected: tuple[DeviceID, ...]) -> None:
    spec = load(HEAD + f"    - device-filter: {filter_yaml}\n      devices: all\n      vgpu-devices: {{}}\n")
    assert spec.configs["a"][0].device_filter == expected


def test_absent_filter_selects_by_devices_only() -> None:
    spec = load(
        """\
        version: v1
        vgpu-configs:
          a:
            - devices: all
              vgpu-devices: {}
            - devices: [1]
              vgpu-devices: {}
            - device-filter: "0x25B610DE:0x14A910DE"
              devices: all
              vgpu-devices: {}
        """
    )
    every, second, a16 = spec.configs["a"]
    assert every.devices is None and every.device_filter == ()
    assert every.selects(0, T4) and every.selects(7, T4)
    assert second.selects(1, T4) and not second.selects(0, T4)
    assert a16.selects(3, DeviceID(0x25B6, 0x10DE, 0x14A9, 0x10DE))
    assert not a16.selects(3, DeviceID(0x25B6, 0x10DE, 0x157E, 0x10DE))
    assert not a16.selects(3, T4)


def test_several_types_of_one_kind_in_one_entry_are_valid() -> None:
    spec = load(
        """\
        version: v1
        vgpu-configs:
          ts:
            - devices: all
              vgpu-devices: {"T4-1Q": 4, "T4-2Q": 2, "T4-4C": 1}
          mig:
            - devices: all
              vgpu-devices: {"A100-1-5C": 2, "A100-2-10C": 1, "A100-1-5CME": 1}
        """
    )
    assert wanted(spec, "ts") == {"T4-1Q": 4, "T4-2Q": 2, "T4-4C": 1}
    assert wanted(spec, "mig") == {"A100-1-5C": 2, "A100-2-10C": 1, "A100-1-5CME": 1}


def test_config_names_keep_file_order_and_odd_names() -> None:
    spec = load(
        """\
        version: v1
        vgpu-configs:
          zeta: [{devices: all, vgpu-devices: {}}]
          "with space": [{devices: all, vgpu-devices: {}}]
          alpha: [{devices: all, vgpu-devices: {}}]
          "1": [{devices: all, vgpu-devices: {}}]
        """
    )
    assert list(spec.configs) == ["zeta", "with space", "alpha", "1"]
    assert spec.configs["with space"][0].path == 'vgpu-configs."with space"[0]'


def test_integer_spellings_for_indices_and_counts() -> None:
    spec = load(
        """\
        version: v1
        vgpu-configs:
          a:
            - devices: [0x1, 0, 0b11]
              vgpu-devices: {"T4-1Q": 0x10, "T4-2Q": !!int "3"}
        """
    )
    assert spec.configs["a"][0].devices == (1, 0, 3)
    assert wanted(spec, "a") == {"T4-1Q": 16, "T4-2Q": 3}


# -- JSON input ------------------------------------------------------------------------------------


def test_json_input() -> None:
    doc = {
        "version": "v1",
        "vgpu-configs": {
            "T4-small": [{"device-filter": "0x1EB810DE", "devices": "all", "vgpu-devices": {"T4-1Q": 16}}],
            "pair": [{"devices": [0, 1], "vgpu-devices": {"T4-8Q": 2}}],
        },
    }
    spec = load_spec(json.dumps(doc).encode(), "f.json")
    assert wanted(spec, "T4-small") == {"T4-1Q": 16}
    assert spec.configs["pair"][0].devices == (0, 1)


def test_tab_indented_json_input() -> None:
    doc = {"version": "v1", "vgpu-configs": {"a": [{"devices": "all", "vgpu-devices": {"L40S-48Q": 1}}]}}
    text = json.dumps(doc, indent="\t")
    assert "\n\t\t" in text
    assert wanted(load_spec(text.encode(), "f.json"), "a") == {"L40S-48Q": 1}


def test_json_errors_are_located() -> None:
    text = '{\n\t"version": "v1",\n\t"vgpu-configs": {\n\t\t"a": [{"devices": "some", "vgpu-devices": {}}]}}'
    assert problems(text, "f.json") == [
        "f.json:4:21: vgpu-configs.a[0].devices: expected 'all' or a list of GPU indices, "
        "got a string ('some')"
    ]


# -- anchors and merge keys -----------------------------------------------------------------------


def test_anchors_and_aliases_reuse_entries() -> None:
    spec = load(
        """\
        version: v1
        vgpu-configs:
          first: &entries
            - devices: all
              vgpu-devices: {"T4-1Q": 16}
          second: *entries
        """
    )
    assert wanted(spec, "first") == wanted(spec, "second") == {"T4-1Q": 16}


def test_merge_keys_with_override() -> None:
    spec = load(
        """\
        version: v1
        vgpu-configs:
          base:
            - &t4 {device-filter: "0x1EB810DE", devices: all, vgpu-devices: {"T4-1Q": 16}}
          first-gpu:
            - <<: *t4
              devices: [0]
          two-bases:
            - <<: [{devices: [1]}, *t4]
              vgpu-devices: {"T4-2Q": 8}
        """
    )
    first = spec.configs["first-gpu"][0]
    assert first.devices == (0,)  # the key written next to the merge wins
    assert first.device_filter == (DeviceID(0x1EB8, 0x10DE),)  # merged in
    assert wanted(spec, "first-gpu") == {"T4-1Q": 16}
    two = spec.configs["two-bases"][0]
    assert two.devices == (1,)  # the first merged mapping wins over later ones
    assert wanted(spec, "two-bases") == {"T4-2Q": 8}


def test_merge_keys_in_vgpu_devices() -> None:
    spec = load(
        """\
        version: v1
        vgpu-configs:
          a:
            - devices: all
              vgpu-devices: &small {"T4-1Q": 8}
          b:
            - devices: all
              vgpu-devices:
                <<: *small
                "T4-1Q": 16
        """
    )
    assert wanted(spec, "b") == {"T4-1Q": 16}


def test_merge_of_a_non_mapping_is_an_error() -> None:
    assert problems(
        """\
        version: v1
        vgpu-configs:
          a:
            - <<: 3
              devices: all
              vgpu-devices: {}
        """
    ) == [
        "f.yaml:4:11: vgpu-configs.a[0]: invalid merge key: expected a mapping to merge, got an integer ('3')"
    ]


# -- top level -------------------------------------------------------------------------------------


def test_version_missing_in_a_non_empty_document() -> None:
    assert problems(
        """\
        vgpu-configs:
          a: [{devices: all, vgpu-devices: {}}]
        """
    ) == ["f.yaml:1:1: missing required key 'version' (expected version: v1)"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "v2",
            "unsupported version 'v2': this tool reads version v1, the only version of the vGPU config "
            "format (write version: v1)",
        ),
        ("V1", "unsupported version 'V1': this tool reads version v1"),
        ('""', "unsupported version '': this tool reads version v1"),
        ("1", "expected the string v1, got an integer ('1')"),
        ("1.0", "expected the string v1, got a float ('1.0')"),
        ("", "expected the string v1, got null (empty)"),
        ("[v1]", "expected the string v1, got a list"),
    ],
)
def test_other_versions_are_rejected(value: str, message: str) -> None:
    """Issue 18.10: 'unsupported version a string ('v2')' did not read as a sentence."""
    text = f"version: {value}\nvgpu-configs:\n  a: [{{devices: all, vgpu-devices: {{}}}}]\n"
    col = 9 if value == "" else 10
    (found,) = problems(text)
    assert found.startswith(f"f.yaml:1:{col}: version: {message}")


def test_unknown_top_level_key() -> None:
    assert problems(
        """\
        version: v1
        vgpu-config:
          a: [{devices: all, vgpu-devices: {}}]
        """
    ) == [
        "f.yaml:2:1: unknown key 'vgpu-config'; did you mean 'vgpu-configs'? "
        "(expected one of: version, vgpu-configs)"
    ]


@pytest.mark.parametrize(
    ("text", "kind"),
    [("- a\n", "a list"), ("hello\n", "a string"), ("42\n", "an integer")],
)
def test_top_level_must_be_a_mapping(text: str, kind: str) -> None:
    # Not quoted (issue 18.12): a file that is not a config may be anything, /etc/passwd included.
    assert problems(text) == [
        f"f.yaml:1:1: this is not a vGPU config file: its top level is {kind}, not a mapping with "
        "'version: v1' and 'vgpu-configs:'"
    ]


def test_a_file_with_many_unknown_top_level_keys_is_not_a_config_and_is_not_quoted() -> None:
    """Issue 18.12: 'apply -f /etc/shadow' echoed every line of the file into the log."""
    shadow = "".join(f"user{i}:$6$salt$secret{i}:20228:0:99999:7:::\n" for i in range(24))
    assert problems(shadow) == [
        "f.yaml:1:1: this is not a vGPU config file: 24 of its 24 top-level keys are not 'version' or "
        "'vgpu-configs' (lines 1, 2, 3, 4, 5, …); a vGPU config file is a YAML mapping with "
        "'version: v1' and 'vgpu-configs:'"
    ]
    # Two unknown keys still read as typos in a config, each with its own location; so do more next to
    # the keys of a config.
    typos = problems("vgpu-config: {}\nversoin: v1\n")
    assert [p.split(": ", 1)[0] for p in typos] == ["f.yaml:1:1", "f.yaml:1:1", "f.yaml:2:1"]
    assert "unknown key 'versoin'; did you mean 'version'?" in typos[2]
    extra = problems("version: v1\na: 1\nb: 2\nc: 3\nvgpu-configs: {x: [{devices: all, vgpu-devices: {}}]}\n")
    assert [p.split(": ", 1)[0] for p in extra] == ["f.yaml:2:1", "f.yaml:3:1", "f.yaml:4:1"]


def test_long_values_are_cut_in_messages() -> None:
    (found,) = problems(
        "version: v1\nvgpu-configs:\n  a:\n    - devices: " + "x" * 500 + "\n      vgpu-devices: {}\n"
    )
    assert "'" + "x" * 40 + "…'" in found and "x" * 41 not in found


def test_empty_vgpu_configs_mapping() -> None:
    assert problems("version: v1\nvgpu-configs: {}\n") == [
        "f.yaml:2:15: vgpu-configs: must define at least one config"
    ]


def test_null_vgpu_configs() -> None:
    assert problems("version: v1\nvgpu-configs:\n") == [
        "f.yaml:2:14: vgpu-configs: expected a mapping of config name to entries (a mapping), "
        "got null (empty)"
    ]


def test_vgpu_configs_as_a_list() -> None:
    assert problems("version: v1\nvgpu-configs:\n  - a\n") == [
        "f.yaml:3:3: vgpu-configs: expected a mapping of config name to entries (a mapping), got a list"
    ]


# -- configs and entries ---------------------------------------------------------------------------


def test_config_with_an_empty_list_or_not_a_list() -> None:
    assert problems(
        """\
        version: v1
        vgpu-configs:
          empty: []
          map: {devices: all}
          nothing:
        """
    ) == [
        "f.yaml:3:10: vgpu-configs.empty: must have at least one entry",
        "f.yaml:4:8: vgpu-configs.map: expected a list of entries, got a mapping",
        "f.yaml:5:11: vgpu-configs.nothing: expected a list of entries, got null (empty)",
    ]


def test_entry_must_be_a_mapping() -> None:
    assert problems(
        """\
        version: v1
        vgpu-configs:
          a:
            - T4-1Q
            - 3
        """
    ) == [
        "f.yaml:4:7: vgpu-configs.a[0]: expected a config entry (a mapping), got a string ('T4-1Q')",
        "f.yaml:5:7: vgpu-configs.a[1]: expected a config entry (a mapping), got an integer ('3')",
    ]


def test_entry_unknown_key() -> None:
    assert problems(
        """\
        version: v1
        vgpu-configs:
          a:
            - devices: all
              device-filters: "0x1EB810DE"
              vgpu-devices: {}
        """
    ) == [
        "f.yaml:5:7: vgpu-configs.a[0]: unknown key 'device-filters'; did you mean 'device-filter'? "
        "(expected one of: devices, device-filter, vgpu-devices)"
    ]


def test_entry_missing_devices_and_vgpu_devices() -> None:
    assert problems(
        """\
        version: v1
        vgpu-configs:
          a:
            - vgpu-devices: {}
            - devices: all
            - device-filter: "0x1EB810DE"
        """
    ) == [
        "f.yaml:4:7: vgpu-configs.a[0]: missing required key 'devices'",
        "f.yaml:5:7: vgpu-configs.a[1]: missing required key 'vgpu-devices'",
        "f.yaml:6:7: vgpu-configs.a[2]: missing required key 'devices'",
        "f.yaml:6:7: vgpu-configs.a[2]: missing required key 'vgpu-devices'",
    ]


# -- devices ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("devices", "expected"),
    [("all", None), ('"all"', None), ("[0]", (0,)), ("[3, 1, 2]", (3, 1, 2)), ("[0x10]", (16,))],
)
def test_devices_all_or_list(devices: str, expected: tuple[int, ...] | None) -> None:
    spec = load(f"version: v1\nvgpu-configs:\n  a:\n    - devices: {devices}\n      vgpu-devices: {{}}\n")
    assert spec.configs["a"][0].devices == expected


@pytest.mark.parametrize(
    ("devices", "message"),
    [
        ("some", "vgpu-configs.a[0].devices: expected 'all' or a list of GPU indices, got a string ('some')"),
        ("All", "vgpu-configs.a[0].devices: expected 'all' or a list of GPU indices, got a string ('All')"),
        ("0", "vgpu-configs.a[0].devices: expected 'all' or a list of GPU indices, got an integer ('0')"),
        ("{0: x}", "vgpu-configs.a[0].devices: expected 'all' or a list of GPU indices, got a mapping"),
        (
            "[]",
            "vgpu-configs.a[0].devices: empty list selects no GPU; use 'all' or list at least one GPU index",
        ),
    ],
)
def test_devices_bad_value(devices: str, message: str) -> None:
    text = f"version: v1\nvgpu-configs:\n  a:\n    - devices: {devices}\n      vgpu-devices: {{}}\n"
    assert problems(text) == [f"f.yaml:4:16: {message}"]


def test_devices_null() -> None:
    text = "version: v1\nvgpu-configs:\n  a:\n    - devices:\n      vgpu-devices: {}\n"
    assert problems(text) == [
        "f.yaml:4:15: vgpu-configs.a[0].devices: expected 'all' or a list of GPU indices, got null (empty)"
    ]


def test_devices_bad_indices_are_each_reported() -> None:
    text = HEAD + '    - devices: [0, -1, 0, true, "1", 1.5, [2], 3]\n      vgpu-devices: {}\n'
    #                  col: 17 20  24 27    33   38   43
    not_index = "expected a GPU index (an integer >= 0), got"
    assert problems(text) == [
        "f.yaml:4:20: vgpu-configs.a[0].devices[1]: GPU index must be >= 0, got -1",
        "f.yaml:4:24: vgpu-configs.a[0].devices[2]: GPU index 0 is listed twice (first at [0])",
        f"f.yaml:4:27: vgpu-configs.a[0].devices[3]: {not_index} a boolean ('true')",
        f"f.yaml:4:33: vgpu-configs.a[0].devices[4]: {not_index} a string ('1')",
        f"f.yaml:4:38: vgpu-configs.a[0].devices[5]: {not_index} a float ('1.5')",
        f"f.yaml:4:43: vgpu-configs.a[0].devices[6]: {not_index} a list",
    ]


@pytest.mark.parametrize("boolean", ["true", "false", "yes", "no", "on", "True"])
def test_devices_booleans_are_not_indices(boolean: str) -> None:
    text = f"version: v1\nvgpu-configs:\n  a:\n    - devices: [{boolean}]\n      vgpu-devices: {{}}\n"
    assert problems(text) == [
        f"f.yaml:4:17: vgpu-configs.a[0].devices[0]: expected a GPU index (an integer >= 0), "
        f"got a boolean ({boolean!r})"
    ]


def test_devices_duplicate_in_block_list() -> None:
    assert problems(
        """\
        version: v1
        vgpu-configs:
          a:
            - devices:
                - 2
                - 1
                - 2
              vgpu-devices: {}
        """
    ) == ["f.yaml:7:11: vgpu-configs.a[0].devices[2]: GPU index 2 is listed twice (first at [0])"]


# -- device-filter ---------------------------------------------------------------------------------


def test_unquoted_hex_filter_gets_the_quoting_hint() -> None:
    assert problems(
        """\
        version: v1
        vgpu-configs:
          a:
            - device-filter: 0x1EB810DE
              devices: all
              vgpu-devices: {}
          b:
            - device-filter: [0x1EB810DE, "0x1DB410DE"]
              devices: all
              vgpu-devices: {}
        """
    ) == [
        f"f.yaml:4:22: vgpu-configs.a[0].device-filter: expected a device id string, "
        f"got an integer ('0x1EB810DE') {QUOTE_HINT}",
        f"f.yaml:8:23: vgpu-configs.b[0].device-filter[0]: expected a device id string, "
        f"got an integer ('0x1EB810DE') {QUOTE_HINT}",
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            '"MODEL"',
            "invalid device id 'MODEL': expected 0xDDDDVVVV (device then vendor, e.g. 0x1EB810DE) "
            "with an optional :0xSSSSVVVV subsystem part",
        ),
        (
            '"1EB810DE"',
            "invalid device id '1EB810DE': expected 0xDDDDVVVV (device then vendor, e.g. 0x1EB810DE) "
            "with an optional :0xSSSSVVVV subsystem part",
        ),
        ('"0x1:0x2:0x3"', "invalid device id '0x1:0x2:0x3': expected 0xDDDDVVVV or 0xDDDDVVVV:0xSSSSVVVV"),
        ('"0x1EB810DE:"', "invalid device id '0x1EB810DE:': expected 0xDDDDVVVV or 0xDDDDVVVV:0xSSSSVVVV"),
        ('"0x1EB810DE0"', "invalid device id '0x1EB810DE0': '0x1EB810DE0' does not fit in 32 bits"),
        ("true", "expected a device id string, got a boolean ('true')"),
        ("{a: b}", "expected a device id string, got a mapping"),
        # The vendor half must be NVIDIA's: these parse as numbers but could never match a GPU.
        *(
            (
                f'"{text}"',
                f"invalid device id '{text}': the vendor half is {vendor}, not NVIDIA's 0x10DE; "
                "expected 0xDDDDVVVV (device then vendor, e.g. 0x1EB810DE) with an optional "
                ":0xSSSSVVVV subsystem part",
            )
            for text, vendor in (("0x1EB8", "0x1EB8"), ("0x10DE1EB8", "0x1EB8"), ("123", "0x007B"))
        ),
        ('""', "empty device id: leave device-filter out to select every GPU"),
        ("[]", "empty list: leave device-filter out to select GPUs of every model"),
        ("", "expected a device id string, got null (empty)"),
    ],
)
def test_malformed_filter_is_an_error(value: str, message: str) -> None:
    text = HEAD + f"    - device-filter: {value}\n      devices: all\n      vgpu-devices: {{}}\n"
    col = 21 if value == "" else 22
    assert problems(text) == [f"f.yaml:4:{col}: vgpu-configs.a[0].device-filter: {message}"]


def test_malformed_filter_in_a_list_is_located_at_its_item() -> None:
    text = (
        HEAD + '    - device-filter: ["0x1EB810DE", "T4", ""]\n      devices: all\n      vgpu-devices: {}\n'
    )
    assert problems(text) == [
        "f.yaml:4:37: vgpu-configs.a[0].device-filter[1]: invalid device id 'T4': expected 0xDDDDVVVV "
        "(device then vendor, e.g. 0x1EB810DE) with an optional :0xSSSSVVVV subsystem part",
        "f.yaml:4:43: vgpu-configs.a[0].device-filter[2]: empty device id: leave device-filter out to "
        "select every GPU",
    ]


# -- vgpu-devices ----------------------------------------------------------------------------------


def test_bad_type_name_has_the_exact_located_message() -> None:
    assert problems(
        """\
        # T4 layouts
        version: v1
        vgpu-configs:
          T4-small:
            - devices: all
              vgpu-devices: {"T4-1Q": 16}
            - devices: [0]
              vgpu-devices:
                "T4-2X": 8
        """
    ) == [
        f"f.yaml:9:9: vgpu-configs.T4-small[1].vgpu-devices.\"T4-2X\": invalid vGPU type 'T4-2X': {BAD_TYPE}"
        "; did you mean 'T4-2Q'?"
    ]


@pytest.mark.parametrize(
    ("name", "meant"),
    [
        ("A100-1-5Cme", "A100-1-5CME"),
        ("A16-8E", None),
        ("T4-1Q ", "T4-1Q"),
        ("t4-1q", "T4-1Q"),
        ("T4-01Q", "T4-1Q"),
        ("T4-1QX", "T4-1Q"),
        ("Foo", None),
    ],
)
def test_bad_type_names(name: str, meant: str | None) -> None:
    text = f'version: v1\nvgpu-configs:\n  a:\n    - devices: all\n      vgpu-devices: {{"{name}": 1}}\n'
    (found,) = problems(text)
    assert found.startswith(
        f'f.yaml:5:22: vgpu-configs.a[0].vgpu-devices."{name}": invalid vGPU type {name!r}: {BAD_TYPE}'
    )
    if meant:  # the catalog type it probably means (issue 18: "did you mean", also for the case)
        assert found.endswith(f"; did you mean {meant!r}?")


@pytest.mark.parametrize(
    ("count", "described"),
    [
        ("true", "a boolean ('true')"),
        ("1.5", "a float ('1.5')"),
        ("2.0", "a float ('2.0')"),
        ('"2"', "a string ('2')"),
        ("two", "a string ('two')"),
        ("[1]", "a list"),
        ("", "null (empty)"),
        ('!!int "abc"', "an integer ('abc')"),
    ],
)
def test_count_must_be_an_integer(count: str, described: str) -> None:
    text = (
        f"version: v1\nvgpu-configs:\n  a:\n    - devices: all\n      vgpu-devices:\n        T4-1Q: {count}\n"
    )
    col = 15 if count == "" else 16
    assert problems(text) == [
        f'f.yaml:6:{col}: vgpu-configs.a[0].vgpu-devices."T4-1Q": count must be an integer > 0, '
        f"got {described}"
    ]


def test_negative_count() -> None:
    text = "version: v1\nvgpu-configs:\n  a:\n    - devices: all\n      vgpu-devices:\n        T4-1Q: -2\n"
    assert problems(text) == [
        'f.yaml:6:16: vgpu-configs.a[0].vgpu-devices."T4-1Q": count must be an integer > 0, got -2'
    ]


def test_all_zero_counts_is_one_error_pointing_to_empty_mapping() -> None:
    assert problems(
        """\
        version: v1
        vgpu-configs:
          a:
            - devices: all
              vgpu-devices:
                T4-1Q: 0
                T4-2Q: 0
        """
    ) == [
        "f.yaml:6:9: vgpu-configs.a[0].vgpu-devices: every count is 0; "
        "write 'vgpu-devices: {}' to mean no vGPUs on these GPUs"
    ]


def test_single_zero_count_among_others() -> None:
    assert problems(
        """\
        version: v1
        vgpu-configs:
          a:
            - devices: all
              vgpu-devices:
                T4-1Q: 8
                T4-2Q: 0
        """
    ) == [
        'f.yaml:7:16: vgpu-configs.a[0].vgpu-devices."T4-2Q": count must be an integer > 0, '
        "got 0 (leave the type out instead)"
    ]


def test_mixing_time_sliced_and_mig_backed_in_one_entry() -> None:
    assert problems(
        """\
        version: v1
        vgpu-configs:
          a:
            - devices: all
              vgpu-devices:
                A100-4C: 2
                A100-1-5C: 1
                A100-1-5CME: 1
        """
    ) == [
        "f.yaml:6:9: vgpu-configs.a[0].vgpu-devices: mixes time-sliced (A100-4C) and "
        "MIG-backed (A100-1-5C, A100-1-5CME) vGPU types in one entry"
    ]


def test_mixing_kinds_across_entries_is_fine() -> None:
    spec = load(
        """\
        version: v1
        vgpu-configs:
          a:
            - devices: [0]
              vgpu-devices: {A100-4C: 2}
            - devices: [1]
              vgpu-devices: {A100-1-5C: 1}
        """
    )
    assert [e.is_mig_backed for e in spec.configs["a"]] == [False, True]


def test_vgpu_devices_must_be_a_mapping() -> None:
    assert problems(
        """\
        version: v1
        vgpu-configs:
          a:
            - devices: all
              vgpu-devices: [T4-1Q]
            - devices: all
              vgpu-devices:
        """
    ) == [
        "f.yaml:5:21: vgpu-configs.a[0].vgpu-devices: expected a mapping of vGPU type to count (a mapping), "
        "got a list",
        "f.yaml:7:20: vgpu-configs.a[1].vgpu-devices: expected a mapping of vGPU type to count (a mapping), "
        "got null (empty)",
    ]


# -- duplicate keys --------------------------------------------------------------------------------


def test_duplicate_keys_anywhere() -> None:
    assert problems(
        """\
        version: v1
        vgpu-configs:
          a:
            - devices: all
              vgpu-devices:
                T4-1Q: 8
                T4-1Q: 16
          a:
            - devices: all
              devices: [0]
              vgpu-devices: {}
        version: v1
        """
    ) == [
        "f.yaml:7:9: vgpu-configs.a[0].vgpu-devices: duplicate key 'T4-1Q' (first defined on line 6)",
        "f.yaml:8:3: vgpu-configs: duplicate key 'a' (first defined on line 3)",
        "f.yaml:12:1: duplicate key 'version' (first defined on line 1)",
    ]


def test_duplicate_keys_inside_a_duplicated_config_are_not_checked_twice() -> None:
    # The second "a" is dropped after its duplicate key error, so its body is not validated.
    errs = problems(
        """\
        version: v1
        vgpu-configs:
          a: [{devices: all, vgpu-devices: {}}]
          a: [{devices: all, devices: all, vgpu-devices: {}}]
        """
    )
    assert errs == ["f.yaml:4:3: vgpu-configs: duplicate key 'a' (first defined on line 3)"]


def test_non_string_keys() -> None:
    assert problems("version: v1\nvgpu-configs:\n  ? [a]\n  : []\n") == [
        "f.yaml:3:3: vgpu-configs: must define at least one config",
        "f.yaml:3:5: vgpu-configs: keys must be strings, got a list",
    ]
    assert problems("version: v1\nvgpu-configs:\n  ~: []\n") == [
        "f.yaml:3:3: vgpu-configs: keys must be strings, got null (empty)",
        "f.yaml:3:3: vgpu-configs: must define at least one config",
    ]


# -- all errors, sorted --------------------------------------------------------------------------


def test_every_error_is_collected_and_sorted_by_line() -> None:
    errs = problems(
        """\
        extra: 1
        vgpu-configs:
          b:
            - devices: some
              device-filter: 0x1EB810DE
              vgpu-devices: {"T4-1Q": 0, "nope": 1}
          a:
            - devices: [0, 0]
              color: blue
              vgpu-devices: {"A100-4C": 1, "A100-1-5C": 1}
          c: []
        version: v3
        """
    )
    locations = ["1:1", "4:16", "5:22", "6:31", "6:34", "8:20", "9:7", "10:21", "11:6", "12:10"]
    assert [e.split(": ", 1)[0] for e in errs] == [f"f.yaml:{loc}" for loc in locations]
    assert [e.split(": ", 2)[1] for e in errs[1:]] == [
        "vgpu-configs.b[0].devices",
        "vgpu-configs.b[0].device-filter",
        'vgpu-configs.b[0].vgpu-devices."T4-1Q"',
        'vgpu-configs.b[0].vgpu-devices."nope"',
        "vgpu-configs.a[0].devices[1]",
        "vgpu-configs.a[0]",
        "vgpu-configs.a[0].vgpu-devices",
        "vgpu-configs.c",
        "version",
    ]
    assert errs[0] == "f.yaml:1:1: unknown key 'extra' (expected one of: version, vgpu-configs)"
    joined = "\n".join(errs)
    for fragment in (
        "devices: expected 'all' or a list of GPU indices, got a string ('some')",
        QUOTE_HINT,
        "count must be an integer > 0, got 0",
        "invalid vGPU type 'nope'",
        "GPU index 0 is listed twice",
        "unknown key 'color'",
        "mixes time-sliced (A100-4C) and MIG-backed (A100-1-5C)",
        "vgpu-configs.c: must have at least one entry",
        "unsupported version 'v3'",
    ):
        assert fragment in joined


def test_problem_objects_carry_their_fields() -> None:
    with pytest.raises(ConfigError) as exc:
        load("version: v1\nvgpu-configs:\n  a: [{devices: none, vgpu-devices: {}}]\n", "dir/x.yaml")
    (p,) = exc.value.problems
    assert p == Problem(
        "dir/x.yaml",
        3,
        17,
        "vgpu-configs.a[0].devices",
        "expected 'all' or a list of GPU indices, got a string ('none')",
    )


# -- malformed input -----------------------------------------------------------------------------


def test_yaml_syntax_error_is_located() -> None:
    assert problems("version: v1\nvgpu-configs:\n  a: [\n    {devices: all,\n") == [
        "f.yaml:5:1: invalid YAML/JSON: while parsing a flow node did not find expected node content"
    ]
    assert problems("version: v1\nvgpu-configs:\n  a:\n    - devices: all\n   vgpu-devices: {}\n") == [
        "f.yaml:5:4: invalid YAML/JSON: while parsing a block mapping did not find expected key"
    ]


def test_tab_indentation_in_yaml_is_located() -> None:
    errs = problems("version: v1\nvgpu-configs:\n\ta: []\n")
    assert len(errs) == 1
    assert errs[0].startswith("f.yaml:3:1: invalid YAML/JSON: ")
    assert "token" in errs[0]


def test_control_character_is_located() -> None:
    assert problems(b"version: v1\n# \xc3\xa9\nvgpu-configs:\x01\n") == [
        "f.yaml:3:14: invalid YAML/JSON: unacceptable character #x0001: control characters are not allowed"
    ]


def test_invalid_utf8() -> None:
    assert problems(b"version: v1\nvgpu-configs:\n  \xff\xfe: []\n") == [
        "f.yaml:3:1: not valid UTF-8 text (invalid start byte)"
    ]


def test_lone_surrogate_in_str_input() -> None:
    assert problems("version: v1\nx: \ud800\n") == ["f.yaml:2:4: not valid text (surrogates not allowed)"]


def test_multiple_documents() -> None:
    assert problems("version: v1\n---\nversion: v1\n") == [
        "f.yaml:2:1: invalid YAML/JSON: expected a single document in the stream but found another document"
    ]


def test_undefined_alias() -> None:
    errs = problems("version: v1\nvgpu-configs: *nope\n")
    assert errs == ["f.yaml:2:15: invalid YAML/JSON: found undefined alias"]


def test_file_over_the_size_limit_is_refused(tmp_path) -> None:
    big = b"# " + b"x" * MAX_CONFIG_BYTES + b"\nversion: v1\n"
    with pytest.raises(ConfigError, match=r"f.yaml: config file is larger than 8 MiB"):
        load_spec(big, "f.yaml")
    path = tmp_path / "big.yaml"
    path.write_bytes(big)
    with pytest.raises(ConfigError, match=r"big.yaml: config file is larger than 8 MiB; refusing it"):
        read_config_source(str(path))
    with pytest.raises(ConfigError, match="larger than 8 MiB"):
        load_spec_file(path)


def test_file_at_the_size_limit_is_read(tmp_path) -> None:
    text = b"version: v1\n"
    data = text + b"#" * (MAX_CONFIG_BYTES - len(text) - 1) + b"\n"
    assert len(data) == MAX_CONFIG_BYTES
    path = tmp_path / "limit.yaml"
    path.write_bytes(data)
    read, name = read_config_source(str(path))
    assert read == data
    assert name == str(path)
    assert load_spec(read, name).configs == {}


def test_missing_file(tmp_path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(
        ConfigError, match=r"missing.yaml: cannot read config file: No such file or directory"
    ):
        read_config_source(str(path))


def test_directory_instead_of_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        read_config_source(str(tmp_path))


# -- alias bombs ---------------------------------------------------------------------------------


def _timed_problems(text: str) -> tuple[list[str], float]:
    start = time.monotonic()
    errs = problems(text)
    return errs, time.monotonic() - start


def test_alias_bomb_through_the_schema_is_refused() -> None:
    # 100 configs x 100 entries x 100 device indices: a valid-looking 3 KB file of 1,000,000 nodes.
    indices = ", ".join(str(i) for i in range(100))
    lines = [
        "version: v1",
        "vgpu-configs:",
        "  c0: &entries",
        f"    - &e {{devices: &d [{indices}], vgpu-devices: {{}}}}",
    ]
    lines += ["    - *e"] * 99
    lines += [f"  c{i}: *entries" for i in range(1, 100)]
    text = "\n".join(lines) + "\n"
    assert len(text) < 5000
    errs, elapsed = _timed_problems(text)
    assert len(errs) == 1
    assert errs[0].startswith("f.yaml:")
    assert f"document expands to more than {MAX_NODES} YAML nodes (the limit is the file's size" in errs[0]
    assert errs[0].endswith("(an alias bomb); refusing it")
    assert elapsed < 10


def test_merge_key_bomb_is_refused() -> None:
    # Each level merges the previous one nine times under distinct keys: 9**9 keys when expanded.
    lines = ["version: v1", "l0: &l0 {" + ", ".join(f"k{i}: 1" for i in range(9)) + "}"]
    for level in range(1, 9):
        refs = ", ".join(f"*l{level - 1}" for _ in range(9))
        lines.append(f"l{level}: &l{level} {{<<: [{refs}], own{level}: 1}}")
    lines.append("vgpu-configs: {<<: *l8}")
    errs, elapsed = _timed_problems("\n".join(lines) + "\n")
    assert any("alias bomb" in e for e in errs)
    assert elapsed < 10


def test_billion_laughs_outside_the_schema_is_harmless() -> None:
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    lines.append("version: v1")
    errs, elapsed = _timed_problems("\n".join(lines) + "\n")
    assert errs[0] == "f.yaml:1:1: unknown key 'a' (expected one of: version, vgpu-configs)"
    assert len(errs) == 9
    assert elapsed < 10


def test_recursive_merge_is_refused() -> None:
    errs = problems("version: v1\nvgpu-configs: &a {<<: *a}\n")
    assert len(errs) == 1
    assert "refusing it" in errs[0]


def test_deep_nesting_is_refused_without_recursion_error() -> None:
    errs = problems("[" * 5000 + "]" * 5000)
    assert len(errs) == 1
    assert errs[0].startswith("f.yaml:1:")


# -- Spec.select -----------------------------------------------------------------------------------


def _spec(*names: str) -> Spec:
    body = "".join(f"  {n}: [{{devices: all, vgpu-devices: {{}}}}]\n" for n in names)
    return load_spec(f"version: v1\nvgpu-configs:\n{body}", "f.yaml")


@pytest.mark.parametrize("name", [None, ""])
def test_select_without_name_picks_the_only_config(name: str | None) -> None:
    selected, entries = _spec("only").select(name)
    assert selected == "only"
    assert len(entries) == 1


@pytest.mark.parametrize("name", [None, ""])
def test_select_without_name_needs_exactly_one_config(name: str | None) -> None:
    with pytest.raises(ConfigError) as exc:
        _spec("one", "two", "three").select(name)
    assert str(exc.value) == (
        "f.yaml: missing required flag 'selected-config' (-c): the file defines 3 configs: one, two, three"
    )


def test_select_by_name() -> None:
    spec = _spec("one", "two")
    assert spec.select("two") == ("two", spec.configs["two"])


def test_select_unknown_name_lists_the_configs() -> None:
    with pytest.raises(ConfigError) as exc:
        _spec("one", "two").select("three")
    assert (
        str(exc.value) == "f.yaml: selected vgpu-config not present: 'three' (configs in the file: one, two)"
    )


def test_select_is_case_sensitive() -> None:
    with pytest.raises(ConfigError, match="not present: 'One'"):
        _spec("one").select("One")


def test_loaded_spec_matches_safe_load_for_valid_files(pytestconfig: pytest.Config) -> None:
    raw = (pytestconfig.rootpath / EXAMPLE).read_text()
    doc = yaml.safe_load(raw)
    spec = load_spec(raw)
    assert list(spec.configs) == list(doc["vgpu-configs"])
    for name, entries in doc["vgpu-configs"].items():
        assert [dict((t.name, n) for t, n in e.vgpu_devices) for e in spec.configs[name]] == [
            e["vgpu-devices"] for e in entries
        ]
