package harness

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"time"

	// Deprecated for k8s.io/streaming, but client-go v0.37 still dials through apimachinery's types.
	httpstreamspdy "k8s.io/apimachinery/pkg/util/httpstream/spdy" //nolint:staticcheck // SA1019, see above
	"k8s.io/client-go/tools/remotecommand"
	"k8s.io/client-go/util/exec"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// StreamOptions are the streams of an interactive exec or attach.
type StreamOptions struct {
	Stdin  io.Reader
	Stdout io.Writer
	Stderr io.Writer // ignored with TTY: the terminal merges it into Stdout
	TTY    bool
}

// Exec runs cmd in a container through the CRI Exec URL and client-go's SPDY executor, as
// `kubectl exec` through kubelet would. It returns the command's exit code; err is set only when
// the exec itself failed.
func (e *Env) Exec(ctx context.Context, containerID string, cmd []string, o StreamOptions) (exitCode int, err error) {
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	resp, err := e.Runtime.Exec(rctx, &runtimeapi.ExecRequest{
		ContainerId: containerID, Cmd: cmd, Tty: o.TTY,
		Stdin: o.Stdin != nil, Stdout: o.Stdout != nil, Stderr: o.Stderr != nil && !o.TTY,
	})
	cancel()
	if err != nil {
		return -1, fmt.Errorf("Exec %v in %s: %w", cmd, containerID, err)
	}
	return e.stream(ctx, resp.Url, o)
}

// Attach attaches to a container's stdio through the CRI Attach URL.
func (e *Env) Attach(ctx context.Context, containerID string, o StreamOptions) error {
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	resp, err := e.Runtime.Attach(rctx, &runtimeapi.AttachRequest{
		ContainerId: containerID, Tty: o.TTY,
		Stdin: o.Stdin != nil, Stdout: o.Stdout != nil, Stderr: o.Stderr != nil && !o.TTY,
	})
	cancel()
	if err != nil {
		return fmt.Errorf("Attach %s: %w", containerID, err)
	}
	_, err = e.stream(ctx, resp.Url, o)
	return err
}

// stream runs the SPDY remotecommand protocol against a CRI streaming URL. The streaming server
// listens on 127.0.0.1 inside the harness netns, so the connection is dialled from there.
func (e *Env) stream(ctx context.Context, rawURL string, o StreamOptions) (int, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return -1, fmt.Errorf("streaming URL %q: %w", rawURL, err)
	}
	rt, err := httpstreamspdy.NewRoundTripperWithConfig(httpstreamspdy.RoundTripperConfig{
		UpgradeTransport: &http.Transport{DialContext: e.ns.dialContext},
		PingPeriod:       5 * time.Second,
	})
	if err != nil {
		return -1, err
	}
	ex, err := remotecommand.NewSPDYExecutorForTransports(rt, rt, http.MethodPost, u)
	if err != nil {
		return -1, err
	}
	opts := remotecommand.StreamOptions{Stdin: o.Stdin, Stdout: o.Stdout, Tty: o.TTY}
	if !o.TTY {
		opts.Stderr = o.Stderr
	}
	err = ex.StreamWithContext(ctx, opts)
	var exitErr exec.CodeExitError
	switch {
	case err == nil:
		return 0, nil
	case errors.As(err, &exitErr):
		return exitErr.Code, nil
	default:
		return -1, fmt.Errorf("stream %s: %w", u.Path, err)
	}
}
