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


def did_you_mean(word: str, choices, quote: bool = True) -> str:
    """``"; did you mean 'X'?"`` for the choice closest to a mistyped ``word``, or ``""``.

    The same spelling in another case wins (``T4-1q`` → ``T4-1Q``); otherwise the closest by
    difflib's ratio, if any is close enough to be a typo rather than a different word.
    """
    options = [c for c in dict.fromkeys(choices) if c != word]
    if not word or not options:
        return ""
    folded = [c for c in options if c.casefold() == word.casefold()]
    if folded:
        best = folded[0]
    else:
        import difflib  # only on this error path

        by_fold = {}
        for c in options:
            by_fold.setdefault(c.casefold(), c)
        close = difflib.get_close_matches(word.casefold(), list(by_fold), n=1, cutoff=0.75)
        if not close:
            return ""
        best = by_fold[close[0]]
    return f"; did you mean {best!r}?" if quote else f"; did you mean {best}?"
