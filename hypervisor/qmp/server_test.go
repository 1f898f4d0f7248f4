package qmp

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"path/filepath"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// fakeQEMU is a QMP server speaking the real protocol: greeting, capabilities negotiation,
// replies carrying the request id, events. Each test gives it a handler for commands.
type fakeQEMU struct {
	t    *testing.T
	path string
	ln   *net.UnixListener

	handle func(s *session, r *serverReq)

	mu       sync.Mutex
	sessions []*session
}

type serverReq struct {
	Execute   string          `json:"execute"`
	Arguments json.RawMessage `json:"arguments"`
	ID        json.RawMessage `json:"id"`
	fds       []int
}

type session struct {
	conn *net.UnixConn
	wmu  sync.Mutex
}

const greeting = `{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}`

func (s *session) sendRaw(line string) {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	// The client under test may have hung up; what it saw is what the test checks.
	_, _ = s.conn.Write([]byte(line + "\r\n"))
}

func (s *session) reply(r *serverReq, ret any) {
	b, _ := json.Marshal(ret)
	s.sendRaw(fmt.Sprintf(`{"return": %s, "id": %s}`, b, r.ID))
}

func (s *session) replyErr(r *serverReq, class, desc string) {
	s.sendRaw(fmt.Sprintf(`{"id": %s, "error": {"class": %q, "desc": %q}}`, r.ID, class, desc))
}

func (s *session) event(name, data string) {
	s.sendRaw(fmt.Sprintf(`{"timestamp": {"seconds": 1700000000, "microseconds": 250000}, "event": %q, "data": %s}`, name, data))
}

func newFakeQEMU(t *testing.T, handle func(s *session, r *serverReq)) *fakeQEMU {
	t.Helper()
	q := &fakeQEMU{t: t, path: filepath.Join(t.TempDir(), "qmp.sock"), handle: handle}
	q.listen()
	return q
}

func (q *fakeQEMU) listen() {
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: q.path, Net: "unix"})
	if err != nil {
		q.t.Fatal(err)
	}
	q.ln = ln
	q.t.Cleanup(func() {
		ln.Close()
		q.mu.Lock()
		defer q.mu.Unlock()
		for _, s := range q.sessions {
			s.conn.Close()
		}
	})
	go func() {
		for {
			c, err := ln.AcceptUnix()
			if err != nil {
				return
			}
			s := &session{conn: c}
			q.mu.Lock()
			q.sessions = append(q.sessions, s)
			q.mu.Unlock()
			go q.serve(s)
		}
	}()
}

func (q *fakeQEMU) serve(s *session) {
	defer s.conn.Close()
	s.sendRaw(greeting)
	negotiated := false
	var pending []byte
	var fds []int
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(16*4))
	for {
		n, oobn, _, _, err := s.conn.ReadMsgUnix(buf, oob)
		if err != nil {
			return
		}
		if oobn > 0 {
			msgs, _ := unix.ParseSocketControlMessage(oob[:oobn])
			for _, m := range msgs {
				got, _ := unix.ParseUnixRights(&m)
				fds = append(fds, got...)
			}
		}
		pending = append(pending, buf[:n]...)
		for {
			i := bytes.IndexByte(pending, '\n')
			if i < 0 {
				break
			}
			line := pending[:i]
			pending = pending[i+1:]
			r := &serverReq{}
			if err := json.Unmarshal(line, r); err != nil {
				s.sendRaw(`{"error": {"class": "GenericError", "desc": "JSON parse error"}}`)
				continue
			}
			r.fds, fds = fds, nil
			switch {
			case r.Execute == "qmp_capabilities":
				negotiated = true
				s.reply(r, struct{}{})
			case !negotiated:
				s.replyErr(r, "CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'")
			default:
				q.handle(s, r)
			}
		}
	}
}
