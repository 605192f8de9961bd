"""Names of the simulator's own files in a simulated host's ``.vgpu-dm-sim`` directory.

Kept apart from the modules that parse them so that the read path of a simulated host can see whether
a file exists without importing its parser (see SimHostRoot).
"""

STATE_FILE = "host.json"  # the simulated driver's state (sim/layout.py)
FAULTS_FILE = "faults.json"  # armed faults (sim/faults.py)
LATENCY_FILE = "latency.json"  # per-write latency (sim/latency.py)
WRITE_LOG = "writes.log"  # every control-file write the tool made (sim/host.py)
DRIVER_LOCK = "driver.lock"  # held while the simulated driver changes its state (sim/host.py)
UDEV_QUEUE_FILE = "udev-queue.json"  # mdev parents whose udev events wait to be handled (sim/mdevctl.py)
