"""Upstream's flag spellings for ``nvidia-k8s-vgpu-dm``, turned into the ones click parses.

The upstream agent parses its command line with urfave/cli v2 on Go's ``flag`` package
(cmd/nvidia-k8s-vgpu-dm/main.go, NVIDIA/vgpu-device-manager v0.5.0), so a manifest written for it may
spell any flag or alias with one dash or two (``-node-name x``, ``--ns x``, ``--n x``), join a value
with ``=`` (``-f=/path``), and give a boolean as ``-with-reboot``, ``--with-reboot=true`` or
``-r=false`` (Go's ``strconv.ParseBool`` values). click alone reads ``-node-name`` as ``-n ode-name``
and refuses a value on a flag, so the arguments are rewritten first: every long name and alias, with
one dash or two, becomes the option's ``--long`` spelling; a boolean's ``=false`` becomes its
``--no-…`` form. A single-dash word that names no flag is refused, as Go does (click would read
``-nfoo`` as ``-n foo``). Anything else is left for click to parse (and to reject with a usage error).
"""

from __future__ import annotations

import click

# Go's strconv.ParseBool.
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def _table(command: click.Command) -> dict[str, tuple[click.Option, str, str | None]]:
    """bare name → (option, spelling for true/with a value, spelling for false)."""
    names: dict[str, tuple[click.Option, str, str | None]] = {}
    for param in command.params:
        if not isinstance(param, click.Option):
            continue
        long = max((o for o in param.opts if o.startswith("--")), key=len, default=param.opts[0])
        negative = next((o for o in param.secondary_opts if o.startswith("--")), None)
        for opt in param.opts:
            names[opt.lstrip("-")] = (param, long, negative)
        for opt in param.secondary_opts:
            names[opt.lstrip("-")] = (param, opt, long)
    return names


def upstream_argv(argv: list[str], command: click.Command) -> list[str]:
    """``argv`` with upstream's spellings rewritten for click (see the module doc)."""
    names = _table(command)
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--" or not arg.startswith("-") or arg == "-":
            out.append(arg)
            if arg == "--":
                out += argv[i:]
                break
            continue
        body = arg[2:] if arg.startswith("--") else arg[1:]
        name, eq, value = body.partition("=")
        if name in ("h", "help"):
            out.append("--help")
            continue
        hit = names.get(name)
        if hit is None:
            if not arg.startswith("--") and len(name) > 1:
                # Go's flag package reads -abc as one flag named abc; click would read -n bc.
                raise click.NoSuchOption(arg.split("=")[0])
            out.append(arg)
            continue
        param, spelling, negative = hit
        if param.is_flag:
            if not eq or value in _TRUE:
                out.append(spelling)
            elif value in _FALSE:
                if negative:
                    out.append(negative)
            else:
                raise click.UsageError(f"invalid boolean value {value!r} for {arg.split('=')[0]}")
            continue
        if eq:
            out.append(f"{spelling}={value}")
        else:
            out.append(spelling)
            if i < len(argv):
                out.append(argv[i])  # the value, as it is (it may start with a dash)
                i += 1
    return out
