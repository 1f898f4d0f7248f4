package guest

import (
	"context"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/ttrpc"

	"github.com/podvm/podvm/agent"
	"github.com/podvm/podvm/agent/api"
)

// TestServerOverTTRPC drives the agent server through the real ttrpc stack and the host
// client, and checks that bad requests come back as typed errors, not a dead agent.
func TestServerOverTTRPC(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "agent.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := ttrpc.NewServer(ttrpc.WithUnaryServerInterceptor(toGRPCErrors))
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer()
	powered := make(chan struct{})
	s.powerOff = func() { close(powered) }
	api.RegisterAgentService(srv, s)
	// Serve returns ttrpc.ErrServerClosed once the test closes srv; any other failure shows up
	// as the test's calls failing.
	go func() { _ = srv.Serve(context.Background(), l) }()
	defer srv.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := agent.Connect(ctx, func(ctx context.Context) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if c.Info.AgentVersion != agent.Version || c.Info.KernelRelease == "" {
		t.Fatalf("version = %+v", c.Info)
	}

	for name, call := range map[string]func() error{
		"start unknown": func() error {
			_, err := c.StartProcess(ctx, &api.ProcessRequest{ContainerId: "nope"})
			return err
		},
		"wait unknown": func() error {
			_, err := c.WaitProcess(ctx, &api.ProcessRequest{ContainerId: "nope"})
			return err
		},
		"remove unknown": func() error {
			_, err := c.RemoveContainer(ctx, &api.RemoveContainerRequest{ContainerId: "nope"})
			return err
		},
	} {
		if err := call(); !errdefs.IsNotFound(err) {
			t.Errorf("%s: %v, want not found", name, err)
		}
	}
	for name, req := range map[string]*api.CreateContainerRequest{
		"malformed spec": {ContainerId: "c1", Spec: []byte("{not json")},
		"empty id":       {Spec: []byte(`{}`)},
		"no process":     {ContainerId: "c1", Spec: []byte(`{"root":{"path":"/nonexistent"}}`)},
	} {
		if _, err := c.CreateContainer(ctx, req); !errdefs.IsInvalidArgument(err) {
			t.Errorf("%s: %v, want invalid argument", name, err)
		}
	}
	// The id of a failed create is free again.
	if _, err := c.CreateContainer(ctx, &api.CreateContainerRequest{ContainerId: "c1", Spec: []byte("{")}); !errdefs.IsInvalidArgument(err) {
		t.Errorf("retry after failure: %v", err)
	}
	// A container being created is not there yet for other calls (containerd's stats
	// collector asks at any time).
	s.mu.Lock()
	s.containers["creating"] = nil
	s.mu.Unlock()
	if _, err := c.Stats(ctx, &api.ContainerRequest{ContainerId: "creating"}); !errdefs.IsNotFound(err) {
		t.Errorf("stats of a container being created: %v, want not found", err)
	}
	// Still serving.
	if _, err := c.Version(ctx, &api.VersionRequest{}); err != nil {
		t.Fatal(err)
	}
	octx, ocancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer ocancel()
	if _, err := c.GetOOMEvent(octx, &api.Empty{}); err == nil {
		t.Fatal("GetOOMEvent returned without an OOM")
	}
	if _, err := c.Shutdown(ctx, &api.Empty{}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-powered:
	case <-time.After(5 * time.Second):
		t.Fatal("Shutdown did not power off")
	}
}
