"""`naiad snapshotter`: the containerd remote snapshotter (gRPC proxy plugin).

Argument parsing and printing only; the work is done in `naiad.snapshotter`.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from naiad.errors import NaiadError


def cmd_snapshotter(args: argparse.Namespace) -> int:
    from naiad.snapshotter.config import containerd_config

    if args.print_config:
        print(containerd_config(args.address), end="")
        return 0
    from naiad.oci.image import Platform, RegistryOptions
    from naiad.snapshotter.service import run

    if os.geteuid() != 0:
        raise NaiadError("naiad snapshotter needs root (overlayfs, FUSE mounts for containerd)")
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    creds = args.creds or os.environ.get("NAIAD_CREDS")
    if creds:
        # The mount daemons read it from the environment: a command line is visible to ps.
        os.environ["NAIAD_CREDS"] = creds
    registry = RegistryOptions(plain_http=True if args.plain_http else None, creds=creds,
                               tls_verify=not args.insecure_skip_tls_verify)
    run(args.address, args.root, registry, frozenset(args.insecure_registry), Platform.parse(args.platform),
        prefetch_all=args.prefetch_all, with_mountd=not args.no_mountd)
    return 0


def add_parsers(sub: Any, parents: Any) -> None:
    """Add this module's subcommands to `sub` (the `naiad` subparsers action)."""
    from naiad.snapshotter.config import DEFAULT_ADDRESS, DEFAULT_ROOT

    p = sub.add_parser(
        "snapshotter", parents=[parents.registry], help="serve the containerd remote snapshotter",
        description="Serve containerd's snapshots API on a unix socket (a proxy plugin named 'naiad'). "
        "Layers of naiad images are not downloaded: the image is mounted lazily, one daemon per image, "
        "and containers run on an overlay of it. Plain OCI images work as with the overlayfs "
        "snapshotter. Serves until SIGTERM; the lazy mounts outlive it, and a restart re-attaches to "
        "them. See docs/containerd.md.")
    p.add_argument("--address", default=DEFAULT_ADDRESS, metavar="SOCKET",
                   help=f"unix socket to serve on (default: {DEFAULT_ADDRESS})")
    p.add_argument("--root", default=DEFAULT_ROOT, metavar="DIR",
                   help=f"snapshots and metadata (default: {DEFAULT_ROOT})")
    p.add_argument("--insecure-registry", action="append", default=[], metavar="HOST[:PORT]",
                   help="talk plain HTTP to this registry (repeatable); --plain-http does it for all")
    p.add_argument("--prefetch-all", action="store_true",
                   help="lazy mounts fetch every chunk in the background after the prefetch list")
    p.add_argument("--no-mountd", action="store_true",
                   help="start each image's mount daemon as a new process, instead of forking it from "
                   "a `naiad mountd` the snapshotter starts (unless one serves NAIAD_HOME already) "
                   "and stops with it")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    p.add_argument("--print-config", action="store_true",
                   help="print the containerd config.toml lines that register this snapshotter, and exit")
    p.set_defaults(func=cmd_snapshotter)
