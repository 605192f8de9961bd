"""vgpu-device-manager: declarative NVIDIA vGPU layouts for KVM hosts and Kubernetes nodes."""

__version__ = "0.1.0"
