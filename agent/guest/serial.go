package guest

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// port is the guest's end of a virtio-serial port, as a serialConn uses it.
type port interface {
	io.ReadWriteCloser
	// hostConnected reports whether the guest has learnt that the host's end is connected.
	hostConnected() (bool, error)
	SetDeadline(t time.Time) error
	SetReadDeadline(t time.Time) error
	SetWriteDeadline(t time.Time) error
}

// devicePort is a port opened in /dev.
type devicePort struct{ *os.File }

func openDevicePort(path string) (port, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	return devicePort{f}, nil
}

// hostConnected polls the port without waiting: Linux's virtio_console reports POLLHUP for a
// port whose host end it believes closed.
func (p devicePort) hostConnected() (bool, error) {
	rc, err := p.SyscallConn()
	if err != nil {
		return false, err
	}
	fds := []unix.PollFd{{Events: unix.POLLIN}}
	var perr error
	if err := rc.Control(func(fd uintptr) {
		fds[0].Fd = int32(fd)
		_, perr = unix.Poll(fds, 0)
	}); err != nil {
		return false, err
	}
	if perr != nil && !errors.Is(perr, unix.EINTR) {
		return false, fmt.Errorf("poll %s: %w", p.Name(), perr)
	}
	return perr == nil && fds[0].Revents&unix.POLLHUP == 0, nil
}

// serialListener turns a virtio-serial port into a listener of one connection at a time.
// The port can be open only once, so Accept waits for the previous connection to close.
type serialListener struct {
	path   string
	open   func(path string) (port, error)
	closed chan struct{}
	once   sync.Once
	// free holds a token while no connection is open.
	free chan struct{}
}

func newSerialListener(path string) *serialListener {
	l := &serialListener{path: path, open: openDevicePort, closed: make(chan struct{}), free: make(chan struct{}, 1)}
	l.free <- struct{}{}
	return l
}

func (l *serialListener) Accept() (net.Conn, error) {
	select {
	case <-l.closed:
		return nil, net.ErrClosed
	case <-l.free:
	}
	select {
	case <-l.closed: // both were ready: closed wins
		l.free <- struct{}{}
		return nil, net.ErrClosed
	default:
	}
	p, err := l.open(l.path)
	if err != nil {
		l.free <- struct{}{}
		return nil, err
	}
	return &serialConn{p: p, l: l, closing: make(chan struct{})}, nil
}

func (l *serialListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return nil
}

func (l *serialListener) Addr() net.Addr { return serialAddr(l.path) }

type serialAddr string

func (a serialAddr) Network() string { return "virtio-serial" }
func (a serialAddr) String() string  { return string(a) }

// hostPoll is how often a connection waiting for a host on the other end looks again.
const hostPoll = 10 * time.Millisecond

// serialConn is one host connection on the port. A connection starts by waiting until the
// guest sees the host's end connected, polling every hostPoll; from then on, EOF means the
// host went away, and the connection ends.
//
// The wait comes before the first read, not after it, because the guest learns of a new
// host and receives its bytes on two separate queues: the host's request can be readable
// while the guest's driver has not yet handled the "host connected" message and still
// reports the host gone. A connection that read the request then would take the next EOF
// for the host's departure, end, and drop its answer: the host waits forever. This is what
// hung VMs restored from a template about 1 start in 100, whose host connects and sends at
// once. Nor must a connection close the port while it waits: bytes the host sends while the
// port is open are queued in the guest, and closing the port discards them.
type serialConn struct {
	p         port
	l         *serialListener
	connected bool
	closing   chan struct{}
	closeOnce sync.Once
}

func (c *serialConn) Read(b []byte) (int, error) {
	if !c.connected {
		if err := c.waitHost(); err != nil {
			return 0, err
		}
		c.connected = true
	}
	n, err := c.p.Read(b)
	if errors.Is(err, os.ErrClosed) {
		// Close ran while Read waited in the file: report it as a closed connection, as a
		// net.Conn does, not as a closed file.
		return n, net.ErrClosed
	}
	return n, err
}

// waitHost returns once the guest sees the host's end connected, or the connection or the
// listener closed.
func (c *serialConn) waitHost() error {
	for {
		ok, err := c.p.hostConnected()
		switch {
		case errors.Is(err, os.ErrClosed):
			return net.ErrClosed
		case err != nil:
			return err
		case ok:
			return nil
		}
		select {
		case <-c.closing:
			return net.ErrClosed
		case <-c.l.closed:
			return net.ErrClosed
		case <-time.After(hostPoll):
		}
	}
}

func (c *serialConn) Write(b []byte) (int, error) { return c.p.Write(b) }
func (c *serialConn) Close() error {
	err := c.p.Close()
	c.closeOnce.Do(func() {
		close(c.closing)
		c.l.free <- struct{}{}
	})
	return err
}
func (c *serialConn) LocalAddr() net.Addr                { return c.l.Addr() }
func (c *serialConn) RemoteAddr() net.Addr               { return serialAddr("host") }
func (c *serialConn) SetDeadline(t time.Time) error      { return c.p.SetDeadline(t) }
func (c *serialConn) SetReadDeadline(t time.Time) error  { return c.p.SetReadDeadline(t) }
func (c *serialConn) SetWriteDeadline(t time.Time) error { return c.p.SetWriteDeadline(t) }
