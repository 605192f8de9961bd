"""The ``nvidia-vgpu-dm`` command line (click): apply, assert, list, sim."""

from __future__ import annotations

import os
import sys


def run() -> None:
    """The console script. A short-lived process: the cyclic garbage collector stays off, and the
    interpreter's teardown is skipped when nothing needs it.

    Nearly all of a no-op command's time is start-up, and collections triggered by the allocations of
    importing modules rescan everything imported so far; nothing this process allocates needs the
    cycle collector before it exits (reference counting frees the rest).
    """
    import gc

    gc.disable()
    from vgpu_dm.cli.main import main

    exit_now(main())


def exit_now(code: int) -> None:
    """End the process with ``code``, without tearing the interpreter down when that is safe.

    Freeing every module and object at exit costs more than a no-op assert's own work (about 9 ms of
    its 72 here, bench/bench_host.py). It is skipped only when nothing would run during it: no other
    thread (a normal exit would wait for it), no atexit callback, and standard output and error
    flushed without error; otherwise this is a normal ``sys.exit``. Files the command wrote are closed
    by then (every write uses ``with``), and the kernel releases the host lock's flock either way.
    """
    import threading

    atexit = sys.modules.get("atexit")
    pending = atexit is not None and getattr(atexit, "_ncallbacks", lambda: 1)() > 0
    if threading.active_count() > 1 or pending:
        sys.exit(code)
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:  # None: the descriptor was closed when the process started
                stream.flush()
    except (OSError, ValueError):
        sys.exit(code)  # let the interpreter report a stream it cannot flush, as it always has
    os._exit(code)
