package shim

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/fifo"
	"github.com/containerd/log"

	"github.com/podvm/podvm/agent"
	"github.com/podvm/podvm/agent/api"
)

// stdioPaths is where containerd wants a process's stdio: fifo paths, or file:// and
// binary:// URIs for stdout/stderr.
type stdioPaths struct {
	stdin, stdout, stderr string
	terminal              bool
}

func (s stdioPaths) agentStdio() *api.Stdio {
	return &api.Stdio{Stdin: s.stdin != "", Stdout: s.stdout != "", Stderr: s.stderr != "" && !s.terminal, Terminal: s.terminal}
}

// hostIO copies one process's stdio between containerd's endpoints and the guest agent.
type hostIO struct {
	// out finishes when stdout and stderr reached EOF (the process and everything that
	// inherited its stdio are gone) or the copy was cancelled.
	out    sync.WaitGroup
	ctx    context.Context // the copies' lifetime; cancel ends it
	cancel context.CancelFunc
	// stdout and stderr are containerd's ends (nil where it wants none).
	stdout, stderr *output

	stdinMu sync.Mutex
	stdin   io.ReadCloser
	// stdinDone is closed when the stdin copy ended (nil before startStdin); stdinClosing is
	// set by CloseIO.
	stdinDone    chan struct{}
	stdinClosing bool
	// wait (set up by openIO) waits for a logging binary; close calls it, once.
	wait      func()
	closeOnce sync.Once
}

// ioGrace bounds how long an exited process's output may take to drain.
const ioGrace = 5 * time.Second

// stdinDrainGrace bounds how long the stdin copy may take to reach the end of the fifo after
// CloseIO (containerd has closed its end by then; only another writer keeps it open).
const stdinDrainGrace = 5 * time.Second

// startIO opens containerd's endpoints (openIO) and starts copying the process's output from
// the guest until EOF or close (startOutput).
func startIO(ctx context.Context, ag api.AgentService, ns, containerID, execID string, paths stdioPaths) (*hostIO, error) {
	h, err := openIO(ctx, ns, containerID, paths)
	if err != nil {
		return nil, err
	}
	h.startOutput(ag, containerID, execID)
	return h, nil
}

// openIO opens containerd's endpoints, copying nothing yet. The fifos are opened under the
// IO's own lifetime, not the request's: containerd/fifo closes a fifo whose context ends
// before its (asynchronous) open completed, and ttrpc ends a request's context when the
// handler returns.
func openIO(ctx context.Context, ns, containerID string, paths stdioPaths) (_ *hostIO, retErr error) {
	copyCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	ctx = copyCtx
	h := &hostIO{ctx: copyCtx, cancel: cancel}
	defer func() {
		if retErr != nil {
			h.close()
		}
	}()
	if isBinaryURI(paths.stdout) {
		w1, w2, wait, err := startLoggingBinary(ctx, paths.stdout, ns, containerID)
		if err != nil {
			return nil, err
		}
		h.stdout, h.stderr, h.wait = &output{w: w1, closers: []io.Closer{w1}}, &output{w: w2, closers: []io.Closer{w2}}, wait
	} else {
		var err error
		if h.stdout, err = openOutput(ctx, paths.stdout); err != nil {
			return nil, err
		}
		if !paths.terminal {
			if h.stderr, err = openOutput(ctx, paths.stderr); err != nil {
				return nil, err
			}
		}
	}
	if paths.stdin != "" {
		r, err := fifo.OpenFifo(ctx, paths.stdin, syscall.O_RDONLY|syscall.O_NONBLOCK, 0)
		if err != nil {
			return nil, fmt.Errorf("open stdin %s: %w", paths.stdin, err)
		}
		h.stdin = r
	}
	return h, nil
}

// startOutput starts copying the process's stdout and stderr from the guest, each until EOF
// or close; the process must exist in the guest. What it writes before the copy starts waits
// in the guest.
func (h *hostIO) startOutput(ag api.AgentService, containerID, execID string) {
	copyOut := func(stream api.StdioStream, o *output) {
		if o == nil {
			return
		}
		h.out.Add(1)
		go func() {
			defer h.out.Done()
			if err := agent.CopyOut(h.ctx, ag, containerID, execID, stream, o.w); err != nil && h.ctx.Err() == nil {
				log.G(h.ctx).WithError(err).Warn("stdio copy")
			}
			// containerd (CRI's exec especially) waits for EOF on its end.
			o.close(h.ctx)
		}()
	}
	copyOut(api.StdioStream_STDOUT, h.stdout)
	copyOut(api.StdioStream_STDERR, h.stderr)
}

// startStdin begins copying stdin; it must run after the process exists in the guest. When
// the copy ends, at the fifo's end or cut short, the guest's stdin is closed, so the process
// sees end-of-file either way.
func (h *hostIO) startStdin(ctx context.Context, ag api.AgentService, containerID, execID string) {
	h.stdinMu.Lock()
	r := h.stdin
	if r == nil || h.stdinDone != nil {
		h.stdinMu.Unlock()
		return
	}
	done := make(chan struct{})
	h.stdinDone = done
	closing := h.stdinClosing
	h.stdinMu.Unlock()
	go func() {
		defer close(done)
		err := agent.CopyIn(ctx, ag, containerID, execID, r)
		if errors.Is(err, os.ErrClosed) {
			// Cut before the fifo's end: the guest's stdin still ends here.
			cctx, cancel := context.WithTimeout(ctx, ioGrace)
			_, err = ag.CloseStdin(cctx, &api.ProcessRequest{ContainerId: containerID, ExecId: execID})
			cancel()
		}
		if err != nil && ctx.Err() == nil {
			log.G(ctx).WithError(err).Debug("stdin copy")
		}
		h.dropStdin()
	}()
	if closing {
		go h.cutStdinAfter(done)
	}
}

// closeStdin is CloseIO. containerd closes its end of the fifo first, so the copy forwards
// what is still in the fifo, reads its end and closes the guest's stdin; closing our read end
// now would drop that data and never tell the guest. A copy that has not ended after
// stdinDrainGrace (another writer holds the fifo open) is cut, and the guest's stdin closed
// all the same.
func (h *hostIO) closeStdin() {
	h.stdinMu.Lock()
	defer h.stdinMu.Unlock()
	if h.stdin == nil || h.stdinClosing {
		return
	}
	h.stdinClosing = true
	if h.stdinDone != nil {
		go h.cutStdinAfter(h.stdinDone)
	}
	// Not started yet: startStdin copies to the end and bounds it the same way.
}

// cutStdinAfter closes our end of the stdin fifo unless the copy ends within stdinDrainGrace.
func (h *hostIO) cutStdinAfter(done <-chan struct{}) {
	t := time.NewTimer(stdinDrainGrace)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		h.dropStdin()
	}
}

// dropStdin closes our read end of containerd's stdin fifo (it only ends the copy).
func (h *hostIO) dropStdin() {
	h.stdinMu.Lock()
	defer h.stdinMu.Unlock()
	if h.stdin != nil {
		_ = h.stdin.Close()
		h.stdin = nil
	}
}

// output is one stdout/stderr endpoint.
type output struct {
	w       io.Writer
	closers []io.Closer
	once    sync.Once
}

// close closes the endpoint once, logging a failure (a log file may lose its last bytes).
func (o *output) close(ctx context.Context) {
	o.once.Do(func() {
		for _, c := range o.closers {
			if err := c.Close(); err != nil {
				log.G(ctx).WithError(err).Warn("close stdio")
			}
		}
	})
}

func openOutput(ctx context.Context, target string) (*output, error) {
	if target == "" {
		return nil, nil
	}
	u, err := url.Parse(target)
	if err != nil {
		return nil, fmt.Errorf("stdio %q: %w", target, err)
	}
	switch u.Scheme {
	case "", "fifo":
		path := target
		if u.Scheme != "" {
			path = u.Path
		}
		w, err := fifo.OpenFifo(ctx, path, syscall.O_WRONLY, 0)
		if err != nil {
			return nil, fmt.Errorf("open fifo %s: %w", path, err)
		}
		// Holding a read end too keeps writes from failing with EPIPE while
		// containerd reopens its side (e.g. after a restart).
		r, err := fifo.OpenFifo(ctx, path, syscall.O_RDONLY, 0)
		if err != nil {
			_ = w.Close() // nothing written yet
			return nil, fmt.Errorf("open fifo %s: %w", path, err)
		}
		return &output{w: w, closers: []io.Closer{w, r}}, nil
	case "file":
		if err := os.MkdirAll(filepath.Dir(u.Path), 0o755); err != nil {
			return nil, err
		}
		f, err := os.OpenFile(u.Path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
		if err != nil {
			return nil, fmt.Errorf("open log file: %w", err)
		}
		return &output{w: f, closers: []io.Closer{f}}, nil
	default:
		return nil, fmt.Errorf("stdio %q: unsupported scheme %q (use a fifo path, file:// or binary://)", target, u.Scheme)
	}
}

func isBinaryURI(s string) bool {
	u, err := url.Parse(s)
	return err == nil && u.Scheme == "binary"
}

// startLoggingBinary runs a containerd logging binary: it reads stdout on fd 3 and stderr on
// fd 4 and closes fd 5 when it is ready (containerd's binary:// protocol).
func startLoggingBinary(ctx context.Context, uri, ns, id string) (io.WriteCloser, io.WriteCloser, func(), error) {
	u, err := url.Parse(uri)
	if err != nil {
		return nil, nil, nil, err
	}
	var args []string
	for k, vs := range u.Query() {
		args = append(args, k)
		if len(vs) > 0 && vs[0] != "" {
			args = append(args, vs[0])
		}
	}
	// Closing the pipe ends below cannot lose anything: none has carried data yet, or (after
	// Start) the binary holds its own copies.
	outR, outW, err := os.Pipe()
	if err != nil {
		return nil, nil, nil, err
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		closeFiles(outR, outW)
		return nil, nil, nil, err
	}
	readyR, readyW, err := os.Pipe()
	if err != nil {
		closeFiles(outR, outW, errR, errW)
		return nil, nil, nil, err
	}
	cmd := exec.Command(u.Path, args...)
	cmd.Env = append(os.Environ(), "CONTAINER_ID="+id, "CONTAINER_NAMESPACE="+ns)
	cmd.ExtraFiles = []*os.File{outR, errR, readyW}
	err = cmd.Start()
	closeFiles(outR, errR, readyW)
	if err != nil {
		closeFiles(readyR, outW, errW)
		return nil, nil, nil, fmt.Errorf("start logging binary %s: %w", u.Path, err)
	}
	// Wait until the binary says it is ready (closes fd 5).
	_, _ = io.Copy(io.Discard, readyR)
	closeFiles(readyR)
	wait := func() {
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(ioGrace):
			_ = cmd.Process.Kill()
			<-done
		}
	}
	return outW, errW, wait, nil
}

// closeFiles closes pipe ends that carry no data that could be lost.
func closeFiles(files ...*os.File) {
	for _, f := range files {
		_ = f.Close()
	}
}

// drain waits for the output copies to finish, at most ioGrace.
func (h *hostIO) drain() {
	done := make(chan struct{})
	go func() { h.out.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(ioGrace):
		h.cancel()
		<-done
	}
}

// close stops the copies and closes everything; it may be called more than once, from
// any goroutine.
func (h *hostIO) close() {
	h.closeOnce.Do(func() {
		h.cancel()
		h.out.Wait()
		h.dropStdin()
		// Each output closed itself when its copy ended; this closes those whose copy never
		// started (a logging binary waits for their EOF).
		for _, o := range []*output{h.stdout, h.stderr} {
			if o != nil {
				o.close(h.ctx)
			}
		}
		if h.wait != nil {
			h.wait()
		}
	})
}
