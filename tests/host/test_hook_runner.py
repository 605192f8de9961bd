"""Hook sessions running real programs: stage order and rules, environment, output, failures, timeouts.

Programs run through the real host-root object: ``HostRoot("/")`` runs them directly; a host root
elsewhere runs them through ``chroot`` — tried here in a tiny root holding ``/bin/sh`` and its libraries
(skipped where this process may not chroot).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vgpu_dm import log
from vgpu_dm.device_id import DeviceID
from vgpu_dm.errors import ApplyInterrupted
from vgpu_dm.hooks.runner import DEFAULT_PATH, HookFailed, HookSession
from vgpu_dm.hooks.spec import parse_hooks
from vgpu_dm.host.pci import GPU
from vgpu_dm.host.root import HostRoot

GPU0 = GPU(0, "0000:3b:00.0", DeviceID.parse("0x1EB810DE:0x12A210DE"), 0, "nvidia", None, ())
GPU1 = GPU(1, "0000:5e:00.0", DeviceID.parse("0x1EB810DE:0x12A210DE"), 0, "nvidia", None, ())


@pytest.fixture
def logged():
    """The log lines written while the test runs."""
    import io

    stream = io.StringIO()
    saved = dict(log.settings)
    log.setup(debug=False, fmt="text", stream=stream)
    yield stream
    log.setup(**saved)


def session(tmp_path: Path, body: str, stop: threading.Event | None = None) -> HookSession:
    hooks = parse_hooks("version: v1\nhooks:\n" + body, str(tmp_path / "hooks.yaml"))
    return HookSession(hooks, HostRoot("/"), "/etc/vgpu.yaml", "T4-small", stop)


def recorder(tmp_path: Path, stage: str) -> str:
    """A hook entry that appends its stage and environment to tmp_path/trace."""
    trace = tmp_path / "trace"
    return f"""  {stage}:
    - command: /bin/sh
      args: ["-c", "echo {stage} >> {trace}; env -0 > {trace}.{stage}"]
"""


def trace(tmp_path: Path) -> list[str]:
    path = tmp_path / "trace"
    return path.read_text().split() if path.exists() else []


def env_of(tmp_path: Path, stage: str) -> dict[str, str]:
    entries = (tmp_path / f"trace.{stage}").read_text().split("\0")
    return dict(entry.split("=", 1) for entry in entries if entry)


ALL = ("apply-start", "pre-change", "post-change", "apply-exit")


def test_a_changing_run_calls_the_stages_in_order_with_their_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SECRET_OF_THE_CALLER", "must not leak")
    s = session(tmp_path, "".join(recorder(tmp_path, st) for st in ALL))
    s.apply_start()
    s.before_change([GPU1])
    s.before_change([GPU0])  # pre-change runs once; later stages see every GPU
    s.finish("success")
    assert trace(tmp_path) == list(ALL)
    start, pre, post, exit_ = (env_of(tmp_path, st) for st in ALL)
    for env, stage in zip((start, pre, post, exit_), ALL, strict=True):
        assert env["VGPU_DM_HOOK"] == stage
        assert env["VGPU_DM_CONFIG_FILE"] == "/etc/vgpu.yaml"
        assert env["VGPU_DM_SELECTED_CONFIG"] == "T4-small"
        assert env["PATH"] == DEFAULT_PATH
        assert "SECRET_OF_THE_CALLER" not in env and "HOME" not in env
    assert start["VGPU_DM_GPUS"] == ""
    assert pre["VGPU_DM_GPUS"] == "0000:5e:00.0" and pre["VGPU_DM_GPU_INDICES"] == "1"
    assert post["VGPU_DM_GPUS"] == "0000:3b:00.0 0000:5e:00.0" and post["VGPU_DM_GPU_INDICES"] == "0 1"
    assert post["VGPU_DM_RESULT"] == exit_["VGPU_DM_RESULT"] == "success"
    assert "VGPU_DM_RESULT" not in pre and "VGPU_DM_ERROR" not in post


def test_a_run_that_changes_nothing_skips_pre_and_post_change(tmp_path):
    s = session(tmp_path, "".join(recorder(tmp_path, st) for st in ALL))
    s.apply_start()
    s.finish("unchanged")
    assert trace(tmp_path) == ["apply-start", "apply-exit"]
    assert env_of(tmp_path, "apply-exit")["VGPU_DM_RESULT"] == "unchanged"


def test_hook_env_and_workdir_and_output_in_the_log(tmp_path, logged):
    work = tmp_path / "work"
    work.mkdir()
    body = f"""  apply-start:
    - command: sh
      args: ["-c", "pwd; echo \\"$GREETING\\"; echo oops >&2; echo $VGPU_DM_HOOK"]
      env: {{GREETING: "hello  world", PATH: "/usr/bin:/bin", VGPU_DM_X: 1}}
      workdir: {work}
"""
    with pytest.raises(Exception, match="VGPU_DM_"):  # the tool's names are reserved
        session(tmp_path, body)
    s = session(tmp_path, body.replace(", VGPU_DM_X: 1", ""))
    s.apply_start()
    lines = logged.getvalue().splitlines()
    said = [line.split("msg=", 1)[1] for line in lines]
    assert said[0].startswith(f'"hook apply-start ({tmp_path}/hooks.yaml:4): running sh -c')
    assert said[1:5] == [
        f'"hook apply-start: {work}"',
        '"hook apply-start: hello  world"',
        '"hook apply-start: oops"',
        '"hook apply-start: apply-start"',
    ]
    assert said[5].startswith('"hook apply-start: done (exit 0')


def test_failing_pre_change_stops_the_list_and_post_change_still_runs(tmp_path):
    body = (
        recorder(tmp_path, "apply-start")
        + f"""  pre-change:
    - command: /bin/sh
      args: ["-c", "echo pre1 >> {tmp_path}/trace; echo cannot stop the service; exit 3"]
    - command: /bin/sh
      args: ["-c", "echo pre2 >> {tmp_path}/trace"]
"""
        + recorder(tmp_path, "post-change")
        + recorder(tmp_path, "apply-exit")
    )
    s = session(tmp_path, body)
    s.apply_start()
    with pytest.raises(HookFailed) as caught:
        s.before_change([GPU0])
    message = str(caught.value)
    assert message.startswith(f"hook pre-change[0] ({tmp_path}/hooks.yaml:7): /bin/sh -c")
    assert "exited with status 3; its last output: cannot stop the service" in message
    s.finish("failed", caught.value)
    assert trace(tmp_path) == ["apply-start", "pre1", "post-change", "apply-exit"]
    post = env_of(tmp_path, "post-change")
    assert post["VGPU_DM_RESULT"] == "failed"
    assert "exited with status 3" in post["VGPU_DM_ERROR"]


def test_failing_apply_exit_fails_a_good_run_and_is_only_logged_after_a_failed_one(tmp_path, logged):
    body = """  post-change:
    - command: /bin/false
  apply-exit:
    - command: /nonexistent/program
"""
    s = session(tmp_path, body)
    s.before_change([GPU0])
    with pytest.raises(HookFailed) as caught:
        s.finish("success")
    lines = str(caught.value).splitlines()
    assert "hook post-change" in lines[0] and "exited with status 1" in lines[0]
    assert "hook apply-exit" in lines[1] and "cannot run /nonexistent/program" in lines[1]
    assert lines[2] == "the vGPU changes were made; only the hook failed"
    s2 = session(tmp_path, body)
    # Nothing raised: the run's own error wins; the failures are handed back, to be reported after it.
    late = s2.finish("failed", RuntimeError("write failed"))
    assert any("cannot run /nonexistent/program" in line for line in late)
    assert "cannot run" not in logged.getvalue()


def test_a_missing_workdir_is_named_as_such_not_blamed_on_the_command(tmp_path):
    s = session(tmp_path, "  apply-start:\n    - command: /bin/true\n      workdir: /nonexistent/dir\n")
    with pytest.raises(HookFailed) as caught:
        s.apply_start()
    assert "cannot change to its workdir /nonexistent/dir: No such file or directory" in str(caught.value)
    assert "cannot run /bin/true" not in str(caught.value)


def test_a_hook_past_its_timeout_is_killed_with_its_children(tmp_path):
    pidfile = tmp_path / "child.pid"
    body = f"""  pre-change:
    - command: /bin/sh
      args: ["-c", "sleep 60 & echo $! > {pidfile}; echo waiting; wait"]
      timeout: 0.5
"""
    s = session(tmp_path, body)
    started = time.monotonic()
    with pytest.raises(
        HookFailed, match=r"did not finish within 0.5 s \(timeout\); killed; its last output: waiting"
    ):
        s.before_change([GPU0])
    assert time.monotonic() - started < 8
    child = int(pidfile.read_text())
    for _ in range(50):
        if not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the hook's child {child} survived the timeout")


def test_a_stop_request_kills_a_running_pre_change_hook(tmp_path):
    stop = threading.Event()
    s = session(tmp_path, "  pre-change:\n    - command: /bin/sleep\n      args: [30]\n", stop)
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    with pytest.raises(ApplyInterrupted, match="while hook pre-change ran"):
        s.before_change([GPU0])
    assert time.monotonic() - started < 8


def _tiny_root(base: Path) -> Path | None:
    """A root holding /bin/sh and the libraries it needs, or None when chroot is not possible here."""
    if os.geteuid() != 0 or not shutil.which("chroot") or not sys.platform.startswith("linux"):
        return None
    sh = os.path.realpath("/bin/sh")
    try:
        libs = subprocess.run(["ldd", sh], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    (base / "bin").mkdir(parents=True)
    shutil.copy2(sh, base / "bin/sh")
    for word in libs.split():
        if word.startswith("/") and os.path.exists(word):
            target = base / word.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(word, target)
    (base / "work").mkdir()
    probe = subprocess.run(["chroot", str(base), "/bin/sh", "-c", "true"], capture_output=True)
    return base if probe.returncode == 0 else None


def test_on_a_host_root_other_than_slash_hooks_run_chrooted_in_their_workdir(tmp_path, logged):
    root = _tiny_root(tmp_path / "root")
    if root is None:
        pytest.skip("this process cannot chroot (needs root and a chroot program)")
    hooks = parse_hooks(
        "version: v1\nhooks:\n  apply-start:\n    - command: /bin/sh\n"
        '      args: ["-c", "pwd; echo $VGPU_DM_HOOK"]\n      workdir: /work\n',
        "h.yaml",
    )
    HookSession(hooks, HostRoot(root), "c.yaml", "x").apply_start()
    said = logged.getvalue()
    assert "hook apply-start: /work" in said  # the root's /work, not this machine's
    assert "hook apply-start: apply-start" in said
    missing = parse_hooks(
        "version: v1\nhooks:\n  apply-start:\n    - command: /bin/sh\n      workdir: /gone\n", "h.yaml"
    )
    with pytest.raises(HookFailed, match=f"cannot change to its workdir /gone .in the host root {root}."):
        HookSession(missing, HostRoot(root), "c.yaml", "x").apply_start()


def test_under_a_host_root_hooks_get_the_config_file_as_the_host_sees_it(tmp_path):
    """Hooks run inside the host root (chroot), so a path of this process means nothing to them: a file
    inside the host root is named by its host path, one only this container has (the agent's
    ConfigMap) is copied into the host root's run directory first."""
    root = tmp_path / "host"
    (root / "etc").mkdir(parents=True)
    inside = root / "etc/vgpu.yaml"
    inside.write_text("version: v1\n")
    hooks = parse_hooks("version: v1\nhooks:\n  apply-start:\n    - command: /bin/true\n", "h.yaml")
    hook = hooks.get("apply-start")[0]
    told = HookSession(hooks, HostRoot(root), str(inside), "x").environment("apply-start", hook, {})
    assert told["VGPU_DM_CONFIG_FILE"] == "/etc/vgpu.yaml"
    outside = tmp_path / "configmap/config.yaml"
    outside.parent.mkdir()
    outside.write_text("version: v1\nvgpu-configs: {}\n")
    told = HookSession(hooks, HostRoot(root), str(outside), "x").environment("apply-start", hook, {})
    assert told["VGPU_DM_CONFIG_FILE"] == "/run/nvidia-vgpu-dm/hooks-config.yaml"
    assert (root / "run/nvidia-vgpu-dm/hooks-config.yaml").read_text() == outside.read_text()
    # On a host root of "/", the path is this machine's own.
    told = HookSession(hooks, HostRoot("/"), str(outside), "x").environment("apply-start", hook, {})
    assert told["VGPU_DM_CONFIG_FILE"] == str(outside)


def test_a_silent_long_hook_is_reported_while_it_runs(tmp_path, logged, monkeypatch):
    """Issue 18.13: a wait says how it is going at least every 5 s (0.2 s here), hooks included."""
    from vgpu_dm import waiting

    assert waiting.PROGRESS_EVERY == 5.0
    monkeypatch.setattr(waiting, "PROGRESS_EVERY", 0.2)
    s = session(tmp_path, "  pre-change:\n    - command: /bin/sleep\n      args: [1]\n      timeout: 30\n")
    s.before_change([GPU0])
    said = [line.split("msg=", 1)[1] for line in logged.getvalue().splitlines()]
    waits = [x for x in said if "still waiting for hook pre-change" in x]
    assert len(waits) >= 3, said
    assert f"({tmp_path}/hooks.yaml:4)" in waits[0] and "it is killed after 30 s" in waits[0]
    assert said[-1].startswith('"hook pre-change: done (exit 0')
