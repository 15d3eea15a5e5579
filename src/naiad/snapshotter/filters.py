"""containerd's filter syntax (github.com/containerd/containerd/filters), for List.

    filter   := selector ("," selector)*            all must match
    selector := fieldpath [("==" | "!=" | "~=") value]   no operator: the field is present
    fieldpath:= field ("." field)*                  field: [A-Za-z0-9_]+ or quoted
    value    := quoted | anything up to "," (spaces trimmed)

Quotes are `"`, `/` or `|` with Go's backslash escapes. Several filter strings match if any
does. After a remote pull containerd sends, for instance,
`labels."containerd.io/snapshot.ref"==sha256:...,parent=="ns/3/sha256:..."`.
Fields of a snapshot: `name`, `parent`, `kind` (active, view, committed), `labels.<key>`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

from naiad.errors import NaiadError

_QUOTES = '"/|'
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}


class FilterError(NaiadError):
    """A filter string that does not parse."""


@dataclasses.dataclass(frozen=True)
class Selector:
    path: tuple[str, ...]
    op: str | None  # None: presence
    value: str


Lookup = Callable[[tuple[str, ...]], str | None]


class _Scanner:
    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def error(self, what: str) -> FilterError:
        return FilterError(f"invalid filter {self.text!r} at {self.pos}: {what}")

    def skip_spaces(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def quoted(self) -> str:
        quote = self.text[self.pos]
        self.pos += 1
        out = []
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            self.pos += 1
            if ch == quote:
                return "".join(out)
            if ch == "\\" and self.pos < len(self.text):
                esc = self.text[self.pos]
                self.pos += 1
                if esc in ("x", "u", "U"):
                    width = {"x": 2, "u": 4, "U": 8}[esc]
                    digits = self.text[self.pos:self.pos + width]
                    self.pos += width
                    try:
                        out.append(chr(int(digits, 16)))
                    except ValueError:
                        raise self.error(f"bad escape \\{esc}{digits}") from None
                else:
                    out.append(_ESCAPES.get(esc, esc))
                continue
            out.append(ch)
        raise self.error("unterminated quote")

    def field(self) -> str:
        self.skip_spaces()
        if self.peek() and self.peek() in _QUOTES:
            return self.quoted()
        m = re.compile(r"[A-Za-z0-9_]+").match(self.text, self.pos)
        if not m:
            raise self.error("expected a field name")
        self.pos = m.end()
        return m.group()

    def value(self) -> str:
        self.skip_spaces()
        if self.peek() and self.peek() in _QUOTES:
            return self.quoted()
        end = self.text.find(",", self.pos)
        end = len(self.text) if end < 0 else end
        raw, self.pos = self.text[self.pos:end].strip(), end
        if not raw:
            raise self.error("expected a value")
        return raw


def parse(text: str) -> list[Selector]:
    """One filter string: its selectors, all of which must match."""
    s = _Scanner(text)
    selectors = []
    while True:
        path = [s.field()]
        while s.peek() == ".":
            s.pos += 1
            path.append(s.field())
        s.skip_spaces()
        op = s.text[s.pos:s.pos + 2]
        if op in ("==", "!=", "~="):
            s.pos += 2
            value = s.value()
            if op == "~=":
                try:
                    re.compile(value)
                except re.error as e:
                    raise s.error(f"bad regular expression: {e}") from None
            selectors.append(Selector(tuple(path), op, value))
        else:
            selectors.append(Selector(tuple(path), None, ""))
        s.skip_spaces()
        if not s.peek():
            return selectors
        if s.peek() != ",":
            raise s.error("expected ',' or an operator")
        s.pos += 1


def _matches(selectors: list[Selector], lookup: Lookup) -> bool:
    for sel in selectors:
        actual = lookup(sel.path)
        if sel.op is None:
            ok = actual is not None
        elif sel.op == "==":
            ok = actual == sel.value
        elif sel.op == "!=":
            ok = actual != sel.value
        else:
            ok = actual is not None and re.search(sel.value, actual) is not None
        if not ok:
            return False
    return True


def compile_filters(texts: Sequence[str]) -> Callable[[Lookup], bool]:
    """A predicate: whether a snapshot (seen through `lookup`) matches any of the filters (or none given)."""
    parsed = [parse(t) for t in texts if t.strip()]
    if not parsed:
        return lambda _lookup: True
    return lambda lookup: any(_matches(sels, lookup) for sels in parsed)
