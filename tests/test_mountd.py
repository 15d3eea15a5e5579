"""`naiad mountd`: mount daemons forked from a resident process that has their code loaded.

With mountd running, `naiad mount` (and everything that mounts) gets a daemon forked from it:
the same mount, the same state, stopped by `naiad umount` as any other, and outliving mountd.
Without it, or with a socket nobody serves, daemons start as new processes. Real mounts and a
real registry.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_mount import Node, mounted, one_line_error, wait_for

from naiad.fs.daemon import pid_alive

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="kernel-mode mounts need root")


def mountd_answers(home: Path, timeout: float = 30.0) -> bool:
    """Whether a `naiad mountd` listens on NAIAD_HOME's socket (within `timeout`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
            try:
                probe.connect(str(home / "mountd.sock"))
                return True
            except OSError:
                time.sleep(0.05)
    return False


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


class Mountd:
    def __init__(self, node: Node):
        self.sock = node.home / "mountd.sock"
        node.home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "NAIAD_HOME": str(node.home)}
        self.proc = subprocess.Popen([sys.executable, "-m", "naiad", "mountd"], env=env,
                                     stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        assert line.startswith("naiad mountd: serving on"), line

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)


@pytest.fixture
def mountd(node: Node):
    m = Mountd(node)
    yield m
    m.stop()


def test_mountd_forks_the_daemon_and_it_is_an_ordinary_one(node: Node, mountd: Mountd, small_image) -> None:
    ref, files = small_image
    assert stat.S_IMODE(mountd.sock.stat().st_mode) == 0o600
    mnt = node.mount(ref)
    pid = node.pid(mnt)
    assert _ppid(pid) == mountd.proc.pid  # forked by mountd, not started
    assert os.getsid(pid) == pid  # a session of its own
    for path, data in files.items():
        assert (mnt / path).read_bytes() == data
    assert "rootfs" in node.state(mnt, "image-config.json")  # the OCI config, for `naiad run`
    # It outlives mountd, and `naiad umount` stops it as any other.
    mountd.stop()
    assert not mountd.sock.exists()
    assert (mnt / "etc/hello").read_bytes() == files["etc/hello"]
    node.umount(mnt)
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(pid)


def test_a_failed_mount_through_mountd_says_why(node: Node, mountd: Mountd, registry) -> None:
    mnt = node.mountpoint()
    proc = node.naiad("mount", f"{registry.host}/mountd/nothing:here", mnt)
    one_line_error(proc, "not found")
    assert not mounted(mnt)
    assert mountd.proc.poll() is None  # and it serves on
    children = [p for p in os.listdir("/proc") if p.isdigit() and pid_alive(int(p))
                and _ppid(int(p)) == mountd.proc.pid]
    assert children == []


def test_without_a_serving_mountd_daemons_start_as_before(node: Node, small_image) -> None:
    ref, files = small_image
    first = Mountd(node)
    with pytest.raises(AssertionError, match="already serves"):
        Mountd(node)  # a second one refuses the socket
    first.stop(signal.SIGKILL)  # leaves its socket behind
    assert first.sock.exists()
    mnt = node.mount(ref)
    assert _ppid(node.pid(mnt)) != first.proc.pid
    assert (mnt / "bin/tool").read_bytes() == files["bin/tool"]
    node.umount(mnt)
    again = Mountd(node)  # claims the stale socket
    try:
        mnt = node.mount(ref, name="mnt2")
        assert _ppid(node.pid(mnt)) == again.proc.pid
        node.umount(mnt)
    finally:
        again.stop()


def test_a_companion_mountd_ends_with_its_parent_and_defers_to_a_running_one(node: Node) -> None:
    """What the snapshotter does: start a mountd of its own unless one serves NAIAD_HOME already;
    that mountd ends with it, even on kill -9."""
    node.home.mkdir(parents=True, exist_ok=True)
    sock = node.home / "mountd.sock"
    env = {**os.environ, "NAIAD_HOME": str(node.home)}
    script = ("import time; from naiad.fs import mountd; p = mountd.start_companion(); "
              "print(p.pid if p else 0, flush=True); time.sleep(120)")

    def parent() -> tuple[subprocess.Popen[str], int]:
        proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        return proc, int(proc.stdout.readline())

    first, companion = parent()
    second = None
    try:
        assert companion and _ppid(companion) == first.pid
        assert mountd_answers(node.home)
        second, none = parent()
        assert none == 0  # the first one's serves NAIAD_HOME
        first.kill()
        first.wait()
        wait_for(lambda: not pid_alive(companion), "the companion mountd to end with its parent")
        assert not sock.exists()
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
