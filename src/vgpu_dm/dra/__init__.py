"""``nvidia-vgpu-dra``: a Kubernetes DRA kubelet plugin that offers the vGPUs the node's selected config
allows as ResourceSlices and creates each vGPU only when a ResourceClaim is prepared on the node.

It reuses spec → plan → apply → host (one vGPU at a time, under apply's lock, journal, in-use checks and
rollback); the CLI and the agent never import it, nor it them (docs/dra.md).
"""
