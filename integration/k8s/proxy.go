package k8s

import (
	"context"
	"io"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/podvm/podvm/integration/harness"
)

// loopbackProxy listens on the host's 127.0.0.1 and relays every connection to the API server
// inside the harness's network namespace. client-go's streaming transports (SPDY, WebSocket)
// dial on their own, ignoring rest.Config.Dial, so a plain TCP relay is what lets exec, attach
// and port-forward reach the namespace. TLS passes through untouched.
type loopbackProxy struct {
	l      net.Listener
	wg     sync.WaitGroup
	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	closed bool
}

func newLoopbackProxy(env *harness.Env, target string) (*loopbackProxy, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &loopbackProxy{l: l, conns: map[net.Conn]struct{}{}}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			p.wg.Add(1)
			go func() {
				defer p.wg.Done()
				p.relay(env, c, target)
			}()
		}
	}()
	return p, nil
}

func (p *loopbackProxy) addr() string { return p.l.Addr().String() }

func (p *loopbackProxy) track(c net.Conn, add bool) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if add {
		if p.closed {
			return false
		}
		p.conns[c] = struct{}{}
	} else {
		delete(p.conns, c)
	}
	return true
}

func (p *loopbackProxy) relay(env *harness.Env, c net.Conn, target string) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	up, err := env.DialContext(ctx, "tcp", target)
	cancel()
	if err != nil {
		_ = c.Close()
		return
	}
	if !p.track(c, true) || !p.track(up, true) {
		_ = c.Close()
		_ = up.Close()
		return
	}
	done := make(chan struct{}, 2)
	cp := func(dst, src net.Conn) {
		_, _ = io.Copy(dst, src)
		if tc, ok := dst.(*net.TCPConn); ok {
			_ = tc.CloseWrite()
		}
		done <- struct{}{}
	}
	go cp(up, c)
	go cp(c, up)
	<-done
	<-done
	_ = c.Close()
	_ = up.Close()
	p.track(c, false)
	p.track(up, false)
}

// close stops accepting, cuts every relayed connection and waits for the relays.
func (p *loopbackProxy) close() {
	_ = p.l.Close()
	p.mu.Lock()
	p.closed = true
	for c := range p.conns {
		_ = c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

func newGet(ctx context.Context, url string) (*http.Request, error) {
	return http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
}
