package guest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/podvm/podvm/agent/api"
)

// ports holds the guest ends of the host's port-forward connections (DialPort … CloseConn).
// They belong to the host's agent connection(s): when the last one closes, every port
// connection is closed, so a dead shim leaves none behind.
type ports struct {
	// loopback is where DialPort connects: 127.0.0.1 in the guest (tests: the test's own).
	loopback string

	mu    sync.Mutex
	next  uint64
	conns map[uint64]*portConn
	// hosts counts the host's open agent connections.
	hosts int
}

type portConn struct {
	c *net.TCPConn
	// readMu serialises ReadConn calls, so bytes are handed out in order.
	readMu sync.Mutex
	eof    bool
}

func newPorts() *ports {
	return &ports{loopback: "127.0.0.1", conns: map[uint64]*portConn{}}
}

func (p *ports) get(id uint64) (*portConn, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	c, ok := p.conns[id]
	if !ok {
		return nil, fmt.Errorf("port connection %d: %w", id, errdefs.ErrNotFound)
	}
	return c, nil
}

func (p *ports) dial(ctx context.Context, port uint32) (uint64, error) {
	if port == 0 || port > 65535 {
		return 0, fmt.Errorf("port %d is not a TCP port: %w", port, errdefs.ErrInvalidArgument)
	}
	addr := net.JoinHostPort(p.loopback, strconv.Itoa(int(port)))
	c, err := (&net.Dialer{}).DialContext(ctx, "tcp4", addr)
	if err != nil {
		if errors.Is(err, syscall.ECONNREFUSED) {
			return 0, fmt.Errorf("connect to %s in the guest: nothing listens there: %w", addr, errdefs.ErrUnavailable)
		}
		return 0, fmt.Errorf("connect to %s in the guest: %w", addr, err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.next++
	p.conns[p.next] = &portConn{c: c.(*net.TCPConn)}
	return p.next, nil
}

// read blocks until the guest side sent something or closed; it gives up, without losing
// bytes, when ctx ends.
func (p *ports) read(ctx context.Context, id uint64, limit uint32) ([]byte, bool, error) {
	pc, err := p.get(id)
	if err != nil {
		return nil, false, err
	}
	pc.readMu.Lock()
	defer pc.readMu.Unlock()
	if pc.eof {
		return nil, true, nil
	}
	data, eof, err := readOnce(ctx, pc.c, limit, readOpts{})
	pc.eof = eof
	if err != nil && ctx.Err() == nil {
		err = fmt.Errorf("port connection %d: %w", id, err)
	}
	return data, eof, err
}

func (p *ports) write(ctx context.Context, id uint64, data []byte) (int, error) {
	pc, err := p.get(id)
	if err != nil {
		return 0, err
	}
	stop := context.AfterFunc(ctx, func() { _ = pc.c.SetWriteDeadline(time.Now()) })
	defer stop()
	n, err := pc.c.Write(data)
	if err != nil {
		return n, fmt.Errorf("port connection %d: %w", id, err)
	}
	return n, nil
}

func (p *ports) close(id uint64, writeOnly bool) error {
	if writeOnly {
		pc, err := p.get(id)
		if err != nil {
			return err
		}
		return pc.c.CloseWrite()
	}
	p.mu.Lock()
	pc, ok := p.conns[id]
	delete(p.conns, id)
	p.mu.Unlock()
	if !ok {
		return fmt.Errorf("port connection %d: %w", id, errdefs.ErrNotFound)
	}
	return pc.c.Close()
}

// track counts conn as a host connection until it closes; when none is left, it closes every
// port connection. It is the agent's ttrpc handshake, so it sees every host connection.
func (p *ports) track(ctx context.Context, conn net.Conn) (net.Conn, any, error) {
	p.mu.Lock()
	p.hosts++
	p.mu.Unlock()
	return &hostConn{Conn: conn, onClose: func() { p.hostGone(ctx) }}, nil, nil
}

func (p *ports) hostGone(ctx context.Context) {
	p.mu.Lock()
	p.hosts--
	var conns map[uint64]*portConn
	if p.hosts == 0 && len(p.conns) > 0 {
		conns, p.conns = p.conns, map[uint64]*portConn{}
	}
	p.mu.Unlock()
	for _, pc := range conns {
		_ = pc.c.Close()
	}
	if len(conns) > 0 {
		log.G(ctx).Infof("host connection gone: closed %d port-forward connections", len(conns))
	}
}

// hostConn calls onClose once, when the agent connection closes.
type hostConn struct {
	net.Conn
	once    sync.Once
	onClose func()
}

func (c *hostConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.onClose)
	return err
}

// DialPort implements the RPC of that name in api.AgentService (agent.proto).
func (s *Server) DialPort(ctx context.Context, req *api.DialPortRequest) (*api.DialPortResponse, error) {
	id, err := s.ports.dial(ctx, req.Port)
	if err != nil {
		return nil, err
	}
	return &api.DialPortResponse{ConnId: id}, nil
}

// ReadConn implements the RPC of that name in api.AgentService (agent.proto).
func (s *Server) ReadConn(ctx context.Context, req *api.ReadConnRequest) (*api.ReadConnResponse, error) {
	data, eof, err := s.ports.read(ctx, req.ConnId, req.MaxBytes)
	if err != nil {
		return nil, err
	}
	return &api.ReadConnResponse{Data: data, Eof: eof}, nil
}

// WriteConn implements the RPC of that name in api.AgentService (agent.proto).
func (s *Server) WriteConn(ctx context.Context, req *api.WriteConnRequest) (*api.WriteConnResponse, error) {
	n, err := s.ports.write(ctx, req.ConnId, req.Data)
	if err != nil {
		return nil, err
	}
	return &api.WriteConnResponse{Written: uint32(n)}, nil
}

// CloseConn implements the RPC of that name in api.AgentService (agent.proto).
func (s *Server) CloseConn(ctx context.Context, req *api.CloseConnRequest) (*api.Empty, error) {
	if err := s.ports.close(req.ConnId, req.WriteOnly); err != nil {
		return nil, err
	}
	return &api.Empty{}, nil
}
