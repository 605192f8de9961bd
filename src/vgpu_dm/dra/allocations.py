"""Which devices of this node's pool ResourceClaims have allocated: a cache of the claims kept by one
list + watch of ResourceClaims (``kubeapi.ListWatch``), so that a relabel never withdraws an allocated
device and a resync costs no API call.

ResourceClaims have no field selector for their allocation (only ``metadata.name`` and
``metadata.namespace``), so the watch covers every namespace; only claims with a device of this pool
are kept. While the watch is not synced (before the first list, after a broken stream until the
relist) the answer is "unknown", and the driver then withdraws nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class Allocations:
    """Claim UID → the devices of ``driver``'s ``pool`` that its allocation names."""

    def __init__(self, driver: str, pool: str):
        self.driver = driver
        self.pool = pool
        self.on_change: Callable[[], None] = lambda: None  # the set of allocated devices changed
        self.synced: Callable[[], bool] = lambda: False  # the watch's state (set by whoever feeds it)
        self._claims: dict[str, frozenset[str]] = {}
        self._lock = threading.Lock()

    def _ours(self, claim: dict) -> frozenset[str]:
        allocation = (claim.get("status") or {}).get("allocation") or {}
        results = (allocation.get("devices") or {}).get("results") or []
        return frozenset(
            r["device"] for r in results if r.get("driver") == self.driver and r.get("pool") == self.pool
        )

    def _all(self) -> frozenset[str]:
        return frozenset(d for devices in self._claims.values() for d in devices)

    def replace(self, claims: list[dict]) -> None:
        """A complete list."""
        fresh = {}
        for claim in claims:
            devices = self._ours(claim)
            if devices:
                fresh[(claim.get("metadata") or {}).get("uid", "")] = devices
        with self._lock:
            before = self._all()
            self._claims = fresh
            changed = before != self._all()
        if changed:
            self.on_change()

    def update(self, kind: str, claim: dict) -> None:
        """One watch event (ADDED, MODIFIED, DELETED)."""
        uid = (claim.get("metadata") or {}).get("uid", "")
        devices = frozenset() if kind == "DELETED" else self._ours(claim)
        with self._lock:
            before = self._all()
            if devices:
                self._claims[uid] = devices
            else:
                self._claims.pop(uid, None)
            changed = before != self._all()
        if changed:
            self.on_change()

    def devices(self) -> frozenset[str] | None:
        """The allocated devices of the pool, or None while they are not known."""
        if not self.synced():
            return None
        with self._lock:
            return self._all()
