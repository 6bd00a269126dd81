"""Reading one YAML mapping from a file that nobody vouches for: the one loader of every spec and config file.

``yaml.safe_load`` is not enough for input written by people or tools: it keeps the last of two equal keys without a
word, expands a "billion laughs" document of a few hundred bytes into billions of references that the next consumer
walks one by one, recurses once per nesting level (a file of ``[`` characters is a ``RecursionError``), decodes
bytes with whatever it guesses, returns dates, sets, byte strings and NaN that JSON (and so the Kubernetes API) has
no word for, and reads a 4,301-digit integer into a ``ValueError``. This loader builds the document from the
parser's events itself (libyaml's C parser where PyYAML has it), one event at a time and without recursion, and
every rule below is a :class:`~trainer.config.errors.ConfigError` with a one-line reason:

- the file is a regular file of at most :data:`MAX_BYTES` (256 KiB: a spec is a few KiB; the bound keeps the worst
  case, a file of one-character list items, under a second);
- UTF-8 text (a UTF-8 byte-order mark is skipped), not binary (no NUL byte), with exactly one YAML document whose
  top level is a mapping (an empty file, a comment-only file or a second ``---`` document is an error);
- no key twice in any mapping (the error names the key's path and both line numbers); keys are strings;
- nesting at most :data:`MAX_DEPTH` levels deep;
- aliases repeat at most :data:`MAX_ALIAS_NODES` nodes in all (a small document cannot expand beyond its size plus
  that), and no alias refers to the collection it sits in;
- only what JSON has: mappings, lists, strings, integers that fit 64 bits, finite floats, booleans and null; a JSON
  number with an exponent and no dot (``1e-05``) is a float, as in YAML 1.2 and Kubernetes (YAML 1.1: a string).
  Unquoted dates stay strings (as Kubernetes reads YAML); ``!!binary``, ``!!set``, ``!!timestamp``, ``!!python/...``
  and other tags are errors. Merge keys (``<<: *defaults``) work as in YAML 1.1, explicit keys winning.

Standard library and PyYAML only (no torch), so ``dino-ctl validate``, curation and the trainer share it.
"""

from __future__ import annotations

import copy
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
import yaml.reader
from yaml import events
from yaml.constructor import SafeConstructor
from yaml.nodes import ScalarNode
from yaml.resolver import Resolver

from trainer.config.errors import ConfigError

try:
    from yaml.cyaml import CParser as _CParser
except ImportError:  # PyYAML built without libyaml: the pure-Python parser gives the same events
    _CParser = None

__all__ = ["MAX_ALIAS_NODES", "MAX_BYTES", "MAX_DEPTH", "parse_yaml_mapping", "read_yaml_mapping"]

MAX_BYTES = 256 << 10
"""Largest file read, in bytes (256 KiB)."""
MAX_DEPTH = 64
"""Deepest nesting of mappings and lists (a spec needs about 8; deeper input would only recurse its consumers)."""
MAX_ALIAS_NODES = 10_000
"""Nodes (scalars, lists, mappings) that all aliases of a document may repeat together."""

_INT64 = (-(2**63), 2**63 - 1)
_JSON_EXPONENT = re.compile(r"^-?(0|[1-9][0-9]*)(\.[0-9]*)?[eE][-+]?[0-9]+$")
_YAML = "tag:yaml.org,2002:"
_SCALAR_TAGS = {f"{_YAML}{name}" for name in ("str", "int", "float", "bool", "null", "value")}
_MERGE = f"{_YAML}merge"
_ALLOWED_TAGS = "plain YAML: mappings, lists, strings, numbers, true/false and null (tags !!str, !!int, !!float, " \
    "!!bool, !!null, !!seq, !!map)"
_TYPE_NAMES = {dict: "a mapping", list: "a list", str: "a string", int: "an integer", float: "a number",
               bool: "a boolean", type(None): "null"}
_CONSTRUCTOR = SafeConstructor()
_RESOLVER = Resolver()


def _parser(text: str) -> Any:
    """An event source for ``text``: libyaml's C parser where PyYAML was built with it (about 30x faster)."""
    if _CParser is not None:
        return _CParser(text)
    return yaml.SafeLoader(text)  # the pure-Python reader, scanner and parser (same events)


@dataclass
class _Frame:
    """An open mapping or list while its events arrive."""

    container: dict[str, Any] | list[Any]
    path: str
    anchor: str | None
    line: int
    size: int = 1
    key: str | None = None
    """Mappings: the key whose value comes next (None: a key comes next)."""
    key_line: int = 0
    merge_next: bool = False
    lines: dict[str, int] = field(default_factory=dict)
    """Mappings: the line of each explicit key."""
    merges: list[dict[str, Any]] = field(default_factory=list)


class _Builder:
    """Builds one document from parser events with the rules of the module docstring."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.stack: list[_Frame] = []
        self.anchors: dict[str, tuple[Any, int]] = {}
        self.alias_nodes = 0
        self.root: Any = None
        self.done = False

    def fail(self, path: str, value: Any, allowed: str, line: int) -> ConfigError:
        return ConfigError(path or self.source, value, allowed, context=f"at line {line}")

    # -- placing a finished value ----------------------------------------------------------------------------------
    def child_path(self) -> str:
        if not self.stack:
            return ""
        top = self.stack[-1]
        if isinstance(top.container, list):
            return f"{top.path}[{len(top.container)}]"
        key = top.key if top.key is not None else "<key>"
        return f"{top.path}.{key}" if top.path else key

    def place(self, value: Any, size: int, line: int) -> None:
        if not self.stack:
            self.root, self.done = value, True
            return
        top = self.stack[-1]
        top.size += size
        if isinstance(top.container, list):
            top.container.append(value)
            return
        if top.merge_next:
            self.merge(top, value, line)
        elif top.key is None:
            self.key(top, value, line)
        else:
            top.container[top.key] = value
            top.key = None

    def key(self, top: _Frame, value: Any, line: int) -> None:
        path = f"{top.path}.<key>" if top.path else "<key>"
        if not isinstance(value, str):
            raise self.fail(path, value, "a string key (quote it: yes/no/on/off are booleans in YAML 1.1)", line)
        if value in top.lines:
            where = f"{top.path}.{value}" if top.path else value
            raise ConfigError(where, value, "each key once per mapping (YAML would keep only the last one)",
                              context=f"at lines {top.lines[value]} and {line}")
        top.lines[value], top.key, top.key_line = line, value, line

    def merge(self, top: _Frame, value: Any, line: int) -> None:
        top.merge_next = False
        sources = value if isinstance(value, list) else [value]
        if not sources or not all(isinstance(source, dict) for source in sources):
            path = f"{top.path}.<<" if top.path else "<<"
            raise self.fail(path, _TYPE_NAMES.get(type(value), "?"), "a mapping or a list of mappings to merge", line)
        top.merges.extend(sources)

    # -- events ----------------------------------------------------------------------------------------------------
    def scalar(self, event: events.ScalarEvent) -> None:
        line = event.start_mark.line + 1
        tag = event.tag
        if tag is None or tag == "!":
            tag = _RESOLVER.resolve(ScalarNode, event.value, event.implicit) if tag is None else f"{_YAML}str"
            if tag == f"{_YAML}timestamp":
                tag = f"{_YAML}str"  # an unquoted date stays the text it is (as Kubernetes reads YAML)
            elif tag == f"{_YAML}str" and event.implicit[0] and _JSON_EXPONENT.match(event.value):
                # YAML 1.1 needs a dot in a float, so JSON's 1e-05 (json.dumps, kubectl -o json) would be a string;
                # YAML 1.2 and Kubernetes read it as the number it is
                tag = f"{_YAML}float"
        top = self.stack[-1] if self.stack else None
        if tag == _MERGE:
            if top is None or not isinstance(top.container, dict) or top.key is not None:
                tag = f"{_YAML}str"  # '<<' anywhere but in a key's place is the text '<<'
            else:
                self.key(top, "<<", line)  # a second '<<' in one mapping is a duplicate key
                top.key, top.merge_next = None, True
                top.size += 1
                return
        value = self.construct(tag, event.value, line)
        self.remember(event.anchor, value, 1)
        self.place(value, 1, line)

    def construct(self, tag: str, text: str, line: int) -> Any:
        path = self.child_path()
        if tag not in _SCALAR_TAGS:
            raise self.fail(path, tag.replace(_YAML, "!!"), _ALLOWED_TAGS, line)
        kind = tag.removeprefix(_YAML)
        if kind in ("str", "value"):
            return text
        node = ScalarNode(tag, text)
        try:
            value = getattr(_CONSTRUCTOR, f"construct_yaml_{kind}")(node)
        except (ValueError, KeyError, TypeError, IndexError, OverflowError):
            allowed = "an integer that fits 64 bits" if kind == "int" else f"a {kind} written as YAML writes one"
            raise self.fail(path, text[:40], allowed, line) from None
        if kind == "int" and not _INT64[0] <= value <= _INT64[1]:
            raise self.fail(path, text[:40], "an integer that fits 64 bits (-2^63 .. 2^63-1)", line)
        if kind == "float" and not math.isfinite(value):
            raise self.fail(path, text, "a finite number (JSON and the Kubernetes API have no NaN or infinity)", line)
        return value

    def start(self, event: events.CollectionStartEvent, container: dict[str, Any] | list[Any]) -> None:
        line = event.start_mark.line + 1
        tag = event.tag
        expected = f"{_YAML}{'map' if isinstance(container, dict) else 'seq'}"
        path = self.child_path()
        if tag not in (None, "!", expected):
            raise self.fail(path, tag.replace(_YAML, "!!"), _ALLOWED_TAGS, line)
        top = self.stack[-1] if self.stack else None
        if top is not None and isinstance(top.container, dict) and top.key is None and not top.merge_next:
            raise self.fail(f"{top.path}.<key>" if top.path else "<key>", "a " + ("mapping" if isinstance(
                container, dict) else "list"), "a string key", line)
        if len(self.stack) >= MAX_DEPTH:
            raise self.fail(path, f"{len(self.stack) + 1} levels", f"at most {MAX_DEPTH} levels of nesting", line)
        self.stack.append(_Frame(container=container, path=path, anchor=event.anchor, line=line))

    def end(self, line: int) -> None:
        frame = self.stack.pop()
        value = frame.container
        if frame.merges:
            merged: dict[str, Any] = {}
            for source in frame.merges:  # YAML 1.1: earlier merged mappings win over later ones
                for key, item in source.items():
                    merged.setdefault(key, item)
            merged.update(value)  # explicit keys win over merged ones
            value = merged
        self.remember(frame.anchor, value, frame.size)
        self.place(value, frame.size, line)

    def remember(self, anchor: str | None, value: Any, size: int) -> None:
        if anchor is not None:
            self.anchors[anchor] = (value, size)

    def alias(self, event: events.AliasEvent) -> None:
        line = event.start_mark.line + 1
        path = self.child_path()
        if any(frame.anchor == event.anchor for frame in self.stack):
            raise self.fail(path, f"*{event.anchor}", "an alias outside the collection it names (no recursion)", line)
        if event.anchor not in self.anchors:
            raise self.fail(path, f"*{event.anchor}", "an alias of an anchor (&name) defined before it", line)
        value, size = self.anchors[event.anchor]
        self.alias_nodes += size
        if self.alias_nodes > MAX_ALIAS_NODES:
            raise self.fail(path, f"*{event.anchor}",
                            f"aliases that repeat at most {MAX_ALIAS_NODES:,} nodes in all (this one brings the "
                            f"document to {self.alias_nodes:,}: a 'billion laughs' expansion)", line)
        top = self.stack[-1] if self.stack else None
        if top is not None and top.merge_next:
            top.size += size
            self.merge(top, value, line)  # merged keys are copied into the new mapping, the source stays as it is
            return
        self.place(copy.deepcopy(value), size, line)  # a copy: the consumers may edit what they were given


def _one_line(exc: yaml.YAMLError, text: str) -> str:
    if isinstance(exc, yaml.reader.ReaderError):  # PyYAML's reader: a character YAML does not allow
        position = min(max(exc.position, 0), len(text))
        line = text.count("\n", 0, position) + 1
        column = position - (text.rfind("\n", 0, position) + 1) + 1
        return f"character U+{exc.character:04X} ({exc.reason}) at line {line}, column {column}"
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        problem = exc.problem or exc.context or "invalid YAML"
        return f"{problem} at line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}"
    return " ".join(str(exc).split())[:200]


def _document(text: str, source: str) -> Any:
    builder = _Builder(source)
    parser = None
    documents = 0
    try:
        parser = _parser(text)
        while True:
            event = parser.get_event()
            if isinstance(event, events.StreamEndEvent):
                break
            if isinstance(event, events.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    line = event.start_mark.line + 1
                    raise ConfigError(source, "a second YAML document", "one document (no second '---')",
                                      context=f"at line {line}")
            elif isinstance(event, events.ScalarEvent):
                builder.scalar(event)
            elif isinstance(event, events.MappingStartEvent):
                builder.start(event, {})
            elif isinstance(event, events.SequenceStartEvent):
                builder.start(event, [])
            elif isinstance(event, (events.MappingEndEvent, events.SequenceEndEvent)):
                builder.end(event.start_mark.line + 1)
            elif isinstance(event, events.AliasEvent):
                builder.alias(event)
    except yaml.YAMLError as exc:
        raise ConfigError(source, _one_line(exc, text), "valid YAML") from None
    finally:
        dispose = getattr(parser, "dispose", None) if parser is not None else None
        if dispose is not None:
            dispose()
    if documents == 0:
        raise ConfigError(source, "an empty file", "one YAML mapping")
    return builder.root


def _text(data: bytes, source: str) -> str:
    for bom, name in ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
                      (b"\xfe\xff", "UTF-16")):
        if data.startswith(bom):
            raise ConfigError(source, f"{name} text", "UTF-8 text (save the file as UTF-8)")
    data = data.removeprefix(b"\xef\xbb\xbf")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise ConfigError(source, "binary data", "UTF-8 text", context=f"(a NUL byte at offset {nul})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(source, f"byte 0x{data[exc.start]:02x}", "UTF-8 text (save the file as UTF-8)",
                          context=f"at line {line}, column {column}") from None


def parse_yaml_mapping(data: bytes | str, *, source: str = "<document>", allow_empty: bool = False) -> dict[str, Any]:
    """The one YAML mapping ``data`` holds, under the rules of the module docstring; :class:`ConfigError` otherwise
    (``path`` is ``source`` for file-level problems, the dotted key path for problems inside the document).

    ``allow_empty``: an empty file (or one holding only comments or ``null``) is ``{}`` instead of an error.
    """
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if len(data) > MAX_BYTES:
        raise ConfigError(source, f"{len(data):,} bytes", f"at most {MAX_BYTES:,} bytes (256 KiB)")
    text = _text(data, source)
    try:
        document = _document(text, source)
    except ConfigError:
        if allow_empty and not text.strip(" \t\r\n\ufeff"):
            return {}
        raise
    if document is None and allow_empty:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(source, _TYPE_NAMES.get(type(document), type(document).__name__), "one YAML mapping at the top")
    return document


def read_yaml_mapping(path: str | os.PathLike[str], *, allow_empty: bool = False) -> dict[str, Any]:
    """:func:`parse_yaml_mapping` of the file at ``path``, read with a bound: a missing or unreadable path, a
    directory, a FIFO or device (which could block or never end) and a file over :data:`MAX_BYTES` are
    :class:`ConfigError` naming the path."""
    source = str(path)
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ConfigError(source, exc.strerror or type(exc).__name__, "a path to an existing file") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise ConfigError(source, kind, "a path to a regular file")
    try:
        with Path(path).open("rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(source, exc.strerror or type(exc).__name__, "a readable file") from None
    if len(data) > MAX_BYTES:
        raise ConfigError(source, f"more than {MAX_BYTES:,} bytes", f"at most {MAX_BYTES:,} bytes (256 KiB)")
    return parse_yaml_mapping(data, source=source, allow_empty=allow_empty)
