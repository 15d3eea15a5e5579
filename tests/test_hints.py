"""Access hints (docs/format.md §10): what a build predicts a lazy start reads next, and the mount
fetching it.

- The builder: the imports a module runs as it is imported (absolute, relative, `from package
  import submodule`, extension modules; in `try` too), not those inside functions or classes or
  under `if TYPE_CHECKING:`; checked-hash bytecode leads to its
  source (fetched), timestamp bytecode only follows it; an ELF object's loader tables and its
  DT_NEEDED libraries (real system libraries, found through symlinks), a program's loader cache,
  the code its static initialisers call and the read-only data that code addresses (C++ libraries
  compiled here); the entry points of a site directory's distributions, one leading to the next;
  garbage that looks like
  an ELF object or a module, or an object at addresses past 2^63, breaks nothing, and symlinks
  never lead out of the image.
- The mount: reading one module fetches what it imports, before anyone reads it, and nothing
  else; `--no-hints` fetches only what is read. A mount that follows hints reads ahead of a miss
  only after a small chunk. Bytes read are the image's either way.
- The prefetcher: a walk's range requests run on all its threads at once, in the order the app
  imports, not the order the blob stores.
"""

from __future__ import annotations

import itertools
import json
import os
import py_compile
import random
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from registry_server import RegistryServer
from test_mount import Node, naiad, ok, publish, wait_for
from test_optimize import bootstrap_of

from naiad.builder.hints import CODE_GRAIN, Process
from naiad.builder.nodehints import load_time_requires
from naiad.builder.optimize import predicted_prefetch
from naiad.format.bootstrap import Bootstrap
from naiad.format.pathwalk import follow
from naiad.format.stats import bootstrap_stats
from naiad.oci.image import open_source
from naiad.oci.reference import parse_reference
from naiad.storage.cache import ChunkCache
from naiad.storage.fetcher import ChunkFetcher
from naiad.storage.hints import WORKERS, HintPrefetcher
from naiad.storage.image import NaiadImage

LIBDIR = Path("/usr/lib/x86_64-linux-gnu")


def write(root: Path, rel: str, text: str | bytes) -> Path:
    p = root / rel.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return p


def compile_pyc(source: Path, mode: py_compile.PycInvalidationMode) -> None:
    py_compile.compile(str(source), invalidation_mode=mode, doraise=True)


def empty_program(tmp_path: Path, dest: Path) -> Path:
    """`dest`: a program (ELF, this machine's C library) that does nothing."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    src = write(tmp_path, "main.c", "int main(void) { return 0; }\n")
    ok(subprocess.run(["gcc", "-o", str(dest), str(src)], capture_output=True, text=True))
    return dest


def app_tree(root: Path) -> Path:
    """An app whose imports exercise the resolver; the comments say what each line must hint."""
    write(root, "app/main.py", "import os\n"                 # nothing in the image: no hint
                               "import pkg.inner\n"          # pkg/__init__ and pkg/inner/__init__
                               "from pkg import helper, CONST as c\n"  # helper.py (a submodule)
                               "import native  # noqa\n"    # native.cpython-311-x86_64-linux-gnu.so
                               "def f():\n    import pkg.lazy\n"  # not at import time: no hint
                               "try:\n    import pkg.optional\n"  # runs on import: hinted
                               "except ImportError:\n    pass\n"
                               "if TYPE_CHECKING:\n    import pkg.typed\n"  # for type checkers only
                               "if __name__ == '__main__':\n    import pkg.script\n"  # as a script only
                               "class C:\n    if True:\n        import pkg.in_class\n")  # not followed
    write(root, "app/pkg/__init__.py", "from . import sibling\nfrom .deep.mod import thing\nCONST = 1\n")
    write(root, "app/pkg/sibling.py", "X = 1\n")
    write(root, "app/pkg/helper.py", "Y = 2\n")
    write(root, "app/pkg/lazy.py", "Z = 3\n")
    for name in ("optional", "typed", "script", "in_class"):
        write(root, f"app/pkg/{name}.py", "W = 4\n")
    write(root, "app/pkg/inner/__init__.py", "import pkg.sibling\n")
    write(root, "app/pkg/deep/__init__.py", "")
    write(root, "app/pkg/deep/mod.py", "thing = 5\n")
    write(root, "app/native.cpython-311-x86_64-linux-gnu.so", b"\x7fELF" + os.urandom(3000))  # garbage
    write(root, "app/libhigh.so", high_address_elf())  # well formed, addresses past 2^63
    write(root, "app/broken.py", b"from \xff\xfe import (\nimport ...\nfrom . import\n" + os.urandom(500))
    compile_pyc(root / "app/pkg/helper.py", py_compile.PycInvalidationMode.CHECKED_HASH)
    compile_pyc(root / "app/pkg/sibling.py", py_compile.PycInvalidationMode.TIMESTAMP)
    return root


def high_address_elf() -> bytes:
    """A small x86-64 object whose one segment, initialiser and unwind table sit at the top of the
    address space: parsed as given, it overflows 64-bit arithmetic."""
    base = (1 << 64) - 4096
    header = (b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 64, 0, 0,
                                                                  64, 56, 3, 0, 0, 0))
    phdrs = b"".join(struct.pack("<IIQQQQQQ", *p) for p in (
        (1, 5, 0, base, base, 1024, 1024, 4096),  # PT_LOAD, R+X
        (2, 6, 256, base + 256, base + 256, 48, 48, 8),  # PT_DYNAMIC
        (0x6474E550, 4, 600, base + 600, base + 600, 20, 20, 4)))  # PT_GNU_EH_FRAME
    body = bytearray(1024)
    body[:len(header + phdrs)] = header + phdrs
    body[256:304] = struct.pack("<qQqQqQ", 25, base + 512, 27, 8, 0, 0)  # DT_INIT_ARRAY(SZ)
    body[512:520] = struct.pack("<Q", base + 600)
    body[600:620] = bytes([1, 0x1B, 0x03, 0x3B]) + struct.pack("<iIii", 0, 1, 0, 0)
    return bytes(body)


def hints_by_path(bs: Bootstrap) -> dict[str, list[tuple[str, int, int]]]:
    """trigger path -> [(target path, foffset, size)] as stored."""
    paths = {attr.ino: os.fsdecode(p) for p, _, attr in bs.walk()}
    out = {}
    for ino, path in paths.items():
        first = bs.first_chunk(ino)
        if first is not None and (rows := bs.hints_of(first)):
            out[path] = [(paths[t], off, size) for t, off, size in rows]
    return out


def build(tmp_path: Path, tree: Path) -> Bootstrap:
    home = tmp_path / "home"
    target = f"oci:{tmp_path / 'layout'}:v1"
    ok(naiad(home, "build", tree, target))
    return bootstrap_of(home, target)


def test_python_hints_follow_top_level_imports(tmp_path: Path) -> None:
    bs = build(tmp_path, app_tree(tmp_path / "tree"))
    hints = hints_by_path(bs)
    stats = bootstrap_stats(bs)  # what `naiad inspect` shows
    assert stats["hint_triggers"] == len(hints) and stats["hints"] == sum(map(len, hints.values()))
    tag = sys.implementation.cache_tag  # py_compile names bytecode for the running interpreter
    helper_pyc, sibling_pyc = (f"/app/pkg/__pycache__/{n}.{tag}.pyc" for n in ("helper", "sibling"))
    assert hints["/app/main.py"] == [
        ("/app/pkg/__init__.py", 0, -1),
        ("/app/pkg/inner/__init__.py", 0, -1),
        (helper_pyc, 0, -1), ("/app/pkg/helper.py", 0, -1),  # checked-hash: the import reads both
        ("/app/native.cpython-311-x86_64-linux-gnu.so", 0, 1),  # its header; the loader does the rest
        ("/app/pkg/optional.py", 0, -1),
    ]
    # A submodule imported with `from . import` is hinted; timestamp bytecode only (no source).
    assert hints["/app/pkg/__init__.py"] == [(sibling_pyc, 0, -1), ("/app/pkg/deep/__init__.py", 0, -1),
                                             ("/app/pkg/deep/mod.py", 0, -1)]
    assert hints["/app/pkg/inner/__init__.py"] == [("/app/pkg/__init__.py", 0, -1), (sibling_pyc, 0, -1)]
    # Bytecode leads to its source's hints: fetching the source too only where the import reads it.
    assert hints[helper_pyc] == [("/app/pkg/helper.py", 0, -1)]
    assert hints[sibling_pyc] == [("/app/pkg/sibling.py", 0, 0)]
    # Garbage after an ELF magic and a module that is no Python: no hints of their own, and the
    # build went on.
    assert "/app/native.cpython-311-x86_64-linux-gnu.so" not in hints
    assert "/app/libhigh.so" not in hints
    assert "/app/broken.py" not in hints
    never = {f"/app/pkg/{n}.py" for n in ("lazy", "typed", "script", "in_class")}
    for targets in hints.values():
        assert not {t for t, _, _ in targets} & never


def test_a_pth_file_hints_the_modules_its_import_lines_import(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    site = "opt/venv/lib/python3.11/site-packages"
    write(tree, f"{site}/distutils-precedence.pth",  # as setuptools installs it
          "import os; var = 'SETUPTOOLS_USE_DISTUTILS'; enabled = os.environ.get(var, 'local') == 'local'; "
          "enabled and __import__('_distutils_hack').add_shim(); \n")
    write(tree, f"{site}/_distutils_hack/__init__.py", "def add_shim(): pass\n")
    write(tree, f"{site}/several.pth", "# a comment: import nothing\nextra\nimport first, second\n")
    for name in ("first", "second", "extra/not_imported"):
        write(tree, f"{site}/{name}.py", "")
    write(tree, "opt/elsewhere/lonely.pth", "import first\n")  # not in a site directory: site never reads it
    hints = hints_by_path(build(tmp_path, tree))
    assert hints[f"/{site}/distutils-precedence.pth"] == [(f"/{site}/_distutils_hack/__init__.py", 0, -1)]
    assert hints[f"/{site}/several.pth"] == [(f"/{site}/first.py", 0, -1), (f"/{site}/second.py", 0, -1)]
    assert "/opt/elsewhere/lonely.pth" not in hints


def test_node_requires_that_run_at_load_are_found_past_strings_comments_and_functions() -> None:
    source = rb"""'use strict';
// require('commented')
/* require('block-comment') */
var a = require('a'), b = require("./b");
const s = "require('in-a-string')";
const re = /require\('in-a-regex'\)[/]/g;
const t = `require('in-a-template') ${x}`;
if (x) { require('if-block'); } else { require('else-block') }
try { require('try-block') } catch (e) { require('catch-block') }
function f() { require('in-a-function') }
const g = () => { require('in-an-arrow') };
const h = async (x) => { require('in-an-async-arrow') };
obj = { m() { require('in-a-method') }, k: require('object-value') };
(function () { require('iife') })();
!function () { require('bang-iife') }();
(() => { require('arrow-iife') })();
app.get('/', function (req, res) { require('in-a-callback') });
class C { method(a) { require('in-a-class-method') } }
module.exports = function () { require('exported-function') };
var y = a / b; require('after-a-division');
"""
    assert load_time_requires(source) == [
        b"a", b"./b", b"if-block", b"else-block", b"try-block", b"catch-block", b"object-value",
        b"iife", b"bang-iife", b"arrow-iife", b"after-a-division"]
    # Whatever a file holds, the scan ends: unterminated literals, stray braces, binary, deep nesting.
    for junk in (b"require('a", b"/* require('b')", b"`${require('c')", b"}}}{{{ require('d')",
                 os.urandom(4096), b"`${" * 5000 + b"require('e')"):
        assert isinstance(load_time_requires(junk), list)


def test_node_hints_resolve_requires_as_node_does(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    write(tree, "app/main.js", "\n".join([
        "const express = require('express');",  # a global folder, package.json main
        "const util = require('./util');",  # relative, .js added
        "const local = require('local-pkg');",  # node_modules beside the app, index.js
        "const sub = require('@scope/pkg/sub');",  # Debian's arch folder, exports' require condition
        "const fs = require('fs'), path = require('node:path');",  # built-ins: no files
        "const gone = require('missing');",
        "const data = require('./data.json');",
        "const addon = require('./addon.node');",  # native: its header, the loader does the rest
        "function later() { return require('lazy-pkg'); }",
    ]))
    write(tree, "app/util.js", "module.exports = 'util';\n")
    write(tree, "app/data.json", '{"data": 1}\n')
    write(tree, "app/addon.node", b"\x7fELF not really")
    write(tree, "app/node_modules/local-pkg/index.js", "module.exports = 'local';\n")
    write(tree, "app/node_modules/lazy-pkg/index.js", "module.exports = 'lazy';\n")
    write(tree, "usr/share/nodejs/fs/index.js", "module.exports = 'not the built-in';\n")
    express = "usr/share/nodejs/express"
    write(tree, f"{express}/package.json", json.dumps({"name": "express", "main": "lib/express.js"}))
    write(tree, f"{express}/lib/express.js", "var router = require('./router');\n")
    write(tree, f"{express}/lib/router/index.js", "module.exports = {};\n")
    scoped = "usr/lib/x86_64-linux-gnu/nodejs/@scope/pkg"
    write(tree, f"{scoped}/package.json", json.dumps({"name": "@scope/pkg", "exports": {
        ".": "./main.js", "./sub": {"import": "./esm/sub.mjs", "require": "./cjs/sub.js"}}}))
    write(tree, f"{scoped}/cjs/sub.js", "module.exports = 'sub';\n")
    write(tree, f"{scoped}/esm/sub.mjs", "export default 'sub';\n")
    write(tree, f"{scoped}/sub.js", "module.exports = 'not exported';\n")
    write(tree, "usr/share/nodejs/unused/index.js", "require('./x');\n")  # no app loads it
    write(tree, "usr/share/nodejs/unused/x.js", "module.exports = 'x';\n")
    hints = hints_by_path(build(tmp_path, tree))
    assert hints["/app/main.js"] == [
        (f"/{express}/package.json", 0, -1), (f"/{express}/lib/express.js", 0, -1),
        ("/app/util.js", 0, -1),
        ("/app/node_modules/local-pkg/index.js", 0, -1),
        (f"/{scoped}/package.json", 0, -1), (f"/{scoped}/cjs/sub.js", 0, -1),
        ("/app/data.json", 0, -1),
        ("/app/addon.node", 0, 1),
    ]
    assert hints[f"/{express}/lib/express.js"] == [(f"/{express}/lib/router/index.js", 0, -1)]
    assert hints["/usr/share/nodejs/unused/index.js"] == [("/usr/share/nodejs/unused/x.js", 0, -1)]
    # With the image's `node main.js` known, only what it loads is scanned: the same hints for it.
    config = write(tmp_path, "config.json", json.dumps({"config": {
        "Entrypoint": ["/usr/bin/node"], "Cmd": ["main.js"], "WorkingDir": "/app"}}))
    home, target = tmp_path / "home2", f"oci:{tmp_path / 'layout2'}:v1"
    ok(naiad(home, "build", tree, target, "--config", config))
    from_entry = hints_by_path(bootstrap_of(home, target))
    assert from_entry["/app/main.js"] == hints["/app/main.js"]
    assert from_entry[f"/{express}/lib/express.js"] == hints[f"/{express}/lib/express.js"]
    assert "/usr/share/nodejs/unused/index.js" not in from_entry


def test_a_package_json_no_parser_can_read_costs_its_hints_not_the_build(tmp_path: Path) -> None:
    # Nested deeper than Python's stack, and not JSON at all: no manifest to follow, so the hints
    # name the package's index.js, where a loader without a "main" looks.
    tree = tmp_path / "tree"
    write(tree, "app/main.js", "require('deep'); require('broken');\n")
    for name, manifest in (("deep", "[" * 200_000 + "]" * 200_000), ("broken", "{main: nope")):
        write(tree, f"app/node_modules/{name}/package.json", manifest)
        write(tree, f"app/node_modules/{name}/index.js", "module.exports = 1;\n")
    hints = hints_by_path(build(tmp_path, tree))
    assert [path for path, _, _ in hints["/app/main.js"]] == [
        "/app/node_modules/deep/index.js", "/app/node_modules/broken/index.js"]


def test_entry_points_of_a_site_directory_lead_one_to_the_next(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    site = "/venv/lib/python3.11/site-packages"
    for dist in ("torch-2.0.dist-info", "Jinja2-3.1.egg-info", "numpy-2.2.dist-info", "sympy-1.14.dist-info"):
        write(tree, f"{site}/{dist}/entry_points.txt", f"[console_scripts]\n{dist} = {dist}:main\n")
    write(tree, f"{site}/six-1.16.dist-info/METADATA", "Name: six\n")  # no entry points: not in the chain
    write(tree, "/usr/lib/python3/dist-packages/pip-23.0.dist-info/entry_points.txt", "[console_scripts]\n")
    hints = hints_by_path(build(tmp_path, tree))
    chain = [f"{site}/{d}/entry_points.txt" for d in ("Jinja2-3.1.egg-info", "numpy-2.2.dist-info",
                                                       "sympy-1.14.dist-info", "torch-2.0.dist-info")]
    for a, b in itertools.pairwise(chain):
        assert hints[a] == [(b, 0, -1)]
    assert chain[-1] not in hints  # the last leads nowhere, and another directory is a chain of its own
    assert "/usr/lib/python3/dist-packages/pip-23.0.dist-info/entry_points.txt" not in hints


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_cpython_hints_what_it_reads_before_the_script(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    python = empty_program(tmp_path, tree / "usr/bin/python3.11")
    for module in ("encodings/__init__", "encodings/utf_8", "json/__init__"):
        write(tree, f"usr/lib/python3.11/{module}.py", "")
    write(tree, "etc/python3.11/sitecustomize.py", "")
    os.symlink("/etc/python3.11/sitecustomize.py", tree / "usr/lib/python3.11/sitecustomize.py")
    write(tree, "usr/lib/python3/dist-packages/system.pth", "")
    write(tree, "usr/lib/locale/C.utf8/LC_CTYPE", "ctype\n")
    write(tree, "usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache", "cache\n")
    write(tree, "usr/share/zoneinfo/Etc/UTC", "TZif\n")
    os.symlink("/usr/share/zoneinfo/Etc/UTC", tree / "etc/localtime")
    write(tree, "opt/venv/pyvenv.cfg", "home = /usr/bin\ninclude-system-site-packages = false\n")
    os.makedirs(tree / "opt/venv/bin")
    os.symlink("/usr/bin/python3.11", tree / "opt/venv/bin/python")
    for name in ("z.pth", "a.pth", "module.py"):
        write(tree, f"opt/venv/lib/python3.11/site-packages/{name}", name)
    write(tree, "opt/other/pyvenv.cfg", "home = /usr/local/bin\n")  # another interpreter's venv
    write(tree, "opt/other/lib/python3.11/site-packages/other.pth", "")
    hints = hints_by_path(build(tmp_path, tree))["/usr/bin/python3.11"]
    site = "/opt/venv/lib/python3.11/site-packages"
    assert [t for t, _, _ in hints if t != "/usr/bin/python3.11"] == [
        "/opt/venv/pyvenv.cfg", "/usr/lib/locale/C.utf8/LC_CTYPE",
        "/usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache", "/usr/share/zoneinfo/Etc/UTC",
        "/usr/lib/python3/dist-packages/system.pth", f"{site}/a.pth", f"{site}/z.pth",
        "/usr/lib/python3.11/encodings/__init__.py", "/usr/lib/python3.11/encodings/utf_8.py",
        "/etc/python3.11/sitecustomize.py",
    ]
    # A small program hints all it loads (its code too, not only the loader's tables).
    hinted = set()
    for t, off, size in hints:
        if t == "/usr/bin/python3.11":
            hinted.update(range(off, off + size))
    segments = ok(subprocess.run(["readelf", "-lW", str(python)], capture_output=True, text=True)).stdout
    for line in segments.splitlines():
        if line.split()[:1] == ["LOAD"]:
            off, size = int(line.split()[1], 16), int(line.split()[4], 16)
            assert set(range(off, off + size)) <= hinted, line


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_the_entry_program_hints_its_script_and_locale(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    empty_program(tmp_path, tree / "usr/bin/tool")
    write(tree, "app/script.txt", "run me\n")
    write(tree, "app/rel/data.txt", "and me\n")
    write(tree, "app/-flag", "not an argument's file\n")
    write(tree, "usr/lib/locale/C.utf8/LC_CTYPE", "ctype\n")  # LANG=C.UTF-8, as glibc normalises it
    write(tree, "usr/lib/locale/de_DE.utf8/LC_CTYPE", "another locale\n")
    config = write(tmp_path, "config.json", json.dumps({"config": {
        "Entrypoint": ["tool"], "Cmd": ["/app/script.txt", "rel/data.txt", "-flag", "/nonexistent"],
        "Env": ["PATH=/nowhere:/usr/bin", "LANG=C.UTF-8"], "WorkingDir": "/app"}}))
    home, target = tmp_path / "home", f"oci:{tmp_path / 'layout'}:v1"
    ok(naiad(home, "build", tree, target, "--config", config))
    hints = hints_by_path(bootstrap_of(home, target))
    assert [h for h in hints["/usr/bin/tool"] if h[0] != "/usr/bin/tool" and "x86_64" not in h[0]][-3:] == [
        ("/app/script.txt", 0, -1), ("/app/rel/data.txt", 0, -1), ("/usr/lib/locale/C.utf8/LC_CTYPE", 0, -1)]


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_a_start_is_predicted_from_the_program_the_config_runs(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    empty_program(tmp_path, tree / "usr/lib/tool/tool-1")
    (tree / "usr/bin").mkdir()
    os.symlink("../lib/tool/tool-1", tree / "usr/bin/tool")
    write(tree, "nowhere/tool", "a file by the name, not executable\n")
    write(tree, "app/script.txt", "run me\n")
    write(tree, "app/unread.txt", "not me\n")
    write(tree, "etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")  # the runtime reads it first
    write(tree, "etc/group", "")  # empty: nothing to read
    config = {"config": {"Entrypoint": ["tool"], "Cmd": ["/app/script.txt"],
                         "Env": ["PATH=/nowhere:/usr/bin"], "WorkingDir": "/app"}}
    path = write(tmp_path, "config.json", json.dumps(config))
    home, target = tmp_path / "home", f"oci:{tmp_path / 'layout'}:v1"
    ok(naiad(home, "build", tree, target, "--config", path))
    bs = bootstrap_of(home, target)
    predicted = [bs.path_of(ino) for ino, _ in predicted_prefetch(bs, config)]
    assert predicted[:2] == ["/etc/passwd", "/usr/lib/tool/tool-1"] and "/app/script.txt" in predicted
    assert "/app/unread.txt" not in predicted and "/nowhere/tool" not in predicted
    assert predicted_prefetch(bs, {"config": {"Entrypoint": ["/app/script.txt"]}}) == []  # not executable
    assert predicted_prefetch(bs, {}) == []


@pytest.mark.parametrize(("config", "expected"), [
    ({}, None),
    ({"config": "not a mapping"}, None),
    ({"config": {"Entrypoint": "sh -c x", "Cmd": None}}, None),  # not lists: runs nothing we know of
    ({"config": {"Entrypoint": ["/bin/sh", 3], "Cmd": ["run"], "Env": ["A=1=2", 7, "B"],
                 "WorkingDir": "rel"}},
     Process([b"/bin/sh", b"run"], {b"A": b"1=2", b"B": b""}, b"/")),
])
def test_a_config_of_any_shape_gives_a_process_or_none(config: dict, expected: Process | None) -> None:
    assert Process.of_config(config) == expected


@pytest.mark.parametrize("version", ["3.10", "3.11"])
def test_frozen_standard_modules_are_not_hinted(version: str, tmp_path: Path) -> None:
    """CPython 3.11 runs `os`, `stat` and the like from frozen copies: importing them reads no file."""
    tree = tmp_path / "tree"
    lib = f"usr/lib/python{version}"
    write(tree, f"{lib}/os.py", "import stat\nimport json\n")
    write(tree, f"{lib}/stat.py", "X = 1\n")
    write(tree, f"{lib}/json/__init__.py", "Y = 2\n")
    write(tree, f"{lib}/importlib/__init__.py", "")
    write(tree, f"{lib}/importlib/_bootstrap.py", "Z = 3\n")  # frozen in every version
    write(tree, "app/main.py", "import os\nimport json\nfrom importlib import _bootstrap\n")
    hints = hints_by_path(build(tmp_path, tree))
    json_init, importlib = (f"/{lib}/json/__init__.py", 0, -1), (f"/{lib}/importlib/__init__.py", 0, -1)
    if version == "3.10":
        assert hints["/app/main.py"] == [(f"/{lib}/os.py", 0, -1), json_init, importlib]
    else:
        assert hints["/app/main.py"] == [json_init, importlib]


@pytest.mark.skipif(not (LIBDIR / "libzstd.so.1").exists() or not (LIBDIR / "libc.so.6").exists(),
                    reason="needs Debian's x86-64 libzstd and libc")
def test_elf_hints_name_the_loader_tables_and_needed_libraries(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    lib = tree / "usr/lib/x86_64-linux-gnu"
    lib.mkdir(parents=True)
    real = os.path.realpath(LIBDIR / "libzstd.so.1")
    shutil.copy(real, lib / os.path.basename(real))
    (lib / "libzstd.so.1").symlink_to(os.path.basename(real))  # DT_NEEDED names the soname link
    shutil.copy(os.path.realpath(LIBDIR / "libc.so.6"), lib / "libc.so.6")
    (tree / "lib").symlink_to("usr/lib")  # merged /usr, as Debian has it
    (tree / "bin").mkdir()
    shutil.copy("/usr/bin/true", tree / "bin/tool")  # an executable, found by its mode
    write(tree, "etc/ld.so.cache", os.urandom(5000))  # where the loader looks after RUNPATH
    (tree / "usr/lib/x86_64-linux-gnu/loop.so").symlink_to("loop.so")  # a loop is no library
    bs = build(tmp_path, tree)
    hints = hints_by_path(bs)
    zstd = "/usr/lib/x86_64-linux-gnu/" + os.path.basename(real)
    own = [(off, size) for t, off, size in hints[zstd] if t == zstd]
    needed = [t for t, off, size in hints[zstd] if t != zstd]
    assert needed == ["/usr/lib/x86_64-linux-gnu/libc.so.6"]
    # The loader's tables: what `readelf` calls .dynsym through .rela.plt, and the writable segment.
    sections = readelf_sections(Path(real))
    for name in (".dynsym", ".dynstr", ".gnu.hash", ".rela.dyn", ".data.rel.ro", ".got"):
        if name in sections:
            off, size = sections[name]
            assert any(o <= off and off + size <= o + s for o, s in own), (name, own)
    assert sum(s for _, s in own) < os.path.getsize(real) / 2  # not the code
    assert ("/usr/lib/x86_64-linux-gnu/libc.so.6", 0, 1) in hints["/bin/tool"]
    # A program's loader reads the library cache, whole, before its libraries; a library's does not.
    targets = [t for t, _, _ in hints["/bin/tool"]]
    assert ("/etc/ld.so.cache", 0, -1) in hints["/bin/tool"]
    assert targets.index("/etc/ld.so.cache") < targets.index("/usr/lib/x86_64-linux-gnu/libc.so.6")
    assert "/etc/ld.so.cache" not in {t for t, _, _ in hints[zstd]}


@pytest.mark.skipif(not (LIBDIR / "libzstd.so.1").exists(), reason="needs Debian's x86-64 libzstd")
def test_elf_hints_of_a_patched_object_skip_its_code(tmp_path: Path) -> None:
    """patchelf (auditwheel, for most wheels' libraries) moves tables to a new segment at the end:
    the hints are each table, not everything between the first and the last."""
    tree = tmp_path / "tree"
    lib = tree / "opt/wheel.libs/libzstd-patched.so"
    lib.parent.mkdir(parents=True)
    shutil.copy(os.path.realpath(LIBDIR / "libzstd.so.1"), lib)
    ok(subprocess.run(["patchelf", "--set-rpath", "$ORIGIN/" + "x" * 4000, str(lib)],
                      capture_output=True, text=True))
    sections = readelf_sections(lib)
    assert sections[".dynstr"][0] > sections[".text"][0], "patchelf left .dynstr in place"
    bs = build(tmp_path, tree)
    own = [(off, size) for _, off, size in hints_by_path(bs)["/opt/wheel.libs/libzstd-patched.so"]]
    for name in (".dynsym", ".dynstr", ".rela.dyn"):
        off, size = sections[name]
        assert any(o <= off and off + size <= o + s for o, s in own), (name, own)
    # Of the code, only what its initialisers run (frame_dummy and the like, a grain or two).
    text_off, text_size = sections[".text"]
    in_text = sum(min(o + s, text_off + text_size) - max(o, text_off) for o, s in own
                  if o < text_off + text_size and text_off < o + s)
    assert in_text <= 2 * CODE_GRAIN < text_size / 4, own


# A C++ library whose static initialiser calls an exported function (through the PLT), which calls
# a file-local one directly, which calls another exported one; a fourth is never called. Padding
# between them (no unwind information: not functions) puts each in a chunk of its own.
INIT_LIBRARY = r"""
asm(".text\n.skip 1048576, 0xcc\n");
extern "C" __attribute__((noinline)) int reached(int x) { return x * 7 + 1; }
asm(".text\n.skip 1048576, 0xcc\n");
static __attribute__((noinline)) int direct(int x) { return reached(x) + 3; }
asm(".text\n.skip 1048576, 0xcc\n");
extern "C" __attribute__((noinline)) int never(int x) { return x * 13; }
asm(".text\n.skip 1048576, 0xcc\n");
extern "C" __attribute__((noinline)) int via_plt(int x) { return direct(x) + 1; }
struct Init { Init() { value = via_plt(2); } int value; };
Init init;
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_elf_hints_name_the_code_its_initialisers_run(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    lib = compile_library(write(tmp_path, "init.cpp", INIT_LIBRARY), tree / "usr/lib/libinit.so")
    offsets = function_offsets(lib)
    calls = ok(subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(lib)], capture_output=True,
                              text=True)).stdout
    assert "call" in calls and "<via_plt@plt>" in calls, "the initialiser no longer calls through the PLT"
    own = own_ranges(build(tmp_path, tree), "/usr/lib/libinit.so")

    def hinted(name: str) -> bool:
        return covered(own, offsets[name])

    ctor = next(n for n in offsets if n.startswith("_GLOBAL__sub_I"))
    assert hinted(ctor) and hinted("via_plt") and hinted("reached")
    assert hinted(next(n for n in offsets if "direct" in n))  # _ZL6directi
    assert not hinted("never"), own


# A C++ library whose static initialiser passes a table in .rodata to a function; another table,
# which only a function never called reads, lies before it, after padding that keeps both away
# from the code's pieces; each fills a chunk.
DATA_LIBRARY = r"""
extern "C" __attribute__((noinline)) int lookup(const char *table, int i) { return table[i]; }
__attribute__((used)) static const char padding[1 << 20] = {3};
static const char unread_table[1 << 20] = {2};
static const char read_table[1 << 20] = {1};
extern "C" __attribute__((noinline)) int never(int i) { return lookup(unread_table, i); }
struct Init { Init() { value = lookup(read_table, 3); } int value; };
Init init;
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_elf_hints_name_the_data_its_initialisers_read(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    lib = compile_library(write(tmp_path, "data.cpp", DATA_LIBRARY), tree / "usr/lib/libdata.so")
    tables = symbol_offsets(lib, ".rodata", "r")
    assert abs(tables["_ZL10read_table"] - tables["_ZL12unread_table"]) >= 1 << 20, tables
    own = own_ranges(build(tmp_path, tree), "/usr/lib/libdata.so")
    assert covered(own, tables["_ZL10read_table"])
    assert not covered(own, tables["_ZL12unread_table"]), own


# A Python extension module: the import calls PyInit_fake once the module is loaded, and it calls
# a function stored a chunk away; another, never called, lies between them.
EXTENSION = r"""
static __attribute__((noinline)) int reached(int x) { return x * 7 + VARIANT; }
__asm__(".text\n.skip 1048576, 0xcc\n");
__attribute__((noinline)) int never(int x) { return x * 13; }
__asm__(".text\n.skip 1048576, 0xcc\n");
void *PyInit_fake(void) { return (void *)(long)reached(3); }
"""


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_an_extension_module_hints_the_code_its_init_function_runs(tmp_path: Path) -> None:
    src = write(tmp_path, "fake.c", EXTENSION)
    tree = tmp_path / "tree"
    site = "/usr/lib/python3/dist-packages"
    # The same code in a plain library (built apart: identical files would share their hints).
    objects = {"fake.cpython-311-x86_64-linux-gnu.so": "1", "libfake.so": "2"}
    for name, variant in objects.items():
        compile_library(src, tree / site.lstrip("/") / name, f"-DVARIANT={variant}")
    bs = build(tmp_path, tree)
    for name in objects:
        offsets = function_offsets(tree / site.lstrip("/") / name)
        own = own_ranges(bs, f"{site}/{name}")
        reached = next(f for f in offsets if f.startswith("reached"))
        assert covered(own, offsets[reached]) == name.startswith("fake."), (name, own)
        assert not covered(own, offsets["never"])


# An exported constructor: its .init_array entry is bound by symbol (R_X86_64_64), not RELATIVE.
EXPORTED_CONSTRUCTOR = r"""
static __attribute__((noinline)) int reached(int x) { return x * 7 + 1; }
__asm__(".text\n.skip 1048576, 0xcc\n");
int value;
__attribute__((constructor)) void exported_init(void) { value = reached(3); }
"""


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_an_exported_constructor_is_an_initialiser(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    lib = compile_library(write(tmp_path, "ctor.c", EXPORTED_CONSTRUCTOR), tree / "usr/lib/libctor.so")
    relocations = ok(subprocess.run(["readelf", "-rW", str(lib)], capture_output=True, text=True)).stdout
    assert any("R_X86_64_64" in ln and "exported_init" in ln for ln in relocations.splitlines())
    offsets = function_offsets(lib)
    own = own_ranges(build(tmp_path, tree), "/usr/lib/libctor.so")
    reached = next(f for f in offsets if f.startswith("reached"))
    assert covered(own, offsets[reached]), own


# A constructor that registers a callback (takes its address, as a library registering its kernels
# or factories does), a chunk away from it; another function lies between them, never referenced.
REGISTERING_CONSTRUCTOR = r"""
static __attribute__((noinline)) int registered(int x) { return x * 7 + 1; }
__asm__(".text\n.skip 1048576, 0xcc\n");
__attribute__((noinline)) int never(int x) { return x * 13; }
__asm__(".text\n.skip 1048576, 0xcc\n");
int (*volatile callbacks[1])(int);
__attribute__((constructor)) static void registering(void) { callbacks[0] = registered; }
"""


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_a_callback_an_initialiser_registers_is_hinted_as_called(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    lib = compile_library(write(tmp_path, "reg.c", REGISTERING_CONSTRUCTOR), tree / "usr/lib/libreg.so")
    offsets = function_offsets(lib)
    registered = next(f for f in offsets if f.startswith("registered"))
    listing = ok(subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(lib)], capture_output=True,
                                text=True)).stdout
    assert any("lea" in ln and f"<{registered}>" in ln for ln in listing.splitlines()), "no lea of it"
    own = own_ranges(build(tmp_path, tree), "/usr/lib/libreg.so")
    assert covered(own, offsets[registered]), own
    assert not covered(own, offsets["never"]), own


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_libcrypto_hints_the_openssl_config_its_initialisation_reads(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    lib = tree / "usr/lib/x86_64-linux-gnu"
    text = 'const char dir[] __attribute__((used)) = "OPENSSLDIR: \\"/usr/lib/ssl\\"";\n'
    compile_library(write(tmp_path, "dir.c", text), lib / "libcrypto.so.3")
    # The string alone is not enough (and another file: hints are keyed by a file's first chunk).
    compile_library(write(tmp_path, "other.c", text + "int other;\n"), lib / "libother.so.3")
    write(tree, "etc/ssl/openssl.cnf", "[openssl_init]\n")
    (tree / "usr/lib/ssl").mkdir(parents=True)
    os.symlink("/etc/ssl/openssl.cnf", tree / "usr/lib/ssl/openssl.cnf")
    hints = hints_by_path(build(tmp_path, tree))
    assert ("/etc/ssl/openssl.cnf", 0, -1) in hints["/usr/lib/x86_64-linux-gnu/libcrypto.so.3"]
    assert "/etc/ssl/openssl.cnf" not in {t for t, _, _ in hints["/usr/lib/x86_64-linux-gnu/libother.so.3"]}


def compile_library(source: Path, lib: Path, *flags: str) -> Path:
    """`source` (C or C++, by its suffix) built as a shared object at `lib`, at -O1, with its
    definitions in the order written."""
    compiler = "g++" if source.suffix == ".cpp" else "gcc"
    lib.parent.mkdir(parents=True, exist_ok=True)
    ok(subprocess.run([compiler, "-O1", "-fPIC", "-shared", "-fno-toplevel-reorder", *flags, "-o", str(lib),
                       str(source)], capture_output=True, text=True))
    return lib


def own_ranges(bs: Bootstrap, path: str) -> list[tuple[int, int]]:
    """(offset, size) of the hints the file at `path` has into itself."""
    return [(off, size) for target, off, size in hints_by_path(bs).get(path, []) if target == path]


def covered(ranges: list[tuple[int, int]], offset: int) -> bool:
    return any(o <= offset < o + s for o, s in ranges)


def function_offsets(lib: Path) -> dict[str, int]:
    """File offset of each function symbol."""
    return symbol_offsets(lib, ".text", "tT")


def symbol_offsets(lib: Path, section: str, kinds: str) -> dict[str, int]:
    """File offset of each symbol of these `nm` kinds in `section` (through its address and offset)."""
    listing = ok(subprocess.run(["readelf", "-SW", str(lib)], capture_output=True, text=True)).stdout
    row = next(ln.replace("[ ", "[").split() for ln in listing.splitlines() if f" {section} " in ln)
    addr, offset, size = int(row[3], 16), int(row[4], 16), int(row[5], 16)
    out = {}
    for line in ok(subprocess.run(["nm", str(lib)], capture_output=True, text=True)).stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in kinds and addr <= int(parts[0], 16) < addr + size:
            out[parts[2]] = int(parts[0], 16) - addr + offset
    return out


def readelf_sections(path: Path) -> dict[str, tuple[int, int]]:
    out = ok(subprocess.run(["readelf", "-SW", str(path)], capture_output=True, text=True)).stdout
    sections = {}
    for line in out.splitlines():
        parts = line.replace("[ ", "[").split()
        if len(parts) > 6 and parts[0].startswith("[") and parts[1].startswith("."):
            sections[parts[1]] = (int(parts[4], 16), int(parts[5], 16))
    return sections


@pytest.mark.parametrize("hints", [True, False], ids=["hints", "no-hints"])
def test_a_mount_that_follows_hints_reads_ahead_only_after_small_chunks(hints: bool, registry: RegistryServer,
                                                                          node: Node) -> None:
    tree = node.root / "tree"
    for name in "abcd":  # stored back to back, 200 KB each (random: as big compressed)
        write(tree, f"data/{name}", os.urandom(200_000))
    write(tree, "app/mod.py", "")
    write(tree, "app/main.py", "import mod\n")  # an image with hints
    ref, _ = publish(node.home, tree, registry, name="readahead")
    mnt = node.mount(ref, *([] if hints else ["--no-hints"]))
    assert (mnt / "data/a").read_bytes()[:10] == (tree / "data/a").read_bytes()[:10]
    fetched = node.stats(mnt)["chunks_fetched"]
    # Hints fetch a start's neighbours; a miss of a 200 KB chunk reads nothing more. Without
    # hints, read-ahead takes the next chunks, up to 1 MiB until the link is measured.
    assert fetched == 1 if hints else fetched == 4, fetched


@pytest.mark.parametrize("hints", [True, False], ids=["hints", "no-hints"])
def test_a_read_fetches_what_the_module_imports(hints: bool, registry: RegistryServer, node: Node) -> None:
    tree = app_tree(node.root / "tree")
    write(tree, "app/big", os.urandom(4 << 20))  # read-ahead could reach the modules through it
    ref, _ = publish(node.home, tree, registry, name="hints")
    options = ["--amplify", "0"] + ([] if hints else ["--no-hints"])
    mnt = node.mount(ref, *options)
    assert (mnt / "app/main.py").read_bytes() == (tree / "app/main.py").read_bytes()
    bs = node.bootstrap()
    wanted = {p: bs.file_chunks(bs.resolve(p))[0].digest
              for p in ("app/pkg/__init__.py", "app/pkg/helper.py", "app/pkg/deep/mod.py")}
    unwanted = {p: bs.file_chunks(bs.resolve(p))[0].digest for p in ("app/pkg/lazy.py", "app/big")}
    if hints:
        wait_for(lambda: set(wanted.values()) <= set(node.cache_rows()), "the hinted modules in the cache")
        stats = node.stats(mnt)
        assert stats["hints"]["triggers"] >= 1 and stats["hints"]["chunks"] >= len(wanted)
    else:
        stats = node.stats(mnt)
        assert stats["hints"] is None
        assert stats["chunks_fetched"] == 1  # main.py, and nothing it imports
    assert not set(unwanted.values()) & set(node.cache_rows())
    for rel in ("app/pkg/__init__.py", "app/pkg/helper.py", "app/pkg/deep/mod.py", "app/pkg/lazy.py"):
        assert (mnt / rel).read_bytes() == (tree / rel).read_bytes()
    # With hints, what main.py imports was cached before it was read: only main.py and lazy.py missed.
    assert node.stats(mnt)["misses"] == (2 if hints else 5)
    node.assert_cache_consistent()



class SlowBackend:
    """An OCI layout's blobs, every range request taking `delay` seconds (a distant registry);
    records the offset each request starts at and how many ran at once."""

    def __init__(self, source, delay: float):
        self.source, self.delay = source, delay
        self.offsets: list[int] = []
        self.active = self.peak = 0
        self._lock = threading.Lock()

    def read_range(self, digest: str, offset: int, size: int) -> bytes:
        with self._lock:
            self.offsets.append(offset)
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            time.sleep(self.delay)
            return self.source.read_range(digest, offset, size)
        finally:
            with self._lock:
                self.active -= 1


def test_hinted_fetches_run_at_once_in_the_order_the_app_imports(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    names = [f"m{i:02d}" for i in range(16)]
    write(tree, "app/main.py", "".join(f"import {n}\n" for n in reversed(names)))  # m15 first
    rnd = random.Random(5)
    for n in names:
        write(tree, f"app/{n}.py", f"X = {n!r}\n")
        # Stored between two modules, too big to read across: one range request per module.
        write(tree, f"app/{n}x.dat", rnd.randbytes(100_000))
    build(tmp_path, tree)
    img = NaiadImage.open(open_source(parse_reference(f"oci:{tmp_path / 'layout'}:v1")))
    bs = img.bootstrap
    backend = SlowBackend(img.source, 0.1)
    cache = ChunkCache(str(tmp_path / "cache"))
    fetcher = ChunkFetcher(bs, backend, cache, amplify=0)
    hints = HintPrefetcher(bs, fetcher)
    fetcher.on_miss = hints.on_miss
    try:
        fetcher.read(bs.file_chunks(bs.resolve("/app/main.py")))
        modules = [bs.file_chunks(bs.resolve(f"/app/{n}.py"))[0] for n in names]
        wait_for(lambda: all(cache.contains(c.digest) for c in modules), "the imported modules cached")
        # Every hint thread at once (main.py's own request may still be running too): one thread
        # per miss made it 2 at most.
        assert backend.peak >= WORKERS
        # The first requests after main.py's own are the modules it imports first.
        first = {c.offset: n for c, n in zip(modules, names, strict=True)}
        assert {first.get(o) for o in backend.offsets[1:1 + WORKERS]} == set(names[-WORKERS:])
        assert len(backend.offsets) == 1 + len(names)  # nothing else, nothing twice
    finally:
        hints.close()
        fetcher.close()
        cache.close()
        img.close()


def test_path_walk_stays_in_the_image_and_stops_at_loops() -> None:
    """format/pathwalk.follow, over a toy tree: absolute links restart at the image's root, ".."
    stops there, and a loop ends in None instead of a hang."""
    tree = {b"/": {b"usr": b"/usr", b"lib": b"->usr/lib", b"etc": b"/etc"},
            b"/usr": {b"lib": b"/usr/lib"}, b"/usr/lib": {b"libc.so.6": b"/usr/lib/libc.so.6",
                                                         b"up": b"->../../../../etc", b"a": b"->b",
                                                         b"b": b"->a", b"abs": b"->/etc/passwd"},
            b"/etc": {b"passwd": b"/etc/passwd"}, b"/etc/passwd": None, b"/usr/lib/libc.so.6": None}

    def child(node: bytes, name: bytes) -> bytes | None:
        entries = tree.get(node)
        return entries.get(name) if isinstance(entries, dict) else None

    def link(node: bytes) -> bytes | None:
        return node[2:] if node.startswith(b"->") else None

    def resolve(path: bytes) -> bytes | None:
        return follow(path, b"/", child, link)

    assert resolve(b"/lib/libc.so.6") == b"/usr/lib/libc.so.6"  # merged /usr
    assert resolve(b"/usr/lib/up/passwd") == b"/etc/passwd"  # ".." past the root stays at the root
    assert resolve(b"/usr/lib/../../../../etc/passwd") == b"/etc/passwd"
    assert resolve(b"/usr/lib/abs") == b"/etc/passwd"  # an absolute target means the image's root
    assert resolve(b"/usr/lib/a") is None  # a -> b -> a -> ...
    assert resolve(b"/nowhere/x") is None
