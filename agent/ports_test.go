package agent

import (
	"bytes"
	"context"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/podvm/podvm/agent/api"
)

// sizeRecorder is an agent that notes how much each ReadConn asked for and each WriteConn
// carried.
type sizeRecorder struct {
	api.AgentService
	mu     sync.Mutex
	asked  []uint32
	writes []int
}

func (r *sizeRecorder) ReadConn(ctx context.Context, req *api.ReadConnRequest) (*api.ReadConnResponse, error) {
	r.mu.Lock()
	r.asked = append(r.asked, req.MaxBytes)
	r.mu.Unlock()
	return r.AgentService.ReadConn(ctx, req)
}

func (r *sizeRecorder) WriteConn(ctx context.Context, req *api.WriteConnRequest) (*api.WriteConnResponse, error) {
	r.mu.Lock()
	r.writes = append(r.writes, len(req.Data))
	r.mu.Unlock()
	return r.AgentService.WriteConn(ctx, req)
}

// tcpPair is a connected pair of loopback TCP connections.
func tcpPair(t *testing.T) (*net.TCPConn, *net.TCPConn) {
	t.Helper()
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	c, err := net.Dial("tcp4", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close(); _ = s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

// TestPortConnCopiesInLargeCalls: io.Copy between a host TCP connection and a guest port,
// as the port-forwarder does, moves up to portChunk per ReadConn and more than io.Copy's own
// 32 KiB per WriteConn: each call is a round trip to the guest.
func TestPortConnCopiesInLargeCalls(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rec := &sizeRecorder{AgentService: NewFake()}
	// The guest's side: a listener the fake agent dials, as the agent dials 127.0.0.1:port.
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err == nil {
			accepted <- c
		}
	}()
	pc, err := DialPort(ctx, rec, uint32(l.Addr().(*net.TCPAddr).Port))
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	guest := <-accepted
	defer guest.Close()

	// From the guest: 3 MiB, then its end.
	const down = 3 << 20
	go func() {
		_, _ = guest.Write(bytes.Repeat([]byte("d"), down))
		_ = guest.(*net.TCPConn).CloseWrite()
	}()
	hostC, hostPeer := tcpPair(t)
	got := make(chan int64, 1)
	go func() {
		n, _ := io.Copy(io.Discard, hostPeer)
		got <- n
	}()
	if n, err := io.Copy(hostC, pc); err != nil || n != down {
		t.Fatalf("copy from the guest: %d bytes, %v", n, err)
	}
	_ = hostC.CloseWrite()
	if n := <-got; n != down {
		t.Fatalf("the host peer got %d bytes, want %d", n, down)
	}
	rec.mu.Lock()
	for _, a := range rec.asked {
		if a != portChunk {
			t.Errorf("ReadConn asked for %d bytes, want %d: a round trip for every %d bytes", a, portChunk, a)
			break
		}
	}
	rec.mu.Unlock()

	// To the guest: 200 KiB the host side has at once.
	const up = 200 << 10
	hostC2, hostPeer2 := tcpPair(t)
	if _, err := hostPeer2.Write(bytes.Repeat([]byte("u"), up)); err != nil {
		t.Fatal(err)
	}
	_ = hostPeer2.CloseWrite()
	recv := make(chan int64, 1)
	go func() {
		n, _ := io.Copy(io.Discard, guest)
		recv <- n
	}()
	time.Sleep(50 * time.Millisecond) // the 200 KiB reach hostC2's receive queue
	if n, err := io.Copy(pc, hostC2); err != nil || n != up {
		t.Fatalf("copy to the guest: %d bytes, %v", n, err)
	}
	_ = pc.CloseWrite()
	if n := <-recv; n != up {
		t.Fatalf("the guest got %d bytes, want %d", n, up)
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	largest := 0
	for _, w := range rec.writes {
		largest = max(largest, w)
	}
	if largest <= 32<<10 {
		t.Errorf("WriteConn carried at most %d bytes (%d calls for %d): io.Copy's buffer, not portReadBuf", largest, len(rec.writes), up)
	}
}
