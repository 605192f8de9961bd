"""Device-id strings (device-filter): parsing with the upstream auto base, formatting and matching."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vgpu_dm.device_id import DeviceID, InvalidDeviceID

T4 = DeviceID(0x1EB8, 0x10DE, 0x12A2, 0x10DE)
A16 = DeviceID(0x25B6, 0x10DE, 0x14A9, 0x10DE)
A2 = DeviceID(0x25B6, 0x10DE, 0x157E, 0x10DE)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0x1EB810DE", DeviceID(0x1EB8, 0x10DE)),
        ("0x1eb810de", DeviceID(0x1EB8, 0x10DE)),
        ("0X1EB810DE", DeviceID(0x1EB8, 0x10DE)),
        ("0x25B610DE:0x14A910DE", DeviceID(0x25B6, 0x10DE, 0x14A9, 0x10DE)),
        ("0x25b610de:0x157e10de", DeviceID(0x25B6, 0x10DE, 0x157E, 0x10DE)),
        # automatic base, as Go's strconv.ParseUint(s, 0, 32): decimal, and octal with a leading 0
        ("515379422", DeviceID(0x1EB8, 0x10DE)),
        ("0365520", DeviceID(0x0001, 0xEB50)),
        ("017", DeviceID(0, 15)),
        ("0", DeviceID(0, 0)),
        ("0x10DE", DeviceID(0, 0x10DE)),
        ("0xFFFFFFFF", DeviceID(0xFFFF, 0xFFFF)),
        ("0x1EB810DE:515379422", DeviceID(0x1EB8, 0x10DE, 0x1EB8, 0x10DE)),
        ("0x1EB8_10DE", DeviceID(0x1EB8, 0x10DE)),  # Go allows underscores with base 0 too
    ],
)
def test_parse(text: str, expected: DeviceID) -> None:
    assert DeviceID.parse(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "1EB810DE",  # hex needs 0x
        "0x1EB810DE:0x14A910DE:0x1",  # more than two parts
        "0x1:0x2:0x3:0x4",
        "",
        ":",
        "0x1EB810DE:",  # empty part
        ":0x14A910DE",
        "0x",
        "0xZZZZ10DE",
        "08",  # 8 is not an octal digit
        "0x100000000",  # more than 32 bits
        "4294967296",
        "0x1EB810DE:0x100000000",
        "-1",  # negative
        "-0x1EB810DE",
        "+1",
        "T4",
        "MODEL",
        "0x1EB810DE 0x14A910DE",
        "1.5",
        " 0x1EB810DE",  # Go's ParseUint takes no surrounding blanks
        "0x1EB810DE\n",
        "0x1EB810DE: 0x14A910DE",
        "١٢٣",  # non-ASCII digits that Python's int() would accept
        "0x１EB810DE",
    ],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(InvalidDeviceID) as exc:
        DeviceID.parse(text)
    assert repr(text) in str(exc.value)


@pytest.mark.parametrize("value", [None, 0x1EB810DE, b"0x1EB810DE"])
def test_parse_rejects_non_strings(value: object) -> None:
    with pytest.raises(InvalidDeviceID, match="must be a string"):
        DeviceID.parse(value)  # type: ignore[arg-type]


def test_invalid_device_id_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        DeviceID.parse("nope")


def test_parse_error_explains_the_format() -> None:
    with pytest.raises(InvalidDeviceID, match=r"expected 0xDDDDVVVV .*0x1EB810DE"):
        DeviceID.parse("1EB810DE")
    with pytest.raises(InvalidDeviceID, match="32 bits"):
        DeviceID.parse("0x123456789")


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("0x1eb810de", "0x1EB810DE"),
        ("0x25b610de:0x14a910de", "0x25B610DE:0x14A910DE"),
        ("515379422", "0x1EB810DE"),
        ("0x10DE", "0x000010DE"),
    ],
)
def test_format_is_canonical_uppercase(text: str, canonical: str) -> None:
    assert str(DeviceID.parse(text)) == canonical


def test_has_subsystem() -> None:
    assert not DeviceID.parse("0x1EB810DE").has_subsystem
    assert DeviceID.parse("0x25B610DE:0x14A910DE").has_subsystem


def test_filter_without_subsystem_matches_any_subsystem() -> None:
    f = DeviceID.parse("0x25B610DE")
    assert f.matches(A16)
    assert f.matches(A2)
    assert f.matches(DeviceID(0x25B6, 0x10DE, 0, 0))
    assert not f.matches(T4)


def test_filter_with_subsystem_needs_all_four_parts() -> None:
    f = DeviceID.parse("0x25B610DE:0x14A910DE")
    assert f.matches(A16)
    assert not f.matches(A2)  # same device, other sub-device
    assert not f.matches(DeviceID(0x25B6, 0x10DE, 0x14A9, 0x1234))  # other sub-vendor
    assert not f.matches(DeviceID(0x25B6, 0x1234, 0x14A9, 0x10DE))  # other vendor
    assert not f.matches(DeviceID(0x25B7, 0x10DE, 0x14A9, 0x10DE))  # other device
    assert not f.matches(DeviceID(0x25B6, 0x10DE))  # GPU without a known subsystem


def test_vendor_must_match_too() -> None:
    assert not DeviceID.parse("0x1EB81234").matches(T4)
    assert DeviceID.parse("0x1EB810DE").matches(T4)


_u16 = st.integers(0, 0xFFFF)


@settings(max_examples=200, deadline=None)
@given(_u16, _u16, st.none() | st.tuples(_u16, _u16))
def test_format_parse_round_trip(device: int, vendor: int, sub: tuple[int, int] | None) -> None:
    d = DeviceID(device, vendor, *(sub or (None, None)))
    text = str(d)
    assert DeviceID.parse(text) == d
    assert DeviceID.parse(text.lower()) == d
    assert d.matches(d if sub else DeviceID(device, vendor, 1, 2))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30))
def test_parse_raises_only_invalid_device_id(text: str) -> None:
    try:
        d = DeviceID.parse(text)
    except InvalidDeviceID:
        return
    assert 0 <= d.device <= 0xFFFF
    assert 0 <= d.vendor <= 0xFFFF
