// Package qmp is a small, context-aware client for the QEMU Machine Protocol.
//
// A Client multiplexes concurrent commands over one monitor socket (each command carries an
// id and is matched to its reply by it) and delivers asynchronous events on a bounded channel.
// FakeMonitor is an in-memory Monitor for unit tests of code that drives QEMU.
package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// Monitor is a QEMU monitor connection. Every call takes a context; a QMP error reply is
// returned as *Error so callers keep QMP's error class (use errors.As).
type Monitor interface {
	// Execute runs cmd with args (marshalled to JSON; nil for none) and decodes the reply's
	// "return" value into out (which may be nil).
	Execute(ctx context.Context, cmd string, args, out any) error
	// ExecuteWithFiles is Execute that also passes the files' descriptors to QEMU
	// (SCM_RIGHTS, in the same message as the command), for getfd and add-fd.
	ExecuteWithFiles(ctx context.Context, cmd string, args, out any, files ...*os.File) error
	// Events delivers QMP events. The channel is closed when the connection ends.
	Events() <-chan Event
	Close() error
}

// ErrClosed is wrapped by every error caused by the monitor connection going away.
var ErrClosed = errors.New("monitor connection closed")

// EventBuffer is how many undelivered events a Client keeps. When the buffer is full the
// oldest event is dropped, so a consumer that does not drain Events never blocks replies.
const EventBuffer = 256

// maxMessage bounds one QMP message (query-qmp-schema is the largest, well below 1 MiB).
const maxMessage = 32 << 20

// Client is a QMP connection to one QEMU process. It implements Monitor.
type Client struct {
	conn    *net.UnixConn
	version Version

	nextID   atomic.Uint64
	writeSem chan struct{} // one writer at a time; acquired with a context

	mu       sync.Mutex
	pending  map[uint64]chan *message
	closeErr error // set once the connection is gone

	events  chan Event
	dropped atomic.Uint64
	greet   chan *message
	done    chan struct{} // closed when the reader has exited
	closing sync.Once
}

var _ Monitor = (*Client)(nil)

// Dial connects to QEMU's QMP socket, reads the greeting and leaves capabilities-negotiation
// mode. QEMU creates the socket asynchronously, so Dial retries while the socket does not
// exist yet or refuses connections, until ctx ends.
func Dial(ctx context.Context, socketPath string) (*Client, error) {
	conn, err := dialRetry(ctx, socketPath)
	if err != nil {
		return nil, err
	}
	c := newClient(ctx, conn)
	select {
	case m := <-c.greet:
		if m == nil {
			_ = c.Close() // Close reports nothing; the error returned says what failed
			return nil, fmt.Errorf("qmp: reading greeting from %s: %w", socketPath, c.err())
		}
		c.version = m.version
	case <-ctx.Done():
		_ = c.Close()
		return nil, fmt.Errorf("qmp: waiting for the greeting on %s: %w", socketPath, ctx.Err())
	}
	if err := c.Execute(ctx, "qmp_capabilities", nil, nil); err != nil {
		_ = c.Close()
		return nil, err
	}
	return c, nil
}

func dialRetry(ctx context.Context, socketPath string) (*net.UnixConn, error) {
	var d net.Dialer
	delay := 5 * time.Millisecond
	for {
		conn, err := d.DialContext(ctx, "unix", socketPath)
		if err == nil {
			return conn.(*net.UnixConn), nil
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("qmp: connecting to %s: %w (last error: %v)", socketPath, ctx.Err(), err)
		}
		if !errors.Is(err, syscall.ENOENT) && !errors.Is(err, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("qmp: connecting to %s: %w", socketPath, err)
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("qmp: connecting to %s: %w (last error: %v)", socketPath, ctx.Err(), err)
		case <-t.C:
		}
		delay = min(delay*2, 100*time.Millisecond)
	}
}

func newClient(ctx context.Context, conn *net.UnixConn) *Client {
	c := &Client{
		conn:     conn,
		writeSem: make(chan struct{}, 1),
		pending:  make(map[uint64]chan *message),
		events:   make(chan Event, EventBuffer),
		greet:    make(chan *message, 1),
		done:     make(chan struct{}),
	}
	// The reader outlives Dial's ctx; keep only its logger.
	go c.readLoop(log.WithLogger(context.WithoutCancel(ctx), log.G(ctx).WithField("qmp", conn.RemoteAddr().String())))
	return c
}

// Version is QEMU's version from the greeting.
func (c *Client) Version() Version { return c.version }

// Events implements Monitor. See EventBuffer for what happens when nobody drains it.
func (c *Client) Events() <-chan Event { return c.events }

// DroppedEvents is how many events were discarded because the Events buffer was full.
func (c *Client) DroppedEvents() uint64 { return c.dropped.Load() }

// Done is closed once the connection has ended (closed by either side).
func (c *Client) Done() <-chan struct{} { return c.done }

// Close closes the connection; pending and later calls fail with ErrClosed.
func (c *Client) Close() error {
	c.fail(errors.New("closed by client"))
	<-c.done
	return nil
}

func (c *Client) err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closeErr
}

// fail marks the connection dead with cause, closes it and fails all pending calls.
func (c *Client) fail(cause error) {
	c.closing.Do(func() {
		c.mu.Lock()
		c.closeErr = fmt.Errorf("%w: %v", ErrClosed, cause)
		pending := c.pending
		c.pending = nil
		c.mu.Unlock()
		_ = c.conn.Close() // the connection is being abandoned: cause is what matters
		for _, ch := range pending {
			close(ch) // a closed channel means "connection gone"
		}
	})
}

func (c *Client) readLoop(ctx context.Context) {
	defer close(c.done)
	defer close(c.events)
	defer close(c.greet)
	r := bufio.NewReaderSize(c.conn, 64<<10)
	greeted := false
	for {
		line, err := readLine(r)
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = errors.New("QEMU closed the connection")
			}
			c.fail(err)
			return
		}
		m, err := decode(line)
		if err != nil {
			if !errors.Is(err, errEmptyMessage) {
				log.G(ctx).WithError(err).Warn("qmp: ignoring undecodable message")
			}
			continue
		}
		switch m.kind {
		case kindGreeting:
			if !greeted {
				greeted = true
				c.greet <- m
			}
		case kindEvent:
			c.deliver(ctx, m.event)
		case kindReply:
			if !m.hasID {
				// QEMU answers unparsable input without an id; nothing to match it to.
				log.G(ctx).WithField("error", m.errRep).Warn("qmp: reply without id")
				continue
			}
			c.mu.Lock()
			ch, ok := c.pending[m.id]
			delete(c.pending, m.id)
			c.mu.Unlock()
			if ok {
				ch <- m // buffered, never blocks
			}
			// No waiter: the caller gave up (ctx ended); drop the late reply.
		}
	}
}

// deliver queues ev without ever blocking: when the buffer is full the oldest event goes.
func (c *Client) deliver(ctx context.Context, ev Event) {
	select {
	case c.events <- ev:
		return
	default:
	}
	select {
	case old := <-c.events:
		if n := c.dropped.Add(1); n == 1 || n%100 == 0 {
			log.G(ctx).WithField("event", old.Name).WithField("dropped", n).Warn("qmp: event buffer full, dropping oldest events")
		}
	default:
	}
	select {
	case c.events <- ev: // only this goroutine sends, so there is room now
	default:
	}
}

func readLine(r *bufio.Reader) ([]byte, error) {
	var buf []byte
	for {
		chunk, err := r.ReadSlice('\n')
		if len(buf)+len(chunk) > maxMessage {
			return nil, fmt.Errorf("QMP message larger than %d bytes", maxMessage)
		}
		if err == nil {
			if buf == nil {
				return chunk, nil // valid until the next read; decode copies what it keeps
			}
			return append(buf, chunk...), nil
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			buf = append(buf, chunk...)
			continue
		}
		return nil, err
	}
}

// Execute implements Monitor.
func (c *Client) Execute(ctx context.Context, cmd string, args, out any) error {
	return c.execute(ctx, cmd, args, out, nil)
}

// ExecuteWithFiles implements Monitor.
func (c *Client) ExecuteWithFiles(ctx context.Context, cmd string, args, out any, files ...*os.File) error {
	return c.execute(ctx, cmd, args, out, files)
}

type request struct {
	Execute   string `json:"execute"`
	Arguments any    `json:"arguments,omitempty"`
	ID        uint64 `json:"id"`
}

func (c *Client) execute(ctx context.Context, cmd string, args, out any, files []*os.File) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	id := c.nextID.Add(1)
	b, err := json.Marshal(request{Execute: cmd, Arguments: args, ID: id})
	if err != nil {
		return fmt.Errorf("qmp: %s: encoding arguments: %w", cmd, err)
	}
	b = append(b, '\n')

	ch := make(chan *message, 1)
	c.mu.Lock()
	if c.pending == nil {
		err := c.closeErr
		c.mu.Unlock()
		return fmt.Errorf("qmp: %s: %w", cmd, err)
	}
	c.pending[id] = ch
	c.mu.Unlock()
	forget := func() {
		c.mu.Lock()
		if c.pending != nil {
			delete(c.pending, id)
		}
		c.mu.Unlock()
	}

	if err := c.write(ctx, b, files); err != nil {
		forget()
		if ctx.Err() != nil && !errors.Is(err, ErrClosed) {
			return ctx.Err()
		}
		return fmt.Errorf("qmp: %s: %w", cmd, err)
	}

	select {
	case m, ok := <-ch:
		if !ok {
			return fmt.Errorf("qmp: %s: %w", cmd, c.err())
		}
		if m.errRep != nil {
			e := *m.errRep
			e.Cmd = cmd
			return &e
		}
		if out != nil {
			if err := json.Unmarshal(m.ret, out); err != nil {
				return fmt.Errorf("qmp: %s: decoding reply: %w", cmd, err)
			}
		}
		return nil
	case <-ctx.Done():
		forget() // a late reply is discarded by the reader
		return ctx.Err()
	}
}

// write sends one command. A write interrupted half-way would corrupt the stream, so then
// the connection is closed (failing every call) rather than reused.
func (c *Client) write(ctx context.Context, b []byte, files []*os.File) error {
	select {
	case c.writeSem <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-c.writeSem }()
	if err := c.err(); err != nil {
		return err
	}

	fired := make(chan struct{})
	// SetWriteDeadline fails only on a closed connection, on which the write fails anyway.
	stop := context.AfterFunc(ctx, func() {
		_ = c.conn.SetWriteDeadline(time.Now())
		close(fired)
	})
	defer func() {
		if !stop() {
			<-fired
			_ = c.conn.SetWriteDeadline(time.Time{})
		}
	}()

	var n int
	var err error
	if len(files) > 0 {
		fds := make([]int, len(files))
		for i, f := range files {
			fds[i] = int(f.Fd())
		}
		n, _, err = c.conn.WriteMsgUnix(b, unix.UnixRights(fds...), nil)
		if err == nil && n < len(b) {
			var m int
			m, err = c.conn.Write(b[n:])
			n += m
		}
	} else {
		n, err = c.conn.Write(b)
	}
	if err != nil {
		if n > 0 || ctx.Err() == nil {
			c.fail(fmt.Errorf("writing command: %v", err))
			return c.err()
		}
		return err
	}
	return nil
}
