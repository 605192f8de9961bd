"""The files this tool keeps below the host root, in one place for operators (and so that checking
for one does not import the module that reads it). Everything else it writes is a driver control file.
"""

LOCK_FILE = "run/nvidia-vgpu-dm.lock"  # flock'ed by apply; holds the pid of the apply running now
JOURNAL_FILE = "run/nvidia-vgpu-dm/journal.json"  # what an apply will change, kept until it ends
# A copy of the config file for hooks, which run inside the host root, when only our container has the
# file (the Kubernetes agent's ConfigMap); VGPU_DM_CONFIG_FILE names it.
HOOKS_CONFIG_FILE = "run/nvidia-vgpu-dm/hooks-config.yaml"
# Vendor-VFIO type id -> name tables learned per GPU, driver and device id: a VF's creatable list stops
# naming a type once the GPU is full, so the names seen earlier are kept here.
LEARNED_DIR = "var/lib/nvidia-vgpu-dm/types"
# GPUs whose vGPUs the DRA driver (nvidia-vgpu-dra) creates per ResourceClaim: apply and the agent leave
# them alone. Persistent (a node set up for DRA stays so across reboots); see host/owner.py.
DRA_OWNED_FILE = "var/lib/nvidia-vgpu-dm/dra-owned.json"
