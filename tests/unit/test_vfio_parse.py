"""``parse_creatable``: the text of a VF's ``nvidia/creatable_vgpu_types`` → {type id: driver name}.

The format (host-interfaces.md §3.3): a header line ``ID    : vGPU Name``, then one line per type
creatable now, the decimal ID left-aligned in five columns, `` : `` and the full name. An exhausted
GPU shows the header alone. Lines are split at the FIRST colon; anything whose ID is not a decimal
number is ignored.
"""

from __future__ import annotations

import pytest

from vgpu_dm.host.vfio import parse_creatable
from vgpu_dm.vgpu_type import short_type_name

HEADER = "ID    : vGPU Name\n"


def test_empty_text_and_header_only_give_nothing():
    assert parse_creatable("") == {}
    assert parse_creatable(HEADER) == {}
    assert parse_creatable("ID    : vGPU Name") == {}  # no trailing newline
    assert parse_creatable("\n\n" + HEADER + "\n") == {}


def test_typical_listing_in_driver_layout():
    text = HEADER + "1147  : NVIDIA L40S-1Q\n1148  : NVIDIA L40S-2Q\n1160  : NVIDIA L40S-48Q\n"
    assert parse_creatable(text) == {
        1147: "NVIDIA L40S-1Q",
        1148: "NVIDIA L40S-2Q",
        1160: "NVIDIA L40S-48Q",
    }


def test_blank_and_whitespace_only_lines_are_skipped():
    text = "\n" + HEADER + "\n   \n1147  : NVIDIA L40S-1Q\n\n\t\n1148  : NVIDIA L40S-2Q\n\n"
    assert parse_creatable(text) == {1147: "NVIDIA L40S-1Q", 1148: "NVIDIA L40S-2Q"}


def test_extra_spaces_and_tabs_around_both_fields_are_trimmed():
    text = HEADER + "   1147      :     NVIDIA L40S-1Q    \n1148\t:\tNVIDIA L40S-2Q\t\n1149:NVIDIA L40S-3Q\n"
    assert parse_creatable(text) == {
        1147: "NVIDIA L40S-1Q",
        1148: "NVIDIA L40S-2Q",
        1149: "NVIDIA L40S-3Q",
    }


def test_crlf_line_endings():
    text = "ID    : vGPU Name\r\n1147  : NVIDIA L40S-1Q\r\n1148  : NVIDIA L40S-2Q\r\n"
    assert parse_creatable(text) == {1147: "NVIDIA L40S-1Q", 1148: "NVIDIA L40S-2Q"}


def test_name_containing_colons_is_split_at_the_first_colon_only():
    text = HEADER + "1201  : NVIDIA Fancy: Board:Edition X-8Q\n1202  : a:b:c\n"
    parsed = parse_creatable(text)
    assert parsed == {1201: "NVIDIA Fancy: Board:Edition X-8Q", 1202: "a:b:c"}
    assert short_type_name(parsed[1201]) == "X-8Q"


def test_multi_word_names_keep_every_word_and_the_short_name_is_the_last_word():
    text = HEADER + "3990  : NVIDIA RTX Pro 6000 Blackwell DC-8Q\n4001  : NVIDIA H200X-1-18C\n"
    parsed = parse_creatable(text)
    assert parsed == {3990: "NVIDIA RTX Pro 6000 Blackwell DC-8Q", 4001: "NVIDIA H200X-1-18C"}
    assert {short_type_name(n) for n in parsed.values()} == {"DC-8Q", "H200X-1-18C"}


@pytest.mark.parametrize(
    "line",
    [
        "ID    : vGPU Name",  # the header itself
        "id : vGPU Name",
        "0x47B : NVIDIA L40S-1Q",  # hex is not what sysfs prints (decimal only)
        "47B : NVIDIA L40S-1Q",
        "-5 : NVIDIA L40S-1Q",
        "+5 : NVIDIA L40S-1Q",
        "1 147 : NVIDIA L40S-1Q",  # a space inside the id
        "1147.0 : NVIDIA L40S-1Q",
        " : NVIDIA L40S-1Q",  # no id at all
        "1147 NVIDIA L40S-1Q",  # no colon: not a type line
        "garbage without structure",
        "\ufffd\ufffd : NVIDIA L40S-1Q",  # undecodable bytes (the host reads with errors=replace)
    ],
)
def test_lines_without_a_decimal_id_are_ignored(line):
    text = HEADER + line + "\n1150  : NVIDIA L40S-4Q\n"
    assert parse_creatable(text) == {1150: "NVIDIA L40S-4Q"}


def test_unicode_digit_like_id_is_ignored_not_a_crash():
    text = HEADER + "\u00b2 : NVIDIA L40S-1Q\n1150  : NVIDIA L40S-4Q\n"
    assert parse_creatable(text) == {1150: "NVIDIA L40S-4Q"}


def test_leading_zeros_are_decimal_not_octal():
    assert parse_creatable(HEADER + "0010  : NVIDIA L4-1Q\n") == {10: "NVIDIA L4-1Q"}


def test_header_in_the_middle_and_repeated_lines():
    text = "1147  : NVIDIA L40S-1Q\n" + HEADER + "1147  : NVIDIA L40S-1Q\n1148  : NVIDIA L40S-2Q\n"
    assert parse_creatable(text) == {1147: "NVIDIA L40S-1Q", 1148: "NVIDIA L40S-2Q"}


def test_result_keys_are_ints_and_values_are_stripped_strings():
    parsed = parse_creatable(HEADER + "  42 :   NVIDIA A10-4Q   \n")
    assert list(parsed.items()) == [(42, "NVIDIA A10-4Q")]
    assert isinstance(next(iter(parsed)), int)
