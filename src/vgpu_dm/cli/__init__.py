"""The ``nvidia-vgpu-dm`` command line (click)."""
