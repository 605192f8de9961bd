"""nvidia-k8s-vgpu-dm: the Kubernetes node agent that makes a node's vGPUs follow its
``nvidia.com/vgpu.config`` label. Imports lightkube and prometheus-client; the CLI never imports this."""
