package network

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"strconv"
	"sync"
	"testing"
	"time"
)

// guestStandIn is a listener of the test process playing the guest's 127.0.0.1, and the
// dialer the forwarder gets (what agent.DialPort does over the agent connection).
type guestStandIn struct {
	ln    net.Listener
	mu    sync.Mutex
	ports []uint16
}

func newGuestStandIn(t *testing.T, serve func(net.Conn)) *guestStandIn {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go serve(c)
		}
	}()
	return &guestStandIn{ln: ln}
}

// dial connects to the stand-in for the guest ports it serves (8080) and refuses the others,
// as the agent answers for a port nothing listens on.
func (g *guestStandIn) dial(ctx context.Context, port uint16) (GuestConn, error) {
	g.mu.Lock()
	g.ports = append(g.ports, port)
	g.mu.Unlock()
	if port != 8080 {
		return nil, errors.New("connect to 127.0.0.1:" + strconv.Itoa(int(port)) + " in the guest: nothing listens there")
	}
	c, err := (&net.Dialer{}).DialContext(ctx, "tcp4", g.ln.Addr().String())
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// echoThenBye reads until EOF, sends it back with "bye" and closes.
func echoThenBye(c net.Conn) {
	defer c.Close()
	b, _ := io.ReadAll(c)
	_, _ = c.Write(append(b, "bye"...))
}

// startForwarder runs a forwarder on a plain loopback listener; the original port of every
// connection is *port (no netns, no iptables: that part is TestForwardPorts's).
func startForwarder(t *testing.T, g *guestStandIn, port *uint16) *PortForwarder {
	t.Helper()
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	f := newPortForwarder(context.Background(), ln, g.dial, func(*net.TCPConn) (uint16, error) {
		if *port == 0 {
			return 0, errors.New("no SO_ORIGINAL_DST")
		}
		return *port, nil
	})
	t.Cleanup(func() { f.Close(context.Background()) })
	return f
}

// dialForwarder starts a forwarder to g for connections to port, and connects to it.
func dialForwarder(t *testing.T, g *guestStandIn, port uint16) (*PortForwarder, *net.TCPConn) {
	t.Helper()
	f := startForwarder(t, g, &port)
	c, err := net.DialTCP("tcp4", nil, f.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return f, c
}

func TestPortForwarderCopies(t *testing.T) {
	g := newGuestStandIn(t, echoThenBye)
	_, c := dialForwarder(t, g, 8080)
	payload := bytes.Repeat([]byte("podvm "), 100000)
	errc := make(chan error, 1)
	go func() {
		_, err := c.Write(payload)
		if err == nil {
			err = c.CloseWrite() // the guest side must see EOF to answer
		}
		errc <- err
	}()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if want := append(payload, "bye"...); !bytes.Equal(got, want) {
		t.Fatalf("got %d bytes back, want %d", len(got), len(want))
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(g.ports) != 1 || g.ports[0] != 8080 {
		t.Errorf("dialled guest ports %v, want [8080]", g.ports)
	}
}

func TestPortForwarderRefused(t *testing.T) {
	g := newGuestStandIn(t, echoThenBye)
	for name, port := range map[string]uint16{"nothing listens in the guest": 9, "no original destination": 0} {
		t.Run(name, func(t *testing.T) {
			f := startForwarder(t, g, &port)
			c, err := net.DialTCP("tcp4", nil, f.Addr())
			if isReset(err) {
				return // the reset came before connect returned
			}
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
			n, err := c.Read(make([]byte, 10))
			if n != 0 || !errors.Is(err, io.EOF) && !isReset(err) {
				t.Errorf("read %d bytes, %v; want a reset or EOF", n, err)
			}
		})
	}
}

func isReset(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && bytes.Contains([]byte(op.Err.Error()), []byte("reset"))
}

func TestPortForwarderCloseEndsConnections(t *testing.T) {
	// A guest service that never answers nor closes.
	g := newGuestStandIn(t, func(c net.Conn) { _, _ = io.Copy(io.Discard, c) })
	f, c := dialForwarder(t, g, 8080)
	if _, err := c.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := f.Close(ctx); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(make([]byte, 10)); n != 0 || err == nil {
		t.Errorf("after Close: read %d bytes, %v; want the connection ended", n, err)
	}
	if c2, err := net.DialTCP("tcp4", nil, f.Addr()); err == nil {
		c2.Close()
		t.Error("the listener still accepts after Close")
	}
	if err := f.Close(ctx); err != nil {
		t.Errorf("second Close: %v", err)
	}
}
