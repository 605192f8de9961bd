"""Property tests: whatever bytes or YAML reach load_spec, it returns a Spec or raises ConfigError only."""

from __future__ import annotations

import json
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vgpu_dm.errors import ConfigError
from vgpu_dm.spec import Spec, load_spec

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOME = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check(data: bytes | str) -> Spec | None:
    """load_spec must return a Spec or raise a ConfigError with sorted, located problems."""
    try:
        return load_spec(data, "fuzz.yaml")
    except ConfigError as exc:
        text = str(exc)
        assert text
        if exc.problems:
            where = [(p.line, p.column) for p in exc.problems]
            assert where == sorted(where)
            assert all(p.file == "fuzz.yaml" and p.line >= 1 and p.column >= 1 for p in exc.problems)
            assert text.splitlines()[0].startswith("fuzz.yaml:")
        return None


# -- raw input -----------------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=600))
def test_arbitrary_bytes(data: bytes) -> None:
    check(data)


@SOME
@given(st.text(max_size=300))
def test_arbitrary_text(text: str) -> None:
    check(text)
    check(text.encode("utf-8"))


_TOKENS = [
    "version", "v1", "v2", "vgpu-configs", "devices", "device-filter", "vgpu-devices", "all",
    "T4-1Q", "A100-1-5CME", "A16-8E", "0x1EB810DE", "0x25B610DE:0x14A910DE", "MODEL",
    ":", ": ", " ", "  ", "\n", "\n  ", "\n    ", "- ", "-", "[", "]", "{", "}", ", ", '"', "'",
    "&a ", "*a", "&b ", "*b", "<<: ", "!!int ", "!!str ", "!!float ", "!!binary ", "!!map ", "!!seq ",
    "!custom ", "~", "null", "true", "no", "0", "1", "-1", "16", "0o7", "1.5", ".inf", "1:30",
    "#", "\t", "---", "...", "? ", "|", ">", "%YAML 1.1\n", "%TAG ! tag:x,2000:\n", "\x00", "\x85",
    "é", "日本", "\ufeff", "\\", "@", "`",
]  # fmt: skip


@FUZZ
@given(st.lists(st.sampled_from(_TOKENS), max_size=60))
def test_yaml_ish_token_soup(tokens: list[str]) -> None:
    text = "".join(tokens)
    check(text)
    check(text.encode("utf-8"))


_PREFIX = "version: v1\nvgpu-configs:\n  a:\n    - "


@FUZZ
@given(st.lists(st.sampled_from(_TOKENS), max_size=40))
def test_yaml_ish_after_a_valid_prefix(tokens: list[str]) -> None:
    check(_PREFIX + "".join(tokens))


_TEMPLATE = (
    "version: {0}\nvgpu-configs:\n  {1}:\n    - devices: {2}\n      device-filter: {3}\n"
    "      vgpu-devices: {{{4}: {5}}}\n"
)
_TAGS = ["", "", "!!int ", "!!str ", "!!float ", "!!bool ", "!!null ", "!!timestamp ", "!custom ", "&a "]
_VALUES = [
    "",
    "all",
    "v1",
    "x",
    "T4-1Q",
    "A100-1-5CME",
    "0x1EB810DE",
    "0",
    "1",
    "-1",
    "1.5",
    "-",
    "0x",
    "_",
    '""',
]
_slot = st.tuples(st.sampled_from(_TAGS), st.sampled_from(_VALUES)).map("".join)


@FUZZ
@given(st.lists(_slot, min_size=6, max_size=6))
def test_yaml_ish_in_every_slot_of_a_valid_file(slots: list[str]) -> None:
    # Explicit tags where values are expected: `!!int x` once crashed the loader with a ValueError.
    check(_TEMPLATE.format(*slots))


# -- structured documents ------------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["all", "v1", "T4-1Q", "A100-1-5C", "0x1EB810DE", "", "0x25B610DE:0x14A910DE"])
)
_keys = st.sampled_from(
    ["version", "vgpu-configs", "devices", "device-filter", "vgpu-devices", "T4-1Q", "x"]
) | st.text(max_size=8)
_anything = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_keys, children, max_size=4),
    max_leaves=20,
)

_type_names = st.sampled_from(
    ["T4-1Q", "T4-2Q", "A100-4C", "A100-1-5C", "A100-1-5CME", "DC-1-24QGFX", "bad", "A16-8E"]
)
_counts = st.one_of(st.integers(-2, 20), st.sampled_from([True, 1.5, "2", None]))
_devices = st.one_of(
    st.just("all"),
    st.sampled_from(["some", "", None, 0]),
    st.lists(st.one_of(st.integers(-1, 8), st.booleans(), st.text(max_size=2)), max_size=4),
)
_filters = st.one_of(
    st.sampled_from(["0x1EB810DE", "0x25B610DE:0x14A910DE", "", "MODEL", "1EB810DE", "0x1:0x2:0x3"]),
    st.integers(0, 2**32),
    st.lists(st.sampled_from(["0x1EB810DE", "bad", ""]), max_size=3),
)


@st.composite
def _entries(draw: st.DrawFn) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    if draw(st.booleans()) or draw(st.booleans()):
        entry["devices"] = draw(_devices)
    if draw(st.booleans()):
        entry["device-filter"] = draw(_filters)
    if draw(st.booleans()) or draw(st.booleans()):
        entry["vgpu-devices"] = draw(st.dictionaries(_type_names, _counts, max_size=3))
    if not draw(st.integers(0, 9)):
        entry[draw(_keys)] = draw(_scalars)
    return entry


@st.composite
def _documents(draw: st.DrawFn) -> Any:
    if not draw(st.integers(0, 9)):
        return draw(_anything)
    doc: dict[str, Any] = {}
    if draw(st.integers(0, 5)):
        doc["version"] = draw(st.sampled_from(["v1", "v1", "v1", "v2", 1, None]))
    if draw(st.integers(0, 5)):
        doc["vgpu-configs"] = draw(
            st.dictionaries(
                st.text(min_size=1, max_size=6),
                st.lists(_entries(), max_size=3) | _anything,
                max_size=3,
            )
        )
    if not draw(st.integers(0, 9)):
        doc[draw(_keys)] = draw(_anything)
    return doc


@FUZZ
@given(_documents(), st.sampled_from(["block", "flow", "json"]))
def test_structured_documents(doc: Any, style: str) -> None:
    if style == "json":
        text = json.dumps(doc, indent="\t" if isinstance(doc, dict) else None)
    else:
        text = yaml.safe_dump(doc, default_flow_style=style == "flow", allow_unicode=True)
    spec = check(text.encode("utf-8"))
    if spec is not None:
        # Whatever is accepted is a well-formed v1 document (or an empty one).
        assert isinstance(doc, dict) or doc is None
        if spec.configs:
            assert doc["version"] == "v1"
            assert set(spec.configs) == set(doc["vgpu-configs"])


@SOME
@given(_anything)
def test_any_json_value(doc: Any) -> None:
    check(json.dumps(doc))


# -- valid documents are accepted and read back faithfully ---------------------------------------

_ts_types = st.sampled_from(["T4-1Q", "T4-2Q", "T4-16C", "L40S-48Q", "RTX6000-Ada-4Q", "M60-0Q", "A16-2B"])
_mig_types = st.sampled_from(["A100-1-5C", "A100-1-5CME", "H100-3-40C", "DC-1-24QGFX", "A30-2-12CNOME"])


@st.composite
def _valid_entries(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from([_ts_types, _mig_types]))
    entry: dict[str, Any] = {
        "devices": draw(st.just("all") | st.lists(st.integers(0, 15), min_size=1, max_size=4, unique=True)),
        "vgpu-devices": draw(st.dictionaries(kind, st.integers(1, 64), max_size=3)),
    }
    if draw(st.booleans()):
        entry["device-filter"] = draw(
            st.sampled_from(["0x1EB810DE", "0x25B610DE:0x14A910DE"])
            | st.lists(st.sampled_from(["0x1EB810DE", "0x20B510DE"]), min_size=1, max_size=2)
        )
    return entry


_valid_docs = st.fixed_dictionaries(
    {
        "version": st.just("v1"),
        "vgpu-configs": st.dictionaries(
            st.text(st.characters(codec="ascii", exclude_categories=["Cc"]), min_size=1, max_size=10),
            st.lists(_valid_entries(), min_size=1, max_size=3),
            min_size=1,
            max_size=4,
        ),
    }
)


@SOME
@given(_valid_docs, st.sampled_from(["block", "flow", "json"]))
def test_valid_documents_load_faithfully(doc: dict[str, Any], style: str) -> None:
    if style == "json":
        text = json.dumps(doc)
    else:
        text = yaml.safe_dump(doc, default_flow_style=style == "flow", sort_keys=False)
    spec = load_spec(text.encode(), "ok.yaml")
    assert list(spec.configs) == list(doc["vgpu-configs"])
    for name, entries in doc["vgpu-configs"].items():
        loaded = spec.configs[name]
        assert len(loaded) == len(entries)
        for got, want in zip(loaded, entries, strict=True):
            assert got.devices == (None if want["devices"] == "all" else tuple(want["devices"]))
            assert {t.name: n for t, n in got.vgpu_devices} == want["vgpu-devices"]
            filters = want.get("device-filter", [])
            filters = [filters] if isinstance(filters, str) else filters
            assert [str(f) for f in got.device_filter] == [f.upper().replace("X", "x") for f in filters if f]
