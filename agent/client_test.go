package agent

import (
	"context"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/ttrpc"

	"github.com/podvm/podvm/agent/api"
)

// TestObserveRPCs: after ObserveRPCs every call is reported with its method, a duration and
// its error, as the caller sees it (an errdefs error for a failed call).
func TestObserveRPCs(t *testing.T) {
	fake := NewFake()
	srv, err := ttrpc.NewServer()
	if err != nil {
		t.Fatal(err)
	}
	api.RegisterAgentService(srv, fake)
	sock := filepath.Join(t.TempDir(), "agent.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(context.WithoutCancel(t.Context()), l) }()
	t.Cleanup(func() { _ = srv.Close() })

	c, err := Connect(t.Context(), func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = c.Close() }()

	type call struct {
		method string
		d      time.Duration
		err    error
	}
	var mu sync.Mutex
	var got []call
	c.ObserveRPCs(func(method string, d time.Duration, err error) {
		mu.Lock()
		defer mu.Unlock()
		got = append(got, call{method, d, err})
	})
	if _, err := c.SetupSandbox(t.Context(), &api.SetupSandboxRequest{Hostname: "h"}); err != nil {
		t.Fatal(err)
	}
	fake.FailOn("PauseContainer", errdefs.ErrNotFound)
	_, perr := c.PauseContainer(t.Context(), &api.ContainerRequest{ContainerId: "x"})
	if perr == nil {
		t.Fatal("PauseContainer succeeded; the fake was told to fail it")
	}
	mu.Lock()
	defer mu.Unlock()
	if len(got) != 2 || filepath.Base(got[0].method) != "SetupSandbox" || got[0].err != nil ||
		filepath.Base(got[1].method) != "PauseContainer" || got[1].err == nil || got[1].err.Error() != perr.Error() {
		t.Fatalf("observed %+v, want SetupSandbox ok then PauseContainer failing with %v", got, perr)
	}
	if got[0].d <= 0 {
		t.Errorf("duration %v", got[0].d)
	}
}
