"""The ``nvidia-vgpu-dm`` command line (click): apply, assert, list, sim."""


def run() -> None:
    """The console script. A short-lived process: the cyclic garbage collector stays off.

    Nearly all of a no-op command's time is start-up, and collections triggered by the allocations of
    importing modules rescan everything imported so far; nothing this process allocates needs the
    cycle collector before it exits (reference counting frees the rest).
    """
    import gc

    gc.disable()
    from vgpu_dm.cli.main import entry_point

    entry_point()
