"""A private containerd for tests and benchmarks: its own root, state, socket and config.

Nothing here touches the machine's own containerd (if one runs): every path
is under the directory given, shims get sockets derived from that state dir,
and `stop()` kills the tasks this instance started before containerd itself.
Only the standard library is used, so `bench/` imports it as
`tests.containerd_server` too.

    with Containerd(tmp / "ctrd", snapshotter_socket=sock) as ctrd:
        ctrd.ctr("images", "ls")
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

NAMESPACE = "naiad-test"
PROXY_PLUGIN = "naiad"


def containerd_available() -> bool:
    return all(shutil.which(t) for t in ("containerd", "ctr", "runc"))


class Containerd:
    """containerd with everything under `base`; `.address` is its gRPC socket.

    `snapshotter_socket` registers a proxy snapshotter named "naiad" there.
    `cri` keeps the CRI plugin (off by default: it wants CNI and is slow to
    start) and points it at that snapshotter with snapshot annotations on.
    `netns` runs containerd (and `ctr`) inside that network namespace (`ip netns`), with
    `nsenter --net` rather than `ip netns exec`: the latter remounts /sys in a mount namespace
    of its own, which hides the cgroup mounts runc needs and the snapshots' mounts from the caller.
    """

    def __init__(self, base: Path, *, snapshotter_socket: str | None = None, cri: bool = False,
                 netns: str | None = None, namespace: str = NAMESPACE, extra_config: str = ""):
        self.base = Path(base)
        self.address = str(self.base / "containerd.sock")
        self.namespace = namespace
        self.netns = netns
        self.snapshotter_socket = snapshotter_socket
        self.cri = cri
        self.extra_config = extra_config
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.base / "containerd.log"

    def config(self) -> str:
        b = self.base
        lines = [
            "version = 2",
            f'root = "{b / "root"}"',
            f'state = "{b / "state"}"',
            f'disabled_plugins = [{"" if self.cri else chr(34) + "io.containerd.grpc.v1.cri" + chr(34)}]',
            "[grpc]",
            f'  address = "{self.address}"',
            "[ttrpc]",
            f'  address = "{self.address}.ttrpc"',
            "[debug]",
            '  level = "info"',
            '[plugins."io.containerd.internal.v1.opt"]',
            f'  path = "{b / "opt"}"',
        ]
        if self.snapshotter_socket:
            lines += [
                f"[proxy_plugins.{PROXY_PLUGIN}]",
                '  type = "snapshot"',
                f'  address = "{self.snapshotter_socket}"',
            ]
        if self.cri:
            lines += [
                '[plugins."io.containerd.grpc.v1.cri"]',
                '  sandbox_image = "registry.invalid/pause:none"',
                '[plugins."io.containerd.grpc.v1.cri".containerd]',
                f'  snapshotter = "{PROXY_PLUGIN if self.snapshotter_socket else "overlayfs"}"',
                "  disable_snapshot_annotations = false",
                '[plugins."io.containerd.grpc.v1.cri".cni]',
                f'  bin_dir = "{b / "cni-bin"}"',
                f'  conf_dir = "{b / "cni-conf"}"',
            ]
        return "\n".join(lines) + "\n" + self.extra_config

    def start(self, timeout: float = 30.0) -> Containerd:
        self.base.mkdir(parents=True, exist_ok=True)
        conf = self.base / "config.toml"
        conf.write_text(self.config())
        argv = self._in_netns(["containerd", "--config", str(conf)])
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited ({self.proc.returncode}):\n{self.log_tail()}")
            if os.path.exists(self.address) and self.ctr("version", check=False).returncode == 0:
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"containerd did not come up in {timeout:.0f} s:\n{self.log_tail()}")

    def restart(self) -> None:
        """Stop containerd itself (not its shims or tasks) and start it again, as an upgrade would."""
        self._stop_daemon()
        self.start()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def _in_netns(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--", *argv] if self.netns else argv

    def ctr_argv(self, *args: str, tool: str = "ctr", namespace: str | None = None) -> list[str]:
        """The command line of `ctr` (or `ctr-remote`) against this instance, for callers that run it."""
        return self._in_netns([tool, "--address", self.address, "--namespace", namespace or self.namespace,
                               *args])

    def ctr(self, *args: str, check: bool = True, timeout: float = 300.0, tool: str = "ctr",
            input: bytes | None = None, namespace: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run `ctr` (or `ctr-remote`) against this instance, in its namespace (or `namespace`)."""
        argv = self.ctr_argv(*args, tool=tool, namespace=namespace)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              input=input.decode() if input is not None else None)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[argv.index(tool):])} failed ({proc.returncode}):\n"
                               f"{proc.stdout}{proc.stderr}\n--- containerd log ---\n{self.log_tail()}")
        return proc

    def ctr_remote(self, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return self.ctr(*args, tool="ctr-remote", **kwargs)  # type: ignore[arg-type]

    def tasks(self) -> list[str]:
        out = self.ctr("tasks", "ls", "-q", check=False).stdout
        return [t for t in out.split() if t]

    def stop(self) -> None:
        """Kill this instance's tasks, remove its containers and mounts, stop containerd."""
        if self.proc is not None and self.proc.poll() is None:
            for task in self.tasks():
                self.ctr("tasks", "kill", "-s", "SIGKILL", task, check=False)
                self.ctr("tasks", "delete", "-f", task, check=False)
            for c in self.ctr("containers", "ls", "-q", check=False).stdout.split():
                self.ctr("containers", "delete", c, check=False)
        self._stop_daemon()
        self._kill_shims()
        _unmount_under(self.base)

    def _stop_daemon(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def _kill_shims(self) -> None:
        """Shims outlive containerd by design; ours are the ones whose command line names our state."""
        marker = str(self.base).encode()
        for pid in _pids():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if b"containerd-shim" in cmd and marker in cmd:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> Containerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _pids() -> Sequence[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _unmount_under(base: Path) -> None:
    """Lazily unmount whatever is still mounted below `base` (rootfs overlays, shm), deepest first."""
    prefix = os.path.realpath(base) + "/"
    with open("/proc/self/mountinfo") as f:
        targets = [line.split()[4] for line in f]
    for target in sorted((t for t in targets if t.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True)
