// containerd's snapshotter conformance suite (snapshots/testsuite, from Debian's
// golang-github-containerd-containerd-dev) against naiad's snapshotter, through containerd's
// own proxy client, as containerd itself talks to it.
//
// Each test of the suite gets a fresh snapshotter process on a fresh root. Run by
// tests/test_snapshotter_conformance.py (GOPATH mode, GO111MODULE=off); NAIAD_PYTHON names
// the Python that has naiad installed.
package conformance

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

func startNaiad(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	socket := filepath.Join(root, "sn.sock")
	cmd := exec.Command(os.Getenv("NAIAD_PYTHON"), "-m", "naiad", "snapshotter", "--address", socket,
		"--root", filepath.Join(root, "sn"), "--log-level", "warning")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.Env = append(os.Environ(), "NAIAD_HOME="+filepath.Join(root, "home"))
	if err := cmd.Start(); err != nil {
		return nil, nil, err
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		if c, err := net.Dial("unix", socket); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			cmd.Wait()
			return nil, nil, fmt.Errorf("naiad snapshotter did not listen on %s", socket)
		}
		time.Sleep(50 * time.Millisecond)
	}
	conn, err := grpc.Dial("unix://"+socket, grpc.WithInsecure())
	if err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		return nil, nil, err
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "naiad")
	cleanup := func() error {
		conn.Close()
		cmd.Process.Signal(syscall.SIGTERM)
		return cmd.Wait()
	}
	return sn, cleanup, nil
}

func TestNaiadSnapshotter(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root")
	}
	testsuite.SnapshotterSuite(t, "naiad", startNaiad)
}
