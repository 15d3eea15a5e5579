"""`naiad peer`, `naiad scheduler`, `naiad preheat`, `naiad p2p status`: the P2P network.

Argument parsing and printing only; the work is done in `naiad.p2p`.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from naiad.cli import _emit, _human, _registry_options, _size


def _log(args: argparse.Namespace) -> None:
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # its lines name every URL it fetches


def _list(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def cmd_scheduler(args: argparse.Namespace) -> int:
    from naiad.p2p.daemon import run_scheduler
    from naiad.p2p.pieces import P2PError
    from naiad.p2p.security import load_token, split_hostport

    _log(args)
    if args.source_limit < 1:
        raise P2PError("--source-limit must be at least 1")
    host, port = split_hostport(args.listen, "--listen")
    run_scheduler(host, port, load_token(args.token_file), args.source_limit)
    return 0


def cmd_peer(args: argparse.Namespace) -> int:
    from naiad.p2p.client import parse_schedulers
    from naiad.p2p.daemon import run_peer
    from naiad.p2p.peer import PeerConfig
    from naiad.p2p.pieces import P2PError
    from naiad.p2p.security import AllowList, load_token, split_hostport

    _log(args)
    listen = split_hostport(args.listen, "--listen")
    proxy = split_hostport(args.proxy, "--proxy")
    allowed = _list(args.allow_registry)
    if args.default_registry and args.default_registry not in allowed:
        allowed.append(args.default_registry)
    insecure = _list(args.insecure_registry) + (allowed if args.plain_http else [])
    registry = _registry_options(args)
    if args.upload_slots < 1:
        raise P2PError("--upload-slots must be at least 1")
    config = PeerConfig(
        data=args.data, advertise=args.advertise or args.listen, schedulers=parse_schedulers(args.scheduler),
        token=load_token(args.token_file), allow=AllowList(allowed, insecure), seed=args.seed,
        upload_rate=_size(args.upload_rate) if args.upload_rate else None, upload_slots=args.upload_slots,
        quota=_size(args.quota) if args.quota else None, creds=registry.creds, tls_verify=registry.tls_verify)
    split_hostport(config.advertise, "--advertise")
    run_peer(config, listen, proxy, args.default_registry)
    return 0


def cmd_preheat(args: argparse.Namespace) -> int:
    from naiad.oci.reference import parse_reference
    from naiad.p2p.client import parse_schedulers
    from naiad.p2p.preheat import preheat
    from naiad.p2p.security import load_token

    result = preheat(parse_reference(args.ref), _registry_options(args), parse_schedulers(args.scheduler),
                     load_token(args.token_file), wait=None if args.no_wait else args.timeout)
    state = "on the seeds" if result["done"] else "requested"
    _emit(args, result, f"{args.ref}: {result['blobs']} blobs ({_human(result['bytes'])}) {state}, "
                        f"on {len(set(result['seeds'].values()))} seed peers")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from naiad.p2p.client import parse_schedulers, scheduler_call
    from naiad.p2p.security import load_token

    token = load_token(args.token_file)
    merged: dict[str, Any] = {"schedulers": [], "peers": {}, "tasks": []}
    for addr in parse_schedulers(args.scheduler):
        status = scheduler_call(addr, token, "GET", "/api/v1/status")
        merged["schedulers"].append(addr)
        merged["peers"].update({p["id"]: p for p in status["peers"]})
        merged["tasks"] += status["tasks"]
    merged["peers"] = list(merged["peers"].values())
    where = ", ".join(merged["schedulers"])
    lines = [f"{len(merged['peers'])} peers, {len(merged['tasks'])} tasks on {where}"]
    for p in merged["peers"]:
        flags = ",".join(f for f, on in (("seed", p["seed"]), ("dead", not p["alive"]),
                                         ("banned", p["banned"])) if on)
        lines.append(f"  peer {p['id']:<34} {p['addr']:<22} slots {p['free']}/{p['slots']} "
                     f"{_human(p['throughput'])}/s {flags}")
    for t in merged["tasks"]:
        lines.append(f"  task {t['digest'][:19]}  {_human(t['size']):>10} {t['pieces']} pieces  "
                     f"complete on {len(t['complete'])} peers  ({t['source'] or '?'})")
        for e in sorted(t["edges"], key=lambda e: -e["bytes"]):
            lines.append(f"    {e['child']} <- {e['parent']}: {_human(e['bytes'])}")
    _emit(args, merged, "\n".join(lines))
    return 0


def add_parsers(sub: Any, parents: Any) -> None:
    """Add this module's subcommands to `sub` (the `naiad` subparsers action)."""
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("cluster")
    g.add_argument("--scheduler", required=True, metavar="HOST:PORT[,HOST:PORT...]",
                   help="the schedulers; each task goes to one of them by consistent hashing")
    g.add_argument("--token-file", required=True, metavar="FILE",
                   help="file holding the cluster token (at least 16 characters, mode 600)")
    daemon = argparse.ArgumentParser(add_help=False)
    daemon.add_argument("--log-level", default=os.environ.get("NAIAD_LOG_LEVEL", "info"),
                        choices=("debug", "info", "warning", "error"), help="daemon log level (stderr)")

    p = sub.add_parser("scheduler", parents=[daemon], help="run a P2P scheduler",
                       description="Run a P2P scheduler: peers announce what they hold; for each piece "
                       "a peer needs it names parents to fetch from, or the peer that goes "
                       "back to the registry. "
                       "State is in memory, rebuilt from peers after a restart. Metrics at /metrics.")
    p.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="address to serve peers on (port 0: any)")
    p.add_argument("--token-file", required=True, metavar="FILE", help="file holding the cluster token")
    p.add_argument("--source-limit", type=int, default=1, metavar="K",
                   help="at most K peers fetch the same piece from the registry at a time (default 1)")
    p.set_defaults(func=cmd_scheduler)

    p = sub.add_parser("peer", parents=[parents.registry, common, daemon], help="run a P2P peer daemon",
                       description="Run the node's P2P peer: a registry mirror for containerd, skopeo and "
                       "naiad mounts (--proxy, loopback, no token), a piece server for other peers "
                       "(--listen, "
                       "cluster token) and a piece store. Blob reads are served from other peers, or from "
                       "the registry when none holds the piece. --creds (or docker's config) is used for "
                       "back-to-source; it is never logged or stored.")
    p.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="piece server address for other peers")
    p.add_argument("--advertise", metavar="HOST:PORT",
                   help="address other peers reach the piece server at (default: --listen)")
    p.add_argument("--proxy", required=True, metavar="127.0.0.1:PORT",
                   help="registry mirror address (loopback)")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="piece store directory (kept across restarts)")
    p.add_argument("--allow-registry", required=True, metavar="HOST[:PORT][,...]",
                   help="registries this peer may fetch from (anything else is refused)")
    p.add_argument("--default-registry", metavar="HOST[:PORT]",
                   help="upstream for requests without ?ns= (skopeo, plain clients)")
    p.add_argument("--insecure-registry", metavar="HOST[:PORT][,...]",
                   help="registries spoken to over plain HTTP (loopback ones always are)")
    p.add_argument("--seed", action="store_true",
                   help="a seed peer: preferred for back-to-source and preheat")
    p.add_argument("--upload-rate", metavar="SIZE",
                   help="upload limit to other peers in bytes per second, e.g. 50M (default: none)")
    p.add_argument("--upload-slots", type=int, default=16, metavar="N",
                   help="at most N pieces uploaded at once (default 16); more are refused with 503")
    p.add_argument("--quota", metavar="SIZE", help="piece store size limit, e.g. 20G (LRU eviction)")
    p.set_defaults(func=cmd_peer)

    p = sub.add_parser("preheat", parents=[parents.registry, common, parents.json],
                       help="have the seed peers fetch an image's blobs",
                       description="Make the seed peers fetch every blob of image REF (naiad or OCI; "
                       "an index: "
                       "all platforms) before any node asks for them. Waits until they hold them.")
    p.add_argument("ref", help="image reference (HOST/REPO:TAG)")
    p.add_argument("--no-wait", action="store_true", help="return once the seeds accepted the work")
    p.add_argument("--timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="how long to wait for the seeds (default 1800)")
    p.set_defaults(func=cmd_preheat)

    p = sub.add_parser("p2p", help="P2P network status", description="Inspect the P2P network.")
    p2p_sub = p.add_subparsers(dest="p2p_command", required=True, metavar="ACTION")
    s = p2p_sub.add_parser("status", parents=[common, parents.json],
                           help="peers, tasks and who downloaded from whom",
                           description="Show the schedulers' peers, tasks and who downloaded from whom.")
    s.set_defaults(func=cmd_status)
