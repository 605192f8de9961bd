"""Everything the agent is told by its flags and environment, as one immutable value."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_HOST_ROOT = "/host"
DEFAULT_DRIVER_ROOT = "/driver-root"
DEFAULT_MIG_MANAGER_STATE_FILE = "/etc/systemd/system/nvidia-mig-manager.service.d/override.conf"
DEFAULT_KUBELET_SERVICE = "kubelet.service"
DEFAULT_METRICS_ADDRESS = ":8080"


@dataclass(frozen=True)
class Settings:
    node_name: str
    namespace: str
    config_file: str
    default_config: str
    kubeconfig: str | None = None  # None: in-cluster service account
    host_root: str = DEFAULT_HOST_ROOT
    sim: str | None = None
    driver_root: str = DEFAULT_DRIVER_ROOT
    # The driver root's path on the host, when it is not the GPU Operator's /run/nvidia/driver (a
    # driver root outside the host root, e.g. /driver-root, needs it to run sriov-manage in the host).
    driver_install_dir: str | None = None
    host_mig_manager_state_file: str = DEFAULT_MIG_MANAGER_STATE_FILE
    host_kubelet_systemd_service: str = DEFAULT_KUBELET_SERVICE
    gpu_clients_file: str | None = None
    with_reboot: bool = False
    with_shutdown_host_gpu_clients: bool = False
    gpu_clients_settle: float = 30.0  # wait after stopping them, before a MIG mode change (upstream's)
    metrics_address: str | None = DEFAULT_METRICS_ADDRESS  # None or "": no metrics endpoint
    # The address was given (flag or environment), not the default: then a port that cannot be bound
    # stops the agent; the default's failure is logged and the agent runs without the endpoint.
    metrics_required: bool = False
    operand_timeout: float = 120.0
    retry_initial: float = 30.0  # backoff of apply retries after a transient failure
    retry_max: float = 600.0
    lock_timeout: float = 60.0
    jobs: int = 0  # GPUs changed at once; 0 = one per changing GPU up to apply.AUTO_JOBS, as the CLI
    hooks_file: str | None = None  # hooks run by apply (vgpu_dm.hooks), read at every reconcile
