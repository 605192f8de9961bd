"""MIG-backed vGPU types: the nvidia-mig-parted config they need, and running nvidia-mig-parted."""
