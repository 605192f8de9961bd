"""The simulated driver's lock on NFS: there flock is carried out as a POSIX byte-range lock, and an
exclusive one needs a file opened for writing (EBADF otherwise; Linux's NFS client, flock(2) NOTES).
A simulated host on an NFS home directory must work, so the lock file is opened read-write when it
can be, read-only only on a read-only host (tests/e2e/test_new_user_round2.py covers that one)."""

from __future__ import annotations

import errno
import fcntl
import os

from tests.conftest import EXAMPLES
from tests.simstate import layouts

T4_CONFIG = str(EXAMPLES / "config-t4.yaml")


def test_apply_on_a_simulated_host_whose_files_lock_as_on_nfs(cli, sim_host, monkeypatch):
    real_flock = fcntl.flock
    taken = []

    def nfs_flock(fd, operation):
        fileno = fd if isinstance(fd, int) else fd.fileno()
        writable = fcntl.fcntl(fileno, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY
        if operation & fcntl.LOCK_EX and not writable:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        taken.append(operation & (fcntl.LOCK_EX | fcntl.LOCK_SH))
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", nfs_flock)
    root = sim_host("T4")
    result = cli("apply", "--sim", str(root), "-f", T4_CONFIG, "-c", "T4-small")
    assert result.code == 0, result.err
    assert layouts(root) == [{"T4-1Q": 16}]
    assert fcntl.LOCK_EX in taken
    assert cli("list", "--sim", str(root)).code == 0
