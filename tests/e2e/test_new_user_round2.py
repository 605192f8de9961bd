"""What a new user hit, round 2 (issue 18): each defect reproduced the way the user met it, through
the CLI on a simulated host.
"""

from __future__ import annotations

import pytest

from tests.conftest import EXAMPLES, writes

T4_CONFIG = str(EXAMPLES / "config-t4.yaml")


# -- 18.11: a bad value from the environment is named as such -------------------------------------
@pytest.mark.parametrize(
    ("env", "value", "command", "flag"),
    [
        ("VGPU_DM_JOBS", "abc", "apply", "--jobs"),
        ("VGPU_DM_LOCK_TIMEOUT", "soon", "apply", "--lock-timeout"),
        ("VGPU_DM_WATCHDOG_INTERVAL", "0", "apply", "--watchdog-interval"),
        ("VGPU_DM_UUID_MODE", "fixed", "apply", "--uuid-mode"),
        ("VGPU_DM_FORCE", "maybe", "apply", "--force"),
        ("VGPU_DM_KEEP_GOING", "maybe", "apply", "--keep-going"),
        ("VGPU_DM_SKIP_MIG", "maybe", "apply", "--skip-mig"),
        ("VGPU_DM_VALID_CONFIG", "maybe", "assert", "--valid-config"),
        ("VGPU_DM_DEBUG", "maybe", "assert", "--debug"),
        ("VGPU_DM_LOG_FORMAT", "xml", "assert", "--log-format"),
        ("VGPU_DM_SIM", "/nonexistent", "assert", "--sim"),
    ],
)
def test_a_bad_value_from_the_environment_names_the_variable(cli, sim_host, env, value, command, flag):
    root = sim_host("T4")
    args = [command, "-f", T4_CONFIG, "-c", "T4-small"]
    if env != "VGPU_DM_SIM":
        args += ["--sim", str(root)]
    result = cli(*args, env={env: value})
    assert result.code == 2, result.err
    assert f"Invalid value for environment variable {env} (for '{flag}')" in result.err
    assert writes(root) == []


def test_a_bad_value_on_the_command_line_names_the_option(cli, sim_host):
    root = sim_host("T4")
    result = cli("apply", "--sim", str(root), "-f", T4_CONFIG, "-c", "T4-small", "--jobs", "abc")
    assert result.code == 2
    assert "Invalid value for '--jobs': 'abc'" in result.err
    assert "VGPU_DM_JOBS" not in result.err


def test_a_config_file_or_name_from_the_environment_says_so(cli):
    missing = cli("assert", "--valid-config", env={"VGPU_DM_CONFIG_FILE": "/nonexistent.yaml"})
    assert missing.code == 2
    assert "/nonexistent.yaml: cannot read config file" in missing.err
    assert "environment variable VGPU_DM_CONFIG_FILE" in missing.err
    unknown = cli("assert", "--valid-config", "-f", T4_CONFIG, env={"VGPU_DM_SELECTED_CONFIG": "T4-tiny"})
    assert unknown.code == 2
    assert "environment variable VGPU_DM_SELECTED_CONFIG" in unknown.err
    given = cli("assert", "--valid-config", "-f", T4_CONFIG, "-c", "T4-tiny")
    assert "environment variable" not in given.err


# -- did you mean ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("typed", "meant"), [("t4-small", "T4-small"), ("T4-smal", "T4-small"), ("T4-1q", "T4-1Q")]
)
def test_a_mistyped_config_name_gets_a_suggestion(cli, typed, meant):
    result = cli("assert", "--valid-config", "-f", T4_CONFIG, "-c", typed)
    assert result.code == 2
    assert f"selected vgpu-config not present: '{typed}'; did you mean '{meant}'?" in result.err


def test_an_unrelated_config_name_gets_no_suggestion(cli):
    result = cli("assert", "--valid-config", "-f", T4_CONFIG, "-c", "xyz")
    assert result.code == 2
    assert "did you mean" not in result.err
    assert "configs in the file: default, T4-16Q" in result.err


def test_a_mistyped_vgpu_type_gets_a_suggestion(cli, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "version: v1\nvgpu-configs:\n  a:\n    - devices: all\n"
        '      vgpu-devices: {"T4-1q": 4, "l40s-48q": 1}\n'
    )
    result = cli("assert", "--valid-config", "-f", str(config))
    assert result.code == 2
    lines = result.err.splitlines()
    assert any("invalid vGPU type 'T4-1q'" in x and "did you mean 'T4-1Q'?" in x for x in lines), result.err
    assert any("invalid vGPU type 'l40s-48q'" in x and "did you mean 'L40S-48Q'?" in x for x in lines)


def test_a_type_the_gpu_does_not_offer_gets_the_closest_it_does(cli, sim_host, tmp_path):
    root = sim_host("T4", "L40S")
    config = tmp_path / "c.yaml"
    config.write_text(
        "version: v1\nvgpu-configs:\n  a:\n"
        '    - device-filter: "0x1EB810DE"\n      devices: all\n      vgpu-devices: {"T4-16B": 1}\n'
        '    - device-filter: "0x26B910DE"\n      devices: all\n      vgpu-devices: {"L40S-48B": 1}\n'
    )
    result = cli("plan", "--sim", str(root), "-f", str(config))
    assert result.code == 1
    assert "vGPU type T4-16B is not supported on this GPU; did you mean 'T4-16" in result.out
    assert "vGPU type L40S-48B is not a type of the NVIDIA L40S; did you mean 'L40S-48" in result.out


@pytest.mark.parametrize(("typed", "meant"), [("lsit", "list"), ("tpyes", "types"), ("Assert", "assert")])
def test_a_mistyped_command_gets_a_suggestion(cli, typed, meant):
    result = cli(typed)
    assert result.code == 2
    assert f"No such command '{typed}'. Did you mean '{meant}'?" in result.err


def test_a_mistyped_sim_command_gets_a_suggestion(cli):
    result = cli("sim", "creat")
    assert result.code == 2
    assert "Did you mean 'create'?" in result.err


# -- 18.6: a distinct simulator name for every catalog GPU ----------------------------------------
def test_every_catalog_gpu_has_its_own_simulator_name_and_sim_gpus_lines_up(cli):
    from vgpu_dm import catalog

    entries = catalog.load()
    names = [e.sim_name for e in entries]
    assert len(set(n.lower() for n in names)) == len(names), "two GPUs share a simulator name"
    assert all(catalog.find(e.sim_name) is e for e in entries)
    listed = cli("sim", "gpus")
    assert listed.code == 0
    lines = listed.out.splitlines()
    assert [line.split()[0] for line in lines] == names
    # One column of names, then the product names all starting in the same column.
    starts = {line.index(e.name) for line, e in zip(lines, entries, strict=True)}
    assert len(starts) == 1, listed.out


def test_the_two_rtx_pro_gpus_are_told_apart(cli, tmp_path):
    made = cli("sim", "create", str(tmp_path / "h"), "--gpu", "RTXPRO6000", "--gpu", "RTXPRO4500")
    assert made.code == 0, made.err
    assert "RTX PRO 6000 Blackwell" in made.out and "RTX PRO 4500 Blackwell" in made.out
    shared = cli("sim", "create", str(tmp_path / "dc"), "--gpu", "DC")
    assert shared.code == 2
    assert "'DC' is the type prefix of 2 GPUs; pick one: RTXPRO6000" in shared.err
    assert not (tmp_path / "dc").exists()


# -- 18.7: sim commands refuse a directory that is not a simulated host ---------------------------
@pytest.mark.parametrize(
    "args",
    [("writes",), ("fault", "--fail-write", "1"), ("reboot",), ("latency",), ("hold", "x"), ("release", "5")],
)
def test_sim_commands_refuse_a_directory_that_is_not_a_simulated_host(cli, tmp_path, args):
    plain = tmp_path / "plain"
    (plain / "run" / "keep").mkdir(parents=True)
    (plain / "proc" / "4001").mkdir(parents=True)
    result = cli("sim", args[0], str(plain), *args[1:])
    assert result.code == 2, result.err
    assert f"{plain} is not a simulated host" in result.err
    # Nothing of the directory was touched (sim reboot used to empty its run/ and proc/).
    assert sorted(p.relative_to(plain).as_posix() for p in plain.rglob("*")) == [
        "proc",
        "proc/4001",
        "run",
        "run/keep",
    ]


# -- 18.5: read-only commands work on a read-only host, and never speak of changes -----------------
# The CLI in a fresh interpreter whose every write below the host root fails with EROFS, as on a
# read-only mount (the tests run as root, so file modes would not stop them).
READ_ONLY_RUN = """
import errno, os, sys
root = os.path.realpath(sys.argv[1])
WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
def below(path):
    if isinstance(path, int) or path is None:
        return False
    path = os.path.realpath(os.fsdecode(path))
    return path == root or path.startswith(root + "/")
def hook(event, args):
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITES)
        if writing and below(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
    elif event in ("os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "os.symlink",
                   "os.truncate", "os.chmod", "shutil.rmtree"):
        if any(below(a) for a in args if isinstance(a, (str, bytes))):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), args[0])
sys.addaudithook(hook)
from vgpu_dm.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


def run_read_only(root, *args: str):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-c", READ_ONLY_RUN, str(root), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in __import__("os").environ.items() if not k.startswith("VGPU_DM_")},
    )


MIXED_CONFIG = """\
version: v1
vgpu-configs:
  mixed:
    - device-filter: "0x1EB810DE"
      devices: all
      vgpu-devices: {"T4-1Q": 2, "T4-2Q": 2}
    - device-filter: "0x26B910DE"
      devices: all
      vgpu-devices: {"L40S-12Q": 2, "L40S-4Q": 4}
  small:
    - device-filter: "0x1EB810DE"
      devices: all
      vgpu-devices: {"T4-1Q": 4}
    - device-filter: "0x26B910DE"
      devices: all
      vgpu-devices: {"L40S-4Q": 4}
"""


@pytest.fixture
def busy_host(cli, sim_host, tmp_path):
    """A T4 (mdev) + L40S (vendor VFIO) host in mixed-size mode, whose every read runs nvidia-smi."""
    root = sim_host("T4", "L40S")
    config = tmp_path / "mixed.yaml"
    config.write_text(MIXED_CONFIG)
    applied = cli("apply", "--sim", str(root), "-f", str(config), "-c", "mixed")
    assert applied.code == 0, applied.err
    return root, str(config)


@pytest.mark.parametrize(
    "args",
    [
        ("list",),
        ("list", "-o", "json"),
        ("types",),
        ("export",),
        ("assert", "-c", "mixed"),
        ("plan", "-c", "small"),
        ("apply", "--dry-run", "-c", "small"),
    ],
)
def test_read_only_commands_work_on_a_read_only_simulated_host(busy_host, args):
    root, config = busy_host
    before = sorted(str(p) for p in root.rglob("*"))
    extra = ("-f", config) if args[0] in ("assert", "plan", "apply") else ()
    result = run_read_only(root, *args, *extra, "--sim", str(root))
    assert result.returncode == 0, result.stderr
    assert "Read-only file system" not in result.stderr and "Traceback" not in result.stderr
    assert sorted(str(p) for p in root.rglob("*")) == before


def test_list_reports_an_interrupted_apply_on_a_read_only_host(busy_host):
    from vgpu_dm import journal
    from vgpu_dm.sim.host import SimHostRoot

    root, _ = busy_host
    journal.write(SimHostRoot(root), journal.Journal(pid=4242, started=0.0, config="mixed", gpus=[]))
    result = run_read_only(root, "list", "--sim", str(root))
    assert result.returncode == 0, result.stderr
    assert "interrupted apply (pid 4242" in result.stderr


def test_a_read_only_command_that_fails_does_not_speak_of_changes(cli, busy_host):
    root, _ = busy_host
    cli("sim", "fault", str(root), "--eio-read", "current_vgpu_type")
    for command in ("list", "types", "export"):
        result = cli(command, "--sim", str(root))
        assert result.code == 1
        assert "host I/O error: Input/output error" in result.err
        assert "nothing was changed" not in result.err and "run apply again" not in result.err
