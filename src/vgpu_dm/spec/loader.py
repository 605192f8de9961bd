"""Parse config text into a Spec, collecting every problem with its file, line, column and path.

PyYAML's C composer gives a node tree with marks; we walk it ourselves so that duplicate keys,
wrong scalar types and alias bombs are caught with a location instead of silently constructed.

Parsing time is linear in the file size: the cyclic garbage collector is paused while the tree is
built and walked (it would otherwise rescan the growing tree again and again, none of which is
garbage), and plain scalars are not type-guessed while composing: they get a placeholder tag and
are resolved only when the walk needs their type, which it rarely does (a count that is plainly
decimal digits is an integer; a key only has to be told apart from null and the merge key).
"""

from __future__ import annotations

import gc
import sys
from typing import TYPE_CHECKING

import yaml
import yaml.resolver

from vgpu_dm.device_id import DeviceID, InvalidDeviceID
from vgpu_dm.errors import ConfigError, Problem
from vgpu_dm.spec.model import ConfigEntry, Spec
from vgpu_dm.text import json_quote
from vgpu_dm.vgpu_type import InvalidVGPUType, VGPUType

NVIDIA_VENDOR = 0x10DE

if TYPE_CHECKING:
    from pathlib import Path

MAX_CONFIG_BYTES = 8 * 1024 * 1024
# Nodes visited while walking; aliases make a small file expand, this bounds the expansion.
MAX_NODES = 200_000
MAX_DEPTH = 64

_TAG = "tag:yaml.org,2002:"
_STR, _MAP, _SEQ = _TAG + "str", _TAG + "map", _TAG + "seq"
# The tag of an untagged plain scalar until the walk asks for its type (see _tag).
_PLAIN = "tag:vgpu-dm,2026:unresolved-plain-scalar"
# What YAML 1.1 reads as null in a plain scalar (PyYAML's implicit null resolver).
_NULL_WORDS = frozenset(("", "~", "null", "Null", "NULL"))
_TOP_KEYS = ("version", "vgpu-configs")
_ENTRY_KEYS = ("devices", "device-filter", "vgpu-devices")
_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


class _LazyResolver(yaml.resolver.Resolver):
    """Tags only what needs no guessing while composing: collections, quoted and explicit scalars."""

    def resolve(self, kind, value, implicit):
        if kind is yaml.ScalarNode:
            return _PLAIN if implicit[0] else _STR
        if self.yaml_path_resolvers:  # pragma: no cover - none are registered on this class
            return super().resolve(kind, value, implicit)
        return _MAP if kind is yaml.MappingNode else _SEQ


try:
    from yaml.cyaml import CParser

    _LIBYAML = True

    class _Loader(CParser, yaml.constructor.SafeConstructor, _LazyResolver):
        def __init__(self, stream):
            CParser.__init__(self, stream)
            yaml.constructor.SafeConstructor.__init__(self)
            _LazyResolver.__init__(self)

except ImportError:  # pragma: no cover - PyYAML built without libyaml
    _LIBYAML = False

    class _Loader(  # type: ignore[no-redef]
        yaml.reader.Reader,
        yaml.scanner.Scanner,
        yaml.parser.Parser,
        yaml.composer.Composer,
        yaml.constructor.SafeConstructor,
        _LazyResolver,
    ):
        def __init__(self, stream):
            yaml.reader.Reader.__init__(self, stream)
            yaml.scanner.Scanner.__init__(self)
            yaml.parser.Parser.__init__(self)
            yaml.composer.Composer.__init__(self)
            yaml.constructor.SafeConstructor.__init__(self)
            _LazyResolver.__init__(self)


_resolver: yaml.resolver.Resolver | None = None


def _tag(node: yaml.Node) -> str:
    """The node's YAML tag, guessing a plain scalar's type (PyYAML's YAML 1.1 rules) on first use."""
    tag = node.tag
    if tag == _PLAIN:
        global _resolver
        if _resolver is None:
            _resolver = yaml.resolver.Resolver()
        tag = node.tag = _resolver.resolve(yaml.ScalarNode, node.value, (True, False))
    return tag


def _is_null(node: yaml.Node) -> bool:
    tag = node.tag
    if tag == _PLAIN:
        return node.value in _NULL_WORDS
    return tag == _TAG + "null"


def _is_merge_key(node: yaml.Node) -> bool:
    tag = node.tag
    if tag == _PLAIN:
        return node.value == "<<"
    return tag == _TAG + "merge"


def _is_str(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and _tag(node) == _STR


def read_config_source(path: str) -> tuple[bytes, str]:
    """Read a config file (``-`` = stdin) with a size limit; returns (bytes, display name)."""
    if path == "-":
        name = "<stdin>"
        # A closed stdin (``<&-``) leaves sys.stdin None; a bad descriptor fails on read.
        stream = getattr(sys.stdin, "buffer", None)
        if stream is None:
            raise ConfigError(f"{name}: cannot read config file: standard input is closed (-f -)")
        try:
            data = stream.read(MAX_CONFIG_BYTES + 1)
        except (OSError, ValueError) as exc:
            why = getattr(exc, "strerror", None) or str(exc)
            raise ConfigError(f"{name}: cannot read config file from standard input (-f -): {why}") from None
    else:
        name = path
        try:
            with open(path, "rb") as fh:
                data = fh.read(MAX_CONFIG_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{name}: config file is larger than {MAX_CONFIG_BYTES // (1024 * 1024)} MiB; refusing it"
        )
    return data, name


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    tag = _tag(node).removeprefix(_TAG)
    return {
        "str": "a string",
        "int": "an integer",
        "float": "a float",
        "bool": "a boolean",
        "null": "null (empty)",
        "timestamp": "a timestamp",
        "binary": "binary data",
    }.get(tag, tag)


# Values quoted in a message are cut to this many characters: a file that is not a config at all (one
# long scalar) must not end up in the log whole.
MAX_QUOTED = 40
# More unknown top-level keys than this, and neither 'version' nor 'vgpu-configs': the file is something
# else, not a config with typos.
MAX_UNKNOWN_TOP_KEYS = 2


def _quote(value: str) -> str:
    return repr(value if len(value) <= MAX_QUOTED else value[:MAX_QUOTED] + "…")


def _describe(node: yaml.Node) -> str:
    if isinstance(node, yaml.ScalarNode) and not _is_null(node):
        return f"{_kind(node)} ({_quote(node.value)})"
    return _kind(node)


def _unknown_key(key: str, expected: tuple[str, ...]) -> str:
    from vgpu_dm.text import did_you_mean

    return f"unknown key {_quote(key)}{did_you_mean(key, expected)} (expected one of: {', '.join(expected)})"


def _key_segment(key: str, quote: bool = False) -> str:
    # JSON quoting escapes control characters, so a newline in a name cannot split a log line.
    if key and not quote and _KEY_CHARS.issuperset(key):
        return key
    return json_quote(key)


class _Walker:
    def __init__(self, source: str, size: int = 0):
        self.source = source
        self.problems: list[Problem] = []
        self.nodes = 0
        # Without aliases every node takes at least one byte of the file, so a file of many small
        # configs never reaches this limit; only repeated aliases do.
        self.max_nodes = max(MAX_NODES, size)
        self._constructor = yaml.constructor.SafeConstructor()

    # -- helpers ---------------------------------------------------------------------------------
    def error(self, node: yaml.Node | None, path: str, message: str) -> None:
        mark = node.start_mark if node is not None else None
        line = mark.line + 1 if mark else 1
        col = mark.column + 1 if mark else 1
        self.problems.append(Problem(self.source, line, col, path, message))

    def visit(self, node: yaml.Node, depth: int) -> None:
        self.nodes += 1
        if self.nodes > self.max_nodes:
            raise _TooBig(
                node,
                f"document expands to more than {self.max_nodes} YAML nodes (the limit is the file's size "
                f"in bytes, at least {MAX_NODES}); only aliases (*name, <<: *name) that repeat large parts "
                f"expand a file that far (an alias bomb); refusing it",
            )
        if depth > MAX_DEPTH:
            raise _TooBig(node, f"document is nested deeper than {MAX_DEPTH} levels; refusing it")

    def mapping(
        self, node: yaml.Node, path: str, depth: int, what: str
    ) -> list[tuple[str, yaml.Node, yaml.Node]] | None:
        """Items of a mapping node with string keys; duplicate and non-scalar keys are reported."""
        self.visit(node, depth)
        if not isinstance(node, yaml.MappingNode):
            self.error(node, path, f"expected {what} (a mapping), got {_describe(node)}")
            return None
        pairs = self.merged_pairs(node, path, depth)
        if pairs is None:
            return None
        items: dict[str, tuple[str, yaml.Node, yaml.Node]] = {}
        seen: dict[str, yaml.Node] = {}  # keys written in this mapping itself
        for key_node, value_node, own in pairs:
            if not isinstance(key_node, yaml.ScalarNode) or _is_null(key_node):
                self.error(key_node, path, f"keys must be strings, got {_describe(key_node)}")
                continue
            key = key_node.value
            if not own:
                # YAML merge rules: keys of the mapping itself win, then the first merged source.
                items.setdefault(key, (key, key_node, value_node))
                continue
            if key in seen:
                first = seen[key].start_mark.line + 1
                self.error(key_node, path, f"duplicate key {key!r} (first defined on line {first})")
                continue
            seen[key] = key_node
            items[key] = (key, key_node, value_node)
        return list(items.values())

    def merged_pairs(
        self, node: yaml.MappingNode, path: str, depth: int
    ) -> list[tuple[yaml.Node, yaml.Node, bool]] | None:
        """(key, value, own) pairs with merge keys (<<: *anchor) resolved: own pairs, then merged ones.

        Done here rather than with PyYAML's flatten_mapping so that every merged key is counted
        (a merge-key bomb hits MAX_NODES) and the precedence does not depend on the PyYAML version.
        """
        own: list[tuple[yaml.Node, yaml.Node, bool]] = []
        merged: list[tuple[yaml.Node, yaml.Node, bool]] = []
        for key_node, value_node in node.value:
            self.visit(key_node, depth + 1)
            if not _is_merge_key(key_node):
                own.append((key_node, value_node, True))
                continue
            self.visit(value_node, depth + 1)
            sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            for source in sources:
                self.visit(source, depth + 1)
                if not isinstance(source, yaml.MappingNode):
                    self.error(
                        source,
                        path,
                        f"invalid merge key: expected a mapping to merge, got {_describe(source)}",
                    )
                    return None
                inner = self.merged_pairs(source, path, depth + 1)
                if inner is None:
                    return None
                merged.extend((k, v, False) for k, v, _ in inner)
        return own + merged

    def integer(self, node: yaml.Node) -> int | None:
        """The value of an integer scalar, or None (also for a bad explicit ``!!int "abc"``)."""
        if not isinstance(node, yaml.ScalarNode):
            return None
        value = node.value
        if node.tag == _PLAIN and value.isascii() and value.isdigit() and (value[0] != "0" or value == "0"):
            return int(value)  # plain decimal digits: an int under every YAML 1.1 rule
        if _tag(node) != _TAG + "int":
            return None
        try:
            return self._constructor.construct_yaml_int(node)
        except (ValueError, IndexError):
            return None

    # -- the schema ------------------------------------------------------------------------------
    def document(self, root: yaml.Node | None) -> dict[str, tuple[ConfigEntry, ...]]:
        if root is None:
            return {}
        if isinstance(root, yaml.ScalarNode) and _is_null(root):
            return {}
        if not isinstance(root, yaml.MappingNode):
            # Not quoted: it may be any file (-f /etc/passwd), and its text is no help here.
            self.error(
                root,
                "",
                f"this is not a vGPU config file: its top level is {_kind(root)}, not a mapping with "
                f"'version: v1' and 'vgpu-configs:'",
            )
            return {}
        items = self.mapping(root, "", 0, "the top level of a vgpu config file")
        if items is None:
            return {}
        keys = {k: (kn, vn) for k, kn, vn in items}
        unknown = [(k, kn) for k, kn, _ in items if k not in _TOP_KEYS]
        if len(unknown) > MAX_UNKNOWN_TOP_KEYS and len(unknown) == len(items):
            # Some other file (-f /etc/shadow): say so once, and do not echo its lines into the log.
            lines = ", ".join(str(kn.start_mark.line + 1) for _, kn in unknown[:5])
            more = ", …" if len(unknown) > 5 else ""
            self.error(
                unknown[0][1],
                "",
                f"this is not a vGPU config file: {len(unknown)} of its {len(items)} top-level keys are "
                f"not 'version' or 'vgpu-configs' (lines {lines}{more}); a vGPU config file is a YAML "
                f"mapping with 'version: v1' and 'vgpu-configs:'",
            )
            return {}
        for key, key_node in unknown:
            self.error(key_node, "", _unknown_key(key, _TOP_KEYS))
        if "version" not in keys:
            if items:
                self.error(root, "", "missing required key 'version' (expected version: v1)")
        else:
            vnode = keys["version"][1]
            self.visit(vnode, 1)
            if _is_str(vnode) and vnode.value != "v1":
                self.error(
                    vnode,
                    "version",
                    f"unsupported version {_quote(vnode.value)}: this tool reads version v1, the only "
                    f"version of the vGPU config format (write version: v1)",
                )
            elif not _is_str(vnode):
                self.error(vnode, "version", f"expected the string v1, got {_describe(vnode)}")
        if "vgpu-configs" not in keys:
            return {}
        return self.configs(keys["vgpu-configs"][1])

    def configs(self, node: yaml.Node) -> dict[str, tuple[ConfigEntry, ...]]:
        items = self.mapping(node, "vgpu-configs", 1, "a mapping of config name to entries")
        if items is None:
            return {}
        if not items:
            self.error(node, "vgpu-configs", "must define at least one config")
        configs: dict[str, tuple[ConfigEntry, ...]] = {}
        for name, key_node, value in items:
            path = f"vgpu-configs.{_key_segment(name)}"
            self.visit(value, 2)
            if _tag(key_node) != _STR:
                self.error(
                    key_node,
                    path,
                    f"config name must be a string, got {_describe(key_node)}; quote it if it is meant "
                    f'as a name ("{name}")',
                )
                continue
            if name == "":
                self.error(key_node, path, "config name must not be empty")
                continue
            if not isinstance(value, yaml.SequenceNode):
                self.error(value, path, f"expected a list of entries, got {_describe(value)}")
                continue
            if not value.value:
                self.error(value, path, "must have at least one entry")
                continue
            entries = []
            for i, entry_node in enumerate(value.value):
                entry = self.entry(entry_node, f"{path}[{i}]")
                if entry is not None:
                    entries.append(entry)
            configs[name] = tuple(entries)
        return configs

    def entry(self, node: yaml.Node, path: str) -> ConfigEntry | None:
        items = self.mapping(node, path, 3, "a config entry")
        if items is None:
            return None
        fields = {k: v for k, _, v in items}
        ok = True
        for key, key_node, _ in items:
            if key not in _ENTRY_KEYS:
                self.error(key_node, path, _unknown_key(key, _ENTRY_KEYS))
                ok = False
        for required in ("devices", "vgpu-devices"):
            if required not in fields:
                self.error(node, path, f"missing required key {required!r}")
                ok = False
        devices = self.devices(fields["devices"], f"{path}.devices") if "devices" in fields else None
        filters = (
            self.device_filter(fields["device-filter"], f"{path}.device-filter")
            if "device-filter" in fields
            else ()
        )
        vgpus = (
            self.vgpu_devices(fields["vgpu-devices"], f"{path}.vgpu-devices")
            if "vgpu-devices" in fields
            else None
        )
        if not ok or devices is None or filters is None or vgpus is None:
            return None
        return ConfigEntry(
            devices=devices[1],
            device_filter=filters,
            vgpu_devices=vgpus,
            path=path,
            line=node.start_mark.line + 1,
        )

    def devices(self, node: yaml.Node, path: str) -> tuple[bool, tuple[int, ...] | None] | None:
        self.visit(node, 4)
        if _is_str(node):
            if node.value == "all":
                return True, None
            self.error(node, path, f"expected 'all' or a list of GPU indices, got {_describe(node)}")
            return None
        if not isinstance(node, yaml.SequenceNode):
            self.error(node, path, f"expected 'all' or a list of GPU indices, got {_describe(node)}")
            return None
        if not node.value:
            self.error(node, path, "empty list selects no GPU; use 'all' or list at least one GPU index")
            return None
        indices: list[int] = []
        seen: dict[int, int] = {}
        good = True
        for i, item in enumerate(node.value):
            self.visit(item, 5)
            where = f"{path}[{i}]"
            value = self.integer(item)
            if value is None:
                self.error(item, where, f"expected a GPU index (an integer >= 0), got {_describe(item)}")
                good = False
                continue
            if value < 0:
                self.error(item, where, f"GPU index must be >= 0, got {value}")
                good = False
            elif value in seen:
                self.error(item, where, f"GPU index {value} is listed twice (first at [{seen[value]}])")
                good = False
            else:
                seen[value] = i
                indices.append(value)
        return (True, tuple(indices)) if good else None

    def device_filter(self, node: yaml.Node, path: str) -> tuple[DeviceID, ...] | None:
        self.visit(node, 4)
        if isinstance(node, yaml.SequenceNode):
            items = [(f"{path}[{i}]", item) for i, item in enumerate(node.value)]
            if not items:
                self.error(node, path, "empty list: leave device-filter out to select GPUs of every model")
                return None
        else:
            items = [(path, node)]
        filters: list[DeviceID] = []
        good = True
        for where, item in items:
            self.visit(item, 5)
            if not _is_str(item):
                hint = ""
                if isinstance(item, yaml.ScalarNode) and _tag(item) == _TAG + "int":
                    hint = ' (an unquoted 0x... is read as a number by YAML; quote it: "0x1EB810DE")'
                self.error(item, where, f"expected a device id string, got {_describe(item)}{hint}")
                good = False
                continue
            if item.value == "":
                # Upstream reads "" as "every GPU"; a filter that looks set but selects everything is
                # more likely a templating slip than a wish, so it must be said by leaving the key out.
                self.error(item, where, "empty device id: leave device-filter out to select every GPU")
                good = False
                continue
            try:
                parsed = DeviceID.parse(item.value)
            except InvalidDeviceID as exc:
                self.error(item, where, str(exc))
                good = False
                continue
            if parsed.vendor != NVIDIA_VENDOR:
                # Only NVIDIA GPUs are ever matched, so any other vendor half would match nothing.
                self.error(
                    item,
                    where,
                    f"invalid device id {item.value!r}: the vendor half is 0x{parsed.vendor:04X}, not "
                    f"NVIDIA's 0x10DE; expected 0xDDDDVVVV (device then vendor, e.g. 0x1EB810DE) with "
                    f"an optional :0xSSSSVVVV subsystem part",
                )
                good = False
                continue
            filters.append(parsed)
        return tuple(filters) if good else None

    def vgpu_devices(self, node: yaml.Node, path: str) -> tuple[tuple[VGPUType, int], ...] | None:
        items = self.mapping(node, path, 4, "a mapping of vGPU type to count")
        if items is None:
            return None
        good = True
        result: list[tuple[VGPUType, int]] = []
        zero_nodes: list[tuple[str, yaml.Node]] = []
        for name, key_node, value in items:
            where = f"{path}.{_key_segment(name, quote=True)}"
            self.visit(value, 5)
            try:
                vtype = VGPUType.parse(name)
            except InvalidVGPUType as exc:
                self.error(key_node, where, f"{exc}{_type_hint(name)}")
                good = False
                vtype = None
            count = self.integer(value)
            if count is None:
                self.error(value, where, f"count must be an integer > 0, got {_describe(value)}")
                good = False
                continue
            if count == 0:
                zero_nodes.append((where, value))
                continue
            if count < 0:
                self.error(value, where, f"count must be an integer > 0, got {count}")
                good = False
                continue
            if vtype is not None:
                result.append((vtype, count))
        if zero_nodes and len(zero_nodes) == len(items):
            self.error(
                node, path, "every count is 0; write 'vgpu-devices: {}' to mean no vGPUs on these GPUs"
            )
            good = False
        else:
            for where, value in zero_nodes:
                self.error(value, where, "count must be an integer > 0, got 0 (leave the type out instead)")
                good = False
        kinds = {t.is_mig_backed for t, _ in result}
        if len(kinds) > 1:
            mig = ", ".join(t.name for t, _ in result if t.is_mig_backed)
            ts = ", ".join(t.name for t, _ in result if not t.is_mig_backed)
            self.error(node, path, f"mixes time-sliced ({ts}) and MIG-backed ({mig}) vGPU types in one entry")
            good = False
        return tuple(result) if good else None


def _type_hint(name: str) -> str:
    """A catalog vGPU type the mistyped ``name`` probably means (``T4-1q`` → ``T4-1Q``), or ``""``."""
    from vgpu_dm import catalog  # only on this error path
    from vgpu_dm.text import did_you_mean

    return did_you_mean(name, (t for gpu in catalog.load() for t in gpu.vgpu_types))


class _TooBig(Exception):
    def __init__(self, node: yaml.Node, message: str):
        super().__init__(message)
        self.node = node


def _line_col(text: str, position: int) -> tuple[int, int]:
    """1-based line and column of a character offset."""
    line_start = text.rfind("\n", 0, position) + 1
    return text.count("\n", 0, position) + 1, position - line_start + 1


def load_spec(data: bytes | str, source: str = "<config>") -> Spec:
    """Parse and validate a whole config file; raises ConfigError listing every problem."""
    if isinstance(data, bytes):
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{source}: config file is larger than {MAX_CONFIG_BYTES // (1024 * 1024)} MiB")
        try:
            # What the utf-8-sig codec does, without importing it: a leading byte-order mark is dropped.
            text = data.decode("utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise ConfigError(
                [Problem(source, line, 1, "", f"not valid UTF-8 text ({exc.reason})")]
            ) from None
    else:
        text = data
    # Nothing in the node tree is garbage until we are done with it: do not let the collector rescan it.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _parse(text, source)
    finally:
        if collecting:
            gc.enable()


def _parse(text: str, source: str) -> Spec:
    root = compose(text, source)
    walker = _Walker(source, len(text))
    try:
        configs = walker.document(root)
    except _TooBig as exc:
        walker.error(exc.node, "", str(exc))
        configs = {}
    if walker.problems:
        raise ConfigError(sorted(walker.problems, key=lambda p: (p.line, p.column)))
    return Spec(source=source, configs=configs)


def compose(text: str, source: str) -> yaml.Node | None:
    """The YAML node tree of ``text`` (marks for locations, plain scalars untyped until asked); a
    ConfigError located at the problem when it is not YAML. Shared with other files of ours (hooks)."""
    try:
        return yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        what = " ".join(x for x in (exc.context, exc.problem) if x) or "malformed document"
        raise ConfigError([Problem(source, line, col, "", f"invalid YAML/JSON: {what}")]) from None
    except yaml.reader.ReaderError as exc:  # a control character: locate it instead of saying 1:1
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        position = exc.position
        if _LIBYAML:  # libyaml counts bytes of the UTF-8 encoding
            position = len(text.encode("utf-8", "replace")[:position].decode("utf-8", "ignore"))
        line, col = _line_col(text, position)
        message = f"invalid YAML/JSON: unacceptable character #x{char:04x}: {exc.reason}"
        raise ConfigError([Problem(source, line, col, "", message)]) from None
    except UnicodeEncodeError as exc:  # str input with a lone surrogate
        line, col = _line_col(text, exc.start)
        raise ConfigError([Problem(source, line, col, "", f"not valid text ({exc.reason})")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(source, 1, 1, "", f"invalid YAML/JSON: {exc}")]) from None
    except RecursionError:
        raise ConfigError([Problem(source, 1, 1, "", "document is nested too deeply; refusing it")]) from None


def load_spec_file(path: str | Path) -> Spec:
    data, name = read_config_source(str(path))
    return load_spec(data, name)


# -- Shared with the hooks file's parser (hooks/spec.py), which walks its YAML the same way -----------
# The public names of the pieces it builds on: the generic walker (mappings, strings, located errors,
# node and depth limits), the node helpers, and the exception that ends a walk over a too-big file.
Walker = _Walker
WalkTooBig = _TooBig
YAML_TAG = _TAG
node_tag = _tag
is_null = _is_null
is_str = _is_str
describe_node = _describe
