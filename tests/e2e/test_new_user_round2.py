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
