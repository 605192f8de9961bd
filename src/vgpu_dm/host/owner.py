"""Who owns a GPU: a static layout (apply, the agent) or the DRA driver, never both.

The DRA driver records the GPUs it owns in ``DRA_OWNED_FILE`` below the host root before it offers their
vGPUs, and drops a GPU from it once it offers nothing there and holds no vGPU on it. apply and the agent
refuse to plan such a GPU; the DRA driver refuses a GPU that carries vGPUs it did not create.
"""

from __future__ import annotations

import json
import time
from typing import NamedTuple

from vgpu_dm.host.pci import is_pci_address
from vgpu_dm.host.root import HostRoot
from vgpu_dm.state_files import DRA_OWNED_FILE

__all__ = ["DRA_OWNED_FILE", "DraOwnership", "read_dra_owned", "write_dra_owned"]


class DraOwnership(NamedTuple):
    """The DRA driver's record: which GPUs it owns, for which driver name and node."""

    driver: str
    node: str
    gpus: dict[str, float]  # PCI address → when the driver took it (Unix time)

    def describe(self, host: HostRoot, address: str) -> str:
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.gpus.get(address, 0)))
        return (
            f"owned by the DRA driver {self.driver} (nvidia-vgpu-dra on node {self.node or '?'}, since "
            f"{since}, recorded in {host.path(DRA_OWNED_FILE)})"
        )


def read_dra_owned(host: HostRoot) -> DraOwnership | None:
    """The record, or None when the DRA driver owns no GPU here. A damaged record raises ValueError:
    guessing "nobody" would let apply rewrite GPUs whose vGPUs VMs got through DRA."""
    text = host.read_optional(DRA_OWNED_FILE)
    if text is None:
        return None
    try:
        raw = json.loads(text)
        gpus = {str(a): float(t) for a, t in dict(raw["gpus"]).items()}
        if not all(is_pci_address(a) for a in gpus):
            raise ValueError("not a PCI address")
        return DraOwnership(str(raw["driver"]), str(raw.get("node", "")), gpus)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"unreadable DRA ownership record {host.path(DRA_OWNED_FILE)} ({exc}); it names the GPUs the DRA "
            f"driver nvidia-vgpu-dra owns: fix or remove it"
        ) from None


def write_dra_owned(host: HostRoot, record: DraOwnership | None) -> None:
    """Replace the record atomically; None or no GPUs removes it."""
    if record is None or not record.gpus:
        host.remove_state(DRA_OWNED_FILE)
        return
    data = {"driver": record.driver, "node": record.node, "gpus": dict(sorted(record.gpus.items()))}
    host.save_state(DRA_OWNED_FILE, json.dumps(data, indent=1))
