package harness

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"time"

	// Deprecated for k8s.io/streaming, but client-go v0.37 still dials through apimachinery's types.
	httpstreamspdy "k8s.io/apimachinery/pkg/util/httpstream/spdy" //nolint:staticcheck // SA1019, see above
	"k8s.io/client-go/transport/spdy"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// PortForwardResult is what one port-forward connection saw.
type PortForwardResult struct {
	// Data is everything the pod side sent back on the data stream.
	Data []byte
	// RemoteError is the message the runtime put on the error stream ("" when it had none):
	// this is where kubectl port-forward's "error forwarding port" text comes from.
	RemoteError string
}

// PortForward opens one port-forward connection to port in the pod through the CRI PortForward
// URL, as `kubectl port-forward` through kubelet does (SPDY, portforward.k8s.io, one error and
// one data stream per connection), sends send, half-closes, and collects the reply until the
// runtime closes the streams. err is set only when the streaming session itself failed.
func (e *Env) PortForward(ctx context.Context, podID string, port int32, send []byte) (*PortForwardResult, error) {
	return e.portForward(ctx, podID, port, send, 0)
}

// PortForwardReply is PortForward for a client that reads a reply of want bytes before it
// half-closes, as an HTTP client reads the response. After a client's half-close, containerd
// gives the pod side one second to finish (internal/cri/server's portForward) and then closes
// the connection: a reply longer than that would be cut short by containerd, for any runtime.
func (e *Env) PortForwardReply(ctx context.Context, podID string, port int32, send []byte, want int) (*PortForwardResult, error) {
	return e.portForward(ctx, podID, port, send, want)
}

func (e *Env) portForward(ctx context.Context, podID string, port int32, send []byte, want int) (*PortForwardResult, error) {
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	resp, err := e.Runtime.PortForward(rctx, &runtimeapi.PortForwardRequest{PodSandboxId: podID, Port: []int32{port}})
	cancel()
	if err != nil {
		return nil, fmt.Errorf("PortForward %s:%d: %w", podID, port, err)
	}
	u, err := url.Parse(resp.Url)
	if err != nil {
		return nil, fmt.Errorf("port-forward URL %q: %w", resp.Url, err)
	}
	// The streaming server listens on 127.0.0.1 inside the harness netns.
	rt, err := httpstreamspdy.NewRoundTripperWithConfig(httpstreamspdy.RoundTripperConfig{
		UpgradeTransport: &http.Transport{DialContext: e.ns.dialContext},
		PingPeriod:       5 * time.Second,
	})
	if err != nil {
		return nil, err
	}
	conn, _, err := spdy.NewDialer(rt, &http.Client{Transport: rt}, http.MethodPost, u).Dial("portforward.k8s.io")
	if err != nil {
		return nil, fmt.Errorf("port-forward upgrade %s: %w", u, err)
	}
	defer func() { _ = conn.Close() }()

	// The header names and values of k8s.io/api/core/v1 (StreamType, PortHeader, ...).
	headers := http.Header{}
	headers.Set("streamType", "error")
	headers.Set("port", strconv.Itoa(int(port)))
	headers.Set("requestID", "0")
	errStream, err := conn.CreateStream(headers)
	if err != nil {
		return nil, fmt.Errorf("port-forward error stream: %w", err)
	}
	_ = errStream.Close() // only the server writes to it
	errc := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(errStream)
		errc <- b
	}()
	headers.Set("streamType", "data")
	data, err := conn.CreateStream(headers)
	if err != nil {
		return nil, fmt.Errorf("port-forward data stream: %w", err)
	}
	readc := make(chan []byte, 1)
	got := &countingBuffer{want: want, reached: make(chan struct{})}
	go func() {
		_, _ = io.Copy(got, data)
		got.done()
		readc <- got.Bytes()
	}()
	if _, err := data.Write(send); err != nil {
		// A server that failed to connect may have closed the stream already; its reason is on
		// the error stream.
		_ = err
	}
	if want > 0 {
		select {
		case <-got.reached:
		case <-ctx.Done():
		}
	}
	_ = data.Close() // half-close: no more data from us

	res := &PortForwardResult{}
	select {
	case res.Data = <-readc:
	case <-ctx.Done():
		return nil, fmt.Errorf("port-forward %s:%d: waiting for the reply: %w", podID, port, ctx.Err())
	}
	select {
	case b := <-errc:
		res.RemoteError = string(b)
	case <-time.After(10 * time.Second):
		return res, fmt.Errorf("port-forward %s:%d: the error stream was not closed 10s after the data stream", podID, port)
	}
	return res, nil
}

// countingBuffer collects a reply and closes reached once it holds want bytes or ended.
type countingBuffer struct {
	bytes.Buffer
	want    int
	reached chan struct{}
	once    sync.Once
}

func (b *countingBuffer) Write(p []byte) (int, error) {
	n, err := b.Buffer.Write(p)
	if b.Len() >= b.want {
		b.done()
	}
	return n, err
}

func (b *countingBuffer) done() { b.once.Do(func() { close(b.reached) }) }
