"""JSON string quoting without importing json (log lines and config paths quote names on the start-up
path, where json's import would cost more than everything else they do)."""

from __future__ import annotations

# What json.dumps(ensure_ascii=False) escapes in a string: the quote, the backslash, C0 controls.
_JSON_ESCAPES = {
    **{c: f"\\u{c:04x}" for c in range(0x20)},
    **{ord(k): v for k, v in {"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}.items()},
    ord('"'): '\\"',
    ord("\\"): "\\\\",
}


def json_quote(value: str) -> str:
    """``value`` as a JSON string literal, exactly as ``json.dumps(value, ensure_ascii=False)`` writes it."""
    return f'"{value.translate(_JSON_ESCAPES)}"'
