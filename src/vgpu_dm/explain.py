"""Debug lines (``-d``) that say what was discovered and what was planned, not only what was written."""

from __future__ import annotations

from collections import Counter

from vgpu_dm import log

_log = log.get("plan")


def _count(names: list[str]) -> str:
    return ", ".join(f"{c} x {n}" for n, c in Counter(names).items()) or "no vGPUs"


def log_discovery(inventory) -> None:
    """One debug line per GPU: identity, driver, framework and current vGPUs."""
    if not _log.isEnabledFor(log.DEBUG):
        return
    if not inventory.gpus:
        _log.debug("discovered no NVIDIA GPUs")
    for gpu in inventory.gpus:
        has = _count([d.type_name for d in inventory.devices(gpu)])
        _log.debug(
            f"discovered {gpu.describe()}: id {gpu.device_id}, driver {gpu.driver or 'none'}, "
            f"{len(gpu.vfs)} VFs, framework {inventory.framework(gpu)}, has {has}",
            extra=log.fields(gpu=gpu.index, address=gpu.address, action="discover"),
        )


def log_plan(plan) -> None:
    """One debug line per GPU of the plan (and per GPU no entry selects)."""
    if not _log.isEnabledFor(log.DEBUG):
        return
    for gp in plan.gpus:
        parts = [
            ("keep", _count([d.type_name for d in gp.keep]) if gp.keep else ""),
            ("remove", _count([d.type_name for d in gp.remove]) if gp.remove else ""),
            ("create", _count([t.name for t in gp.create]) if gp.create else ""),
        ]
        what = "; ".join(f"{verb} {text}" for verb, text in parts if text) or "nothing"
        extra = " (enable VFs first)" if gp.enable_vfs else ""
        extra += " (switch to mixed-size mode)" if gp.enable_mixed_size else ""
        extra += " (switch back to equal-size mode)" if gp.disable_mixed_size else ""
        if gp.mig is not None:
            extra += f" (MIG first: {gp.mig.current.describe()} -> {gp.mig.target.describe()})"
        _log.debug(
            f"plan {gp.gpu.describe()} [{gp.entry.path}]: {what}{extra}",
            extra=log.fields(gpu=gp.gpu.index, address=gp.gpu.address, action="plan"),
        )
    for gpu in plan.unselected:
        _log.debug(
            f"plan {gpu.describe()}: no entry selects it; left alone",
            extra=log.fields(gpu=gpu.index, address=gpu.address, action="plan"),
        )
