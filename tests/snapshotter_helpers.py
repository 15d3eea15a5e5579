"""Test helpers for the containerd snapshotter: its process, a gRPC client, test images, a node.

`SnapshotterProcess` runs `naiad snapshotter` as containerd would find it (its own session, so
that killing it with -9 is what a crash is); `Node` puts a private containerd on top, with its
own NAIAD_HOME, and undoes everything on `close()`: containers, containerd, the snapshotter,
the lazy mounts and their daemons. `make_images` pushes a two-layer plain OCI image built with
umoci from this machine's programs, and its naiad conversion.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from containerd_server import Containerd, containerd_available

from naiad.snapshotter.api import snapshots_pb2_grpc

WAIT = 120.0
APP_FILES = 60  # files the app image holds under /data/files, read one by one by the slow reader


def skip_unless_possible() -> None:
    if os.geteuid() != 0:
        pytest.skip("the snapshotter needs root")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    if not containerd_available():
        pytest.skip("containerd, ctr and runc are needed")
    for tool in ("ctr-remote", "umoci"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


def naiad(home: Path, *args: object, timeout: float = WAIT) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "naiad", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "NAIAD_HOME": str(home)})
    assert proc.returncode == 0, f"naiad {' '.join(map(str, args))}: {proc.stderr}"
    return proc


class SnapshotterProcess:
    def __init__(self, root: Path, address: str, home: Path, args: tuple[str, ...] = ("--plain-http",)):
        self.root, self.address, self.home, self.args = root, address, home, args
        self.log_path = root.parent / "snapshotter.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> SnapshotterProcess:
        argv = [sys.executable, "-m", "naiad", "snapshotter", "--address", self.address,
                "--root", str(self.root), "--log-level", "debug", *self.args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True,
                                         env={**os.environ, "NAIAD_HOME": str(self.home)})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"snapshotter exited ({self.proc.returncode}):\n{self.log_tail()}")
            if os.path.exists(self.address):
                with grpc.insecure_channel(f"unix://{self.address}") as ch, \
                        contextlib.suppress(grpc.FutureTimeoutError):
                    grpc.channel_ready_future(ch).result(timeout=1)
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"snapshotter did not come up:\n{self.log_tail()}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None
        finally:
            self.proc = None

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(FileNotFoundError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def client(self) -> tuple[grpc.Channel, snapshots_pb2_grpc.SnapshotsStub]:
        channel = grpc.insecure_channel(f"unix://{self.address}")
        return channel, snapshots_pb2_grpc.SnapshotsStub(channel)


def lazy_mounts(root: Path) -> list[str]:
    """Mount points of the snapshotter's lazy mounts that are in the mount table."""
    prefix = str(root / "lazy") + "/"
    with open("/proc/self/mountinfo") as f:
        return [p for p in (line.split()[4] for line in f) if p.startswith(prefix)]


def daemons_of(home: Path) -> list[int]:
    """Live `naiad mount` daemons whose state is under `home` (from their state files)."""
    from naiad.fs.daemon import pid_alive

    pids = []
    for state in (home / "mounts").glob("*/state.json"):
        with contextlib.suppress(ValueError, OSError):
            pid = int(json.loads(state.read_text())["pid"])
            if pid_alive(pid):
                pids.append(pid)
    return pids


def release_lazy_mounts(root: Path, home: Path) -> None:
    """Unmount what the snapshotter left mounted (its mounts outlive it by design) and stop the daemons."""
    for point in sorted(lazy_mounts(root), key=len, reverse=True):
        subprocess.run(["fusermount3", "-u", "-z", point], capture_output=True)
        subprocess.run(["umount", "-l", point], capture_output=True)
    deadline = time.monotonic() + 15
    while daemons_of(home) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in daemons_of(home):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class Node:
    """A snapshotter and a containerd that uses it, all under `base`."""

    def __init__(self, base: Path, snapshotter_args: tuple[str, ...] = ("--plain-http",), cri: bool = False,
                 extra_config: str = ""):
        self.base = base
        self.home = base / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.root = base / "sn"
        self.address = str(base / "sn.sock")
        self.snapshotter = SnapshotterProcess(self.root, self.address, self.home, snapshotter_args)
        self.containerd = Containerd(base / "ctrd", snapshotter_socket=self.address, cri=cri,
                                     extra_config=extra_config)

    def start(self) -> Node:
        self.snapshotter.start()
        self.containerd.start()
        return self

    def start_snapshotter(self, timeout: float = 30.0) -> None:
        """Start the snapshotter again, and wait until containerd has reconnected to it.

        containerd's client backs off (up to a few seconds) after the socket refused it.
        """
        self.snapshotter.start()
        deadline = time.monotonic() + timeout
        while self.containerd.ctr("snapshots", "--snapshotter", "naiad", "ls", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("containerd did not reconnect to the snapshotter")
            time.sleep(0.2)

    def run(self, ref: str, name: str, *command: str, timeout: float = WAIT) -> str:
        return self.containerd.ctr("run", "--snapshotter", "naiad", "--rm", ref, name, *command,
                                   timeout=timeout).stdout

    def rpull(self, ref: str) -> None:
        self.containerd.ctr_remote("image", "rpull", "--plain-http", "--snapshotter", "naiad", ref)

    def close(self) -> None:
        try:
            self.containerd.stop()
        finally:
            try:
                self.snapshotter.stop()
            finally:
                release_lazy_mounts(self.root, self.home)

    def diagnostics(self) -> str:
        return (f"--- snapshotter log ---\n{self.snapshotter.log_tail()}\n"
                f"--- containerd log ---\n{self.containerd.log_tail()}")


# --- images ---------------------------------------------------------------------------------


def _libraries(program: str) -> list[str]:
    out = subprocess.run(["ldd", program], capture_output=True, text=True, check=True).stdout
    return [line.split()[-2] for line in out.splitlines() if "=> /" in line or line.strip().startswith("/")]


def app_file(i: int) -> str:
    return f"file {i:03d} " + "x" * (i * 37 % 200) + "\n"


def _make_rootfs(root: Path) -> None:
    """Layer one: this machine's sh, cat, ls and their libraries."""
    for program in ("/bin/sh", "/bin/cat", "/bin/ls", "/bin/sleep"):
        for path in [program, *_libraries(program)]:
            dest = root / path.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(path), dest)


def _make_data(data: Path) -> None:
    """Layer two: /data, the app's files."""
    (data / "files").mkdir(parents=True)
    (data / "hello").write_text("hello from naiad\n")
    for i in range(APP_FILES):
        (data / "files" / f"f{i:03d}").write_text(app_file(i))


def make_images(base: Path, registry_host: str) -> tuple[str, str]:
    """Push a plain two-layer OCI image (umoci) and a naiad image of the same files (`naiad build`);
    their references (host/repo:tag)."""
    rootfs, data, layout = base / "rootfs", base / "data", base / "layout"
    _make_rootfs(rootfs)
    _make_data(data)
    image = f"{layout}:app"
    for argv in (["init", "--layout", str(layout)], ["new", "--image", image],
                 ["insert", "--image", image, str(rootfs), "/"],
                 ["insert", "--image", image, str(data), "/data"],
                 ["config", "--image", image, "--config.entrypoint", "/bin/sh",
                  "--config.cmd", "-c", "--config.cmd", "cat /data/hello"]):
        subprocess.run(["umoci", *argv], check=True, capture_output=True)
    home = base / "home"
    plain = f"{registry_host}/sn/app:plain"
    naiad_ref = f"{registry_host}/sn/app:naiad"
    naiad(home, "copy", f"oci:{image}", f"docker://{plain}")
    shutil.copytree(data, rootfs / "data")
    (base / "config.json").write_text(json.dumps(
        {"config": {"Entrypoint": ["/bin/sh"], "Cmd": ["-c", "cat /data/hello"]}}))
    naiad(home, "build", rootfs, f"docker://{naiad_ref}", "--config", base / "config.json")
    return plain, naiad_ref
