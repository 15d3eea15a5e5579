"""`naiad run` (issue 3, item 6): real runc containers on real lazy FUSE mounts with an overlay.

The image is a tiny rootfs built from this machine's own programs (dash, cat, sleep, id,
...) and the libraries `ldd` names, with an /etc/passwd and /etc/group, made into a naiad
image with `naiad build --config`. Every test has its own NAIAD_HOME and runs the real
command line in a subprocess, and checks what a run leaves behind: no mounts under
NAIAD_HOME, no runc container, no run dir, no mount daemon.

The first tests are pure: the runtime spec and user lookup, without runc.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from naiad.errors import NaiadError
from naiad.fs.daemon import pid_alive
from naiad.runtime.spec import (
    DEFAULT_CAPABILITIES,
    DEFAULT_PATH,
    SpecOptions,
    User,
    build_spec,
    lookup_user,
    read_in_root,
    resolve_user,
)

WAIT = 60.0
PASSWD = ("root:x:0:0:root:/root:/bin/sh\n"
          "# a comment\n"
          "app:x:1000:1000:App:/home/app:/bin/sh\n"
          "svc:x:1001:1001::/srv:/bin/sh\n")
GROUP = "root:x:0:\napp:x:1000:\nsvc:x:1001:\nextra:x:2000:app,svc\nmore:x:2001:app\n"
CONFIG = {"config": {"Entrypoint": ["/bin/sh", "-c"],
                     "Cmd": ['echo "cwd=$(pwd) foo=$FOO home=$HOME"'],
                     "Env": ["PATH=/usr/bin:/bin", "FOO=bar"], "WorkingDir": "/data"}}


# --- the spec, pure -------------------------------------------------------------------------


def test_args_compose_like_docker():
    spec = build_spec(CONFIG, SpecOptions(), User())
    assert spec["process"]["args"] == ["/bin/sh", "-c", 'echo "cwd=$(pwd) foo=$FOO home=$HOME"']
    spec = build_spec(CONFIG, SpecOptions(command=["exit 3"]), User())
    assert spec["process"]["args"] == ["/bin/sh", "-c", "exit 3"]
    # An explicit entrypoint drops the image's Cmd, which was written for the old one.
    spec = build_spec(CONFIG, SpecOptions(entrypoint="/bin/cat"), User())
    assert spec["process"]["args"] == ["/bin/cat"]
    spec = build_spec(CONFIG, SpecOptions(entrypoint="", command=["/bin/id", "-u"]), User())
    assert spec["process"]["args"] == ["/bin/id", "-u"]
    with pytest.raises(NaiadError, match="no command"):
        build_spec({"config": {}}, SpecOptions(), User())
    with pytest.raises(NaiadError, match="no command"):
        build_spec({}, SpecOptions(entrypoint=""), User())


def test_env_cwd_and_defaults():
    spec = build_spec(CONFIG, SpecOptions(env=["FOO=baz", "NEW=1"], hostname="h1"),
                      User(1000, 1000, (2000,), "/home/app"))
    env = spec["process"]["env"]
    assert env == ["PATH=/usr/bin:/bin", "HOSTNAME=h1", "FOO=baz", "NEW=1", "HOME=/home/app"]
    assert spec["process"]["cwd"] == "/data"
    assert spec["process"]["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [2000]}
    assert spec["hostname"] == "h1"
    bare = build_spec({"config": {"Cmd": ["x"]}}, SpecOptions(terminal=True), User())
    assert bare["process"]["env"] == [f"PATH={DEFAULT_PATH}", "HOSTNAME=naiad", "TERM=xterm", "HOME=/"]
    assert bare["process"]["cwd"] == "/" and bare["process"]["terminal"] is True
    assert build_spec(CONFIG, SpecOptions(workdir="/tmp/"), User())["process"]["cwd"] == "/tmp"
    with pytest.raises(NaiadError, match="absolute"):
        build_spec(CONFIG, SpecOptions(workdir="rel"), User())
    with pytest.raises(NaiadError, match="KEY=VALUE"):
        build_spec(CONFIG, SpecOptions(env=["NOEQUALS"]), User())


def test_isolation_defaults():
    spec = build_spec(CONFIG, SpecOptions(rootfs="/r", binds=[("/x/hosts", "/etc/hosts")]), User())
    assert spec["root"] == {"path": "/r", "readonly": False}
    ns = {n["type"] for n in spec["linux"]["namespaces"]}
    assert ns == {"pid", "ipc", "uts", "mount"}  # host network by default
    none = build_spec(CONFIG, SpecOptions(net="none"), User())
    assert {n["type"] for n in none["linux"]["namespaces"]} == ns | {"network"}
    caps = spec["process"]["capabilities"]
    assert caps["bounding"] == caps["effective"] == caps["permitted"] == list(DEFAULT_CAPABILITIES)
    assert "CAP_SYS_ADMIN" not in caps["bounding"] and "inheritable" not in caps
    mounts = {m["destination"]: m for m in spec["mounts"]}
    assert {"/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys"} <= set(mounts)
    assert "ro" in mounts["/sys"]["options"]
    assert mounts["/etc/hosts"]["source"] == "/x/hosts"
    assert "/proc/kcore" in spec["linux"]["maskedPaths"] and "/proc/sys" in spec["linux"]["readonlyPaths"]
    assert spec["process"]["rlimits"][0]["type"] == "RLIMIT_NOFILE"
    with pytest.raises(NaiadError, match="--net"):
        build_spec(CONFIG, SpecOptions(net="bridge"), User())
    json.dumps(spec)  # it is what goes to config.json


def test_lookup_user():
    assert lookup_user("", PASSWD, GROUP) == User(0, 0, (), "/root")
    assert lookup_user("app", PASSWD, GROUP) == User(1000, 1000, (2000, 2001), "/home/app")
    assert lookup_user("1000", PASSWD, GROUP) == User(1000, 1000, (2000, 2001), "/home/app")
    assert lookup_user("svc:extra", PASSWD, GROUP) == User(1001, 2000, (), "/srv")
    assert lookup_user("app:5", PASSWD, GROUP) == User(1000, 5, (), "/home/app")
    # A uid the image does not know is fine, as in Docker: gid 0, no home.
    assert lookup_user("4242", PASSWD, GROUP) == User(4242, 0, (), None)
    assert lookup_user("4242:77", None, None) == User(4242, 77, (), None)
    with pytest.raises(NaiadError, match="unable to find user nobody"):
        lookup_user("nobody", PASSWD, GROUP)
    with pytest.raises(NaiadError, match="unable to find group nogroup"):
        lookup_user("app:nogroup", PASSWD, GROUP)


def test_read_in_root_never_leaves_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "real").mkdir()
    (root / "real" / "passwd").write_text(PASSWD)
    # Absolute and ".." symlinks resolve inside the root, as in a chroot.
    (root / "etc" / "passwd").symlink_to("/real/passwd")
    (root / "etc" / "group").symlink_to("../../../../../../etc/group")
    (root / "etc" / "shadow").symlink_to("/etc/shadow")
    (root / "loop").symlink_to("loop")
    (root / "dir").symlink_to("/real")
    os.mkfifo(root / "fifo")
    assert read_in_root(str(root), "/etc/passwd") == PASSWD.encode()
    assert read_in_root(str(root), "/dir/passwd") == PASSWD.encode()
    assert read_in_root(str(root), "/etc/group") is None  # /etc/group inside the root: absent
    assert read_in_root(str(root), "/etc/shadow") is None
    assert read_in_root(str(root), "/loop") is None
    assert read_in_root(str(root), "/fifo") is None
    assert read_in_root(str(root), "/etc/passwd/x") is None
    assert resolve_user("app", str(root)) == User(1000, 1000, (), "/home/app")


# --- real containers ------------------------------------------------------------------------


def _skip_unless_possible() -> None:
    if os.geteuid() != 0:
        pytest.skip("naiad run needs root")
    if shutil.which("runc") is None:
        pytest.skip("runc is not installed")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")


def _libraries(program: str) -> list[str]:
    out = subprocess.run(["ldd", program], capture_output=True, text=True, check=True).stdout
    return [m.group(1) for m in re.finditer(r"(/\S+) \(0x", out)]


def _make_rootfs(root: Path) -> None:
    """A minimal root filesystem made of this machine's own dynamically linked programs."""
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    for program in ("/bin/sh", "/bin/cat", "/bin/sleep", "/bin/touch", "/bin/ls", "/usr/bin/id"):
        for path in [program, *_libraries(program)]:
            dest = root / path.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(path), dest)
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)
    (root / "data").mkdir()
    (root / "data" / "existing").write_text("from the image\n")
    (root / "home" / "app").mkdir(parents=True)
    os.chown(root / "home" / "app", 1000, 1000)
    (root / "tmp").mkdir(mode=0o1777)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    _skip_unless_possible()
    base = tmp_path_factory.mktemp("run-image")
    _make_rootfs(base / "rootfs")
    (base / "config.json").write_text(json.dumps(CONFIG))
    layout = base / "layout"
    proc = naiad(base / "home", "build", base / "rootfs", f"oci:{layout}:app",
                 "--config", base / "config.json")
    assert proc.returncode == 0, proc.stderr
    return f"oci:{layout}:app"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    yield path
    assert_clean(path)


def naiad(home: Path, *args: object, timeout: float = WAIT, **kw) -> subprocess.CompletedProcess[str]:
    kw.setdefault("env", _env(home))
    return subprocess.run([sys.executable, "-m", "naiad", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kw)


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "NAIAD_HOME": str(home)}


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p.startswith(str(path) + "/")]


def _daemons_under(home: Path) -> list[int]:
    """Live processes started for NAIAD_HOME `home`, by their environment (a mount daemon that
    `naiad run` forked has run's command line)."""
    needle = f"NAIAD_HOME={home}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and pid_alive(int(entry)):
            try:
                env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if needle in env:
                pids.append(int(entry))
    return pids


def _containers(home: Path) -> list[dict]:
    proc = subprocess.run(["runc", "--root", str(home / "runc"), "list", "--format", "json"],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout or "[]") or []


def assert_clean(home: Path) -> None:
    """Nothing of any run is left: mounts, daemons, runc containers, run dirs."""
    assert _mounts_under(home) == []
    assert _daemons_under(home) == []
    assert _containers(home) == []
    run_dir = home / "run"
    assert not run_dir.exists() or list(run_dir.iterdir()) == []


def test_output_and_exit_code(image, home):
    proc = naiad(home, "run", image, "--", "echo hi; echo err >&2; exit 7")
    assert (proc.returncode, proc.stdout) == (7, "hi\n"), proc.stderr
    assert "err" in proc.stderr
    assert_clean(home)
    proc = naiad(home, "run", "--entrypoint", "/bin/sh", image, "--", "-c", "echo ok")
    assert (proc.returncode, proc.stdout) == (0, "ok\n"), proc.stderr


def test_image_config_is_honoured(image, home):
    proc = naiad(home, "run", image)
    assert (proc.returncode, proc.stdout) == (0, "cwd=/data foo=bar home=/root\n"), proc.stderr
    # Options override the image: env, workdir; a bare -e NAME takes naiad's own value.
    proc = naiad(home, "run", "-e", "FOO=baz", "-e", "FROM_HOST", "-w", "/tmp", image, "--",
                 'echo "$(pwd) $FOO $FROM_HOST $PATH"', env={**_env(home), "FROM_HOST": "yes"})
    assert (proc.returncode, proc.stdout) == (0, "/tmp baz yes /usr/bin:/bin\n"), proc.stderr


def test_user(image, home):
    proc = naiad(home, "run", "--user", "app", image, "--", 'echo "$(id -u) $(id -g) $(id -G) $HOME"')
    assert (proc.returncode, proc.stdout) == (0, "1000 1000 1000 2000 2001 /home/app\n"), proc.stderr
    proc = naiad(home, "run", "-u", "4321:99", image, "--", 'echo "$(id -u) $(id -g)"; touch /x')
    assert proc.stdout == "4321 99\n"
    assert proc.returncode == 1 and "Permission denied" in proc.stderr  # not root: / is not writable
    proc = naiad(home, "run", "-u", "nobody", image)
    assert proc.returncode == 125 and "unable to find user nobody" in proc.stderr


def test_writes_stay_in_the_overlay(image, home):
    script = "echo new > /data/new; echo more >> /data/existing; cat /data/existing; ls /data"
    proc = naiad(home, "run", image, "--", script)
    assert (proc.returncode, proc.stdout) == (0, "from the image\nmore\nexisting\nnew\n"), proc.stderr
    # A second container starts from the image again.
    proc = naiad(home, "run", image, "--", "cat /data/existing; ls /data")
    assert (proc.returncode, proc.stdout) == (0, "from the image\nexisting\n"), proc.stderr
    # --keep leaves the upper dir, and says where.
    proc = naiad(home, "run", "--keep", image, "--", "echo kept > /data/new")
    assert proc.returncode == 0, proc.stderr
    upper = Path(re.search(r"kept in (\S+)", proc.stderr).group(1))
    assert (upper / "data" / "new").read_text() == "kept\n"
    assert _mounts_under(home) == [] and _containers(home) == []
    shutil.rmtree(upper.parent)


def test_stdin_is_passed_through(image, home):
    proc = naiad(home, "run", "--entrypoint", "/bin/cat", image, input="piped\n")
    assert (proc.returncode, proc.stdout) == (0, "piped\n"), proc.stderr


def test_network_modes(image, home):
    host = naiad(home, "run", image, "--", "cat /proc/net/dev")
    none = naiad(home, "run", "--net", "none", image, "--", "cat /proc/net/dev")
    assert host.returncode == none.returncode == 0, host.stderr + none.stderr

    def interfaces(text: str) -> set[str]:
        return {line.split(":")[0].strip() for line in text.splitlines() if ":" in line}

    with open("/proc/net/dev") as f:
        assert interfaces(host.stdout) == interfaces(f.read())
    assert interfaces(none.stdout) == {"lo"}


def test_exit_codes_of_failures(image, home, tmp_path):
    # naiad's own failures are 125, as docker's; so is a command that cannot start, unless it is
    # missing (127) or not executable (126). The app's own exit codes stay distinct.
    proc = naiad(home, "run", f"oci:{tmp_path}/nothing:x")
    assert proc.returncode == 125 and proc.stderr.startswith("naiad: error:"), proc.stderr
    assert_clean(home)  # the mount daemon, started before the image was resolved, is gone too
    proc = naiad(home, "run", "--entrypoint", "", image)
    assert proc.returncode == 125 and "no command" in proc.stderr
    proc = naiad(home, "run", "--entrypoint", "/nope", image)
    assert proc.returncode == 127 and "/nope" in proc.stderr
    proc = naiad(home, "run", "--entrypoint", "/etc/passwd", image)
    assert proc.returncode == 126 and "permission denied" in proc.stderr
    proc = naiad(home, "run", "-w", "/data/existing", image)
    assert proc.returncode == 125 and "not a directory" in proc.stderr
    proc = naiad(home, "run", image, "--", "exit 1")
    assert (proc.returncode, proc.stderr) == (1, "")


def _start(home: Path, *args: object) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "naiad", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(home))
    assert proc.stdout is not None
    assert proc.stdout.readline() == "sleeping\n"  # the container runs
    return proc


def test_sigterm_stops_the_container_and_cleans_up(image, home):
    # PID 1 ignores a signal it has no handler for: after the stop timeout it is killed,
    # and naiad reports the signal it got.
    proc = _start(home, "run", "--stop-timeout", "1", image, "--", "echo sleeping; exec sleep 100")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(WAIT) == 128 + signal.SIGTERM, proc.stderr.read()
    assert time.monotonic() - t0 < 10
    assert_clean(home)
    # A container that handles SIGTERM gets it at once and its own exit code is naiad's.
    proc = _start(home, "run", image, "--", "trap 'echo stopping; exit 3' TERM; echo sleeping; "
                  "sleep 100 & wait")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(WAIT) == 3, proc.stderr.read()
    assert proc.stdout.read() == "stopping\n"
    assert time.monotonic() - t0 < 5  # well under the default 10 s stop timeout
    # Ctrl-C (SIGINT) the same way; a second one does not wait for the timeout.
    proc = _start(home, "run", image, "--", "echo sleeping; exec sleep 100")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(WAIT) == 128 + signal.SIGINT, proc.stderr.read()


def test_a_killed_run_is_cleaned_up_by_the_next(image, home):
    proc = _start(home, "run", image, "--", "echo sleeping; exec sleep 100")
    proc.kill()  # SIGKILL: naiad cannot clean up
    proc.wait(WAIT)
    assert _mounts_under(home) and _containers(home)
    done = naiad(home, "run", image, "--", "true")
    assert done.returncode == 0, done.stderr
    assert_clean(home)


def test_a_run_killed_while_its_daemon_comes_up_is_cleaned_up_by_the_next(image, home):
    # The run's daemon waits on a registry that never answers; the run is killed. The daemon was
    # forked from the run (it has run's command line): the next run finds it by the pid its state
    # dir records, and stops it.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(WAIT)
        proc = subprocess.Popen([sys.executable, "-m", "naiad", "run", "--plain-http",
                                 f"127.0.0.1:{silent.getsockname()[1]}/app:v1", "--", "true"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(home))
        conn, _ = silent.accept()  # the daemon asks for the manifest, and gets no answer
        with conn:
            proc.kill()
            proc.wait(WAIT)
            [started] = home.glob("mounts/*/started.json")
            daemon_pid = json.loads(started.read_text())["pid"]
            assert pid_alive(daemon_pid)
            done = naiad(home, "run", image, "--", "true")
            assert done.returncode == 0, done.stderr
            assert not pid_alive(daemon_pid)
    assert_clean(home)


def test_run_from_a_registry(image, home, registry):
    ref = f"docker://{registry.host}/run/app:v1"
    proc = naiad(home, "copy", image, ref)
    assert proc.returncode == 0, proc.stderr
    proc = naiad(home, "run", ref, "--", "cat /data/existing")
    assert (proc.returncode, proc.stdout) == (0, "from the image\n"), proc.stderr
