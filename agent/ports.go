package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/podvm/podvm/agent/api"
)

// portChunk is how much one ReadConn or WriteConn call moves at most: each is a round trip
// to the guest, so the larger, the faster a busy connection.
const portChunk = 1 << 20

// portReadBuf is the buffer ReadFrom reads the host side's bytes into, for one WriteConn each:
// what a forwarded connection holds while it is open.
const portReadBuf = 256 << 10

// PortConn is a TCP connection to a port on the guest's loopback, carried over the agent's
// DialPort/ReadConn/WriteConn/CloseConn calls. Read asks the guest for the next chunk only
// when the caller wants it, and Write returns once the guest took the bytes, so a slow peer on
// either side slows the other down instead of filling memory. One reader and one writer may
// use it concurrently.
type PortConn struct {
	c    api.AgentService
	id   uint64
	port uint32
	// ctx ends with Close, which unblocks a pending call.
	ctx    context.Context
	cancel context.CancelFunc
	eof    bool
	once   sync.Once
}

// DialPort connects to 127.0.0.1:port in the guest. A port nothing listens on is
// errdefs.ErrUnavailable.
func DialPort(ctx context.Context, c api.AgentService, port uint32) (*PortConn, error) {
	resp, err := c.DialPort(ctx, &api.DialPortRequest{Port: port})
	if err != nil {
		return nil, fmt.Errorf("guest port %d: %w", port, err)
	}
	cctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	return &PortConn{c: c, id: resp.ConnId, port: port, ctx: cctx, cancel: cancel}, nil
}

// Read returns what the guest side sent; io.EOF once it closed or shut down writing.
func (p *PortConn) Read(b []byte) (int, error) {
	if p.eof {
		return 0, io.EOF
	}
	if len(b) == 0 {
		return 0, nil
	}
	for {
		resp, err := p.c.ReadConn(p.ctx, &api.ReadConnRequest{ConnId: p.id, MaxBytes: uint32(min(len(b), portChunk))})
		if err != nil {
			if p.ctx.Err() != nil {
				return 0, net.ErrClosed
			}
			return 0, fmt.Errorf("read guest port %d: %w", p.port, err)
		}
		n := copy(b, resp.Data)
		if resp.Eof {
			p.eof = true
			if n == 0 {
				return 0, io.EOF
			}
		}
		if n > 0 {
			return n, nil
		}
	}
}

// Write sends b to the guest side.
func (p *PortConn) Write(b []byte) (int, error) {
	written := 0
	for len(b) > 0 {
		n := min(len(b), portChunk)
		resp, err := p.c.WriteConn(p.ctx, &api.WriteConnRequest{ConnId: p.id, Data: b[:n]})
		if err != nil {
			if p.ctx.Err() != nil {
				return written, net.ErrClosed
			}
			return written, fmt.Errorf("write guest port %d: %w", p.port, err)
		}
		if resp.Written == 0 || int(resp.Written) > n {
			return written, fmt.Errorf("write guest port %d: the agent took %d of %d bytes: %w", p.port, resp.Written, n, io.ErrShortWrite)
		}
		written += int(resp.Written)
		b = b[resp.Written:]
	}
	return written, nil
}

// WriteTo copies what the guest side sends to w until it closes or shuts down writing, one
// ReadConn reply at a time and without a buffer of its own: io.Copy from the guest uses it,
// where io.Copy's own 32 KiB buffer would make a round trip of every 32 KiB.
func (p *PortConn) WriteTo(w io.Writer) (int64, error) {
	var n int64
	for !p.eof {
		resp, err := p.c.ReadConn(p.ctx, &api.ReadConnRequest{ConnId: p.id, MaxBytes: portChunk})
		if err != nil {
			if p.ctx.Err() != nil {
				return n, net.ErrClosed
			}
			return n, fmt.Errorf("read guest port %d: %w", p.port, err)
		}
		p.eof = resp.Eof
		if len(resp.Data) > 0 {
			m, err := w.Write(resp.Data)
			n += int64(m)
			if err != nil {
				return n, err
			}
		}
	}
	return n, nil
}

// ReadFrom copies r to the guest side until r's EOF, portReadBuf at a time (io.Copy to the
// guest uses it, for the same reason as WriteTo). It does not shut down writing.
func (p *PortConn) ReadFrom(r io.Reader) (int64, error) {
	buf := make([]byte, portReadBuf)
	var n int64
	for {
		m, rerr := r.Read(buf)
		if m > 0 {
			w, err := p.Write(buf[:m])
			n += int64(w)
			if err != nil {
				return n, err
			}
		}
		if errors.Is(rerr, io.EOF) {
			return n, nil
		}
		if rerr != nil {
			return n, rerr
		}
	}
}

// ID is the agent's id of the connection.
func (p *PortConn) ID() uint64 { return p.id }

// CloseWrite shuts down writing: the guest side reads EOF, and can still answer.
func (p *PortConn) CloseWrite() error {
	_, err := p.c.CloseConn(p.ctx, &api.CloseConnRequest{ConnId: p.id, WriteOnly: true})
	return err
}

// Close closes the guest connection; pending Read and Write calls return.
func (p *PortConn) Close() error {
	var err error
	p.once.Do(func() {
		// Closing the guest side first ends a ReadConn blocked in the agent.
		ctx, cancel := context.WithTimeout(context.WithoutCancel(p.ctx), 5*time.Second)
		defer cancel()
		_, err = p.c.CloseConn(ctx, &api.CloseConnRequest{ConnId: p.id})
		p.cancel()
	})
	return err
}
