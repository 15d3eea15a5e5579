"""Access hints for Node.js: the modules a CommonJS module requires as it loads (docs/format.md §10).

Node runs a module's top-level code when the module is first required, and
every `require('x')` there loads x (the package.json that names its main
file, then that file, then x's own requires) before the next line runs: a
start reads a tree of small files one miss after another. A `require` inside
a function runs when the function is called, if ever, so only those outside
functions (or in functions called where they are written, `(function () {
... })()`) are hints. Specifiers are resolved as Node's CommonJS loader does:
relative paths, `node_modules` directories up from the module, then the
global folders (Debian's /usr/share/nodejs among them) and NODE_PATH;
`package.json` "main" and "exports" (its `require` condition); `.js`,
`.json`, `.node` and `index.*`. Built-in modules are not files.

The scan is lexical, not a parse: strings, template literals, comments and
regular expression literals are skipped so that a quote or brace in them
cannot mislead it, and braces are classified by what precedes them. A wrong
guess costs a fetch too many or a miss, never a wrong byte.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Callable, Iterable, Iterator

from naiad.builder.tree import Node

# Node's built-in modules (`require('module').builtinModules`, Node 18-22): never files.
BUILTINS = frozenset(
    b"assert async_hooks buffer child_process cluster console constants crypto dgram "
    b"diagnostics_channel dns domain events fs http http2 https inspector module net os path "
    b"perf_hooks process punycode querystring readline repl stream string_decoder sys timers tls "
    b"trace_events tty url util v8 vm wasi worker_threads zlib".split())
# Where a bare specifier is looked up after the node_modules folders: Node's global folders
# (prefix/lib/node) and Debian's (its node looks in /usr/lib/<triplet>/nodejs and /usr/share/nodejs).
GLOBAL_DIRS = (b"/usr/lib/node", b"/usr/local/lib/node", b"/usr/lib/nodejs", b"/usr/share/nodejs")
MAX_SCRIPT = 4 << 20  # a module bigger than this is not scanned (a bundle: one file, no requires)
_SCRIPTS = (b".js", b".cjs")

_REQUIRE = re.compile(rb"""\brequire\s*\(\s*(['"])([^'"\\\n]{1,512})\1\s*\)""")
_WORD = re.compile(rb"[A-Za-z0-9_$]+$")
_BLOCK_KEYWORDS = frozenset((b"if", b"for", b"while", b"switch", b"catch", b"with"))
# After these a `/` starts a regular expression literal, not a division.
_BEFORE_REGEX = frozenset(b"(,=:[!&|?{};+-*%<>~^")
_REGEX_KEYWORDS = frozenset((b"return", b"typeof", b"case", b"do", b"else", b"in", b"of", b"void",
                             b"delete", b"throw", b"new", b"instanceof", b"yield", b"await"))

File = Callable[[bytes], "Node | None"]  # absolute path -> the regular file there, symlinks followed
# read(node, offset, size): bytes of a regular file, or None when the build does not hold them.
Reader = Callable[[Node, int, int], "bytes | None"]


def is_script(path: bytes) -> bool:
    return path.endswith(_SCRIPTS)


def entry_script(argv: list[bytes], cwd: bytes) -> bytes | None:
    """The script a `node [options] SCRIPT ...` command line runs, as an absolute path."""
    if not argv or posixpath.basename(argv[0]) not in (b"node", b"nodejs"):
        return None
    script = next((a for a in argv[1:] if not a.startswith(b"-")), None)
    if script is None:
        return None
    return posixpath.normpath(script if script.startswith(b"/") else posixpath.join(cwd, script))


def load_time_requires(source: bytes) -> list[bytes]:
    """The string specifiers of the `require(...)` calls in `source` that run when it is loaded."""
    try:
        code = _load_time_code(source)
    except RecursionError:  # template literals nested deeper than Python's stack: no hints
        return []
    return [m[2] for m in _REQUIRE.finditer(code)]


def _load_time_code(source: bytes) -> bytes:
    """`source` with everything blanked but the code that runs at load: strings, comments, regex
    literals and the bodies of functions not called in place become spaces (a require's string
    argument is kept). Lookbehinds read this blanked copy, so that a paren or a word in a string
    or a comment cannot mislead them."""
    out = bytearray(source)
    n = len(source)
    stack: list[bool] = []  # per open brace: whether it is a function body that does not run at load
    lazy = 0  # such bodies open around the current position
    i = 0
    while True:
        m = _TOKEN.search(source, i)
        j = m.start() if m else n
        if lazy:
            out[i:j] = b" " * (j - i)
        if m is None:
            return bytes(out)
        c = source[j]
        end = j + 1
        if c in b"'\"":
            end = _string_end(source, j)
            if lazy or not _REQUIRE_OPEN.search(out, max(0, j - 16), j):
                out[j:end] = b" " * (end - j)
        elif c == 0x60:  # ` a template literal (its ${...} parts are code too, but rarely requires)
            end = _template_end(source, j)
            out[j:end] = b" " * (end - j)
        elif c == 0x2F:  # /
            nxt = source[j + 1:j + 2]
            if nxt == b"/":
                end = source.find(b"\n", j)
                end = n if end < 0 else end
            elif nxt == b"*":
                end = source.find(b"*/", j + 2)
                end = n if end < 0 else end + 2
            elif _regex_may_start(out, _significant_end(out, j)):
                end = _REGEX.match(source, j).end()
            else:
                end = j + 1  # a division
            if end > j + 1:
                out[j:end] = b" " * (end - j)
        elif c == 0x7B:  # {
            fn = not lazy and _opens_function(out, _significant_end(out, j))
            stack.append(fn)
            lazy += fn
        elif stack:  # }
            lazy -= stack.pop()
        i = end


_TOKEN = re.compile(rb"""['"`/{}]""")
# A string literal, to its closing quote (an unterminated one ends at the line); a regex literal
# (a `/` inside a [class] does not end it).
_STRINGS = {q: re.compile(rb"%c(?:[^%c\\\n]|\\.)*(?:%c|\n|$)" % (q, q, q), re.S) for q in b"'\""}
_REGEX = re.compile(rb"/(?:[^/\\\[\n]|\\.|\[(?:[^\]\\\n]|\\.)*\]?)*/?", re.S)
_REQUIRE_OPEN = re.compile(rb"\brequire\s*\(\s*$")
_WINDOW = 256  # bytes a lookbehind reads


def _significant_end(out: bytearray, j: int) -> int:
    """Index past the last character before `j` that is not blank; 0 if there is none nearby."""
    w0 = max(0, j - _WINDOW)
    return w0 + len(out[w0:j].rstrip())


def _string_end(s: bytes, i: int) -> int:
    return _STRINGS[s[i]].match(s, i).end()


def _template_end(s: bytes, i: int) -> int:
    """End of the template literal at `i`, its ${...} parts (nested templates too) included."""
    j, depth = i + 1, 0
    while j < len(s):
        c = s[j]
        if c == 0x5C:
            j += 2
            continue
        if depth == 0 and c == 0x60:
            return j + 1
        if c == 0x24 and s[j + 1:j + 2] == b"{":  # ${
            depth += 1
            j += 2
            continue
        if depth and c == 0x7D:
            depth -= 1
        elif depth and c == 0x60:
            j = _template_end(s, j)
            continue
        elif depth and c in b"'\"":
            j = _string_end(s, j)
            continue
        j += 1
    return len(s)


def _regex_may_start(out: bytearray, prev: int) -> bool:
    """Whether a `/` after the significant text ending at `prev` starts a regex literal."""
    if prev == 0:
        return True
    if out[prev - 1] in _BEFORE_REGEX:
        return True
    word = _WORD.search(out, max(0, prev - 12), prev)
    return word is not None and bytes(word[0]) in _REGEX_KEYWORDS


def _opens_function(out: bytearray, prev: int) -> bool:
    """Whether a `{` after the significant text ending at `prev` opens a function body that does
    not run where it is written: after `=>`, or after the `)` of a parameter list (`function
    f(...)`, a method `name(...)`), not of `if (...)`, `catch (...)` and such, nor an IIFE's."""
    if out[max(0, prev - 2):prev] == b"=>":
        start = _arrow_start(out, prev - 2)
    elif prev and out[prev - 1] == 0x29:  # )
        paren = _matching_open(out, prev - 1)
        if paren < 0:
            return False
        w0 = max(0, paren - _WINDOW)
        before = bytes(out[w0:paren]).rstrip()
        word = _WORD.search(before)
        if word is not None and word[0] in _BLOCK_KEYWORDS:
            return False
        start = w0 + _function_start(before)
    else:
        return False
    return not _called_in_place(out, start)


def _matching_open(out: bytearray, close: int) -> int:
    """The `(` that the `)` at `close` closes, looking back at most 4 KiB; -1 if not found."""
    depth = 0
    for j in range(close, max(-1, close - 4096), -1):
        c = out[j]
        if c == 0x29:
            depth += 1
        elif c == 0x28:
            depth -= 1
            if depth == 0:
                return j
    return -1


def _arrow_start(out: bytearray, arrow: int) -> int:
    """Where the arrow function whose `=>` is at `arrow` starts (its parameters, or `async`)."""
    end = _significant_end(out, arrow)
    if end and out[end - 1] == 0x29:
        paren = _matching_open(out, end - 1)
        end = paren if paren >= 0 else end
    else:
        word = _WORD.search(out, max(0, end - 64), end)
        end = word.start() if word else end
    w0 = max(0, end - _WINDOW)
    before = bytes(out[w0:end]).rstrip()
    return w0 + len(before[:-5] if before.endswith(b"async") else before)


def _function_start(before: bytes) -> int:
    """Where a function whose parameter list follows `before` starts: its `function` keyword,
    else (a method) its name."""
    m = _FUNCTION_HEAD.search(before)
    if m is not None:
        return m.start()
    word = _WORD.search(before)
    return word.start() if word else len(before)


_FUNCTION_HEAD = re.compile(rb"\b(?:async\s+)?function\s*\*?\s*[A-Za-z0-9_$]*\s*$")


def _called_in_place(out: bytearray, start: int) -> bool:
    """Whether the function starting at `start` is called where it is written: `(function ...`,
    `!function ...`; `f(function ...` passes a callback, which may run later or never."""
    w0 = max(0, start - _WINDOW)
    before = bytes(out[w0:start]).rstrip()
    if before.endswith((b"!", b"~", b"void")):
        return True
    if not before.endswith(b"("):
        return False
    before = before[:-1].rstrip()
    return not before or (before[-1:] not in (b")", b"]") and _WORD.search(before[-1:]) is None)


class NodeModules:
    """Node's CommonJS resolution over the built tree."""

    def __init__(self, file: File, is_dir: Callable[[bytes], bool], read: Reader,
                 node_path: list[bytes]):
        self.file, self.is_dir, self.read = file, is_dir, read
        triplets = [b"/usr/lib/" + t + b"/nodejs" for t in (b"x86_64-linux-gnu", b"aarch64-linux-gnu",
                                                             b"arm-linux-gnueabihf", b"i386-linux-gnu")]
        self.global_dirs = [d for d in (*node_path, *GLOBAL_DIRS[:2], *triplets, *GLOBAL_DIRS[2:])
                            if d.startswith(b"/") and is_dir(d)]
        self._packages: dict[bytes, dict | None] = {}

    def hints(self, scripts: Iterable[bytes]) -> Iterator[tuple[Node, Node, int, int]]:
        """(trigger, target, offset, size) for each of `scripts` and every script they load: when
        a module is read, each require that runs as it loads reads the package.json that names
        the required module's main file and then that file (a `.node` addon: its first byte,
        which leads to its loader's hints), in order."""
        queue = list(scripts)
        scanned: set[int] = set()
        while queue:
            path = queue.pop()
            node = self.file(path)
            if node is None or id(node) in scanned or not node.chunks or node.size > MAX_SCRIPT:
                continue
            scanned.add(id(node))
            source = self.read(node, 0, node.size)
            if not source:
                continue
            seen: set[int] = {id(node)}
            base = posixpath.dirname(path)
            for spec in load_time_requires(source):
                for target_path in self.resolve(base, spec):
                    target = self.file(target_path)
                    if target is None or id(target) in seen or not target.chunks:
                        continue
                    seen.add(id(target))
                    yield node, target, 0, 1 if target_path.endswith(b".node") else -1
                    if is_script(target_path):
                        queue.append(target_path)

    def resolve(self, base: bytes, spec: bytes) -> list[bytes]:
        """The files requiring `spec` from a module in directory `base` reads: package.json files on
        the way, the module's file last; [] for a built-in or what is not found."""
        if spec.startswith(b"node:") or spec.split(b"/", 1)[0] in BUILTINS:
            return []
        if spec.startswith((b"./", b"../", b"/")) or spec in (b".", b".."):
            target = posixpath.normpath(posixpath.join(base, spec))
            return self._as_file(target) or self._as_directory(target)
        name_parts = 2 if spec.startswith(b"@") else 1
        parts = spec.split(b"/")
        name, subpath = b"/".join(parts[:name_parts]), b"/".join(parts[name_parts:])
        for d in (*self._node_modules_dirs(base), *self.global_dirs):
            package = d + b"/" + name
            if not self.is_dir(package) and self.file(package + b".js") is None:
                continue
            found = self._in_package(package, subpath)
            if found:
                return found
        return []

    def _node_modules_dirs(self, base: bytes) -> Iterator[bytes]:
        d = base
        while True:
            if posixpath.basename(d) != b"node_modules":
                candidate = (d.rstrip(b"/") or b"") + b"/node_modules"
                if self.is_dir(candidate):
                    yield candidate
            if d in (b"/", b""):
                return
            d = posixpath.dirname(d)

    def _in_package(self, package: bytes, subpath: bytes) -> list[bytes]:
        manifest = self._package_json(package)
        exports = manifest.get("exports") if manifest else None
        if exports is not None:
            key = "./" + subpath.decode(errors="replace") if subpath else "."
            target = _export_target(exports, key)
            if target is not None:
                path = posixpath.normpath(package + b"/" + target.encode())
                if self.file(path) is not None:
                    return [package + b"/package.json", path]
        target = package + b"/" + subpath if subpath else package
        return self._as_file(target) or self._as_directory(target)

    def _as_file(self, target: bytes) -> list[bytes]:
        for suffix in (b"", b".js", b".json", b".node", b".cjs"):
            if self.file(target + suffix) is not None:
                return [target + suffix]
        return []

    def _as_directory(self, target: bytes) -> list[bytes]:
        if not self.is_dir(target):
            return []
        manifest = self._package_json(target)
        read = [target + b"/package.json"] if manifest is not None else []
        main = manifest.get("main") if manifest else None
        if isinstance(main, str) and main:
            entry = posixpath.normpath(target + b"/" + main.encode())
            found = self._as_file(entry) or (self._index(entry) if entry != target else [])
            if found:
                return read + found
        return read + self._index(target)

    def _index(self, directory: bytes) -> list[bytes]:
        for name in (b"index.js", b"index.json", b"index.node"):
            if self.file(directory + b"/" + name) is not None:
                return [directory + b"/" + name]
        return []

    def _package_json(self, directory: bytes) -> dict | None:
        if directory not in self._packages:
            manifest = None
            node = self.file(directory + b"/package.json")
            if node is not None and node.size <= 1 << 20:
                data = self.read(node, 0, node.size)
                try:
                    loaded = json.loads(data) if data else None
                except (ValueError, RecursionError):  # not JSON, or nested past Python's stack
                    loaded = None
                manifest = loaded if isinstance(loaded, dict) else None
            self._packages[directory] = manifest
        return self._packages[directory]


def _export_target(exports: object, key: str) -> str | None:
    """The file package.json "exports" maps `key` ("." or "./sub") to for require()."""
    if isinstance(exports, dict) and not any(k.startswith(".") for k in exports):
        exports = {".": exports}  # conditions only: they describe "."
    if isinstance(exports, str | list):
        exports = {".": exports}
    if not isinstance(exports, dict):
        return None
    return _condition(exports.get(key))


def _condition(value: object) -> str | None:
    if isinstance(value, str):
        return value if value.startswith("./") else None
    if isinstance(value, list):
        return next((t for v in value if (t := _condition(v)) is not None), None)
    if isinstance(value, dict):
        for cond in ("require", "node", "default"):
            if cond in value and (t := _condition(value[cond])) is not None:
                return t
    return None
