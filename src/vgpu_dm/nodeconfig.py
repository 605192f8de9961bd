"""What both Kubernetes front ends (the agent and the DRA driver) share: the node label that selects a
config, the rule that picks the config from it, and loading a kubeconfig (lightkube, imported lazily).
Neither front end imports the other; both import this.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightkube.config.kubeconfig import SingleConfig

CONFIG_LABEL = "nvidia.com/vgpu.config"


def desired_config(labels: Mapping[str, str] | None, default: str) -> str:
    """Level-triggered input: the label's value, or the default when the label is absent or empty."""
    value = (labels or {}).get(CONFIG_LABEL, "")
    return value or default


def load_kubeconfig(kubeconfig: str | None) -> SingleConfig:
    """The kubeconfig file's current context, or the in-cluster service account when no file is given."""
    from lightkube import KubeConfig

    if kubeconfig:
        return KubeConfig.from_file(kubeconfig).get()
    return KubeConfig.from_service_account().get()
