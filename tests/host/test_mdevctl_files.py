"""mdevctl's definitions under a temp host root: read as mdevctl reads them, written as it writes them.

The expected bytes are mdevctl's own test data (mdevctl/mdevctl testdata/define/uuid-auto.expected and
jsonfile.expected): serde_json's pretty printer, 2-space indent, keys mdev_type, start, attrs, no
trailing newline (reference/kvm-host.md §E).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vgpu_dm.host.mdevctl import (
    Definition,
    MdevctlIndex,
    definition_text,
    parse_definition,
    remove_definition,
    write_definition,
)
from vgpu_dm.host.root import HostRoot

U1 = "c2177883-f1bb-47f0-914d-32a22e3a8804"
U2 = "4b20d080-1b54-4048-85b3-a6a62d165c01"
VF = "0000:41:00.4"


def test_body_is_byte_for_byte_what_mdevctl_define_writes():
    assert definition_text("i915-GVTg_V5_4", "auto") == (
        '{\n  "mdev_type": "i915-GVTg_V5_4",\n  "start": "auto",\n  "attrs": []\n}'
    )
    with_attrs = definition_text(
        "vfio_ap-passthrough", "manual", (("assign_adapter", "5"), ("assign_domain", "0xab"))
    )
    assert with_attrs == (
        "{\n"
        '  "mdev_type": "vfio_ap-passthrough",\n'
        '  "start": "manual",\n'
        '  "attrs": [\n'
        "    {\n"
        '      "assign_adapter": "5"\n'
        "    },\n"
        "    {\n"
        '      "assign_domain": "0xab"\n'
        "    }\n"
        "  ]\n"
        "}"
    )
    assert parse_definition(with_attrs) == (
        "vfio_ap-passthrough",
        "manual",
        (("assign_adapter", "5"), ("assign_domain", "0xab")),
    )


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("{", "not valid JSON"),
        ("[]", "not a JSON object"),
        ('{"start": "auto"}', "'mdev_type'"),
        ('{"mdev_type": "nvidia-558"}', "'start'"),
        ('{"mdev_type": 558, "start": "auto"}', "not a string"),
        ('{"mdev_type": "nvidia-558", "start": "auto", "attrs": [{"a": 1}]}', "not a string"),
        ('{"mdev_type": "nvidia-558", "start": "auto", "attrs": {"a": "1"}}', "not a list"),
    ],
)
def test_files_mdevctl_refuses(text, why):
    with pytest.raises(ValueError, match=why):
        parse_definition(text)


def test_anything_but_auto_starts_manually_as_in_mdevctl():
    assert parse_definition('{"mdev_type": "nvidia-558", "start": "Auto"}')[1] == "manual"
    assert parse_definition('{"mdev_type": "nvidia-558", "start": true}')[1] == "manual"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    base = tmp_path / "host"
    (base / "sys/bus/pci/devices").mkdir(parents=True)
    return base


def put(root: Path, parent: str, name: str, text: str) -> None:
    path = root / "etc/mdevctl.d" / parent / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_index_reads_every_parent_and_skips_what_mdevctl_skips(root):
    put(root, VF, U1, definition_text("nvidia-558", "auto"))
    put(root, "0000:3b:00.0", U2, definition_text("nvidia-222", "manual"))
    put(root, "0000:3b:00.0", U1, definition_text("nvidia-222", "auto"))  # one UUID under two parents
    put(root, VF, "README", "not a definition")
    put(root, VF, f"{U2}.tmp.123", "half-written")
    (root / "etc/mdevctl.d/scripts.d/callouts").mkdir(parents=True)
    index = MdevctlIndex(HostRoot(root))
    assert index.installed
    assert index.warnings == []
    assert sorted((d.parent, d.uuid, d.mdev_type, d.start) for d in index.definitions) == [
        ("0000:3b:00.0", U2, "nvidia-222", "manual"),
        ("0000:3b:00.0", U1, "nvidia-222", "auto"),
        (VF, U1, "nvidia-558", "auto"),
    ]
    assert {d.parent for d in index.for_uuid(U1.upper())} == {VF, "0000:3b:00.0"}
    assert [d.uuid for d in index.on_parents([VF])] == [U1]


def test_a_bad_file_is_a_warning_naming_it_and_the_rest_is_read(root):
    put(root, VF, U1, '{"mdev_type": "nvidia-558"}')
    put(root, VF, U2, definition_text("nvidia-558", "auto"))
    index = MdevctlIndex(HostRoot(root))
    assert [d.uuid for d in index.definitions] == [U2]
    (warning,) = index.warnings
    assert str(root / "etc/mdevctl.d" / VF / U1) in warning
    assert "no 'start'" in warning and "mdevctl list --defined" in warning


def test_not_installed_means_no_definitions_and_no_warnings(root):
    index = MdevctlIndex(HostRoot(root))
    assert not index.installed
    assert index.definitions == [] and index.warnings == []


def test_write_is_atomic_and_reads_back_and_remove_keeps_the_parent_directory(root):
    host = HostRoot(root)
    definition = Definition(VF, U1, "nvidia-558", "auto")
    write_definition(host, definition)
    path = root / "etc/mdevctl.d" / VF / U1
    assert path.read_text() == definition_text("nvidia-558", "auto")
    assert os.listdir(path.parent) == [U1]  # no temp file left behind
    assert MdevctlIndex(host).definitions == [definition]
    write_definition(host, definition._replace(start="manual", attrs=(("nvidia/vgpu_params", "frl=0"),)))
    assert MdevctlIndex(host).definitions[0].attrs == (("nvidia/vgpu_params", "frl=0"),)
    remove_definition(host, definition)
    assert not path.exists() and path.parent.is_dir()
    remove_definition(host, definition)  # already gone: nothing to do
