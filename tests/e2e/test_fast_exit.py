"""The console script ends without the interpreter's teardown (cli.exit_now) only when nothing is lost
by it: buffered output still arrives, the exit code is kept, and with another thread running or an
atexit callback registered the process exits normally, waiting for / running them."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ENTRY_POINT, EXAMPLES


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_buffered_output_and_the_exit_code_survive():
    proc = _python(
        "import sys\nfrom vgpu_dm.cli import exit_now\n"
        "sys.stdout.write('no newline')\nsys.stderr.write('err')\nexit_now(3)"
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "no newline", "err")


def test_a_running_thread_is_waited_for(tmp_path):
    done = tmp_path / "done"
    proc = _python(
        "import threading, time\nfrom vgpu_dm.cli import exit_now\n"
        f"def late():\n    time.sleep(0.3)\n    open({str(done)!r}, 'w').write('x')\n"
        "threading.Thread(target=late).start()\nexit_now(4)"
    )
    assert proc.returncode == 4
    assert done.read_text() == "x"  # os._exit would have killed the thread before it wrote


def test_atexit_callbacks_still_run():
    proc = _python(
        "import atexit\nfrom vgpu_dm.cli import exit_now\natexit.register(print, 'bye')\nexit_now(0)"
    )
    assert (proc.returncode, proc.stdout) == (0, "bye\n")


def test_large_json_output_through_a_pipe_arrives_whole(cli, sim_host):
    root = sim_host(*["T4"] * 8)
    config = str(EXAMPLES / "config-t4.yaml")
    assert cli("apply", "--sim", str(root), "-f", config, "-c", "T4-small").code == 0
    proc = subprocess.run(
        [str(ENTRY_POINT), "list", "--json", "--sim", str(root)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0
    listed = json.loads(proc.stdout)["gpus"]
    assert len(listed) == 8 and all(gpu["vgpus"] for gpu in listed)


def test_a_closed_stdout_keeps_the_exit_code():
    # With descriptor 1 closed at start, Python's sys.stdout is None; the command's code must survive.
    proc = subprocess.run(
        ["sh", "-c", f'"{ENTRY_POINT}" assert --valid-config -f "{EXAMPLES}/config-t4.yaml" -c T4-small >&-'],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
