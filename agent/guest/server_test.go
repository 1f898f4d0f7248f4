package guest

import (
	"context"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/podvm/podvm/agent"
	"github.com/podvm/podvm/agent/api"
)

// TestServerOverTTRPC drives the agent server through the real ttrpc stack and the host
// client, and checks that bad requests come back as typed errors, not a dead agent.
func TestServerOverTTRPC(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s := NewServer()
	powered := make(chan struct{})
	s.powerOff = func() { close(powered) }
	c := serveOverTTRPC(ctx, t, s, s)
	if c.Info.AgentVersion != agent.Version || c.Info.KernelRelease == "" {
		t.Fatalf("version = %+v", c.Info)
	}

	t.Run("unknown container", func(t *testing.T) { unknownContainerCalls(ctx, t, c) })
	t.Run("bad create", func(t *testing.T) { badCreates(ctx, t, c) })
	// A container being created is not there yet for other calls (containerd's stats
	// collector asks at any time).
	t.Run("container being created", func(t *testing.T) {
		s.mu.Lock()
		s.containers["creating"] = nil
		s.mu.Unlock()
		if _, err := c.Stats(ctx, &api.ContainerRequest{ContainerId: "creating"}); !errdefs.IsNotFound(err) {
			t.Errorf("stats of a container being created: %v, want not found", err)
		}
	})
	t.Run("still serving", func(t *testing.T) {
		if _, err := c.Version(ctx, &api.VersionRequest{}); err != nil {
			t.Fatal(err)
		}
		octx, ocancel := context.WithTimeout(ctx, 50*time.Millisecond)
		defer ocancel()
		if _, err := c.GetOOMEvent(octx, &api.Empty{}); err == nil {
			t.Fatal("GetOOMEvent returned without an OOM")
		}
	})
	t.Run("shutdown powers off", func(t *testing.T) {
		if _, err := c.Shutdown(ctx, &api.Empty{}); err != nil {
			t.Fatal(err)
		}
		select {
		case <-powered:
		case <-time.After(5 * time.Second):
			t.Fatal("Shutdown did not power off")
		}
	})
}

// unknownContainerCalls: calls about a container the agent does not have are not found.
func unknownContainerCalls(ctx context.Context, t *testing.T, c *agent.Client) {
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
}

// badCreates: a create the agent cannot make sense of is an invalid argument, and leaves the
// id free.
func badCreates(ctx context.Context, t *testing.T, c *agent.Client) {
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
}
