"""`naiad peer`, `naiad scheduler`, `naiad preheat`, `naiad p2p status`: the P2P network.

Argument parsing and printing only; the work is done in `naiad.p2p`.
"""

from __future__ import annotations

from typing import Any


def add_parsers(sub: Any, parents: Any) -> None:
    """Add this module's subcommands to `sub` (the `naiad` subparsers action)."""
    del sub, parents  # not built yet

