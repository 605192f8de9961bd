"""The CLI on config files: --valid-config, selection, env vars, located errors, exit codes, log formats."""

from __future__ import annotations

import io
import json
import os
import re
import sys
from pathlib import Path

import pytest

from vgpu_dm import __version__, log
from vgpu_dm.cli.main import main

EXAMPLE = str(Path(__file__).resolve().parents[2] / "examples" / "config-t4.yaml")
EXAMPLE_CONFIGS = (
    "default, T4-16Q, T4-8Q, T4-4Q, T4-2Q, T4-1Q, T4-small, T4-medium, T4-large, T4-mixed, T4-none"
)
VALID = "Selected vGPU device configuration is valid"
KV_LINE = re.compile(
    r'time="\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ" level=(debug|info|warning|error|fatal) msg="(.*)"'
)

ONE_CONFIG = """\
version: v1
vgpu-configs:
  only:
    - device-filter: "0x1EB810DE"
      devices: all
      vgpu-devices:
        "T4-1Q": 16
"""

# Three problems on lines 4, 6 and 9; every one must be reported, in line order.
INVALID = """\
version: v1
vgpu-configs:
  T4-small:
    - device-filter: 0x1EB810DE
      devices: all
      vgpu-devices: {"T4-1Q": 0, "T4-2Q": 1}
  T4-large:
    - devices: all
      vgpu-devices: {"T4-16X": 1}
"""
INVALID_MESSAGES = [
    "{f}:4:22: vgpu-configs.T4-small[0].device-filter: expected a device id string, got an integer "
    "('0x1EB810DE') (an unquoted 0x... is read as a number by YAML; quote it: \"0x1EB810DE\")",
    '{f}:6:31: vgpu-configs.T4-small[0].vgpu-devices."T4-1Q": count must be an integer > 0, got 0 '
    "(leave the type out instead)",
    "{f}:9:22: vgpu-configs.T4-large[0].vgpu-devices.\"T4-16X\": invalid vGPU type 'T4-16X': expected "
    "<GPU>-<GB><SERIES> (e.g. T4-1Q, RTX6000-Ada-2Q) or <GPU>-<G>-<GB><SERIES>[ME|NOME|MEALL|GFX] "
    "(e.g. A100-1-5CME), series one of A, B, C, Q; did you mean 'T4-16Q'?",
]


def kv_messages(err: str, level: str | None = None) -> list[str]:
    """The msg of every key=value log line on stderr; fails on any other line."""
    out = []
    for line in err.splitlines():
        m = KV_LINE.fullmatch(line)
        assert m, f"not a key=value log line: {line!r}"
        if level is None or m[1] == level:
            out.append(json.loads(f'"{m[2]}"'))
    return out


def json_lines(err: str) -> list[dict[str, str]]:
    records = [json.loads(line) for line in err.splitlines()]
    for r in records:
        assert set(r) == {"level", "msg", "time"}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", r["time"])
    return records


@pytest.fixture
def one_config(tmp_path: Path) -> str:
    path = tmp_path / "one.yaml"
    path.write_text(ONE_CONFIG)
    return str(path)


@pytest.fixture
def invalid(tmp_path: Path) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(INVALID)
    return str(path)


# -- --valid-config -------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--valid-config", "-a"])
@pytest.mark.parametrize("command", ["assert", "apply"])
def test_valid_config_ok(cli, command: str, flag: str) -> None:
    r = cli(command, flag, "-f", EXAMPLE, "-c", "T4-small")
    assert r.code == 0
    assert r.out == ""
    assert kv_messages(r.err) == [VALID]


def test_long_option_names(cli) -> None:
    r = cli("assert", "--valid-config", "--config-file", EXAMPLE, "--selected-config", "T4-mixed")
    assert (r.code, kv_messages(r.err)) == (0, [VALID])


def test_every_example_config_is_valid(cli) -> None:
    for name in EXAMPLE_CONFIGS.split(", "):
        r = cli("assert", "-a", "-f", EXAMPLE, "-c", name)
        assert (r.code, kv_messages(r.err)) == (0, [VALID]), name


def test_stdin(cli) -> None:
    r = cli("assert", "-a", "-f", "-", "-c", "T4-large", stdin=Path(EXAMPLE).read_text())
    assert (r.code, kv_messages(r.err)) == (0, [VALID])


def test_stdin_errors_name_stdin(cli) -> None:
    r = cli("assert", "-a", "-f", "-", stdin=INVALID)
    assert r.code == 2
    assert r.out == ""
    assert kv_messages(r.err, "error") == [m.format(f="<stdin>") for m in INVALID_MESSAGES]


def test_selected_config_can_be_left_out_with_one_config(cli, one_config: str) -> None:
    r = cli("assert", "-a", "-f", one_config)
    assert (r.code, kv_messages(r.err)) == (0, [VALID])


def test_selected_config_needed_with_several_configs(cli) -> None:
    r = cli("assert", "-a", "-f", EXAMPLE)
    assert r.code == 2
    assert kv_messages(r.err, "error") == [
        f"{EXAMPLE}: missing required flag 'selected-config' (-c): "
        f"the file defines 11 configs: {EXAMPLE_CONFIGS}"
    ]


def test_unknown_config_lists_the_names(cli) -> None:
    r = cli("apply", "-a", "-f", EXAMPLE, "-c", "T4-huge")
    assert r.code == 2
    assert kv_messages(r.err, "error") == [
        f"{EXAMPLE}: selected vgpu-config not present: 'T4-huge' (configs in the file: {EXAMPLE_CONFIGS})"
    ]


@pytest.mark.parametrize("command", ["assert", "apply"])
def test_invalid_file_reports_every_located_error(cli, invalid: str, command: str) -> None:
    r = cli(command, "-a", "-f", invalid, "-c", "T4-small")
    assert r.code == 2
    assert r.out == ""
    assert kv_messages(r.err) == [m.format(f=invalid) for m in INVALID_MESSAGES]


def test_invalid_file_is_an_error_even_for_a_valid_selected_config(cli, tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    path.write_text(ONE_CONFIG + "  other:\n    - devices: some\n      vgpu-devices: {}\n")
    r = cli("assert", "-a", "-f", str(path), "-c", "only")
    assert r.code == 2
    assert kv_messages(r.err, "error") == [
        f"{path}:9:16: vgpu-configs.other[0].devices: expected 'all' or a list of GPU indices, "
        "got a string ('some')"
    ]


def test_empty_file_has_no_config_to_select(cli, tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("version: v1\n")
    r = cli("assert", "-a", "-f", str(path))
    assert r.code == 2
    assert kv_messages(r.err, "error") == [f"{path}: the file defines no vgpu-configs"]


def test_yaml_syntax_error(cli, tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("version: v1\nvgpu-configs: [\n")
    r = cli("assert", "-a", "-f", str(path))
    assert r.code == 2
    (msg,) = kv_messages(r.err, "error")
    assert msg.startswith(f"{path}:3:1: invalid YAML/JSON: ")


def test_missing_config_file_option(cli) -> None:
    r = cli("assert", "-a", "-c", "T4-small")
    assert r.code == 2
    assert "Missing option '-f' / '--config-file'" in r.err
    assert "Usage: nvidia-vgpu-dm assert" in r.err
    assert r.out == ""


def test_missing_file(cli, tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    r = cli("assert", "-a", "-f", str(path))
    assert r.code == 2
    assert kv_messages(r.err, "error") == [f"{path}: cannot read config file: No such file or directory"]


def test_directory_as_config_file(cli, tmp_path: Path) -> None:
    r = cli("apply", "-a", "-f", str(tmp_path))
    assert r.code == 2
    (msg,) = kv_messages(r.err, "error")
    assert msg.startswith(f"{tmp_path}: cannot read config file: ")


def test_unknown_option_is_a_usage_error(cli) -> None:
    r = cli("assert", "-a", "-f", EXAMPLE, "--bogus")
    assert r.code == 2
    assert "No such option '--bogus'" in r.err


# -- environment variables ---------------------------------------------------------------------------


def test_env_vars_replace_the_flags(cli) -> None:
    env = {
        "VGPU_DM_CONFIG_FILE": EXAMPLE,
        "VGPU_DM_SELECTED_CONFIG": "T4-medium",
        "VGPU_DM_VALID_CONFIG": "true",
    }
    r = cli("assert", env=env)
    assert (r.code, kv_messages(r.err)) == (0, [VALID])
    # apply only validates with the flag itself: the environment must not turn it into a no-op.
    r = cli("apply", "--valid-config", env=env)
    assert (r.code, kv_messages(r.err)) == (0, [VALID])


def test_valid_config_env_var_does_not_make_apply_a_no_op(cli, sim_host) -> None:
    root = sim_host("T4")
    env = {
        "VGPU_DM_CONFIG_FILE": EXAMPLE,
        "VGPU_DM_SELECTED_CONFIG": "T4-medium",
        "VGPU_DM_VALID_CONFIG": "1",
    }
    r = cli("apply", "--sim", str(root), env=env)
    assert r.code == 0, r.err
    assert "successfully applied" in r.err
    assert cli("assert", "--sim", str(root), "-f", EXAMPLE, "-c", "T4-medium").code == 0


def test_env_selected_config_is_checked(cli) -> None:
    env = {"VGPU_DM_CONFIG_FILE": EXAMPLE, "VGPU_DM_SELECTED_CONFIG": "nope", "VGPU_DM_VALID_CONFIG": "1"}
    r = cli("assert", env=env)
    assert r.code == 2
    assert kv_messages(r.err, "error") == [
        f"{EXAMPLE}: selected vgpu-config not present: 'nope' (configs in the file: {EXAMPLE_CONFIGS}) "
        "(the value came from the environment variable VGPU_DM_SELECTED_CONFIG)"
    ]


def test_flags_override_env_vars(cli, invalid: str) -> None:
    r = cli("assert", "-a", "-f", EXAMPLE, "-c", "T4-large", env={"VGPU_DM_CONFIG_FILE": invalid})
    assert (r.code, kv_messages(r.err)) == (0, [VALID])
    r = cli("assert", "-a", "-f", EXAMPLE, "-c", "T4-large", env={"VGPU_DM_SELECTED_CONFIG": "nope"})
    assert r.code == 0


def test_env_config_file_stdin(cli) -> None:
    r = cli("assert", "-a", stdin=ONE_CONFIG, env={"VGPU_DM_CONFIG_FILE": "-"})
    assert (r.code, kv_messages(r.err)) == (0, [VALID])


@pytest.mark.parametrize(("args", "env"), [(["-d"], {}), (["--debug"], {}), ([], {"VGPU_DM_DEBUG": "true"})])
def test_debug_flag_and_env(cli, args: list[str], env: dict[str, str]) -> None:
    r = cli(*args, "assert", "-a", "-f", EXAMPLE, "-c", "T4-small", env=env)
    assert (r.code, kv_messages(r.err)) == (0, [VALID])
    assert log.get().isEnabledFor(log.DEBUG)


def test_no_debug_by_default(cli) -> None:
    r = cli("assert", "-a", "-f", EXAMPLE, "-c", "T4-small")
    assert r.code == 0
    assert not log.get().isEnabledFor(log.DEBUG) and log.get().isEnabledFor(log.INFO)


# -- version, help ----------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--version", "-v"])
def test_version(cli, flag: str) -> None:
    r = cli(flag)
    assert r.code == 0
    assert r.out == f"nvidia-vgpu-dm, version {__version__}\n"


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["assert", "--help"], ["apply", "-h"]])
def test_help_mentions_exit_codes(cli, args: list[str]) -> None:
    r = cli(*args)
    assert r.code == 0
    text = " ".join(r.out.split())
    assert "Exit codes:" in text
    assert "0 success: config applied (or nothing to do), assertion holds, config valid" in text
    assert "1 assertion false, or apply failed" in text
    assert "2 usage error or invalid config file" in text


def test_subcommand_help_lists_the_upstream_options(cli) -> None:
    r = cli("assert", "--help")
    for option in ("-f, --config-file", "-c, --selected-config", "-a, --valid-config"):
        assert option in r.out
    for env in ("VGPU_DM_CONFIG_FILE", "VGPU_DM_SELECTED_CONFIG", "VGPU_DM_VALID_CONFIG"):
        assert env in r.out
    top = cli("--help").out
    assert "-d, --debug" in top
    assert "VGPU_DM_DEBUG" in top


# -- log formats -----------------------------------------------------------------------------------


def test_json_log_format(cli) -> None:
    r = cli("--log-format", "json", "assert", "-a", "-f", EXAMPLE, "-c", "T4-small")
    assert r.code == 0
    assert [(x["level"], x["msg"]) for x in json_lines(r.err)] == [("info", VALID)]


def test_json_log_format_from_env_with_errors(cli, invalid: str) -> None:
    r = cli("assert", "-a", "-f", invalid, env={"VGPU_DM_LOG_FORMAT": "json"})
    assert r.code == 2
    assert r.out == ""
    records = json_lines(r.err)
    assert [x["level"] for x in records] == ["error"] * 3
    assert [x["msg"] for x in records] == [m.format(f=invalid) for m in INVALID_MESSAGES]


def test_bad_log_format_is_a_usage_error(cli) -> None:
    r = cli("--log-format", "xml", "assert", "-a", "-f", EXAMPLE)
    assert r.code == 2
    assert "Invalid value for '--log-format'" in r.err


def test_key_value_format_escapes_quotes(cli, tmp_path: Path) -> None:
    path = tmp_path / 'we"ird.yaml'
    r = cli("assert", "-a", "-f", str(path))
    assert r.code == 2
    (line,) = r.err.splitlines()
    assert 'we\\"ird.yaml' in line
    assert kv_messages(r.err) == [f"{path}: cannot read config file: No such file or directory"]


def test_terminal_format(monkeypatch, capsys) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    for key in [k for k in os.environ if k.startswith("VGPU_DM_")]:
        monkeypatch.delenv(key)
    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    assert main(["assert", "-a", "-f", EXAMPLE, "-c", "T4-small"]) == 0
    assert re.fullmatch(rf"INFO\[\d{{4}}\] {VALID}\n", tty.getvalue())
    assert capsys.readouterr().out == ""


# -- the installed entry point (a few; each costs a process start) ------------------------------------


def test_entry_point_valid_config(run_cli) -> None:
    r = run_cli("assert", "--valid-config", "-f", EXAMPLE, "-c", "T4-small")
    assert r.code == 0
    assert r.out == ""
    assert kv_messages(r.err) == [VALID]


def test_entry_point_invalid_file_from_stdin_with_json_logs(run_cli) -> None:
    r = run_cli("--log-format", "json", "apply", "-a", "-f", "-", stdin=INVALID)
    assert r.code == 2
    assert r.out == ""
    assert [x["msg"] for x in json_lines(r.err)] == [m.format(f="<stdin>") for m in INVALID_MESSAGES]


def test_entry_point_env_vars(run_cli) -> None:
    env = {"VGPU_DM_CONFIG_FILE": EXAMPLE, "VGPU_DM_SELECTED_CONFIG": "T4-1Q", "VGPU_DM_VALID_CONFIG": "yes"}
    r = run_cli("assert", env=env)
    assert (r.code, kv_messages(r.err)) == (0, [VALID])


def test_entry_point_usage_errors(run_cli) -> None:
    r = run_cli("assert", "-a")
    assert r.code == 2
    assert "Missing option '-f' / '--config-file'" in r.err
    assert "Traceback" not in r.err


def test_entry_point_version(run_cli) -> None:
    r = run_cli("--version")
    assert (r.code, r.out) == (0, f"nvidia-vgpu-dm, version {__version__}\n")
