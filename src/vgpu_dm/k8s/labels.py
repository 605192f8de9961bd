"""The Node labels the agent reads and writes (upstream names and values), and the label patches for
pausing and restoring the GPU Operator's sandbox operands. Pure functions over label dicts."""

from __future__ import annotations

from collections.abc import Mapping

from vgpu_dm.nodeconfig import CONFIG_LABEL, desired_config

__all__ = ["CONFIG_LABEL", "desired_config"]  # shared with the DRA driver (vgpu_dm.nodeconfig)
STATE_LABEL = "nvidia.com/vgpu.config.state"

PENDING = "pending"
SUCCESS = "success"
FAILED = "failed"
REBOOTING = "rebooting"
STATES = (PENDING, SUCCESS, FAILED, REBOOTING)

PAUSED = "paused-for-vgpu-change"
DEVICE_PLUGIN_LABEL = "nvidia.com/gpu.deploy.sandbox-device-plugin"
VALIDATOR_LABEL = "nvidia.com/gpu.deploy.sandbox-validator"
# Operand switch label → the pod label selector of that operand's DaemonSet pods (upstream's order).
OPERANDS: dict[str, str] = {
    DEVICE_PLUGIN_LABEL: "app=nvidia-sandbox-device-plugin-daemonset",
    VALIDATOR_LABEL: "app=nvidia-sandbox-validator",
}


def pause_patch(labels: Mapping[str, str]) -> dict[str, str]:
    """Operand labels to set to paused: those present and not ``false`` (and not already paused)."""
    return {key: PAUSED for key in OPERANDS if labels.get(key) not in (None, "false", PAUSED)}


def restore_patch(labels: Mapping[str, str]) -> dict[str, str]:
    """Operand labels still paused go back to ``true``; a label someone set to ``false`` meanwhile,
    or removed, is left as it is."""
    return {key: "true" for key in OPERANDS if labels.get(key) == PAUSED}


def paused(labels: Mapping[str, str]) -> list[str]:
    return [key for key in OPERANDS if labels.get(key) == PAUSED]
