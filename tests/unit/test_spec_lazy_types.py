"""Plain scalars are typed lazily while parsing (for linear parse time): the result must be exactly
what PyYAML's own type guessing gives, for keys, counts, indices, filters and versions alike.

The reference is the same walk over a tree composed by the stock ``CSafeLoader`` (every scalar typed
while composing); only the loader differs.
"""

from __future__ import annotations

import contextlib
import gc

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vgpu_dm.errors import ConfigError
from vgpu_dm.spec import load_spec
from vgpu_dm.spec import loader as spec_loader

SOME = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Plain-scalar spellings that YAML 1.1 types in different ways (ints in all bases, floats, bools, nulls,
# merge keys, timestamps, strings that look close to those).
TRICKY = [
    "0", "7", "010", "08", "0x10", "0o7", "0b11", "1_000", "+5", "-3", "1:30", "1.5", "1e3", ".inf",
    ".nan", "yes", "No", "on", "OFF", "true", "True", "~", "null", "Null", "NULL", "<<", "=",
    "2024-01-01", "all", "All", "v1", "T4-1Q", "A100-1-5CME", "0x1EB810DE", "１２", "١", "3 ", "٣",
]  # fmt: skip
plain = st.one_of(
    st.sampled_from(TRICKY), st.text(alphabet="0123456789xob_+-.:eE~<TtruenNlyYsfaF", max_size=6)
)


def outcome(text: str) -> object:
    try:
        return load_spec(text, "f.yaml")
    except ConfigError as exc:
        return [str(p) for p in exc.problems] or str(exc)


def reference(monkeypatch: pytest.MonkeyPatch, text: str) -> object:
    with monkeypatch.context() as patch:
        patch.setattr(spec_loader, "_Loader", yaml.CSafeLoader)
        return outcome(text)


def document(version: str, key: str, count: str, index: str, filt: str) -> str:
    return (
        f"version: {version}\n"
        "vgpu-configs:\n"
        f"  {key}:\n"
        f"    - devices: [{index}]\n"
        f"      device-filter: {filt}\n"
        f"      vgpu-devices: {{T4-1Q: {count}, {key}: 1}}\n"
    )


@SOME
@given(version=plain, key=plain, count=plain, index=plain, filt=plain)
def test_lazy_typing_matches_pyyaml_typing(monkeypatch, version, key, count, index, filt) -> None:
    values = (version, key, count, index, filt)
    if any(v != v.strip() or v.startswith(("-", ":")) or (":" in v and " " in v) for v in values):
        return  # not a single plain scalar in this position
    text = document(*values)
    try:
        yaml.compose(text, Loader=yaml.CSafeLoader)
    except yaml.YAMLError:
        return  # the mutation broke the YAML itself; malformed input has its own tests
    assert outcome(text) == reference(monkeypatch, text)


@pytest.mark.parametrize("value", TRICKY)
def test_each_tricky_spelling_as_count_index_key_and_version(monkeypatch, value) -> None:
    for text in (
        document("v1", "cfg", value, "0", '"0x1EB810DE"'),
        document("v1", "cfg", "1", value, '"0x1EB810DE"'),
        document("v1", value, "1", "0", '"0x1EB810DE"'),
        document(value, "cfg", "1", "0", '"0x1EB810DE"'),
        document("v1", "cfg", "1", "0", value),
        f"{value}: v1\n",
    ):
        try:
            yaml.compose(text, Loader=yaml.CSafeLoader)
        except yaml.YAMLError:
            continue
        assert outcome(text) == reference(monkeypatch, text), text


def test_octal_and_hex_counts_keep_their_yaml_11_values() -> None:
    spec = load_spec(document("v1", "cfg", "010", "0x1", '"0x1EB810DE"').replace(", cfg: 1", ""), "f.yaml")
    entry = spec.configs["cfg"][0]
    assert entry.devices == (1,)
    assert [(t.name, n) for t, n in entry.vgpu_devices] == [("T4-1Q", 8)]


def test_quoted_merge_key_is_an_ordinary_key() -> None:
    text = 'version: v1\nvgpu-configs:\n  c:\n    - devices: all\n      vgpu-devices: {}\n      "<<": {}\n'
    with pytest.raises(ConfigError, match="unknown key '<<'"):
        load_spec(text, "f.yaml")


@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize("text", ["version: v1\n", "version: [\n", "version: v2\n"])
def test_garbage_collector_state_is_restored(enabled: bool, text: str) -> None:
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        with contextlib.suppress(ConfigError):
            load_spec(text, "f.yaml")
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()
