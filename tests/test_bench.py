"""The benchmark harness must keep working: `python -m bench --quick` end to end.

Runs every benchmark on its small inputs (about a minute: a small image, a
10,000-file tree, the network lab with a real registry in a namespace) and
checks that the report it writes has every section with measured numbers, and
that the cold-start table has a time for every method that ran (the containerd
`oci` baseline always among them; a method not built yet says "skipped").
The figures themselves are not judged here: speed is for benchmarks, not tests.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("convert", "bootstrap", "coldstart", "push", "dedup")
# A time cell: "1.23", or "1.23 (1.01–1.50)" with repetitions.
TIME = re.compile(r"\d+\.\d+( \(\d+\.\d+–\d+\.\d+\))?")


def coldstart_times(section: str) -> dict[str, str]:
    """method -> time-to-ready cell of the first cold-start table in the report's coldstart section."""
    table = re.search(r"^\*\*[^\n]*time to the ready line[^\n]*\*\*\n\n((?:\|[^\n]*\n)+)", section, re.M)
    assert table, "no cold-start table"
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.group(1).splitlines()[2:]]
    return {row[0].split(":")[0]: row[1] for row in rows}


def test_quick_benchmarks_write_a_report_with_numbers(tmp_path):
    tools = ("umoci", "skopeo", "docker-registry", "ip", "tc", "containerd", "ctr", "runc")
    if os.geteuid() != 0 or not all(shutil.which(t) for t in tools):
        pytest.skip("needs root, umoci, skopeo, docker-registry, iproute2 and containerd")
    name = f"test-smoke-{os.getpid()}"
    env = {**os.environ, "NAIAD_BENCH_CACHE": str(tmp_path / "cache"), "NAIAD_HOME": str(tmp_path / "home")}
    results = REPO / "bench" / "results"
    before = set(results.iterdir()) if results.exists() else set()
    try:
        proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--name", name], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=900)
        # A failed benchmark says why in its section; that, not the tail of the output, is the message.
        failures = re.findall(r"^## [^\n]*\n\n\*\*FAILED\*\*.*?(?=^_\(\d+ s\)_)", proc.stdout, re.M | re.S)
        assert proc.returncode == 0, "".join(failures)[-6000:] + proc.stderr[-2000:]
        reports = [p for p in set(results.iterdir()) - before if p.suffix == ".md"]
        assert len(reports) == 1, reports
        text = reports[0].read_text()
        for section in SECTIONS:
            match = re.search(rf"^## {section}:.*?(?=^## |\Z)", text, re.M | re.S)
            assert match, f"no {section} section"
            # A table row with at least one measured decimal number in it.
            assert re.search(r"^\|[^\n]*\| *\d+\.\d+", match.group(0), re.M), f"{section}: no figures"
            if section == "coldstart":
                times = coldstart_times(match.group(0))
                assert "oci" in times, times
                for method, cell in times.items():
                    assert TIME.fullmatch(cell) or cell.startswith("skipped"), f"coldstart {method}: {cell!r}"
    finally:
        for path in set(results.iterdir()) - before if results.exists() else ():
            path.unlink()
