"""Defects a new user hit (issue 11), each reproduced the way the user met it: through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ENTRY_POINT, EXAMPLES, REPO, writes
from vgpu_dm.host.root import SIM_MARKER

T4_CONFIG = str(EXAMPLES / "config-t4.yaml")


def config(tmp_path: Path, text: str, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def one_line_per_problem(err: str) -> list[str]:
    lines = err.splitlines()
    assert all(line.startswith('time="') for line in lines), err
    return lines


# -- sim create prints the indices configs use ---------------------------------------------------
def test_sim_create_prints_gpu_indices_in_pci_order(cli, tmp_path):
    # The simulator's sixth bus (0x18) sorts before the first (0x3b): that GPU is index 0.
    root = tmp_path / "host"
    result = cli("sim", "create", str(root), *[x for g in ("T4",) * 5 + ("A10",) for x in ("--gpu", g)])
    assert result.code == 0, result.err
    printed = [line.split()[:3] for line in result.out.splitlines() if line.startswith("GPU ")]
    listed = json.loads(cli("list", "--json", "--sim", str(root)).out)["gpus"]
    assert printed == [["GPU", f"{g['index']}:", g["address"]] for g in listed]
    assert printed[0] == ["GPU", "0:", "0000:18:00.0"]
    assert "NVIDIA A10" in result.out.splitlines()[0]
    a16 = cli("sim", "create", str(tmp_path / "a16"), "--gpu", "A16")
    assert a16.out.splitlines()[0] == "GPU 0: 0000:3b:00.0 NVIDIA A16 (mdev-vf, 16 VFs)"  # no catalog note


# -- device filters --------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ['"0x1EB8"', '"0x10DE1EB8"', '"123"', '""', "[]"])
def test_a_device_filter_that_could_never_match_is_a_located_config_error(cli, tmp_path, bad):
    cfg = config(
        tmp_path,
        f"version: v1\nvgpu-configs:\n  a:\n    - device-filter: {bad}\n      devices: all\n"
        f'      vgpu-devices: {{"T4-1Q": 1}}\n',
    )
    result = cli("assert", "--valid-config", "-f", cfg, "-c", "a")
    assert result.code == 2
    assert f"{cfg}:4:22: vgpu-configs.a[0].device-filter" in result.err


# -- I/O errors say whether anything changed --------------------------------------------------------
def test_a_read_error_before_the_first_write_says_nothing_was_changed(cli, sim_host):
    root = sim_host("T4")
    cli("sim", "fault", str(root), "--eio-read", "available_instances")
    result = cli("apply", "--sim", str(root), "-f", T4_CONFIG, "-c", "T4-small")
    assert result.code == 1
    assert "host I/O error: Input/output error" in result.err
    assert "nothing was changed" in result.err
    assert "run apply again" not in result.err
    assert writes(root) == []


def test_a_full_stdout_is_named_and_a_read_only_command_says_nothing_of_changes(sim_host):
    root = sim_host("T4")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VGPU_DM_")}
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [str(ENTRY_POINT), "list", "--sim", str(root)],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            timeout=60,
        )
    assert proc.returncode == 1
    assert "cannot write the result to standard output: No space left on device" in proc.stderr
    assert "nothing was changed" not in proc.stderr  # list never changes anything (issue 18.5)
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr


# -- what list and assert say about a journal ------------------------------------------------------
def _journal(root: Path, gpus: list[dict] | None = None) -> None:
    from vgpu_dm import journal
    from vgpu_dm.sim.host import SimHostRoot

    host = SimHostRoot(root)
    records = [journal.JournalGPU(**g) for g in gpus or []]
    journal.write(host, journal.Journal(pid=4242, started=0.0, config="T4-small", gpus=records))


def test_an_interrupted_apply_is_reported_with_what_the_next_apply_does(cli, sim_host):
    root = sim_host("T4")
    _journal(root)
    checked = cli("assert", "--sim", str(root), "-f", T4_CONFIG, "-c", "T4-small")
    assert checked.code == 1
    assert "found an interrupted apply (pid 4242" in checked.err
    assert "the next apply first puts them back to their devices from before that run" in checked.err
    listed = cli("list", "--sim", str(root))
    assert "the next apply first puts them back" in listed.err


def test_an_unreadable_journal_promises_no_undo(cli, sim_host):
    root = sim_host("T4")
    journal_file = root / "run/nvidia-vgpu-dm/journal.json"
    journal_file.parent.mkdir(parents=True, exist_ok=True)
    journal_file.write_text("{not json")
    checked = cli("assert", "--sim", str(root), "-f", T4_CONFIG, "-c", "T4-small")
    assert checked.code == 1
    assert "can no longer be undone from the journal" in checked.err
    assert "will put it right" not in checked.err and "will undo" not in checked.err


def test_a_running_apply_is_not_promised_an_undo(cli, sim_host):
    from vgpu_dm.host.lock import HostLock
    from vgpu_dm.sim.host import SimHostRoot

    root = sim_host("T4")
    _journal(root)
    with HostLock(SimHostRoot(root)):
        checked = cli("assert", "--sim", str(root), "-f", T4_CONFIG, "-c", "T4-small")
        listed = cli("list", "--sim", str(root), "--json")
    assert "it finishes or rolls back by itself" in checked.err
    assert "next apply" not in checked.err
    (gpu,) = json.loads(listed.out)["gpus"]
    # A journal that names no GPU concerns none: only the warning tells of it.
    assert gpu["apply_journal"] is None
    assert "finishes or rolls back by itself" in listed.err


def test_list_json_shows_an_interrupted_apply_on_its_gpus(cli, sim_host):
    root = sim_host("T4", "T4")
    _journal(
        root,
        [
            {
                "gpu": "0000:5e:00.0",
                "framework": "mdev",
                "before": [],
                "remove": [],
                "create": [{"type": "T4-1Q", "uuid": None}],
            }
        ],
    )
    gpus = json.loads(cli("list", "--json", "--sim", str(root)).out)["gpus"]
    assert gpus[0]["apply_journal"] is None
    pending = gpus[1]["apply_journal"]
    assert pending["state"] == "interrupted" and pending["pid"] == 4242 and pending["config"] == "T4-small"
    assert pending["create"] == [{"type": "T4-1Q", "uuid": None}]


# -- stdin and the simulator's state ---------------------------------------------------------------
def test_a_closed_stdin_is_a_clear_config_error():
    env = {k: v for k, v in os.environ.items() if not k.startswith("VGPU_DM_")}
    proc = subprocess.run(
        ["sh", "-c", f'exec "{ENTRY_POINT}" assert --valid-config -f - <&-'],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "<stdin>: cannot read config file: standard input is closed" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("garbage", ["{broken", '{"gpus": 3}', ""])
def test_a_corrupt_simulator_state_is_a_clear_error_and_leaves_no_journal(cli, sim_host, garbage):
    root = sim_host("T4")
    (root / SIM_MARKER / "host.json").write_text(garbage)
    result = cli("apply", "--sim", str(root), "-f", T4_CONFIG, "-c", "T4-small")
    assert result.code == 1
    assert "state file" in result.err and "is corrupt" in result.err
    assert "Traceback" not in result.err
    assert not (root / "run/nvidia-vgpu-dm/journal.json").exists()


# -- option values -----------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "soon"])
def test_lock_timeout_must_be_a_finite_number(cli, sim_host, value):
    root = sim_host("T4")
    flag = cli("apply", "--sim", str(root), "-f", T4_CONFIG, "-c", "T4-small", "--lock-timeout", value)
    assert flag.code == 2 and "--lock-timeout" in flag.err
    env = cli(
        "apply", "--sim", str(root), "-f", T4_CONFIG, "-c", "T4-small", env={"VGPU_DM_LOCK_TIMEOUT": value}
    )
    assert env.code == 2
    assert writes(root) == []


def test_sim_release_only_ends_processes_sim_hold_made(cli, sim_host):
    root = sim_host("T4")
    refused = cli("sim", "release", str(root), "1")
    assert refused.code == 2 and "not a fake VM made by 'sim hold'" in refused.err
    assert (root / "proc/1").is_dir()
    cli("apply", "--sim", str(root), "-f", T4_CONFIG, "-c", "T4-large")
    uuid = os.listdir(root / "sys/bus/mdev/devices")[0]
    held = cli("sim", "hold", str(root), uuid)
    pid = held.out.split()[1]
    assert cli("sim", "release", str(root), pid).code == 0
    assert not (root / "proc" / pid).exists()
    again = cli("sim", "release", str(root), pid)
    assert again.code == 2


# -- choosing the host: usage errors ------------------------------------------------------------------
def test_host_selection_mistakes_are_usage_errors(cli, sim_host, tmp_path):
    root = sim_host("T4")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        (["--sim", str(tmp_path / "missing")], {}, "does not exist"),
        (["--sim", str(a_file)], {}, "is not a directory"),
        (["--host-root", str(tmp_path / "missing")], {}, "does not exist"),
        (["--host-root", str(a_file)], {}, "is not a directory"),
        (["--sim", str(root), "--host-root", "/"], {}, "--sim and --host-root"),
        (["--sim", str(root)], {"VGPU_DM_HOST_ROOT": "/"}, "--sim and --host-root"),
        (["--host-root", ""], {}, "--host-root needs a directory"),
        (["--sim", ""], {}, "--sim needs a directory"),
        ([], {"VGPU_DM_SIM": ""}, "VGPU_DM_SIM is set but empty"),
        ([], {"VGPU_DM_HOST_ROOT": ""}, "VGPU_DM_HOST_ROOT is set but empty"),
    ]
    for args, env, message in cases:
        for command in (["list"], ["assert", "-f", T4_CONFIG, "-c", "T4-small"]):
            result = cli(*command, *args, env=env)
            assert result.code == 2, (command, args, env, result.err)
            assert message in result.err, (args, result.err)
    assert writes(root) == []


# -- names from the file ------------------------------------------------------------------------------
def test_control_characters_in_names_do_not_split_log_lines(cli, tmp_path):
    cfg = config(
        tmp_path,
        'version: v1\nvgpu-configs:\n  "evil\\nlevel=info msg=ok":\n    - devices: all\n'
        '      vgpu-devices: {"T4-1Q\\n": 1}\n',
    )
    result = cli("assert", "--valid-config", "-f", cfg)
    assert result.code == 2
    (line,) = one_line_per_problem(result.err)
    assert "evil\\\\nlevel=info" in line


def test_terminal_log_lines_escape_control_characters():
    from vgpu_dm.log import ERROR, Record, TerminalFormatter

    record = Record("vgpu_dm", ERROR, "a\nb\x1b[2Jc", 0.0, {})
    assert TerminalFormatter().format(record).endswith("a\\nb\\x1b[2Jc")


@pytest.mark.parametrize(
    ("key", "message"),
    [('""', "config name must not be empty"), ("12", "config name must be a string, got an integer")],
)
def test_empty_and_non_string_config_names_are_located_errors(cli, tmp_path, key, message):
    cfg = config(
        tmp_path, f"version: v1\nvgpu-configs:\n  {key}:\n    - devices: all\n      vgpu-devices: {{}}\n"
    )
    result = cli("assert", "--valid-config", "-f", cfg, "-c", "12")
    assert result.code == 2
    assert f"{cfg}:3:3: " in result.err and message in result.err


# -- many errors, many configs -------------------------------------------------------------------------
def test_thousands_of_errors_print_fifty_and_a_count(cli, tmp_path):
    entries = "".join(f'    - devices: [{i}]\n      vgpu-devices: {{"T4-1X": 1}}\n' for i in range(2000))
    cfg = config(tmp_path, "version: v1\nvgpu-configs:\n  a:\n" + entries)
    result = cli("assert", "--valid-config", "-f", cfg, "-c", "a")
    assert result.code == 2
    lines = one_line_per_problem(result.err)
    assert len(lines) == 51
    assert "... and 1950 more problems" in lines[-1]


def test_a_large_file_of_many_small_configs_is_not_taken_for_an_alias_bomb(cli, tmp_path):
    body = "".join(f"  c{i}: [{{devices: all, vgpu-devices: {{}}}}]\n" for i in range(40_000))
    cfg = config(tmp_path, "version: v1\nvgpu-configs:\n" + body)
    result = cli("assert", "--valid-config", "-f", cfg, "-c", "c39999")
    assert result.code == 0, result.err[:500]


# -- the demo's clean-up ---------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["outside", "inside-not-sim"])
def test_the_demo_refuses_to_delete_what_it_did_not_make(tmp_path, where):
    victim = tmp_path / "precious" if where == "outside" else REPO / ".demo-test-not-a-sim"
    victim.mkdir()
    (victim / "data").write_text("keep me")
    try:
        proc = subprocess.run(
            ["bash", str(EXAMPLES / "demo.sh")],
            env={**os.environ, "DEMO_DIR": str(victim)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2
        assert "refusing to delete" in proc.stderr
        assert (victim / "data").read_text() == "keep me"
    finally:
        if where != "outside":
            (victim / "data").unlink()
            victim.rmdir()
