"""Where naiad keeps its state on this machine: `$NAIAD_HOME`, else ~/.cache/naiad."""

from __future__ import annotations

import os


def naiad_home() -> str:
    home = os.environ.get("NAIAD_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "naiad")
    os.makedirs(home, exist_ok=True)
    return home
