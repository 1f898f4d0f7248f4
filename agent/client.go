package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync/atomic"
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
	// observer is told about every unary call (ObserveRPCs); nil: nobody.
	observer atomic.Pointer[RPCObserver]
	// Info is what the agent said when it became ready.
	Info *api.VersionResponse
}

// RPCObserver is told the full method name, duration and error of an agent call.
type RPCObserver func(method string, d time.Duration, err error)

// ObserveRPCs makes the client report every later unary call to o (the shim's metrics).
func (c *Client) ObserveRPCs(o RPCObserver) { c.observer.Store(&o) }

// observe is the ttrpc client interceptor that times calls for the observer.
func (c *Client) observe(ctx context.Context, req *ttrpc.Request, resp *ttrpc.Response, info *ttrpc.UnaryClientInfo, invoker ttrpc.Invoker) error {
	o := c.observer.Load()
	if o == nil {
		return invoker(ctx, req, resp)
	}
	start := time.Now()
	err := invoker(ctx, req, resp)
	(*o)(info.FullMethod, time.Since(start), err)
	return err
}

// Connect waits until the agent answers and returns a client. It dials until the transport
// accepts (a vsock listener exists only once the agent runs), then waits for one Version reply
// on that one connection. It never re-dials after a connection was made: QEMU passes the
// virtio-serial byte stream to the guest only while the agent holds the port open, so bytes
// wait in order until then, while a second connection could be spliced onto half a message of
// the first. It gives up when ctx ends or vmDone is closed (the VM died), saying which.
func Connect(ctx context.Context, dial Dialer, vmDone <-chan struct{}) (*Client, error) {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	if vmDone != nil {
		go func() {
			select {
			case <-vmDone:
				cancel(errVMExited)
			case <-ctx.Done():
			}
		}()
	}
	var conn net.Conn
	for attempt := 1; ; attempt++ {
		var err error
		if conn, err = dial(ctx); err == nil {
			break
		}
		select {
		case <-time.After(20 * time.Millisecond):
		case <-ctx.Done():
			return nil, fmt.Errorf("connect to the guest agent (%d attempts, last: %v): %w", attempt, err, context.Cause(ctx))
		}
	}
	closed := make(chan struct{})
	c := &Client{closed: closed}
	// observe sees the error fromGRPCErrors made of the reply's status too, and the time a
	// bounded call took to fail.
	tc := ttrpc.NewClient(conn, ttrpc.WithChainUnaryClientInterceptor(c.observe, bounded(callTimeout), fromGRPCErrors),
		ttrpc.WithOnClose(func() { close(closed) }))
	c.AgentService, c.tc = api.NewAgentClient(tc), tc
	v, err := c.Version(ctx, &api.VersionRequest{})
	if err != nil {
		_ = tc.Close()
		if cause := context.Cause(ctx); cause != nil {
			err = cause
		}
		return nil, fmt.Errorf("guest agent did not answer: %w", err)
	}
	if v.AgentVersion != Version {
		_ = tc.Close()
		return nil, fmt.Errorf("guest agent speaks %q, this host %q: rebuild the guest image with `podvm image build`", v.AgentVersion, Version)
	}
	c.Info = v
	return c, nil
}

var errVMExited = errors.New("the VM exited before its agent answered; read its console log")

// CallTimeout bounds every agent call whose answer depends only on the guest being alive:
// a frozen or wedged guest makes it fail, so kubelet's and containerd's calls into the shim
// return an error instead of hanging. A caller's own deadline stays.
const CallTimeout = 30 * time.Second

// callTimeout is CallTimeout; tests shorten it.
var callTimeout = CallTimeout

// waitsForWorkload are the calls whose answer waits for the pod's processes (an exit, output,
// a reader of stdin or of a forwarded connection, an OOM): their callers end them.
var waitsForWorkload = map[string]bool{
	"/podvm.agent.v1.Agent/WaitProcess": true,
	"/podvm.agent.v1.Agent/ReadStdio":   true,
	"/podvm.agent.v1.Agent/WriteStdin":  true,
	"/podvm.agent.v1.Agent/GetOOMEvent": true,
	"/podvm.agent.v1.Agent/ReadConn":    true,
	"/podvm.agent.v1.Agent/WriteConn":   true,
}

// bounded is the client interceptor that gives a call without a deadline one of timeout,
// unless it waits for the workload.
func bounded(timeout time.Duration) ttrpc.UnaryClientInterceptor {
	return func(ctx context.Context, req *ttrpc.Request, resp *ttrpc.Response, info *ttrpc.UnaryClientInfo, invoker ttrpc.Invoker) error {
		if _, ok := ctx.Deadline(); ok || waitsForWorkload[info.FullMethod] {
			return invoker(ctx, req, resp)
		}
		cctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		err := invoker(cctx, req, resp)
		if err != nil && ctx.Err() == nil && errors.Is(cctx.Err(), context.DeadlineExceeded) {
			return fmt.Errorf("the guest agent did not answer %s within %v: the VM is hung or overloaded "+
				"(its console log and `podvm debug` tell more): %w", info.FullMethod, timeout, context.DeadlineExceeded)
		}
		return err
	}
}

// fromGRPCErrors turns the agent's status codes back into errdefs errors. A connection that
// closed under the call is no answer of the agent's: it stays ttrpc.ErrClosed, which is how
// the shim tells a guest that died.
func fromGRPCErrors(ctx context.Context, req *ttrpc.Request, resp *ttrpc.Response, info *ttrpc.UnaryClientInfo, invoker ttrpc.Invoker) error {
	if err := invoker(ctx, req, resp); err != nil {
		if errors.Is(err, ttrpc.ErrClosed) {
			return err
		}
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
