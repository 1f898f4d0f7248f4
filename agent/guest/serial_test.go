package guest

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestSerialListener runs the listener on a FIFO, which opens read-write like a port and,
// having a writer, polls as a port whose host is connected.
func TestSerialListener(t *testing.T) {
	path := filepath.Join(t.TempDir(), "vport")
	if err := unix.Mkfifo(path, 0o600); err != nil {
		t.Fatal(err)
	}
	l := newSerialListener(path)
	if l.Addr().Network() != "virtio-serial" || l.Addr().String() != path {
		t.Fatalf("addr %v", l.Addr())
	}
	c, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 4)
	if n, err := c.Read(b); err != nil || string(b[:n]) != "ping" {
		t.Fatalf("read %q, %v", b[:n], err)
	}
	if c.LocalAddr() != l.Addr() || c.RemoteAddr().String() != "host" {
		t.Fatalf("conn addrs %v %v", c.LocalAddr(), c.RemoteAddr())
	}
	if err := c.SetDeadline(time.Time{}); err != nil {
		t.Fatal(err)
	}
	// The port opens once: the next Accept waits for this connection to close.
	next := make(chan error, 1)
	go func() {
		c2, err := l.Accept()
		if err == nil {
			c2.Close()
		}
		next <- err
	}()
	c.Close()
	if err := <-next; err != nil {
		t.Fatalf("Accept after Close of the connection: %v", err)
	}
	l.Close()
	if _, err := l.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Accept on a closed listener: %v", err)
	}
}

// fakePort is a port as Linux's virtio_console driver presents it to the guest: bytes the
// host sent read first; with none, a read returns EOF while the guest believes the host's
// end closed and waits while it believes it open. The driver learns of the host's end from
// a control message handled apart from the data, so the two can come in either order.
type fakePort struct {
	mu     sync.Mutex
	cond   *sync.Cond
	data   []byte
	host   bool // the guest has handled the host's "connected" message
	closed bool
}

func newFakePort() *fakePort {
	p := &fakePort{}
	p.cond = sync.NewCond(&p.mu)
	return p
}

func (p *fakePort) hostSends(b string) { p.update(func() { p.data = append(p.data, b...) }) }
func (p *fakePort) setHost(open bool)  { p.update(func() { p.host = open }) }

func (p *fakePort) update(f func()) {
	p.mu.Lock()
	defer p.mu.Unlock()
	f()
	p.cond.Broadcast()
}

func (p *fakePort) Read(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for len(p.data) == 0 && p.host && !p.closed {
		p.cond.Wait()
	}
	switch {
	case p.closed:
		return 0, os.ErrClosed
	case len(p.data) == 0:
		return 0, io.EOF
	}
	n := copy(b, p.data)
	p.data = p.data[n:]
	return n, nil
}

func (p *fakePort) Write(b []byte) (int, error) { return len(b), nil }
func (p *fakePort) Close() error {
	p.update(func() { p.closed = true })
	return nil
}

func (p *fakePort) hostConnected() (bool, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false, os.ErrClosed
	}
	return p.host, nil
}
func (p *fakePort) SetDeadline(time.Time) error      { return nil }
func (p *fakePort) SetReadDeadline(time.Time) error  { return nil }
func (p *fakePort) SetWriteDeadline(time.Time) error { return nil }

// acceptFake returns a connection of a listener whose port is p.
func acceptFake(t *testing.T, p *fakePort) net.Conn {
	t.Helper()
	l := newSerialListener("vport")
	l.open = func(string) (port, error) { return p, nil }
	t.Cleanup(func() { l.Close() })
	c, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// reads runs c.Read in the background; each result arrives as "bytes err".
func reads(c net.Conn) func() <-chan string {
	return func() <-chan string {
		got := make(chan string, 1)
		go func() {
			b := make([]byte, 8)
			n, err := c.Read(b)
			got <- fmt.Sprintf("%q %v", b[:n], err)
		}()
		return got
	}
}

func noResult(t *testing.T, got <-chan string, what string) {
	t.Helper()
	select {
	case g := <-got:
		t.Fatalf("Read returned %s %s", g, what)
	case <-time.After(5 * hostPoll):
	}
}

// TestSerialConnWaitsForHost: with no host on the other end, the connection keeps the port
// open and waits (closing it would drop what the host sends meanwhile); the host's bytes
// read once it is there; EOF then means the host left and ends the connection.
func TestSerialConnWaitsForHost(t *testing.T) {
	p := newFakePort()
	read := reads(acceptFake(t, p))
	got := read()
	noResult(t, got, "with no host")
	p.setHost(true)
	noResult(t, got, "before the host sent anything")
	p.hostSends("req")
	if g := <-got; g != `"req" <nil>` {
		t.Fatalf("first read: %s, want the host's bytes", g)
	}
	p.setHost(false)
	if g := <-read(); g != `"" EOF` {
		t.Fatalf("read after the host left: %s, want EOF", g)
	}
}

// TestSerialConnHostBytesBeforeConnected is the race that hung VMs restored from a template:
// the host connects and sends at once, and the guest's driver queues the host's bytes before
// it handles the "host connected" message. The connection must not take the request and
// then the EOF that still follows it for a host that came and left: it waits until the guest
// sees the host, and a read after the request waits for more instead of ending.
func TestSerialConnHostBytesBeforeConnected(t *testing.T) {
	p := newFakePort()
	read := reads(acceptFake(t, p))
	got := read()
	p.hostSends("req")
	noResult(t, got, "while the guest does not see the host yet")
	p.setHost(true)
	if g := <-got; g != `"req" <nil>` {
		t.Fatalf("read once the host is seen: %s, want the host's bytes", g)
	}
	next := read()
	noResult(t, next, "after the request, with the host still there")
	p.hostSends("r2")
	if g := <-next; g != `"r2" <nil>` {
		t.Fatalf("second read: %s, want the host's next bytes", g)
	}
}

// TestSerialConnCloseWhileWaiting: Close ends a read that waits for a host, and one that
// waits for the host's bytes, as a closed net.Conn.
func TestSerialConnCloseWhileWaiting(t *testing.T) {
	for _, host := range []bool{false, true} {
		p := newFakePort()
		p.setHost(host)
		c := acceptFake(t, p)
		got := reads(c)()
		time.Sleep(3 * hostPoll)
		c.Close()
		if g := <-got; !strings.Contains(g, net.ErrClosed.Error()) {
			t.Fatalf("host %v: read, then Close: %s, want %v", host, g, net.ErrClosed)
		}
	}
}
