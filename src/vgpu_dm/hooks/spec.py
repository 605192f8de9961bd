"""The hooks file (v1): programs apply runs at its stage boundaries, parsed with located errors.

```yaml
version: v1
hooks:
  pre-change:
    - command: /usr/bin/systemctl
      args: ["stop", "my-gpu-client.service"]
      env: {SYSTEMD_LOG_LEVEL: "info"}
      workdir: /
      timeout: 60
```

Modelled on nvidia-mig-parted's hooks file (reference/kvm-host.md §F), stricter on purpose: an
unknown key or hook name is an error instead of being ignored, keys are case-sensitive, and a YAML
boolean or null where a string belongs is an error (mig-parted turns ``yes`` into ``"true"``);
numbers are taken as written (``1.10`` stays ``1.10``). mig-parted's ``envs`` is accepted for ``env``.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import yaml

from vgpu_dm.errors import ConfigError, Problem
from vgpu_dm.spec.loader import (
    YAML_TAG,
    Walker,
    WalkTooBig,
    compose,
    describe_node,
    is_null,
    is_str,
    node_tag,
)

APPLY_START, PRE_CHANGE, POST_CHANGE, APPLY_EXIT = "apply-start", "pre-change", "post-change", "apply-exit"
HOOK_NAMES = (APPLY_START, PRE_CHANGE, POST_CHANGE, APPLY_EXIT)
# mig-parted's hook names, to point a user who copies a mig-parted hooks file at ours.
_MIG_PARTED_NAMES = {"pre-apply-mode": PRE_CHANGE, "pre-apply-config": PRE_CHANGE}
_HOOK_KEYS = ("command", "args", "env", "envs", "workdir", "timeout")
_ENV_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
RESERVED_ENV_PREFIX = "VGPU_DM_"  # set by the tool for every hook
DEFAULT_TIMEOUT = 300.0  # seconds; stopping services or VMs may take minutes
MAX_TIMEOUT = 24 * 3600.0
MAX_HOOKS_BYTES = 1024 * 1024


class Hook(NamedTuple):
    """One program to run."""

    command: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    workdir: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    where: str = ""  # file:line of its entry, for messages

    def describe(self) -> str:
        """The command line as a shell would need it typed (the hook itself runs without a shell)."""
        import shlex

        return shlex.join([self.command, *self.args])


class HooksFile(NamedTuple):
    source: str
    hooks: dict[str, tuple[Hook, ...]]

    def get(self, name: str) -> tuple[Hook, ...]:
        return self.hooks.get(name, ())


def read_hooks_file(path: str) -> HooksFile:
    """Read and validate a hooks file; ConfigError lists every problem with file:line:column."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_HOOKS_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read hooks file: {exc.strerror or exc}") from None
    if len(data) > MAX_HOOKS_BYTES:
        raise ConfigError(f"{path}: hooks file is larger than {MAX_HOOKS_BYTES // 1024} KiB; refusing it")
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError([Problem(path, line, 1, "", f"not valid UTF-8 text ({exc.reason})")]) from None
    return parse_hooks(text, path)


def parse_hooks(text: str, source: str = "<hooks>") -> HooksFile:
    root = compose(text, source)
    walker = _HooksWalker(source, len(text))
    try:
        hooks = walker.document(root)
    except WalkTooBig as exc:
        walker.error(exc.node, "", str(exc))
        hooks = {}
    if walker.problems:
        raise ConfigError(sorted(walker.problems, key=lambda p: (p.line, p.column)))
    return HooksFile(source, hooks)


class _HooksWalker(Walker):
    def document(self, root: yaml.Node | None) -> dict[str, tuple[Hook, ...]]:
        if root is None or (isinstance(root, yaml.ScalarNode) and is_null(root)):
            self.error(root, "", "empty hooks file; expected 'version: v1' and 'hooks:'")
            return {}
        items = self.mapping(root, "", 0, "the top level of a hooks file")
        if items is None:
            return {}
        keys = {k: v for k, _, v in items}
        for key, key_node, _ in items:
            if key not in ("version", "hooks"):
                self.error(key_node, "", f"unknown key {key!r}; expected one of: version, hooks")
        if "version" not in keys:
            self.error(root, "", "missing required key 'version' (expected version: v1)")
        elif not (is_str(keys["version"]) and keys["version"].value == "v1"):
            self.error(
                keys["version"],
                "version",
                f"unsupported version {describe_node(keys['version'])}; expected v1",
            )
        node = keys.get("hooks")
        if node is None or (isinstance(node, yaml.ScalarNode) and is_null(node)):
            return {}
        named = self.mapping(node, "hooks", 1, "a mapping of hook name to a list of programs")
        if named is None:
            return {}
        hooks: dict[str, tuple[Hook, ...]] = {}
        for name, key_node, value in named:
            path = f"hooks.{name}"
            if name not in HOOK_NAMES:
                hint = _MIG_PARTED_NAMES.get(name)
                also = f" (nvidia-mig-parted's {name} corresponds to {hint} here)" if hint else ""
                self.error(
                    key_node, path, f"unknown hook {name!r}; expected one of: {', '.join(HOOK_NAMES)}{also}"
                )
                continue
            if isinstance(value, yaml.ScalarNode) and is_null(value):
                hooks[name] = ()
                continue
            if not isinstance(value, yaml.SequenceNode):
                self.error(value, path, f"expected a list of programs to run, got {describe_node(value)}")
                continue
            entries = [self.hook(item, f"{path}[{i}]") for i, item in enumerate(value.value)]
            hooks[name] = tuple(e for e in entries if e is not None)
        return hooks

    def hook(self, node: yaml.Node, path: str) -> Hook | None:
        items = self.mapping(node, path, 3, "a program to run (command, args, env, workdir, timeout)")
        if items is None:
            return None
        fields: dict[str, yaml.Node] = {}
        ok = True
        for key, key_node, value in items:
            if key not in _HOOK_KEYS:
                self.error(
                    key_node,
                    path,
                    f"unknown key {key!r}; expected one of: command, args, env, workdir, timeout",
                )
                ok = False
            elif key in ("env", "envs") and ("env" if key == "envs" else "envs") in fields:
                self.error(
                    key_node, path, "both 'env' and 'envs' given; use one ('envs' is mig-parted's name)"
                )
                ok = False
            else:
                fields[key] = value
        if "command" not in fields:
            self.error(node, path, "missing required key 'command'")
            return None
        command = self.string(fields["command"], f"{path}.command")
        if command is not None:
            if not command:
                self.error(fields["command"], f"{path}.command", "empty command")
                command = None
            elif "/" in command and not command.startswith("/"):
                self.error(
                    fields["command"],
                    f"{path}.command",
                    f"relative path {command!r}: give an absolute path, or a bare name to look up in PATH",
                )
                command = None
        args = self.args(fields["args"], f"{path}.args") if "args" in fields else ()
        env_node = fields.get("env", fields.get("envs"))
        env = (
            self.env(env_node, f"{path}.{'env' if 'env' in fields else 'envs'}")
            if env_node is not None
            else ()
        )
        workdir = None
        if "workdir" in fields:
            workdir = self.string(fields["workdir"], f"{path}.workdir")
            if workdir is not None and not workdir.startswith("/"):
                self.error(
                    fields["workdir"], f"{path}.workdir", f"expected an absolute directory, got {workdir!r}"
                )
                workdir = None
                ok = False
        timeout = DEFAULT_TIMEOUT
        if "timeout" in fields:
            found = self.seconds(fields["timeout"], f"{path}.timeout")
            if found is None:
                ok = False
            else:
                timeout = found
        if not ok or command is None or args is None or env is None:
            return None
        return Hook(command, args, env, workdir, timeout, f"{self.source}:{node.start_mark.line + 1}")

    def string(self, node: yaml.Node, path: str) -> str | None:
        """A scalar as text: strings as they are, numbers as written; booleans and null are errors."""
        self.visit(node, 5)
        if not isinstance(node, yaml.ScalarNode):
            self.error(node, path, f"expected a string, got {describe_node(node)}")
            return None
        tag = node_tag(node)
        if tag in (YAML_TAG + "bool", YAML_TAG + "null"):
            self.error(
                node, path, f"expected a string, got {describe_node(node)}; quote it if it is meant as text"
            )
            return None
        if tag not in (YAML_TAG + "str", YAML_TAG + "int", YAML_TAG + "float"):
            self.error(node, path, f"expected a string, got {describe_node(node)}; quote it")
            return None
        if "\x00" in node.value:
            self.error(node, path, "contains a NUL character")
            return None
        return node.value

    def args(self, node: yaml.Node, path: str) -> tuple[str, ...] | None:
        self.visit(node, 4)
        if isinstance(node, yaml.ScalarNode) and is_null(node):
            return ()
        if not isinstance(node, yaml.SequenceNode):
            hint = " (one list item per argument; no shell splits it)" if is_str(node) else ""
            self.error(node, path, f"expected a list of arguments, got {describe_node(node)}{hint}")
            return None
        values = [self.string(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        return None if any(v is None for v in values) else tuple(v for v in values if v is not None)

    def env(self, node: yaml.Node, path: str) -> tuple[tuple[str, str], ...] | None:
        if isinstance(node, yaml.ScalarNode) and is_null(node):
            return ()
        items = self.mapping(node, path, 4, "a mapping of environment variable name to value")
        if items is None:
            return None
        result: list[tuple[str, str]] = []
        good = True
        for name, key_node, value in items:
            where = f"{path}.{name}"
            if not re.fullmatch(_ENV_NAME, name):
                self.error(key_node, where, f"invalid environment variable name {name!r}")
                good = False
                continue
            if name.startswith(RESERVED_ENV_PREFIX):
                self.error(
                    key_node, where, f"{name}: names starting with {RESERVED_ENV_PREFIX} are set by the tool"
                )
                good = False
                continue
            text = self.string(value, where)
            if text is None:
                good = False
                continue
            result.append((name, text))
        return tuple(result) if good else None

    def seconds(self, node: yaml.Node, path: str) -> float | None:
        self.visit(node, 4)
        value = None
        if isinstance(node, yaml.ScalarNode) and node_tag(node) in (YAML_TAG + "int", YAML_TAG + "float"):
            try:
                value = float(node.value.replace("_", ""))
            except ValueError:
                value = None
        if value is None or not (0 < value <= MAX_TIMEOUT):
            self.error(
                node,
                path,
                f"expected a number of seconds > 0 and <= {MAX_TIMEOUT:g}, got {describe_node(node)}",
            )
            return None
        return value
