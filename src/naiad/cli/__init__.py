"""The `naiad` command line: argument parsing, progress bars, output and exit codes.

Business logic lives in the rooms (builder, storage, fs, oci); each command
here parses, calls one function, and prints. The daemons' commands (snapshotter,
p2p) live in sibling modules of this package, each adding its subcommands to the
parser through `add_parsers(sub, parents)`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from naiad import __version__
from naiad.errors import NaiadError

EXIT_USER_ERROR = 1
EXIT_CHECK_FAILED = 2


# --- progress -------------------------------------------------------------

class _RichProgress:
    def __init__(self, progress: Any):
        self._p = progress

    def task(self, description: str, total: int | None) -> Callable[[int], None]:
        task_id = self._p.add_task(description, total=total)
        return lambda n: self._p.advance(task_id, n)


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    """A rich progress display on a TTY stderr; otherwise a silent one."""
    from naiad.builder.progress import NoProgress

    if not enabled or not sys.stderr.isatty():
        yield NoProgress()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=Console(stderr=True), transient=True,
    ) as p:
        yield _RichProgress(p)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _emit(args: argparse.Namespace, obj: dict[str, Any], text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(obj, indent=2))
    else:
        print(text)


# --- commands -------------------------------------------------------------

def _registry_options(args: argparse.Namespace):
    from naiad.oci.image import RegistryOptions

    creds = args.creds or os.environ.get("NAIAD_CREDS")
    return RegistryOptions(plain_http=True if args.plain_http else None, creds=creds,
                           tls_verify=not args.insecure_skip_tls_verify)


def _build_options(args: argparse.Namespace):
    from naiad.builder.convert import BuildOptions
    from naiad.oci.image import Platform

    prefetch: list[str] = []
    if args.prefetch_list:
        prefetch = _read_prefetch_list(args.prefetch_list)
    chunk_dict = [r.strip() for r in ",".join(args.chunk_dict or []).split(",") if r.strip()]
    levels = {} if args.zstd_level is None else {"zstd_level": args.zstd_level}
    return BuildOptions(chunk_size=_size(args.chunk_size), compressor=args.compressor, **levels,
                        platform=Platform.parse(args.platform), prefetch=prefetch, chunk_dict=chunk_dict,
                        min_blob_use=args.min_blob_use,
                        layer_cache=not getattr(args, "no_layer_cache", False))


def _zstd_level(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 22:
        raise argparse.ArgumentTypeError(f"invalid zstd level {text!r} (1 to 22)")
    return int(text)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid fraction {text!r} (e.g. 0.1)") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text}: a fraction from 0 to 1")
    return value


def _read_prefetch_list(path: str) -> list[str]:
    """Paths from a prefetch list file: one per line; blank lines and # comments skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip() and not line.startswith("#")]
    except (OSError, UnicodeDecodeError) as e:
        raise NaiadError(f"cannot read prefetch list {path}: {getattr(e, 'strerror', None) or e}") from None


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if t and t[-1] in units:
            return int(t[:-1]) * units[t[-1]]
        return int(t)
    except ValueError:
        raise NaiadError(f"invalid size {text!r} (e.g. 1048576, 512K, 1M)") from None


def _report_build(args: argparse.Namespace, target: str, result: Any) -> None:
    new = result.new_blobs
    stored = sum(d.size for d in new)
    reused = sum(d.size for d in result.dict_blobs)
    obj = {
        "target": target, "manifest_digest": result.manifest_digest, "files": result.files,
        "bytes_in": result.bytes_in, "blobs": [d.to_json() for d in result.blobs],
        "bootstrap": result.bootstrap.to_json(), "stored_bytes": stored,
        "dict_blobs": [d.to_json() for d in result.dict_blobs], "dict_bytes": reused,
        "push": result.push.to_json() if result.push else None,
        "cached_layers": result.cached_layers,
    }
    text = (f"{target}@{result.manifest_digest}\n"
            f"  {result.files} files, {len(new)} new blobs, {_human(stored)} stored "
            f"(from {_human(result.bytes_in)} of unique chunk data), bootstrap "
            f"{_human(result.bootstrap.size)}")
    if result.cached_layers:
        text += f"\n  {len(result.cached_layers)} source layers taken from the layer cache"
    if result.dict_blobs:
        text += f"\n  {len(result.dict_blobs)} dictionary blobs referenced ({_human(reused)})"
    if result.push:
        text += "\n  " + _push_summary(result.push)
    _emit(args, obj, text)


def _push_summary(r: Any) -> str:
    mounted = f", {r.blobs_mounted} mounted ({_human(r.bytes_mounted)})" if r.blobs_mounted else ""
    return (f"uploaded {_human(r.bytes_sent)} of {_human(r.bytes_total)} ({r.blobs_sent} of "
            f"{r.blobs_total} blobs{mounted})")


def cmd_convert(args: argparse.Namespace) -> int:
    from naiad.builder.convert import convert, default_target_tag
    from naiad.oci.reference import parse_reference

    source, target = parse_reference(args.source), parse_reference(args.target)
    with _progress(not args.json) as progress:
        result = convert(source, target, _build_options(args), _registry_options(args), progress)
    tag = default_target_tag(source, target)
    _report_build(args, str(target.with_tag(tag) if tag else target), result)
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from naiad.builder.convert import build_from_dir
    from naiad.oci.reference import parse_reference

    target = parse_reference(args.target)
    config = None
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise NaiadError(f"cannot read image config {args.config}: {e}") from None
        if not isinstance(config, dict):
            raise NaiadError(f"image config {args.config} is not a JSON object")
    with _progress(not args.json) as progress:
        result = build_from_dir(args.dir, target, _build_options(args), config,
                                _registry_options(args), progress)
    _report_build(args, str(target), result)
    return 0


@contextlib.contextmanager
def _open_naiad(args: argparse.Namespace) -> Iterator[Any]:
    from naiad.oci.image import Platform, source_for
    from naiad.oci.reference import parse_reference
    from naiad.storage.image import NaiadImage

    with source_for(parse_reference(args.ref), _registry_options(args)) as source:
        img = NaiadImage.open(source, Platform.parse(args.platform))
        try:
            yield img
        finally:
            img.close()


def cmd_inspect(args: argparse.Namespace) -> int:
    from naiad.format.stats import bootstrap_stats

    with _open_naiad(args) as img:
        stats = bootstrap_stats(img.bootstrap)
        bootstrap_raw = os.path.getsize(img.bootstrap.path)
        obj = {
            "reference": args.ref, "manifest_digest": img.image.manifest_digest,
            "bootstrap": {**img.bootstrap_desc.to_json(), "uncompressed_size": bootstrap_raw},
            **stats,
        }
    lines = [
        f"image          {args.ref}@{obj['manifest_digest']}",
        f"entries        {stats['entries']} ({stats['files']} files, {stats['dirs']} dirs, "
        f"{stats['symlinks']} symlinks, {stats['other']} other)",
        f"file data      {_human(stats['file_bytes'])}",
        f"chunks         {stats['chunks']} ({stats['unique_chunks']} unique, chunk size "
        f"{_human(stats['chunk_size'])}, dedup ratio {stats['dedup_ratio']:.2f})",
        f"stored         {_human(stats['stored_bytes'])} (compression ratio "
        f"{stats['compression_ratio']:.2f})",
        f"bootstrap      {_human(img.bootstrap_desc.size)} ({_human(bootstrap_raw)} uncompressed)",
        f"prefetch list  {stats['prefetch_files']} files",
        f"access hints   {stats['hints']}, keyed by {stats['hint_triggers']} files' first chunks",
        "blobs:",
    ]
    lines += [f"  {b['digest']}  {_human(b['size']):>10}  {b['chunks']:>7} chunks  "
              f"{_human(b['used_bytes']):>10} used  {b['compressor']}"
              for b in stats["blobs"]]
    _emit(args, obj, "\n".join(lines))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from naiad.storage.check import check_image

    with _open_naiad(args) as img, _progress(not args.json) as progress:
        total = sum(b.size for b in img.blobs.values())
        problems = check_image(img, progress.task("checking", total))
        chunks = img.bootstrap.count("chunks")
    obj = {"reference": args.ref, "ok": not problems, "chunks": chunks, "problems": problems}
    if problems:
        _emit(args, obj, "\n".join(f"naiad: check: {p}" for p in problems))
        return EXIT_CHECK_FAILED
    _emit(args, obj, f"{args.ref}: bootstrap and {chunks} chunks verified")
    return 0


def cmd_unpack(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from naiad.fs.unpack import unpack_image
    from naiad.oci.copy import copy_image
    from naiad.oci.image import Platform, source_for
    from naiad.oci.layout import OCILayout
    from naiad.oci.reference import Reference, parse_reference
    from naiad.paths import naiad_home
    from naiad.storage.image import NaiadImage

    ref = parse_reference(args.ref)
    registry = _registry_options(args)
    staging = None
    try:
        if ref.transport != "oci":
            # Whole blobs in one request each beat one range request per chunk.
            os.makedirs(os.path.join(naiad_home(), "tmp"), exist_ok=True)
            staging = tempfile.mkdtemp(prefix="unpack-", dir=os.path.join(naiad_home(), "tmp"))
            with source_for(ref, registry) as src:
                dst = OCILayout(Reference("oci", path=staging, tag="image"), create=True)
                copy_image(src, dst, "image")
                dst.close()
            ref = dst.ref
        with source_for(ref, registry) as source, _progress(True) as progress:
            img = NaiadImage.open(source, Platform.parse(args.platform))
            try:
                total = img.bootstrap.query("SELECT coalesce(sum(usize), 0) FROM chunks")[0][0]
                n = unpack_image(img, args.dir, progress.task("unpacking", total))
            finally:
                img.close()
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
    print(f"{args.ref}: {n} entries unpacked into {args.dir}", file=sys.stderr)
    return 0


def cmd_copy(args: argparse.Namespace) -> int:
    from naiad.oci.copy import copy_image
    from naiad.oci.image import source_for, target_for
    from naiad.oci.reference import parse_reference

    source, target = parse_reference(args.source), parse_reference(args.target)
    registry = _registry_options(args)
    with source_for(source, registry) as src, target_for(target, registry) as dst, \
            _progress(not args.json) as progress:
        try:
            result = copy_image(src, dst, target.tag, progress.task("copying", None))
        except BaseException:
            rollback = getattr(dst, "rollback", None)
            if rollback:
                rollback()
            raise
    obj = {"target": str(target), **result.to_json()}
    _emit(args, obj, f"{target}@{result.manifest_digest}: {_push_summary(result)}")
    return 0


def cmd_chunkdict(args: argparse.Namespace) -> int:
    from naiad.builder.chunkdict import build_dict
    from naiad.oci.image import Platform

    cd = build_dict(args.refs, args.output, _registry_options(args), Platform.parse(args.platform))
    size = sum(c.usize for c in cd.chunks.values())
    obj = {"output": args.output, "sources": [s.ref for s in cd.sources], "chunks": len(cd.chunks),
           "blobs": len(cd.blobs), "chunk_bytes": size}
    _emit(args, obj, f"{args.output}: {len(cd.chunks)} chunks ({_human(size)}) in {len(cd.blobs)} blobs "
          f"of {len(cd.sources)} images")
    return 0


def _add_p2p_proxy(p: argparse.ArgumentParser) -> None:
    p.add_argument("--p2p-proxy", metavar="HOST:PORT", default=os.environ.get("NAIAD_P2P_PROXY"),
                   help="read blob chunks through this node's P2P peer (its --proxy address; "
                   "default: $NAIAD_P2P_PROXY)")


def _use_p2p_proxy(args: argparse.Namespace) -> None:
    # The storage layer (naiad.storage.p2p) and the mount daemons it starts read it from the environment.
    if args.p2p_proxy:
        os.environ["NAIAD_P2P_PROXY"] = args.p2p_proxy


def cmd_mount(args: argparse.Namespace) -> int:
    from naiad.fs import daemon
    from naiad.oci.image import Platform
    from naiad.oci.reference import parse_reference

    _use_p2p_proxy(args)
    ref = parse_reference(args.ref)
    if args.foreground:
        from naiad.fs.mount import MountOptions, serve

        options = MountOptions(platform=Platform.parse(args.platform), prefetch_all=args.prefetch_all,
                               prefetch_rate=_size(args.prefetch_rate) if args.prefetch_rate else 0,
                               amplify=None if args.amplify == "auto" else _size(args.amplify),
                               mode=args.mode, read_ahead=_size(args.read_ahead), hints=not args.no_hints)
        try:
            serve(ref, args.mountpoint, _registry_options(args), options, args.notify_fd)
        except NaiadError as e:
            if args.notify_fd is not None:
                with contextlib.suppress(OSError):
                    os.write(args.notify_fd, f"error: {e}\n".encode())
            raise
        return 0
    pid = daemon.spawn(args.argv_for_daemon, args.mountpoint, fork=True)
    print(f"{args.ref} mounted at {args.mountpoint} (pid {pid})", file=sys.stderr)
    return 0


def cmd_mountd(args: argparse.Namespace) -> int:
    from naiad.fs import mountd

    mountd.serve(lambda: print(f"naiad mountd: serving on {mountd.socket_path()}", file=sys.stderr,
                               flush=True))
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    from naiad.fs.daemon import umount

    umount(args.mountpoint)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from naiad.fs.daemon import read_state

    state = read_state(args.mountpoint)
    stats = read_state(args.mountpoint, "stats.json")
    obj = {**state, **stats}
    pf = stats.get("prefetch", {})
    lines = [
        f"{state['ref']} at {state['mountpoint']} (pid {state['pid']})",
        f"fetched        {_human(stats['bytes_fetched'])} in {stats['requests']} requests "
        f"for {stats.get('ranges', stats['requests'])} ranges "
        f"({stats['chunks_fetched']} chunks, {stats['errors']} errors)",
        f"from cache     {stats['chunks_from_cache']} chunks; readers missed {stats.get('misses', '?')}, "
        f"joined {stats.get('joined', '?')} in flight",
        f"readers waited {stats.get('miss_wait_s', '?')} s on their misses, "
        f"{stats.get('join_wait_s', '?')} s on fetches in flight",
        f"served         {_human(stats['bytes_served'])} to {stats['files_read']} files "
        f"in {stats.get('reads', 0)} reads (read amplification {stats['read_amplification']})",
        f"fetch latency  p50 {stats['fetch_ms_p50']} ms, p99 {stats['fetch_ms_p99']} ms",
        f"read-ahead     {_human(stats.get('amplify', 0))} per miss" + (
            f" (link: {link['latency_ms']} ms + {link['throughput_mb_s']} MB/s)"
            if (link := stats.get("link")) else ""),
        f"prefetch       {_human(pf.get('done_bytes', 0))} of {_human(pf.get('total_bytes', 0))}"
        + (" (done)" if pf.get("finished") else ""),
    ]
    if hints := stats.get("hints"):
        lines.append(f"hints          {_human(hints['bytes'])} in {hints['chunks']} chunks fetched ahead, "
                     f"from {hints['triggers']} misses")
    if stats.get("passthrough"):
        lines.append(f"passthrough    {stats['passthrough']} blob files, read by the kernel from the cache"
                     " (those reads are not counted above)")
    _emit(args, obj, "\n".join(lines))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from naiad.storage.cache import ChunkCache

    cache = ChunkCache()
    try:
        if args.action == "ls":
            rows = [{"blob": b, "chunks": n, "bytes": size, "last_used": t}
                    for b, n, size, t in cache.blobs()]
            n, size = cache.usage()
            _emit(args, {"root": cache.root, "chunks": n, "bytes": size, "blobs": rows},
                  "\n".join([f"{r['blob']}  {r['chunks']:>7} chunks  {_human(r['bytes']):>10}" for r in rows]
                            + [f"total: {n} chunks, {_human(size)} in {cache.root}"]))
            return 0
        if args.action == "gc" and args.max_size is None:
            raise NaiadError("cache gc needs --max-size SIZE")
        limit = 0 if args.action == "prune" else _size(args.max_size)
        evicted, freed = cache.gc(limit)
        n, size = cache.usage()
        _emit(args, {"evicted_chunks": evicted, "evicted_bytes": freed, "chunks": n, "bytes": size},
              f"evicted {evicted} chunks ({_human(freed)}); {n} chunks, {_human(size)} remain")
        return 0
    finally:
        cache.close()


def cmd_run(args: argparse.Namespace) -> int:
    from naiad.oci.image import Platform
    from naiad.runtime.run import RunOptions, run

    _use_p2p_proxy(args)
    command = args.command_args[1:] if args.command_args[:1] == ["--"] else args.command_args
    options = RunOptions(env=args.env, workdir=args.workdir, user=args.user, entrypoint=args.entrypoint,
                         net=args.net, prefetch_all=args.prefetch_all, hints=not args.no_hints,
                         keep=args.keep, stop_timeout=args.stop_timeout,
                         platform=Platform.parse(args.platform), registry=_registry_options(args))
    return run(args.ref, command, options)


@contextlib.contextmanager
def _stdout_to_stderr(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def cmd_optimize(args: argparse.Namespace) -> int:
    import tempfile

    from naiad.builder.optimize import optimize_image
    from naiad.oci.image import Platform
    from naiad.oci.reference import parse_reference
    from naiad.runtime.run import RunOptions, run

    source, target = parse_reference(args.ref), parse_reference(args.target)
    if not (target.tag or target.digest):
        target = target.with_tag(f"{source.tag or 'latest'}-optimized")
    command = args.command_args[1:] if args.command_args[:1] == ["--"] else args.command_args
    exit_code = None
    entries: list[tuple[str, int | None]] | None = None  # None: predicted from the image's hints
    if command and (args.prefetch_list or args.from_hints):
        raise NaiadError("a command is run only to record what it reads: "
                         f"{'--prefetch-list' if args.prefetch_list else '--from-hints'} runs none")
    if args.prefetch_list:
        entries = [(path, None) for path in _read_prefetch_list(args.prefetch_list)]
    elif not args.from_hints:
        with tempfile.TemporaryDirectory(prefix="naiad-optimize-") as tmp:
            trace = os.path.join(tmp, "trace.json")
            options = RunOptions(env=args.env, net=args.net, platform=Platform.parse(args.platform),
                                 registry=_registry_options(args), trace_to=trace)
            with _stdout_to_stderr(args.json):  # keep --json output parseable
                exit_code = run(args.ref, command or None, options)
            if not os.path.exists(trace):
                raise NaiadError("the run left no access trace")
            with open(trace, encoding="utf-8") as f:
                entries = [(path, index) for path, index in json.load(f)]
        if exit_code != 0 and not args.allow_failure:
            raise NaiadError(f"the command exited with {exit_code}; not writing an image from its trace "
                             "(--allow-failure to write it anyway)")
    levels = {} if args.hot_level is None else {"hot_level": args.hot_level}
    result = optimize_image(source, target, entries, relayout=not args.no_relayout, **levels,
                            registry=_registry_options(args), platform=Platform.parse(args.platform))
    obj = {"target": str(target), "manifest_digest": result.manifest_digest, "prefetch_files": result.files,
           "prefetch_chunks": result.chunks, "prefetch_bytes": result.bytes,
           "hot_blob": result.hot_blob.to_json() if result.hot_blob else None,
           "not_found": result.missing, "command_exit_code": exit_code}
    hot = f", hot blob {_human(result.hot_blob.size)}" if result.hot_blob else ""
    _emit(args, obj, f"{target}@{result.manifest_digest}: prefetch {result.chunks} chunks of {result.files} "
          f"files ({_human(result.bytes)}){hot}"
          + (f"; {len(result.missing)} paths not in the image" if result.missing else ""))
    return 0


# --- parser ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CommonParents:
    """Option groups shared by subcommands: pass them as `parents=[...]` to `add_parser`."""

    registry: argparse.ArgumentParser  # --plain-http, --creds, --insecure-skip-tls-verify, --platform
    json: argparse.ArgumentParser  # --json


def build_parser() -> argparse.ArgumentParser:
    refs = ("References: oci:PATH[:TAG], docker-archive:FILE, docker://HOST[:PORT]/REPO[:TAG|@DIGEST] "
            "or HOST/REPO[:TAG].")
    parser = argparse.ArgumentParser(
        prog="naiad", description="Lazily loaded, chunk-deduplicated container images. " + refs,
    )
    parser.add_argument("--version", action="version", version=f"naiad {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    reg = argparse.ArgumentParser(add_help=False)
    g = reg.add_argument_group("registry")
    g.add_argument("--plain-http", action="store_true",
                   help="talk HTTP, not HTTPS, to the registry (automatic for localhost/127.0.0.1)")
    g.add_argument("--creds", metavar="USER:PASS",
                   help="registry credentials (default: ~/.docker/config.json, or $NAIAD_CREDS)")
    g.add_argument("--insecure-skip-tls-verify", action="store_true",
                   help="do not verify the registry's TLS certificate")
    g.add_argument("--platform", default="linux/amd64", metavar="OS/ARCH[/VARIANT]",
                   help="platform to pick from a multi-platform image (default: linux/amd64)")
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--json", action="store_true", help="print a JSON object for scripts")

    fmt = argparse.ArgumentParser(add_help=False)
    f = fmt.add_argument_group("format")
    f.add_argument("--chunk-size", default="1M",
                   help="chunk size, a power of two from 4K to 64M (default: 1M)")
    f.add_argument("--compressor", choices=("zstd", "lz4", "none"), default="zstd",
                   help="per-chunk compression (default: zstd)")
    f.add_argument("--zstd-level", type=_zstd_level, metavar="N",
                   help="zstd level (1-22) of new chunks (default: 6); higher levels take more CPU to "
                   "build and make every pull smaller (torchapp: 3 is 6%% bigger, 9 is 1%% smaller, "
                   "and converts take 0.84 and 1.14 times as long)")
    f.add_argument("--prefetch-list", metavar="FILE",
                   help="file with one path per line, to be fetched first after mount")
    f.add_argument("--chunk-dict", action="append", metavar="REF[,REF...]",
                   help="naiad images or `naiad chunkdict build` files whose chunks are referenced, not "
                   "stored again; the image then lists the blobs it uses from them (repeatable)")
    f.add_argument("--min-blob-use", type=_fraction, default=0.1, metavar="FRACTION",
                   help="reference a dictionary blob only if the image uses at least this fraction of its "
                   "bytes; otherwise copy the chunks it uses into the new blob (default: 0.1)")

    p = sub.add_parser("convert", parents=[fmt, reg, out], help="convert an OCI/Docker image to naiad",
                       description="Convert an OCI or Docker image to a naiad image. " + refs +
                       " A TARGET without tag gets SOURCE's tag + '-naiad'.")
    p.add_argument("source", help="source image reference")
    p.add_argument("target", help="target reference for the naiad image")
    p.add_argument("--no-layer-cache", action="store_true",
                   help="convert every layer from the source, and do not record this conversion in the "
                   "layer cache ($NAIAD_HOME/layers) that later converts reuse for identical layers")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("build", parents=[fmt, reg, out], help="build a naiad image from a rootfs directory",
                       description="Build a naiad image straight from a root filesystem directory.")
    p.add_argument("dir", help="root filesystem directory")
    p.add_argument("target", help="target reference")
    p.add_argument("--config", metavar="IMAGE_CONFIG.json",
                   help="OCI image config (entrypoint, env...) to give the image")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("chunkdict", parents=[reg, out], help="make a chunk dictionary file",
                       description="build: write DICT, the chunk table of the naiad images REF... (or "
                       "other dictionary files), for `--chunk-dict DICT`: a team's base images in one "
                       "file, without opening each image at every build.")
    p.add_argument("action", choices=("build",))
    p.add_argument("refs", nargs="+", metavar="REF", help="naiad image reference or dictionary file")
    p.add_argument("-o", "--output", required=True, metavar="DICT", help="dictionary file to write")
    p.set_defaults(func=cmd_chunkdict)

    p = sub.add_parser("inspect", parents=[reg, out], help="show what a naiad image holds",
                       description="Show files, chunks, dedup, blobs and bootstrap of a naiad image.")
    p.add_argument("ref", help="naiad image reference")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("check", parents=[reg, out], help="verify every chunk of a naiad image",
                       description="Fetch and verify the bootstrap and every chunk. Exit status 2 "
                       "and the affected files when something is wrong.")
    p.add_argument("ref", help="naiad image reference")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("unpack", parents=[reg], help="materialise a naiad image's rootfs",
                       description="Write the root filesystem of a naiad image into DIR "
                       "(absent or empty), with owners, modes, xattrs and devices (run as root).")
    p.add_argument("ref", help="naiad image reference")
    p.add_argument("dir", help="destination directory")
    p.set_defaults(func=cmd_unpack)

    p = sub.add_parser("copy", aliases=["push", "pull"], parents=[reg, out],
                       help="copy an image between layouts and registries",
                       description="Copy an image (naiad or OCI) to another place, sending only "
                       "blobs the target lacks and the manifest last.")
    p.add_argument("source", help="source image reference")
    p.add_argument("target", help="target image reference")
    p.set_defaults(func=cmd_copy)

    p = sub.add_parser("mount", parents=[reg], help="mount a naiad image lazily",
                       description="Mount a naiad image read-only at MOUNTPOINT after fetching only its "
                       "manifest and bootstrap; file data is fetched, verified and cached on first read. "
                       "Runs as a daemon unless --foreground.")
    p.add_argument("ref", help="naiad image reference")
    p.add_argument("mountpoint", help="an existing empty directory")
    p.add_argument("--foreground", action="store_true", help="serve in this process until unmounted")
    p.add_argument("--prefetch-all", action="store_true",
                   help="after the image's prefetch list, fetch every chunk in the background")
    p.add_argument("--prefetch-rate", metavar="SIZE",
                   help="bandwidth cap of background prefetch per second, e.g. 50M (default: none)")
    p.add_argument("--amplify", default="auto", metavar="SIZE",
                   help="fetch up to this many bytes of neighbouring chunks with a read; auto (default): "
                   "4 x the backend's latency x its throughput, 128K to 2M, as measured while mounted; "
                   "128K when access hints are followed (they fetch the neighbours a start reads)")
    p.add_argument("--no-hints", action="store_true",
                   help="do not fetch ahead by the image's access hints (the imports of a Python module "
                   "and the loader tables and libraries of an ELF object, fetched when the file is first "
                   "read); pure lazy: only what is read, and its read-ahead")
    p.add_argument("--read-ahead", default="512K", metavar="SIZE",
                   help="kernel mode: how far the kernel reads ahead in the image's files (default: 512K; "
                   "the kernel's own default, 128K, makes sequential reads of large files slower)")
    p.add_argument("--mode", choices=("auto", "kernel", "fuse"), default="auto",
                   help="kernel: the kernel serves the tree (EROFS metadata image over one FUSE file per "
                   "blob; needs root); fuse: naiad serves it all (records the access trace); auto "
                   "(default): kernel where it works here, else fuse")
    p.add_argument("--notify-fd", type=int, help=argparse.SUPPRESS)
    _add_p2p_proxy(p)
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("mountd", help="keep mount daemons' code loaded, so that they start at once",
                       description="Serve on $NAIAD_HOME/mountd.sock until SIGTERM or Ctrl-C: every naiad "
                       "command that mounts (mount, run, the snapshotter) asks it to fork the mount daemon "
                       "from this process, whose code is loaded already, instead of starting a new Python "
                       "process (0.5-0.7 s on a cold page cache). Daemons it forked keep running when it "
                       "stops. Restart it after upgrading naiad.")
    p.set_defaults(func=cmd_mountd)

    p = sub.add_parser("umount", help="unmount a naiad mount", description="Unmount a naiad mount "
                       "and stop its daemon.")
    p.add_argument("mountpoint")
    p.set_defaults(func=cmd_umount)

    p = sub.add_parser("stats", parents=[out], help="fetch statistics of a mount",
                       description="Bytes and chunks fetched, cache hits, requests, read amplification, "
                       "fetch latency and prefetch progress of a running mount.")
    p.add_argument("mountpoint")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("cache", parents=[out], help="inspect or shrink the chunk cache",
                       description="The node's chunk cache in $NAIAD_HOME/cache: ls lists it, gc evicts "
                       "least recently used chunks down to --max-size, prune empties it. Chunks that "
                       "running mounts hold are kept.")
    p.add_argument("action", choices=("ls", "gc", "prune"))
    p.add_argument("--max-size", metavar="SIZE", help="for gc: the size to shrink to, e.g. 10G")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("run", parents=[reg], help="run a container from a naiad image (lazily, with runc)",
                       usage="naiad run [OPTIONS] REF [-- COMMAND [ARG...]]",
                       description="Mount REF lazily, put a writable overlay on top and run COMMAND "
                       "(default: the image's entrypoint and cmd) in a runc container, with the image's env, "
                       "workdir and user. Options go before REF. The exit status is the command's (125 "
                       "when naiad itself fails). Ctrl-C/SIGTERM go to the container; mounts, overlay and "
                       "container are removed on exit. Needs root.")
    p.add_argument("ref", help="naiad image reference")
    p.add_argument("command_args", nargs=argparse.REMAINDER, metavar="COMMAND",
                   help="command and arguments, after '--' (replace the image's cmd)")
    p.add_argument("-e", "--env", action="append", default=[], metavar="KEY[=VALUE]",
                   help="set an environment variable (repeatable); KEY alone passes this shell's value")
    p.add_argument("-w", "--workdir", metavar="DIR", help="working directory in the container")
    p.add_argument("-u", "--user", metavar="USER[:GROUP]",
                   help="user to run as: names (from the image's /etc/passwd, /etc/group) or ids")
    p.add_argument("--entrypoint", metavar="PROGRAM",
                   help="replace the image's entrypoint (and ignore its cmd); '' clears it")
    p.add_argument("--net", choices=("host", "none"), default="host",
                   help="host: share this machine's network (default); none: loopback only")
    p.add_argument("--prefetch-all", action="store_true",
                   help="fetch the whole image in the background while the container runs")
    p.add_argument("--no-hints", action="store_true",
                   help="do not fetch ahead by the image's access hints (see `naiad mount --help`)")
    p.add_argument("--keep", action="store_true",
                   help="keep the container's writes (the overlay upper dir) and print where")
    p.add_argument("--stop-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="after forwarding Ctrl-C/SIGTERM, wait this long before killing (default: 10)")
    _add_p2p_proxy(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("optimize", parents=[reg, out], help="record what an app reads and prefetch it",
                       description="Run CMD (default: the image's entrypoint) in a container of the lazily "
                       "mounted image REF, record the order in which chunks of files are first read, and "
                       "write TARGET: the same image with that order as its prefetch list and those chunks "
                       "copied, in that order, into one new blob, so that mounts fetch them first with a "
                       "few large requests. With --prefetch-list, take whole files from a list instead; "
                       "with --from-hints, the order the image's access hints predict for its entrypoint "
                       "(no run: for builders that cannot run the app). "
                       "TARGET without a tag gets REF's tag + '-optimized'.")
    p.add_argument("ref", help="naiad image reference")
    p.add_argument("target", help="where to write the optimized image")
    given = p.add_mutually_exclusive_group()
    given.add_argument("--prefetch-list", metavar="FILE", help="paths to prefetch, one per line (no run)")
    given.add_argument("--from-hints", action="store_true",
                       help="prefetch what the image's access hints predict its entrypoint reads (no run)")
    p.add_argument("-e", "--env", action="append", default=[], metavar="K[=V]", help="environment for CMD")
    p.add_argument("--net", choices=("host", "none"), default="host", help="network of the run")
    p.add_argument("--allow-failure", action="store_true",
                   help="write the image even if CMD exits non-zero")
    p.add_argument("--no-relayout", action="store_true",
                   help="only set the prefetch list; do not copy the hot chunks into a new blob")
    p.add_argument("--hot-level", type=_zstd_level, metavar="N",
                   help="zstd level (1-22) the hot blob's chunks are recompressed at (default: 18; every "
                   "cold start reads them, so a slow level pays; 9 is 10 times faster, 9%% bigger)")
    # Not REMAINDER: options written after TARGET must stay options; the command goes after "--".
    p.add_argument("command_args", nargs="*", metavar="-- CMD", help="command to run (after '--')")
    p.set_defaults(func=cmd_optimize)

    from naiad.cli import p2p, snapshotter

    parents = CommonParents(registry=reg, json=out)
    snapshotter.add_parsers(sub, parents)
    p2p.add_parsers(sub, parents)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "optimize" and "--" in argv:
        # Everything after "--" is the command, even words that look like options.
        split = argv.index("--")
        args = build_parser().parse_args(argv[:split])
        args.command_args = argv[split + 1:]
    # The mount daemon is started with this command's own arguments.
    args.argv_for_daemon = argv[argv.index("mount") + 1:] if args.command == "mount" else None
    try:
        return args.func(args)
    except NaiadError as e:
        print(f"naiad: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"naiad: error: no space left on device{_where(e)}", file=sys.stderr)
        else:
            print(f"naiad: error: {e.strerror or e}{_where(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("naiad: interrupted", file=sys.stderr)
        return 130


def _where(e: OSError) -> str:
    return f" ({e.filename})" if e.filename else ""
