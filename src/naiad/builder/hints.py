"""Access hints: what a lazy start will read next, predicted from the image alone (docs/format.md §10).

A lazy mount without a prefetch list learns what an app needs one miss at a
time, and every miss is a round trip the app waits for. Some files say much
of what comes next, and they can be read at build time:

* **Python modules.** The imports at a module's top level, and in the `if`,
  `try` and `with` blocks there, run when the module is imported (those in
  a function run when it is called, if ever). Each names modules whose
  bytecode (and, for a checked-hash pyc, source) the interpreter reads
  next, and so on down.
* **ELF objects.** The dynamic loader reads an object's symbol, string, hash,
  version and relocation tables and its writable segment, all of it, and
  then loads its DT_NEEDED libraries the same way.
* **Distributions' entry points.** `importlib.metadata.entry_points()`
  reads every `*.dist-info/entry_points.txt` of a site directory in turn.
* **CPython's start.** Before the script, the interpreter reads its venv's
  pyvenv.cfg, the site directories' `.pth` files and a few modules, one
  miss after another; its own code, a small program's, is most of it.
* **The image's entry point.** The config names the program a container
  runs and its arguments: the script it reads, the locale its Env sets.

A hint says: when a mount first reads file T (keyed by T's first chunk),
fetch these bytes of file F, then follow F's own hints. The mount walks them
depth first, which is the order an interpreter imports in.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import posixpath
import re
import stat
import struct
from collections.abc import Callable, Iterator, Sequence

from naiad.builder import elfcode
from naiad.builder.nodehints import NodeModules, Reader, entry_script, is_script
from naiad.builder.placement import HEADER_SIZE, checked_hash, source_of_bytecode
from naiad.builder.tree import Node
from naiad.format.pathwalk import follow

# (trigger file, target file, offset, size): when the trigger is first read, fetch size bytes of the
# target from offset (size -1: to its end; 0: nothing) and then follow the target's own hints.
Hint = tuple[Node, Node, int, int]

MAX_SOURCE = 4 << 20  # a module bigger than this is not scanned for imports
MAX_RANGE = 64 << 20  # no single ELF hint asks for more
# A program (PT_INTERP) no bigger than this hints all it loads: from main on, its start runs and
# reads much of it (python3.11: 5 of its 7 chunks were misses, one after another).
PROGRAM_WHOLE = 16 << 20
DEFAULT_PATH = b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # runc's, without Env


@dataclasses.dataclass(frozen=True, slots=True)
class Process:
    """What a container of the image runs, by its config: Entrypoint + Cmd, Env, WorkingDir."""

    argv: list[bytes]
    env: dict[bytes, bytes]
    cwd: bytes

    @classmethod
    def of_config(cls, config: dict) -> Process | None:
        """None when the config runs nothing, or says so in a shape the image spec does not have
        (a config is the image author's: it must not stop a build)."""
        c = config.get("config")
        if not isinstance(c, dict):
            return None

        def strings(key: str) -> list[bytes]:
            value = c.get(key)
            return [os.fsencode(v) for v in value if isinstance(v, str)] if isinstance(value, list) else []

        argv = strings("Entrypoint") + strings("Cmd")
        cwd = c.get("WorkingDir")
        if not argv:
            return None
        return cls(argv, dict(e.partition(b"=")[::2] for e in strings("Env")),
                   os.fsencode(cwd) if isinstance(cwd, str) and cwd.startswith("/") else b"/")

    def program_paths(self) -> list[bytes]:
        """Where the program argv[0] names may be, in the order execvp tries them: the name itself
        if it has a slash (from WorkingDir if relative), else in each directory of PATH."""
        name = self.argv[0]
        if b"/" in name:
            return [name if name.startswith(b"/") else self.cwd + b"/" + name]
        return [d + b"/" + name for d in self.env.get(b"PATH", DEFAULT_PATH).split(b":") if d]

_IMPORT = re.compile(
    rb"(?:import[ \t]+(?P<names>[^\n#;]+)"
    rb"|from[ \t]+(?P<module>\.*[\w.]*)[ \t]+import[ \t]+(?P<what>\([^)]*\)|[^\n#;]+))",
)
# The statements whose bodies a module runs as it is imported (a condition's or a handler's
# often, a function's or a class's body not, or not as a rule), and the conditions that hold
# only for type checkers or when the module is run as a script.
_RUN_ON_IMPORT = re.compile(rb"(?:if|elif|else|try|except|finally|with)\b")
_NOT_ON_IMPORT = re.compile(rb"(?:el)?if[ \t(]+(?:(?:typing\.)?TYPE_CHECKING\b|__name__[ \t]*==)")
MAX_HEADER_SCAN = 2000  # lines looked back from an indented import for the statements around it
_PYTHON_LIB = re.compile(rb".*/lib/python3\.\d+")
_EXTENSION_MODULE = re.compile(rb".*/([A-Za-z_]\w*)\.(?:cpython-[^/]+|abi3)\.so")
_CPYTHON = re.compile(rb"(.*)/bin/python3\.(\d+)")  # CPython, by its versioned name: PREFIX/bin/python3.N
# What CPython imports as it starts, before site: the codec registry and the filesystem encoding's
# codec (UTF-8 on Linux: PEP 538 and 540 turn the C locale into it); after: the customisations.
_STARTUP_MODULES = (b"encodings", b"encodings.utf_8", b"sitecustomize", b"usercustomize")
_SITE = re.compile(rb".*/(?:site|dist)-packages")
_DUNDER_IMPORT = re.compile(rb"""__import__\(\s*['"]([\w.]+)['"]""")  # as .pth lines call it
MAX_PTH = 64 << 10  # a bigger .pth file is not read for its import lines
_LIBCRYPTO = re.compile(rb"libcrypto\.so(?:\.\d+)*")
_OPENSSLDIR = re.compile(rb'OPENSSLDIR: "(/[^"\0]{0,4000})"')
MAX_LIBCRYPTO = 64 << 20  # a bigger "libcrypto" is not searched for its OPENSSLDIR
_ENTRY_POINTS = re.compile(rb"(.*/(?:site|dist)-packages)/[^/]+\.(?:dist|egg)-info/entry_points\.txt")
# Standard modules CPython 3.11 and later run from copies frozen into the interpreter
# (Tools/build/freeze_modules.py): importing them reads no file, so no hint names them.
_FROZEN_STDLIB = re.compile(rb".*/lib/python3\.(?:1[1-9]|[2-9]\d)/"
                            rb"(?:abc|codecs|io|_collections_abc|_sitebuiltins|genericpath|ntpath|posixpath"
                            rb"|os|site|stat|runpy|zipimport|importlib/util|importlib/machinery)\.py"
                            # And in every CPython 3: importlib puts the interpreter's own frozen
                            # import system in sys.modules under these names.
                            rb"|.*/lib/python3\.\d+/importlib/_bootstrap(?:_external)?\.py")


def access_hints(root: Node, order: Sequence[tuple[bytes, Node, Node]], read: Reader,
                 process: Process | None = None) -> list[Hint]:
    """The hints of the tree at `root`, whose canonical walk is `order` (path, parent, node), by trigger;
    `process`: what the image's config runs."""
    image = _Image(root, order, read)
    hints: list[Hint] = []
    entry_points: dict[bytes, list[tuple[bytes, Node]]] = {}  # site directory -> its distributions' files
    for path, _parent, node in order:
        if not stat.S_ISREG(node.mode) or not node.chunks:
            continue
        if m := _ENTRY_POINTS.fullmatch(path):
            entry_points.setdefault(m[1], []).append((path, node))
        if path.endswith(b".pth"):
            hints.extend((node, t, 0, size) for t, size in image.pth_hints(path))
        if path.endswith(b".py"):
            hints.extend((node, t, off, size) for t, off, size in image.python_hints(path))
            # The interpreter reads the bytecode first: it leads to the source's hints (size 0: fetch
            # nothing, follow), and fetches the source too if this bytecode makes the import read it.
            for bytecode in image.bytecode_of(path):
                checked = checked_hash(read(bytecode, 0, HEADER_SIZE))
                hints.append((bytecode, node, 0, -1 if checked else 0))
        elif _maybe_elf(path, node) and (elf := image.elf(node, _extension_init(path))) is not None:
            # The loader's order: this object's tables and data, its libraries (whose initialisers
            # run first), then this object's initialisers.
            hints.extend((node, node, off, size) for off, size in elf.ranges)
            if elf.interp and (cache := image.loader_cache(path, elf)) is not None:
                hints.append((node, cache, 0, -1))  # a program's loader maps it whole, first
            if (config := image.openssl_config(path, node)) is not None:
                hints.append((node, config, 0, -1))
            hints.extend((node, lib, 0, 1) for lib in image.needed(path, elf))
            hints.extend((node, node, off, size) for off, size in elf.init_reads)
            if elf.interp:  # what the program reads once it runs
                hints.extend((node, t, off, size) for t, off, size in image.interpreter_start(path, node))
    # importlib.metadata.entry_points() reads the entry_points.txt of every distribution in a
    # directory on sys.path, one after another in directory order (by name, in an image): each
    # leads to the next, so the first one read fetches the rest.
    for files in entry_points.values():
        files.sort(key=lambda f: f[0])
        hints.extend((a, b, 0, -1) for (_, a), (_, b) in itertools.pairwise(files))
    if process is not None:
        hints.extend(image.entry_hints(process))
    # Node: the modules the image's `node SCRIPT` loads, found from the script down (an image's
    # node_modules hold many a module its app never loads, and scanning is the costly part); with
    # no such entry, every script's.
    node_path = process.env.get(b"NODE_PATH", b"").split(b":") if process is not None else []
    node_modules = NodeModules(image.file, image.is_dir, read, [d for d in node_path if d])
    entry = entry_script(process.argv, process.cwd) if process is not None else None
    hints.extend(node_modules.hints([entry] if entry else
                                    [path for path, _, node in order if is_script(path) and node.chunks]))
    return hints


@dataclasses.dataclass(slots=True)
class _Elf:
    machine: int
    ranges: list[tuple[int, int]]  # (offset, size) the loader reads whole
    needed: list[bytes]
    runpath: list[bytes]
    init_reads: list[tuple[int, int]]  # (offset, size) its initialisers may run and read (builder/elfcode.py)
    interp: bool  # a program (PT_INTERP): the dynamic loader starts with it


class _Image:
    """The built tree as the interpreter and the loader would look things up in it."""

    def __init__(self, root: Node, order: Sequence[tuple[bytes, Node, Node]], read: Reader):
        self.root = root
        self.read = read
        self._nodes: dict[bytes, Node | None] = {}
        self._extensions: dict[int, dict[bytes, list[bytes]]] = {}
        self._loader_dirs_of: dict[int, list[bytes]] = {}
        # Memos: a build asks the same questions for every module that imports `os` or `torch`.
        self._modules: dict[tuple[bytes, bytes, int], list[bytes]] = {}
        self._reads: dict[bytes, list[tuple[Node, int]]] = {}
        self._roots_of: dict[bytes, bytes] = {}
        self._bytecode: dict[bytes, dict[bytes, list[bytes]]] = {}  # __pycache__ -> source -> bytecode
        dirs = [path for path, _, node in order if node.is_dir]
        python_libs = [d for d in dirs if _PYTHON_LIB.fullmatch(d)]
        # Where `import x` may find x besides the importer's own root: every site and dist
        # packages directory, the standard libraries and their lib-dynload.
        self.roots = sorted({d for d in dirs if _SITE.fullmatch(d)} | set(python_libs)
                            | {d + b"/lib-dynload" for d in python_libs})
        # Virtual environments: (their directory, pyvenv.cfg, the directory of their interpreter).
        self.venvs = [(path[:-len(b"/pyvenv.cfg")], node, home) for path, _, node in order
                      if path.endswith(b"/pyvenv.cfg") and stat.S_ISREG(node.mode) and node.size <= 1 << 16
                      and (home := _venv_home(read(node, 0, node.size))) is not None]

    # --- lookups -------------------------------------------------------

    def node(self, path: bytes) -> Node | None:
        """The node at absolute `path`, symlinks followed; ".." stops at the root, as in a chroot."""
        if path not in self._nodes:
            self._nodes[path] = follow(path, self.root, _child, _link)
        return self._nodes[path]

    def file(self, path: bytes) -> Node | None:
        node = self.node(path)
        return node if node is not None and stat.S_ISREG(node.mode) else None

    # --- Python --------------------------------------------------------

    def python_hints(self, path: bytes) -> list[tuple[Node, int, int]]:
        """What importing the module at `path` reads next: the imports it runs, in order."""
        node = self.file(path)
        source = self.read(node, 0, node.size) if node is not None and node.size <= MAX_SOURCE else None
        if not source:
            return []
        out: list[tuple[Node, int, int]] = []
        seen: set[int] = set()
        for module_file in self._imported_files(path, source):
            for target, size in self._module_reads(module_file):
                if id(target) not in seen:
                    seen.add(id(target))
                    out.append((target, 0, size))
        return out

    def pth_hints(self, path: bytes) -> list[tuple[Node, int]]:
        """What site reads next after the `.pth` file at `path` of a site directory: the modules
        its import lines import (site runs a line that starts with `import`, often to call
        `__import__('name')`), as (file, bytes to fetch)."""
        node = self.file(path)
        if not _SITE.fullmatch(posixpath.dirname(path)) or node is None or node.size > MAX_PTH:
            return []
        lines = (line for line in (self.read(node, 0, node.size) or b"").splitlines()
                 if line.startswith((b"import ", b"import\t")))
        out: list[tuple[Node, int]] = []
        for line in lines:
            names = [name for m in _import_statements(line) if m["names"] for name in _names(m["names"])]
            for name in [*names, *_DUNDER_IMPORT.findall(line)]:
                for module_file in self._module_files(path, name, 0):
                    out.extend(self._module_reads(module_file))
        return out

    def _imported_files(self, path: bytes, source: bytes) -> Iterator[bytes]:
        for m in _import_statements(source):
            if m["names"] is not None:
                for name in _names(m["names"]):
                    yield from self._module_files(path, name, 0)
                continue
            dotted = m["module"]
            level = len(dotted) - len(dotted.lstrip(b"."))
            module = dotted[level:]
            if module == b"__future__":
                continue
            files = list(self._module_files(path, module, level)) if module else []
            yield from files
            if level:
                pkg_dir = _relative_base(path, level) + (b"/" + module.replace(b".", b"/") if module else b"")
            elif files and files[-1].endswith(b"/__init__.py"):
                pkg_dir = posixpath.dirname(files[-1])
            else:
                continue
            # `from package import name`: name may be a submodule, which is then imported too.
            for name in _names(m["what"].strip(b"()")):
                if b"." not in name and name != b"*":
                    found = self._find_module(pkg_dir, name)
                    if found:
                        yield found

    def _module_files(self, path: bytes, module: bytes, level: int) -> list[bytes]:
        """The files that importing `module` (relative at `level`, from `path`) executes, outermost first."""
        base = _relative_base(path, level) if level else self._root_of(path)
        key = (base, module, level)
        if key not in self._modules:
            self._modules[key] = list(self._find_module_files(base, module, level))
        return self._modules[key]

    def _find_module_files(self, base: bytes, module: bytes, level: int) -> Iterator[bytes]:
        if not all(p.isidentifier() for p in module.decode("ascii", "replace").split(".")):
            return
        roots = [base] if level else [base, *self.roots]
        parts = module.split(b".")
        for root in roots:
            found: list[bytes] = []
            d = root
            for part in parts:
                hit = self._find_module(d, part)
                if hit is None:
                    if self.is_dir(d + b"/" + part):  # a namespace package: no file of its own
                        d = d + b"/" + part
                        continue
                    break
                found.append(hit)
                if not hit.endswith(b"/__init__.py"):
                    break  # a module is no package: nothing below it is importable
                d = posixpath.dirname(hit)
            if found:
                yield from found
                return

    def _find_module(self, directory: bytes, name: bytes) -> bytes | None:
        """The file that makes `name` importable from `directory`, as CPython's finder orders them."""
        init = directory + b"/" + name + b"/__init__.py"
        if self.file(init) is not None:
            return init
        for n in self._extension_modules(directory).get(name, ()):
            if self.file(directory + b"/" + n) is not None:
                return directory + b"/" + n
        plain = directory + b"/" + name + b".py"
        return plain if self.file(plain) is not None else None

    def _extension_modules(self, directory: bytes) -> dict[bytes, list[bytes]]:
        """Extension modules in `directory` by module name (name.TAG.so, name.abi3.so, name.so)."""
        dnode = self.node(directory)
        if dnode is None or dnode.children is None:
            return {}
        key = id(dnode)
        if key not in self._extensions:
            found: dict[bytes, list[bytes]] = {}
            for n in sorted(dnode.children):
                if n.endswith(b".so") and 1 <= n.count(b".") <= 2:
                    found.setdefault(n.split(b".", 1)[0], []).append(n)
            self._extensions[key] = found
        return self._extensions[key]

    def _module_reads(self, module_file: bytes) -> list[tuple[Node, int]]:
        """(file, bytes to fetch) for loading `module_file`: its bytecode and, where read, its source."""
        if module_file not in self._reads:
            self._reads[module_file] = list(self._find_module_reads(module_file))
        return self._reads[module_file]

    def _find_module_reads(self, module_file: bytes) -> Iterator[tuple[Node, int]]:
        if _FROZEN_STDLIB.fullmatch(module_file):
            return
        if module_file.endswith(b".so"):
            node = self.file(module_file)
            if node is not None:
                yield node, 1  # its first chunk; its own hints are the loader's tables
            return
        bytecode = [self.file(p) for p in self.bytecode_paths(module_file)]
        bytecode = [b for b in bytecode if b is not None]
        yield from ((b, -1) for b in bytecode)
        # Timestamp bytecode is all an import reads; checked-hash bytecode (and none) reads the source.
        if not bytecode or any(checked_hash(self.read(b, 0, HEADER_SIZE)) for b in bytecode):
            node = self.file(module_file)
            if node is not None:
                yield node, -1

    def bytecode_paths(self, source: bytes) -> list[bytes]:
        cache_dir = posixpath.dirname(source) + b"/__pycache__"
        if cache_dir not in self._bytecode:
            cache = self.node(cache_dir)
            by_source: dict[bytes, list[bytes]] = {}
            for n in sorted(cache.children) if cache is not None and cache.children is not None else ():
                if (of := source_of_bytecode(cache_dir + b"/" + n)) is not None:
                    by_source.setdefault(of, []).append(cache_dir + b"/" + n)
            self._bytecode[cache_dir] = by_source
        return self._bytecode[cache_dir].get(source, [])

    def bytecode_of(self, source: bytes) -> list[Node]:
        return [n for p in self.bytecode_paths(source) if (n := self.file(p)) is not None]

    def _root_of(self, path: bytes) -> bytes:
        """The sys.path entry `path` was imported from: above its outermost package."""
        start = d = posixpath.dirname(path)
        if start not in self._roots_of:
            while d and self.file(d + b"/__init__.py") is not None:
                d = posixpath.dirname(d)
            self._roots_of[start] = d
        return self._roots_of[start]

    def is_dir(self, path: bytes) -> bool:
        node = self.node(path)
        return node is not None and node.is_dir

    # --- ELF -----------------------------------------------------------

    def elf(self, node: Node, entry: bytes | None = None) -> _Elf | None:
        """The object `node` holds, if one; `entry`: a function run right after its initialisers."""
        head = self.read(node, 0, 64)
        if not head or not head.startswith(b"\x7fELF"):
            return None
        try:
            return _parse_elf(node, head, self.read, entry)
        except (struct.error, ValueError, IndexError, OverflowError):
            return None  # not an object the loader would take either

    def needed(self, path: bytes, elf: _Elf) -> list[Node]:
        """The DT_NEEDED libraries of the object at `path`, found as the dynamic loader would."""
        dirs = self._runpath(path, elf) + self._loader_dirs(elf.machine)
        return [lib for name in elf.needed if (lib := self._library(path, name, dirs)) is not None]

    def interpreter_start(self, path: bytes, program: Node) -> list[tuple[Node, int, int]]:
        """What the program at `path` reads as it starts, if it is CPython (PREFIX/bin/python3.N)
        with its standard library: the pyvenv.cfg of each venv made from it, the `.pth` files of
        that venv's and its own site directories (site reads them all), and the modules it
        imports before the script (_STARTUP_MODULES)."""
        m = _CPYTHON.fullmatch(path)
        stdlib = m[1] + b"/lib/python3." + m[2] if m else b""
        if m is None or not self.is_dir(stdlib):
            return []
        names = (b"python3." + m[2], b"python3", b"python")
        venvs = [(d, cfg) for d, cfg, home in self.venvs
                 if any(self.node(home + b"/" + n) is program for n in names)]
        site_dirs = [stdlib + b"/site-packages", m[1] + b"/lib/python3/dist-packages",
                     m[1] + b"/local/lib/python3." + m[2] + b"/dist-packages",
                     *(d + b"/lib/python3." + m[2] + b"/site-packages" for d, _ in venvs)]
        files = [cfg for _, cfg in venvs]
        # The C library's files it reads first: the locale PEP 538 coerces the C locale to (unless
        # Env names another, which entry_hints adds), the converters that locale loads, and the
        # time zone (`time` sets it at import).
        for f in (self._ctype(b"C.UTF-8"), self._gconv_cache(), self.file(b"/etc/localtime")):
            if f is not None and f.chunks and all(f is not g for g in files):
                files.append(f)
        for d in site_dirs:
            dnode = self.node(d)
            for n in sorted(dnode.children) if dnode is not None and dnode.children is not None else ():
                if n.endswith(b".pth") and (f := self.file(d + b"/" + n)) is not None:
                    files.append(f)
        out = [(f, 0, -1) for f in files]
        for module in _STARTUP_MODULES:
            for module_file in self._find_module_files(stdlib, module, 0):
                out.extend((target, 0, size) for target, size in self._module_reads(module_file))
        return out

    def _gconv_cache(self) -> Node | None:
        """glibc's gconv-modules.cache, wherever this image's libc keeps it."""
        usr_lib = self.node(b"/usr/lib")
        dirs = [b"/usr/lib/" + n for n in sorted(usr_lib.children or {})] if usr_lib is not None else []
        return next((f for d in [*dirs, b"/usr/lib", b"/usr/lib64"]
                     if (f := self.file(d + b"/gconv/gconv-modules.cache")) is not None), None)

    def _ctype(self, locale: bytes) -> Node | None:
        """The LC_CTYPE file of `locale`, as glibc looks for it: the name as given, then with its
        codeset normalised (UTF-8: utf8)."""
        lang, dot, codeset = locale.partition(b".")
        normal = lang + dot + bytes(c for c in codeset.lower() if chr(c).isalnum()) if dot else locale
        files = (self.file(b"/usr/lib/locale/" + n + b"/LC_CTYPE") for n in dict.fromkeys((locale, normal)))
        return next((f for f in files if f is not None and f.chunks), None)

    def entry_hints(self, process: Process) -> list[Hint]:
        """The files the image's entry program reads once it runs, by its config: those its
        arguments name (a script, whole, up to MAX_SOURCE; a bigger file, its first chunk) and
        the LC_CTYPE of the locale its Env sets (the C library reads it at setlocale)."""
        found = (self.file(path) for path in process.program_paths())
        program = next((f for f in found if f is not None and f.mode & 0o111), None)
        if program is None or not program.chunks:
            return []
        out: list[Hint] = []
        for arg in process.argv[1:]:
            path = arg if arg.startswith(b"/") else process.cwd + b"/" + arg
            f = None if arg.startswith(b"-") else self.file(path)
            if f is not None and f.chunks and f is not program:
                out.append((program, f, 0, -1 if f.size <= MAX_SOURCE else 1))
        env = process.env
        locale = env.get(b"LC_ALL") or env.get(b"LC_CTYPE") or env.get(b"LANG")
        if locale and locale not in (b"C", b"POSIX") and (ctype := self._ctype(locale)) is not None:
            out.append((program, ctype, 0, -1))
        return out

    def openssl_config(self, path: bytes, node: Node) -> Node | None:
        """OPENSSLDIR/openssl.cnf if the object at `path` is OpenSSL's libcrypto: its initialisation
        reads that file, the directory being the one built into the library (the string
        `OPENSSLDIR: "DIR"` that `openssl version -d` prints)."""
        if not _LIBCRYPTO.fullmatch(posixpath.basename(path)) or node.size > MAX_LIBCRYPTO:
            return None
        m = _OPENSSLDIR.search(self.read(node, 0, node.size) or b"")
        return None if m is None else self.file(m[1] + b"/openssl.cnf")

    def loader_cache(self, path: bytes, elf: _Elf) -> Node | None:
        """/etc/ld.so.cache if the loader reads it to start the program at `path`: one of its
        libraries is not where its RUNPATH says (glibc's search order: RUNPATH, then the cache)."""
        runpath = self._runpath(path, elf)
        if all(b"/" in name or self._library(path, name, runpath) for name in elf.needed):
            return None
        return self.file(b"/etc/ld.so.cache")

    def _runpath(self, path: bytes, elf: _Elf) -> list[bytes]:
        origin = posixpath.dirname(path)
        return [d.replace(b"${ORIGIN}", origin).replace(b"$ORIGIN", origin) for d in elf.runpath]

    def _library(self, path: bytes, name: bytes, dirs: list[bytes]) -> Node | None:
        origin = posixpath.dirname(path)
        for candidate in [name] if b"/" in name else [d + b"/" + name for d in dirs]:
            lib = self.file(candidate if candidate.startswith(b"/") else origin + b"/" + candidate)
            if lib is not None:
                return lib
        return None

    def _loader_dirs(self, machine: int) -> list[bytes]:
        """The loader's default search path: ld.so.conf.d's directories, then the standard ones."""
        if machine not in self._loader_dirs_of:
            triplet = {62: b"x86_64-linux-gnu", 183: b"aarch64-linux-gnu"}.get(machine)
            dirs: list[bytes] = []
            conf = self.node(b"/etc/ld.so.conf.d")
            for name in sorted(conf.children) if conf is not None and conf.children is not None else []:
                f = self.file(b"/etc/ld.so.conf.d/" + name)
                text = self.read(f, 0, min(f.size, 65536)) if f and name.endswith(b".conf") else None
                dirs += [ln.strip() for ln in (text or b"").splitlines() if ln.strip().startswith(b"/")]
            for base in (b"/lib", b"/usr/lib"):
                dirs += [base + b"/" + triplet, base] if triplet else [base]
            self._loader_dirs_of[machine] = [*dirs, b"/lib64", b"/usr/lib64", b"/usr/local/lib"]
        return self._loader_dirs_of[machine]


def _extension_init(path: bytes) -> bytes | None:
    """PyInit_NAME for a Python extension module (NAME.cpython-TAG.so, NAME.abi3.so): the import
    calls it once the loader has run the module's initialisers."""
    m = _EXTENSION_MODULE.fullmatch(path)
    return b"PyInit_" + m[1] if m else None


def _venv_home(cfg: bytes | None) -> bytes | None:
    """The `home` of a pyvenv.cfg: the directory of the interpreter the venv was made from."""
    for line in (cfg or b"").splitlines():
        key, sep, value = line.partition(b"=")
        if sep and key.strip() == b"home" and value.strip().startswith(b"/"):
            return value.strip().rstrip(b"/")
    return None


def _relative_base(path: bytes, level: int) -> bytes:
    """The directory a relative import of `level` dots in the module at `path` starts from."""
    base = posixpath.dirname(path)
    for _ in range(level - 1):
        base = posixpath.dirname(base)
    return base


def _child(node: Node, name: bytes) -> Node | None:
    return node.children.get(name) if node.children is not None else None


def _link(node: Node) -> bytes | None:
    return node.target if stat.S_ISLNK(node.mode) else None


def _maybe_elf(path: bytes, node: Node) -> bool:
    """Worth reading the header of: a shared object (by name) or an executable (by mode)."""
    return bool(node.mode & 0o111) or b".so" in path.rsplit(b"/", 1)[-1]


def _import_statements(source: bytes) -> Iterator[re.Match[bytes]]:
    """The import statements `source` runs as it is imported, in order: at its top level, and in
    the `if`, `try` and `with` blocks there (not `if TYPE_CHECKING:` or `if __name__ == ...`).
    Lines are found with bytes.find, which is many times faster than letting the regex try every
    position of 150 MB of sources."""
    starts = []
    for keyword in (b"import ", b"import\t", b"from ", b"from\t"):
        i = source.find(keyword)
        while i >= 0:
            line = source.rfind(b"\n", 0, i) + 1
            if line == i or (source[line:i].isspace() and _runs_on_import(source, line, i - line)):
                starts.append(i)
            i = source.find(keyword, i + 1)
    for start in sorted(starts):
        if m := _IMPORT.match(source, start):
            yield m


def _runs_on_import(source: bytes, line: int, indent: int) -> bool:
    """Whether the statement indented by `indent` on the line at `line` runs when the module is
    imported: every statement it is nested in, out to the top level, is one of _RUN_ON_IMPORT."""
    for _ in range(MAX_HEADER_SCAN):
        if line == 0:
            return False
        end = line - 1
        line = source.rfind(b"\n", 0, end) + 1
        text = source[line:end]
        stripped = text.lstrip(b" \t")
        if not stripped or stripped.startswith(b"#") or len(text) - len(stripped) >= indent:
            continue  # blank, a comment, or a statement of the same block or a deeper one
        if not _RUN_ON_IMPORT.match(stripped) or _NOT_ON_IMPORT.match(stripped):
            return False
        indent = len(text) - len(stripped)
        if indent == 0:
            return True
    return False


def _names(text: bytes) -> Iterator[bytes]:
    for item in text.replace(b"\\\n", b" ").replace(b"\n", b" ").split(b","):
        name = item.split(b" as ")[0].strip()
        if name:
            yield name


# ELF64, little endian: the loader's view. Dynamic tags (elf.h) whose value is an address.
_DT_NEEDED, _DT_STRTAB, _DT_STRSZ, _DT_RPATH, _DT_RUNPATH = 1, 5, 10, 15, 29
_TABLE_STARTS = (4, 5, 6, 7, 17, 23, 36, 0x6FFFFEF5, 0x6FFFFFF0, 0x6FFFFFFC, 0x6FFFFFFE)
_TABLE_SIZES = {5: 10, 7: 8, 17: 18, 23: 2, 36: 35}  # table -> the tag of its size
_PT_LOAD, _PT_DYNAMIC, _PT_INTERP, _PT_GNU_EH_FRAME, _PF_X, _PF_W = 1, 2, 3, 0x6474E550, 1, 2
_SHT_NOBITS, _SHF_WRITE, _SHF_ALLOC, _SHF_EXECINSTR = 8, 1, 2, 4
_SHDR = struct.Struct("<IIQQQQIIQQ")
# Initialisers' code and data are hinted in aligned pieces of this size: a fetch is chunks anyway.
CODE_GRAIN = 64 << 10


def _parse_elf(node: Node, head: bytes, read: Reader, entry: bytes | None = None) -> _Elf | None:
    if head[4] != 2 or head[5] != 1:  # ELFCLASS64, ELFDATA2LSB only
        return None
    e_type, machine = struct.unpack_from("<HH", head, 16)
    phoff, = struct.unpack_from("<Q", head, 32)
    phentsize, phnum = struct.unpack_from("<HH", head, 54)
    if e_type not in (2, 3) or phentsize != 56 or not 0 < phnum <= 128 or phoff + phnum * 56 > node.size:
        return None
    phdrs = read(node, phoff, phnum * 56)
    if phdrs is None or len(phdrs) < phnum * 56:
        return None
    loads: list[tuple[int, int, int, int]] = []  # vaddr, offset, filesz, flags
    dynamic = eh_frame_hdr = None
    interp = False
    for i in range(phnum):
        p_type, flags, offset, vaddr, _paddr, filesz = struct.unpack_from("<IIQQQQ", phdrs, i * 56)
        if p_type == _PT_LOAD:
            loads.append((vaddr, offset, filesz, flags))
        elif p_type == _PT_DYNAMIC:
            dynamic = (offset, min(filesz, 1 << 16))
        elif p_type == _PT_GNU_EH_FRAME:
            eh_frame_hdr = (vaddr, filesz)
        elif p_type == _PT_INTERP:
            interp = True

    file_offset = functools.partial(elfcode.file_offset, loads)
    ranges = [(off, size) for _, off, size, flags in loads if flags & _PF_W and size]
    needed: list[bytes] = []
    runpath: list[bytes] = []
    code: list[tuple[int, int]] = []
    if dynamic is not None and dynamic[0] + dynamic[1] <= node.size:
        raw = read(node, *dynamic) or b""
        tags: dict[int, int] = {}
        strings: list[tuple[int, int]] = []
        for tag, value in struct.iter_unpack("<qQ", raw[: len(raw) // 16 * 16]):
            if tag == 0:
                break
            if tag in (_DT_NEEDED, _DT_RPATH, _DT_RUNPATH):
                strings.append((tag, value))
            else:
                tags.setdefault(tag, value)
        ranges += _loader_tables(tags, file_offset, loads)
        code = elfcode.init_reads(machine, tags, loads, eh_frame_hdr, _readonly_data(node, head, loads, read),
                                  lambda off, size: read(node, off, size), entry)
        strtab = file_offset(tags.get(_DT_STRTAB, -1)) if _DT_STRTAB in tags else None
        size = min(tags.get(_DT_STRSZ, 0), 16 << 20)
        fits = strtab is not None and size and strtab + size <= node.size
        table = read(node, strtab, size) if fits else None
        for tag, value in strings if table else ():
            end = table.find(b"\0", value)
            name = table[value:end] if 0 <= value < len(table) and end > value else b""
            if tag == _DT_NEEDED:
                if name:
                    needed.append(name)
            elif tag == _DT_RUNPATH or not any(t == _DT_RUNPATH for t, _ in strings):
                runpath += [d for d in name.split(b":") if d]  # DT_RPATH counts only without RUNPATH
    if interp and sum(size for _, _, size, _ in loads) <= PROGRAM_WHOLE:
        code += [(off, size) for _, off, size, _ in loads if size]  # after its libraries, as it runs
    loader = _merged(_clipped(ranges, node.size))
    grains = []
    for off, size in code:
        start = off // CODE_GRAIN * CODE_GRAIN
        grains.append((start, -(-(off + size) // CODE_GRAIN) * CODE_GRAIN - start))
    code_ranges = _without(_merged(_clipped(grains, node.size)), loader)
    return _Elf(machine, loader, needed, runpath, code_ranges, interp)


def _readonly_data(node: Node, head: bytes, loads: list[tuple[int, int, int, int]],
                   read: Reader) -> list[tuple[int, int]]:
    """(start, end) vaddrs of the object's read-only data, sorted: its allocated sections that are
    neither code nor writable, or without a section table, its segments that are neither."""
    shoff, = struct.unpack_from("<Q", head, 40)
    shentsize, shnum = struct.unpack_from("<HH", head, 58)
    table = None
    if shoff and shentsize == _SHDR.size and 0 < shnum <= 4096 and shoff + shnum * _SHDR.size <= node.size:
        table = read(node, shoff, shnum * _SHDR.size)
    if table is None or len(table) < shnum * _SHDR.size:
        return sorted((va, va + size) for va, _, size, flags in loads if not flags & (_PF_X | _PF_W) and size)
    out = []
    for _name, sh_type, flags, addr, _off, size, *_ in _SHDR.iter_unpack(table):
        readonly = flags & _SHF_ALLOC and not flags & (_SHF_WRITE | _SHF_EXECINSTR)
        if readonly and sh_type != _SHT_NOBITS and size:
            out.append((addr, addr + size))
    return sorted(out)


def _clipped(ranges: list[tuple[int, int]], file_size: int) -> list[tuple[int, int]]:
    return sorted((off, min(size, MAX_RANGE, file_size - off))
                  for off, size in ranges if 0 <= off < file_size)


def _without(ranges: list[tuple[int, int]], taken: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """`ranges` (sorted, disjoint) less the bytes of `taken` (sorted, disjoint)."""
    out = []
    for off, size in ranges:
        end = off + size
        for t_off, t_size in taken:
            if t_off + t_size <= off or t_off >= end:
                continue
            if t_off > off:
                out.append((off, t_off - off))
            off = max(off, t_off + t_size)
        if off < end:
            out.append((off, end - off))
    return out


def _loader_tables(tags: dict[int, int], file_offset: Callable[[int], int | None],
                   loads: list[tuple[int, int, int, int]]) -> list[tuple[int, int]]:
    """(offset, size) of each table the loader reads whole. A table with a size tag has that size;
    one without (symbols, hashes, versions) runs to the next table or to the end of its segment.
    Tables are not assumed to be together: patchelf (auditwheel's wheels) moves some to the end."""
    starts = sorted({o for t in _TABLE_STARTS if t in tags and (o := file_offset(tags[t])) is not None})
    out = []
    for t in _TABLE_STARTS:
        off = file_offset(tags[t]) if t in tags else None
        if off is None:
            continue
        if t in _TABLE_SIZES and _TABLE_SIZES[t] in tags:
            end = off + tags[_TABLE_SIZES[t]]
        else:
            segment_end = next((o + size for _, o, size, _ in loads if o <= off < o + size), off)
            end = min([o for o in starts if o > off] + [segment_end])
        out.append((off, end - off))
    return out


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, size in ranges:
        if out and off <= out[-1][0] + out[-1][1]:
            last = out[-1]
            out[-1] = (last[0], max(last[1], off + size - last[0]))
        else:
            out.append((off, size))
    return out
