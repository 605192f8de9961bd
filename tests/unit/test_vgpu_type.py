"""vGPU type names: the grammar, the parsed parts, MIG profiles, attribute stripping and short names."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vgpu_dm.vgpu_type import ATTRIBUTES, SERIES, InvalidVGPUType, VGPUType, short_type_name


@pytest.mark.parametrize(
    ("name", "gpu", "gb", "series"),
    [
        ("T4-1Q", "T4", 1, "Q"),
        ("T4-16C", "T4", 16, "C"),
        ("A100-40C", "A100", 40, "C"),
        ("A100D-80C", "A100D", 80, "C"),
        ("M60-0Q", "M60", 0, "Q"),
        ("L40S-48Q", "L40S", 48, "Q"),
        ("A16-2B", "A16", 2, "B"),
        ("A40-4A", "A40", 4, "A"),
        ("H200X-141C", "H200X", 141, "C"),
        ("DC-96Q", "DC", 96, "Q"),
        ("RTX6000-Ada-2Q", "RTX6000-Ada", 2, "Q"),
        ("RTX5000-Ada-32C", "RTX5000-Ada", 32, "C"),
        ("X1-Some-Long-Name-4Q", "X1-Some-Long-Name", 4, "Q"),
    ],
)
def test_time_sliced_names_parse_into_parts(name: str, gpu: str, gb: int, series: str) -> None:
    t = VGPUType.parse(name)
    assert (t.gpu, t.gpu_instance_slices, t.framebuffer_gb, t.series, t.attribute) == (gpu, 0, gb, series, "")
    assert not t.is_mig_backed
    assert t.name == name
    assert str(t) == name


@pytest.mark.parametrize(
    ("name", "gpu", "g", "gb", "series", "attr"),
    [
        ("A100-1-5C", "A100", 1, 5, "C", ""),
        ("A100-1-5CME", "A100", 1, 5, "C", "ME"),
        ("A100-1-5CNOME", "A100", 1, 5, "C", "NOME"),
        ("A100-1-5CMEALL", "A100", 1, 5, "C", "MEALL"),
        ("H100-3-40C", "H100", 3, 40, "C", ""),
        ("A30-2-12CME", "A30", 2, 12, "C", "ME"),
        ("DC-1-24QGFX", "DC", 1, 24, "Q", "GFX"),
        ("DC-4-96Q", "DC", 4, 96, "Q", ""),
        ("B200X-7-180C", "B200X", 7, 180, "C", ""),
        ("A100-9-0C", "A100", 9, 0, "C", ""),
    ],
)
def test_mig_backed_names_parse_into_parts(
    name: str, gpu: str, g: int, gb: int, series: str, attr: str
) -> None:
    t = VGPUType.parse(name)
    assert (t.gpu, t.gpu_instance_slices, t.framebuffer_gb, t.series, t.attribute) == (
        gpu,
        g,
        gb,
        series,
        attr,
    )
    assert t.is_mig_backed
    assert t.name == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "T4",
        "T4-",
        "T4-Q",
        "-1Q",
        "T4--1Q",
        "A100-1-5Cme",  # attributes are uppercase only
        "A100-1-5Cgfx",
        "A16-8E",  # unknown series
        "T4-1D",
        "T4-1q",  # lowercase series
        "t4-1Q",  # lowercase GPU
        "T4-01Q",  # leading zero
        "A100-1-05C",
        "A100-0-5C",  # 0 slices is not MIG-backed and not time-sliced
        "A100-10-5C",  # one digit only
        "T4-1QX",  # trailing junk
        "T4-1Q ",
        " T4-1Q",
        "T4-1Q\n",
        "T4 -1Q",
        "T4-1 Q",
        "T4-1Q-",
        "T4-1QME",  # attributes only on MIG-backed types
        "A100-1-5CNOMEME",  # one attribute at most
        "A100-1-5CMEME",
        "RTX6000-Ada-1-5C",  # MIG-backed GPU names have no dash segments
        "T4-Ada1-1Q",  # dash segments are letters only
        "T4_1Q",
        "NVIDIA T4-1Q",
        "T4-1Q\x00",
        "Ｔ4-1Q",  # fullwidth letter
        "T4-١Q",  # Arabic-Indic digit
    ],
)
def test_invalid_names_are_rejected(name: str) -> None:
    with pytest.raises(InvalidVGPUType) as exc:
        VGPUType.parse(name)
    assert repr(name) in str(exc.value)
    assert "series one of A, B, C, Q" in str(exc.value)


@pytest.mark.parametrize("value", [None, 5, b"T4-1Q", ["T4-1Q"]])
def test_non_strings_are_rejected(value: object) -> None:
    with pytest.raises(InvalidVGPUType, match="must be a string"):
        VGPUType.parse(value)  # type: ignore[arg-type]


def test_invalid_type_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        VGPUType.parse("nope")


@pytest.mark.parametrize(
    ("name", "profile"),
    [
        ("A100-1-5C", "1g.5gb"),
        ("A100-1-5CME", "1g.5gb+me"),
        ("A100-1-5CNOME", "1g.5gb-me"),
        ("A100-1-5CMEALL", "1g.5gb+me.all"),
        ("DC-1-24QGFX", "1g.24gb+gfx"),
        ("H100-3-40C", "3g.40gb"),
        ("A30-2-12CME", "2g.12gb+me"),
        ("B200X-7-180C", "7g.180gb"),
    ],
)
def test_mig_profile(name: str, profile: str) -> None:
    assert VGPUType.parse(name).mig_profile == profile


@pytest.mark.parametrize("name", ["T4-1Q", "RTX6000-Ada-2Q", "A100-40C"])
def test_time_sliced_type_has_no_mig_profile(name: str) -> None:
    with pytest.raises(ValueError, match="time-sliced"):
        _ = VGPUType.parse(name).mig_profile


@pytest.mark.parametrize(
    ("name", "stripped"),
    [
        ("A100-1-5CME", "A100-1-5C"),
        ("A100-1-5CNOME", "A100-1-5C"),
        ("A100-1-5CMEALL", "A100-1-5C"),
        ("DC-1-24QGFX", "DC-1-24Q"),
    ],
)
def test_without_attribute_strips_the_attribute(name: str, stripped: str) -> None:
    t = VGPUType.parse(name).without_attribute()
    assert t is not None
    assert t.name == stripped
    assert t == VGPUType.parse(stripped)
    assert t.without_attribute() is None


@pytest.mark.parametrize("name", ["A100-1-5C", "T4-1Q", "RTX6000-Ada-2Q"])
def test_without_attribute_is_none_without_one(name: str) -> None:
    assert VGPUType.parse(name).without_attribute() is None


def test_types_are_hashable_values() -> None:
    a, b = VGPUType.parse("T4-1Q"), VGPUType.parse("T4-1Q")
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b, VGPUType.parse("T4-2Q")}) == 2
    assert VGPUType.parse("A100-1-5C") != VGPUType.parse("A100-1-5CME")


@pytest.mark.parametrize(
    ("driver_name", "short"),
    [
        ("NVIDIA A100-4C", "A100-4C"),
        ("GRID T4-1Q", "T4-1Q"),
        ("NVIDIA RTX Pro 6000 Blackwell DC-1-24Q", "DC-1-24Q"),
        ("NVIDIA RTX Pro 6000 Blackwell DC-8Q", "DC-8Q"),
        ("A100-4C", "A100-4C"),
        ("  NVIDIA   L40S-48Q\n", "L40S-48Q"),
        ("NVIDIA\tH200X-1-18C", "H200X-1-18C"),
        ("", ""),
        ("   ", ""),
    ],
)
def test_short_type_name_is_the_last_word(driver_name: str, short: str) -> None:
    assert short_type_name(driver_name) == short


def test_constants_match_the_grammar() -> None:
    assert set(SERIES) == {"A", "B", "C", "Q"}
    assert set(ATTRIBUTES) == {"ME", "NOME", "MEALL", "GFX"}


# -- property: names built from valid parts parse back to themselves -------------------------------

_UPPER_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_gpu = st.text(_UPPER_DIGITS, min_size=1, max_size=10)
_word = st.text(_LETTERS, min_size=1, max_size=6)
_gb = st.integers(min_value=0, max_value=100_000)
_series = st.sampled_from(SERIES)


@st.composite
def time_sliced_names(draw: st.DrawFn) -> tuple[str, str, int, str]:
    gpu = draw(_gpu) + "".join(f"-{w}" for w in draw(st.lists(_word, max_size=3)))
    gb, series = draw(_gb), draw(_series)
    return f"{gpu}-{gb}{series}", gpu, gb, series


@st.composite
def mig_backed_names(draw: st.DrawFn) -> tuple[str, str, int, int, str, str]:
    gpu, g, gb, series = draw(_gpu), draw(st.integers(1, 9)), draw(_gb), draw(_series)
    attr = draw(st.sampled_from(("", *ATTRIBUTES)))
    return f"{gpu}-{g}-{gb}{series}{attr}", gpu, g, gb, series, attr


@settings(max_examples=300, deadline=None)
@given(time_sliced_names())
def test_time_sliced_round_trip(case: tuple[str, str, int, str]) -> None:
    name, gpu, gb, series = case
    t = VGPUType.parse(name)
    assert t.name == name
    assert (t.gpu, t.gpu_instance_slices, t.framebuffer_gb, t.series, t.attribute) == (gpu, 0, gb, series, "")


@settings(max_examples=300, deadline=None)
@given(mig_backed_names())
def test_mig_backed_round_trip(case: tuple[str, str, int, int, str, str]) -> None:
    name, gpu, g, gb, series, attr = case
    t = VGPUType.parse(name)
    assert t.name == name
    assert (t.gpu, t.gpu_instance_slices, t.framebuffer_gb, t.series, t.attribute) == (
        gpu,
        g,
        gb,
        series,
        attr,
    )
    assert t.mig_profile.startswith(f"{g}g.{gb}gb")
    stripped = t.without_attribute()
    assert (stripped is None) == (attr == "")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=24))
def test_parse_never_raises_anything_else(text: str) -> None:
    try:
        t = VGPUType.parse(text)
    except InvalidVGPUType:
        return
    assert t.name == text
