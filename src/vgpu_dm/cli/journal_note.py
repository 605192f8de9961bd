"""What ``list`` and ``assert`` say about an apply journal: an apply running now, an interrupted one,
or a journal that cannot be read — each with what will really happen next.
"""

from __future__ import annotations


def journal_state(host) -> tuple[str, str] | None:
    """(kind, description) of the journal: kind is "running", "interrupted" or "unreadable"."""
    from vgpu_dm.state_files import JOURNAL_FILE

    if not host.exists(JOURNAL_FILE):
        return None
    from vgpu_dm import journal  # only with a journal to read: keeps the no-op assert path light

    try:
        found = journal.read(host)
    except ValueError as exc:
        return "unreadable", str(exc)
    if not found:
        return None
    from vgpu_dm.host.lock import HostLock  # only with a journal: keeps the no-op assert path light

    running = HostLock(host).busy()
    if running:
        return "running", f"an apply ({running}) is changing the host right now"
    return "interrupted", f"found {found.describe()}"


def journal_note(host) -> str | None:
    """One line for the operator, or None when there is no journal."""
    state = journal_state(host)
    if state is None:
        return None
    kind, what = state
    if kind == "running":
        # That apply ends either in its new layout or rolled back; nothing for a later run to undo.
        return f"{what}; it finishes or rolls back by itself: run this command again when it is done"
    if kind == "interrupted":
        return (
            f"{what}: those GPUs may be half-changed; the next apply first puts them back to their devices "
            f"from before that run, then applies its own config"
        )
    return (
        f"{what}: an earlier apply may have been interrupted, and what it changed can no longer be undone "
        f"from the journal; the next apply converges from the devices that exist now (check them with "
        f"'nvidia-vgpu-dm list')"
    )
