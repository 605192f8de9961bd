"""Mixed-size (heterogeneous) vGPU mode by placements, as NVIDIA's resource manager computes them.

Read in NVIDIA's open GPU kernel modules (``src/nvidia/src/kernel/virtualization/kernel_vgpu_mgr.c``,
2024 copyright; not observed on hardware): in heterogeneous mode every time-sliced vGPU type occupies
``placementSize`` = its framebuffer in whole GB of "slots", in a region as large as the type with one
instance per GPU. Each type may only sit at fixed placement IDs, found by halving the region into
1/2, 1/4 … 1/16 partitions: a type whose maximum instance count is twice the number of partitions gets
one placement at the start and one at the end of each partition; a type whose maximum is not a power
of two gets one per partition at the level of the largest power of two below it (at the start of left
halves, the end of right halves). So a type's count in mixed-size mode is that power of two, not its
maximum; 512 MB types (placementSize 0) get none. 1 GB types on 48 GB boards lose the placements on a
deny list (16 of them on GSP GPUs, Ada and later; IDs 8 and 32 on Ampere). A new vGPU goes to the
first placement of its type, in that order, whose slots are all free; it does not count against the
type's equal-size maximum.

The other rule the simulator offers (``mixed_size_rule: framebuffer``) is the guess made before this
was read: every type up to its maximum, all of them within the framebuffer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vgpu_dm.sim.layout import SimGPU, SimType

MAX_PARTITIONS = 16  # 32 vGPUs per GPU at most: two per 1/16 partition
DENY_GSP = (2, 3, 8, 9, 14, 15, 20, 21, 26, 27, 32, 33, 38, 39, 44, 45)  # Ada, Hopper, Blackwell
DENY_AMPERE = (8, 32)


def deny_list(arch: str, framebuffer_gb: int) -> list[int]:
    """Placement IDs 1 GB types may not use on this GPU (only 48 GB boards have such a list)."""
    if framebuffer_gb != 48:
        return []
    return list(DENY_AMPERE if arch == "Ampere" else DENY_GSP)


def _prev_pow2(n: int) -> int:
    return 1 << (n.bit_length() - 1) if n > 0 else 0


def region(gpu: SimGPU) -> int:
    """Slots of the placement region: the framebuffer (GB) of the type with one instance per GPU."""
    sizes = [int(t.framebuffer_gb) for t in gpu.types if t.max_instances == 1 and not t.mig_backed]
    return max(sizes, default=int(gpu.framebuffer_gb))


def supported(gpu: SimGPU, vtype: SimType) -> list[int]:
    """The type's placement IDs, in the order the driver tries them."""
    size, most = int(vtype.framebuffer_gb), vtype.max_instances
    if vtype.mig_backed or size == 0 or most == 0:
        return []
    top = _prev_pow2(most)
    found: list[int] = []

    def walk(low: int, high: int, parts: int, left: bool) -> None:
        if parts > MAX_PARTITIONS:
            return
        both = parts * 2 == most
        one = (top < most and top == parts) or (parts == 1 and most == 1)
        if both or (one and left):
            found.append(low)
        if both or (one and not left):
            found.append(high - size)
        middle = (low + high) // 2
        walk(low, middle, parts * 2, True)
        walk(middle, high, parts * 2, False)

    walk(0, region(gpu), 1, True)
    if size == 1:
        found = [p for p in found if p not in gpu.placement_deny]
    return found


def _used(gpu: SimGPU) -> set[int]:
    return {slot for start, size in gpu.placements.values() for slot in range(start, start + size)}


def creatable(gpu: SimGPU, vtype: SimType) -> list[int]:
    """Placement IDs of the type whose slots are all free now."""
    used = _used(gpu)
    size = int(vtype.framebuffer_gb)
    return [p for p in supported(gpu, vtype) if not used.intersection(range(p, p + size))]


def room(gpu: SimGPU, vtype: SimType) -> int:
    """How many more of the type fit (a type's placements never overlap one another)."""
    return len(creatable(gpu, vtype))


def place(gpu: SimGPU, vtype: SimType, key: str) -> int:
    """Put the vGPU ``key`` at the type's first free placement; ValueError if there is none."""
    free = creatable(gpu, vtype)
    if not free:
        raise ValueError(f"no free placement for {vtype.name}")
    gpu.placements[key] = [free[0], int(vtype.framebuffer_gb)]
    return free[0]


def release(gpu: SimGPU, key: str) -> None:
    gpu.placements.pop(key, None)
