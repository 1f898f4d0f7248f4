package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/ttrpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/podvm/podvm/agent/api"
)

// Dialer opens one connection to the agent's transport (hypervisor.Hypervisor.DialAgent).
type Dialer func(ctx context.Context) (net.Conn, error)

// Client is the host's connection to one guest agent.
type Client struct {
	api.AgentService
	tc     *ttrpc.Client
	closed chan struct{}
	// Info is what the agent said when it became ready.
	Info *api.VersionResponse
}

// probeTimeout bounds one readiness probe. The agent answers Version within milliseconds once
// it serves; until then a virtio-serial port swallows what the host sends.
const probeTimeout = 250 * time.Millisecond

// Connect waits until the agent answers on a fresh connection and returns a client using it.
// It gives up when ctx ends or vmDone is closed (the VM died), saying which.
func Connect(ctx context.Context, dial Dialer, vmDone <-chan struct{}) (*Client, error) {
	var lastErr error
	for attempt := 0; ; attempt++ {
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("guest agent not ready after %d attempts (last error: %v): %w", attempt, lastErr, ctx.Err())
		case <-vmDone:
			return nil, errors.New("the VM exited before its agent answered; read its console log")
		default:
		}
		c, err := tryConnect(ctx, dial)
		if err == nil {
			return c, nil
		}
		lastErr = err
		select {
		case <-time.After(20 * time.Millisecond):
		case <-ctx.Done():
		case <-vmDone:
		}
	}
}

func tryConnect(ctx context.Context, dial Dialer) (*Client, error) {
	conn, err := dial(ctx)
	if err != nil {
		return nil, err
	}
	closed := make(chan struct{})
	tc := ttrpc.NewClient(conn, ttrpc.WithUnaryClientInterceptor(fromGRPCErrors),
		ttrpc.WithOnClose(func() { close(closed) }))
	c := &Client{AgentService: api.NewAgentClient(tc), tc: tc, closed: closed}
	pctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()
	v, err := c.Version(pctx, &api.VersionRequest{})
	if err != nil {
		tc.Close()
		return nil, err
	}
	if v.AgentVersion != Version {
		tc.Close()
		return nil, fmt.Errorf("guest agent speaks %q, this host %q: rebuild the guest image with `podvm image build`", v.AgentVersion, Version)
	}
	c.Info = v
	return c, nil
}

// fromGRPCErrors turns the agent's status codes back into errdefs errors.
func fromGRPCErrors(ctx context.Context, req *ttrpc.Request, resp *ttrpc.Response, info *ttrpc.UnaryClientInfo, invoker ttrpc.Invoker) error {
	if err := invoker(ctx, req, resp); err != nil {
		return errgrpc.ToNative(err)
	}
	// ttrpc turns the reply's status into an error only after the interceptors ran.
	if resp.Status != nil && codes.Code(resp.Status.Code) != codes.OK {
		return errgrpc.ToNative(status.ErrorProto(resp.Status))
	}
	return nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.tc.Close() }

// Done is closed when the connection is gone (the VM died or Close was called).
func (c *Client) Done() <-chan struct{} { return c.closed }
