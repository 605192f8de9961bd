"""The hooks file: what it accepts, and a located error (file:line:column, path) for everything else."""

from __future__ import annotations

import pytest

from vgpu_dm.errors import ConfigError
from vgpu_dm.hooks.spec import DEFAULT_TIMEOUT, Hook, parse_hooks, read_hooks_file

GOOD = """\
version: v1
hooks:
  apply-start:
    - command: /usr/bin/logger
      args: ["-t", "vgpu-dm", "apply of", "starting"]
  pre-change:
    - command: systemctl
      args: [stop, dcgm-exporter.service]
      timeout: 60
    - command: /bin/sh
      args: ["-c", "echo $LEVEL"]
      env: {LEVEL: 3, RATE: 1.10, NAME: "x y"}
      workdir: /var/tmp
  post-change:
    - command: systemctl
      envs:
        SYSTEMD_LOG_LEVEL: info
      args: [start, dcgm-exporter.service]
  apply-exit:
"""


def test_a_good_file():
    hooks = parse_hooks(GOOD, "hooks.yaml")
    assert hooks.get("apply-start") == (
        Hook(
            "/usr/bin/logger",
            ("-t", "vgpu-dm", "apply of", "starting"),
            (),
            None,
            DEFAULT_TIMEOUT,
            "hooks.yaml:4",
        ),
    )
    stop, shell = hooks.get("pre-change")
    assert (stop.command, stop.args, stop.timeout) == ("systemctl", ("stop", "dcgm-exporter.service"), 60.0)
    # Numbers are taken as written (mig-parted would make 1.10 "1.1").
    assert shell.env == (("LEVEL", "3"), ("RATE", "1.10"), ("NAME", "x y"))
    assert shell.workdir == "/var/tmp"
    assert hooks.get("post-change")[0].env == (("SYSTEMD_LOG_LEVEL", "info"),)
    assert hooks.get("apply-exit") == ()


def test_only_a_version_is_a_file_with_no_hooks():
    assert parse_hooks("version: v1\n").hooks == {}


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_hooks(text, "h.yaml")
    return [str(p) for p in caught.value.problems]


def test_every_problem_is_reported_with_its_location():
    text = """\
version: v1
hooks:
  pre-apply-config:
    - command: /bin/true
  pre-change:
    - args: [x]
    - command: ./relative.sh
    - command: /bin/echo
      args: [yes, ~, [1]]
    - command: /bin/echo
      args: "a b"
      workdir: tmp
      timeout: 0
    - command: /bin/echo
      env: {VGPU_DM_RESULT: x, "BAD NAME": y}
      Command: typo
"""
    assert problems(text) == [
        "h.yaml:3:3: hooks.pre-apply-config: unknown hook 'pre-apply-config'; expected one of: "
        "apply-start, pre-change, post-change, apply-exit (nvidia-mig-parted's pre-apply-config "
        "corresponds to pre-change here)",
        "h.yaml:6:7: hooks.pre-change[0]: missing required key 'command'",
        "h.yaml:7:16: hooks.pre-change[1].command: relative path './relative.sh': give an "
        "absolute path, or a bare name to look up in PATH",
        "h.yaml:9:14: hooks.pre-change[2].args[0]: expected a string, got a boolean ('yes'); "
        "quote it if it is meant as text",
        "h.yaml:9:19: hooks.pre-change[2].args[1]: expected a string, got null (empty); quote it "
        "if it is meant as text",
        "h.yaml:9:22: hooks.pre-change[2].args[2]: expected a string, got a list",
        "h.yaml:11:13: hooks.pre-change[3].args: expected a list of arguments, got a string ('a "
        "b') (one list item per argument; no shell splits it)",
        "h.yaml:12:16: hooks.pre-change[3].workdir: expected an absolute directory, got 'tmp'",
        "h.yaml:13:16: hooks.pre-change[3].timeout: expected a number of seconds > 0 and <= "
        "86400, got an integer ('0')",
        "h.yaml:15:13: hooks.pre-change[4].env.VGPU_DM_RESULT: VGPU_DM_RESULT: names starting "
        "with VGPU_DM_ are set by the tool",
        "h.yaml:15:32: hooks.pre-change[4].env.BAD NAME: invalid environment variable name 'BAD NAME'",
        "h.yaml:16:7: hooks.pre-change[4]: unknown key 'Command'; expected one of: command, "
        "args, env, workdir, timeout",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "h.yaml:1:1: empty hooks file; expected 'version: v1' and 'hooks:'"),
        ("hooks: {}\n", "h.yaml:1:1: missing required key 'version' (expected version: v1)"),
        ("version: v2\n", "h.yaml:1:10: version: unsupported version a string ('v2'); expected v1"),
        (
            "version: v1\nhooks: [a]\n",
            "h.yaml:2:8: hooks: expected a mapping of hook name to a list of programs",
        ),
        ("version: v1\nhook: {}\n", "h.yaml:2:1: unknown key 'hook'; expected one of: version, hooks"),
        (
            "version: v1\nhooks:\n  pre-change: {command: x}\n",
            "h.yaml:3:15: hooks.pre-change: expected a list",
        ),
        ("version: v1\nhooks: {\n", "h.yaml:3:1: invalid YAML/JSON"),
        (
            "version: v1\nhooks:\n  pre-change: []\n  pre-change: []\n",
            "h.yaml:4:3: hooks: duplicate key 'pre-change' (first defined on line 3)",
        ),
        (
            "version: v1\nhooks:\n  pre-change:\n    - {command: x, env: {A: 1}, envs: {B: 2}}\n",
            "h.yaml:4:33: hooks.pre-change[0]: both 'env' and 'envs' given",
        ),
    ],
)
def test_single_problems(text, expected):
    found = problems(text)
    assert len(found) == 1 and found[0].startswith(expected), found


def test_reading_a_file(tmp_path):
    path = tmp_path / "hooks.yaml"
    path.write_text(GOOD)
    assert len(read_hooks_file(str(path)).get("pre-change")) == 2
    with pytest.raises(ConfigError, match="cannot read hooks file"):
        read_hooks_file(str(tmp_path / "missing.yaml"))
    path.write_bytes(b"version: v1\n\xff\n")
    with pytest.raises(ConfigError, match="2:1: not valid UTF-8"):
        read_hooks_file(str(path))


def test_the_shipped_example_is_valid():
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "hooks.yaml"
    hooks = read_hooks_file(str(example))
    assert [len(hooks.get(n)) for n in ("apply-start", "pre-change", "post-change", "apply-exit")] == [
        1,
        1,
        1,
        1,
    ]
