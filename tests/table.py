"""Reading the tables the CLI prints (``list``, ``types``, ``plan``) by column, as an operator's eye does:
a blank cell under a GPU column means "same GPU as the row above".
"""

from __future__ import annotations

LIST_COLUMNS = (
    "GPU", "ADDRESS", "MODEL", "FRAMEWORK", "MIXED", "MIG",
    "VGPU TYPE", "UUID", "PARENT", "HOLDER", "VM", "MDEVCTL",
)  # fmt: skip


def parse_table(text: str, columns: tuple[str, ...], fill: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """Rows of a table whose header line holds ``columns`` in order; cells of ``fill`` columns left
    blank repeat the value of the row above."""
    lines = text.splitlines()
    header = lines[0]
    starts = []
    position = 0
    for name in columns:
        position = header.index(name, position)
        starts.append(position)
        position += len(name)
    assert header.split() == " ".join(columns).split(), header
    rows: list[dict[str, str]] = []
    for line in lines[1:]:
        cells = {}
        for i, name in enumerate(columns):
            end = starts[i + 1] if i + 1 < len(starts) else None
            cells[name] = line[starts[i] : end].strip()
        for name in fill:
            if not cells[name] and rows:
                cells[name] = rows[-1][name]
        rows.append(cells)
    return rows
