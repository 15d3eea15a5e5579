"""containerd's snapshotter conformance suite, run against naiad's snapshotter (the plain-OCI path).

The suite (`snapshots/testsuite`) and containerd's proxy client come from Debian's
golang-github-containerd-containerd-dev; `snapshotter_conformance/conformance_test.go` plugs a
fresh `naiad snapshotter` process into each of its tests. Built in GOPATH mode against
/usr/share/gocode, so nothing is downloaded. Skipped without Go (apt-get install golang-go).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

GOCODE = "/usr/share/gocode"
SUITE = Path(GOCODE, "src/github.com/containerd/containerd/snapshots/testsuite")
HERE = Path(__file__).parent / "snapshotter_conformance"


def test_containerd_snapshotter_conformance_suite(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("the suite mounts what the snapshotter returns: root")
    if shutil.which("go") is None or not SUITE.is_dir():
        pytest.skip("needs Go (golang-go) and golang-github-containerd-containerd-dev")
    # The suite's temp dirs hold the snapshotters' sockets: a short base keeps them under 108 bytes.
    short = tempfile.mkdtemp(prefix="naiad-conf-", dir="/tmp")
    try:
        _run_suite(tmp_path, short)
    finally:
        shutil.rmtree(short, ignore_errors=True)


def _run_suite(tmp_path: Path, short: str) -> None:
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": f"{tmp_path / 'gopath'}:{GOCODE}",
           "GOFLAGS": "", "NAIAD_PYTHON": sys.executable, "TMPDIR": short}
    binary = tmp_path / "conformance.test"
    build = subprocess.run(["go", "test", "-c", "-o", str(binary), "."], cwd=HERE, env=env,
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    # Four snapshotter processes at a time: the suite runs its tests in parallel.
    run = subprocess.run([str(binary), "-test.v", "-test.parallel", "4", "-test.timeout", "540s"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    results = [line.strip() for line in run.stdout.splitlines() if line.strip().startswith("--- ")]
    assert run.returncode == 0, "\n".join(results) + "\n" + run.stdout[-5000:] + run.stderr[-3000:]
    passed = [r for r in results if r.startswith("--- PASS: TestNaiadSnapshotter/")]
    assert len(passed) >= 20, results  # all but Rename, which the suite itself skips on overlay
