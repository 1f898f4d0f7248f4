package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func dialFake(t *testing.T, q *fakeQEMU) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, q.path)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestClient runs the client against a fake QEMU, one subtest per behaviour; each subtest
// gives the fake its own command handler.
func TestClient(t *testing.T) {
	for _, tt := range []struct {
		name string
		run  func(t *testing.T)
	}{
		{"reply decoded into out", testReplyDecoded},
		{"arguments reach QEMU", testArgumentsReachQEMU},
		{"error reply keeps class", testErrorReplyKeepsClass},
		{"out-of-order replies to concurrent callers", testOutOfOrderReplies},
		{"events interleaved with replies", testEventsInterleaved},
		{"undrained events never block replies (oldest dropped)", testUndrainedEvents},
		{"cancelled call does not wedge the connection", testCancelledCall},
		{"abrupt close fails pending calls and closes events", testAbruptClose},
		{"file descriptors travel with the command", testFilesTravel},
	} {
		t.Run(tt.name, tt.run)
	}
}

func testReplyDecoded(t *testing.T) {
	type status struct {
		Status  string `json:"status"`
		Running bool   `json:"running"`
	}
	c := dialFake(t, newFakeQEMU(t, func(s *session, r *serverReq) {
		s.reply(r, map[string]any{"status": "running", "running": true})
	}))
	var st status
	if err := c.Execute(context.Background(), "query-status", nil, &st); err != nil {
		t.Fatal(err)
	}
	if st != (status{"running", true}) {
		t.Fatalf("got %+v", st)
	}
	if v := c.Version(); v.Major != 7 || v.Minor != 2 || v.Micro != 22 || !v.AtLeast(7, 1) || v.AtLeast(8, 0) {
		t.Fatalf("version %v", v)
	}
}

func testArgumentsReachQEMU(t *testing.T) {
	c := dialFake(t, newFakeQEMU(t, func(s *session, r *serverReq) {
		s.reply(r, r.Arguments)
	}))
	var got map[string]string
	if err := c.Execute(context.Background(), "echo", map[string]string{"id": "x,y"}, &got); err != nil {
		t.Fatal(err)
	}
	if got["id"] != "x,y" {
		t.Fatalf("got %v", got)
	}
}

func testErrorReplyKeepsClass(t *testing.T) {
	c := dialFake(t, newFakeQEMU(t, func(s *session, r *serverReq) {
		s.replyErr(r, "DeviceNotFound", "Device 'blk0' not found")
	}))
	err := c.Execute(context.Background(), "device_del", map[string]string{"id": "blk0"}, nil)
	var qe *Error
	if !errors.As(err, &qe) || qe.Class != "DeviceNotFound" || qe.Cmd != "device_del" {
		t.Fatalf("got %v", err)
	}
	if want := "qmp: device_del: DeviceNotFound: Device 'blk0' not found"; err.Error() != want {
		t.Fatalf("Error() = %q, want %q", err.Error(), want)
	}
}

func testOutOfOrderReplies(t *testing.T) {
	var mu sync.Mutex
	var held []*serverReq
	c := dialFake(t, newFakeQEMU(t, func(s *session, r *serverReq) {
		mu.Lock()
		defer mu.Unlock()
		held = append(held, r)
		if len(held) < 3 {
			return
		}
		for i := len(held) - 1; i >= 0; i-- { // reply in reverse order
			s.reply(held[i], held[i].Execute)
		}
		held = nil
	}))
	var wg sync.WaitGroup
	for _, cmd := range []string{"a", "b", "c"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var got string
			if err := c.Execute(context.Background(), cmd, nil, &got); err != nil || got != cmd {
				t.Errorf("%s: got %q, %v", cmd, got, err)
			}
		}()
	}
	wg.Wait()
}

func testEventsInterleaved(t *testing.T) {
	c := dialFake(t, newFakeQEMU(t, func(s *session, r *serverReq) {
		s.event("STOP", "{}")
		s.event("DEVICE_DELETED", `{"device": "blk0", "path": "/machine/peripheral/blk0"}`)
		s.reply(r, struct{}{})
	}))
	if err := c.Execute(context.Background(), "stop", nil, nil); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"STOP", "DEVICE_DELETED"} {
		select {
		case ev := <-c.Events():
			if ev.Name != want {
				t.Fatalf("event %q, want %q", ev.Name, want)
			}
			if !ev.Timestamp.Equal(time.Unix(1700000000, 250000000)) {
				t.Fatalf("timestamp %v", ev.Timestamp)
			}
			if want == "DEVICE_DELETED" && !strings.Contains(string(ev.Data), `"blk0"`) {
				t.Fatalf("data %s", ev.Data)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("no %s event", want)
		}
	}
}

func testUndrainedEvents(t *testing.T) {
	c := dialFake(t, newFakeQEMU(t, func(s *session, r *serverReq) {
		for i := range EventBuffer + 50 {
			s.event("E", `{"n": `+itoa(i)+`}`)
		}
		s.reply(r, struct{}{})
	}))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := c.Execute(ctx, "flood", nil, nil); err != nil {
		t.Fatal(err)
	}
	if d := c.DroppedEvents(); d != 50 {
		t.Fatalf("dropped %d, want 50", d)
	}
	ev := <-c.Events()
	if string(ev.Data) != `{"n": 50}` {
		t.Fatalf("oldest kept event %s, want n=50", ev.Data)
	}
}

func testCancelledCall(t *testing.T) {
	var mu sync.Mutex
	var hung *serverReq
	c := dialFake(t, newFakeQEMU(t, func(s *session, r *serverReq) {
		mu.Lock()
		defer mu.Unlock()
		if r.Execute == "hang" {
			hung = r
			return
		}
		if hung != nil { // late reply to the abandoned call first
			s.reply(hung, "late")
			hung = nil
		}
		s.reply(r, "ok")
	}))
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := c.Execute(ctx, "hang", nil, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v, want deadline exceeded", err)
	}
	var got string
	if err := c.Execute(context.Background(), "next", nil, &got); err != nil || got != "ok" {
		t.Fatalf("got %q, %v", got, err)
	}
}

func testAbruptClose(t *testing.T) {
	// waiting tells the test that a request the fake never answers has reached it.
	waiting := make(chan struct{}, 1)
	c := dialFake(t, newFakeQEMU(t, func(s *session, r *serverReq) {
		switch r.Execute {
		case "wait":
			waiting <- struct{}{} // in flight, never answered
		case "die":
			s.conn.Close()
		}
	}))
	errc := make(chan error, 1)
	go func() { errc <- c.Execute(context.Background(), "wait", nil, nil) }()
	<-waiting
	err := c.Execute(context.Background(), "die", nil, nil)
	for _, e := range []error{err, <-errc} {
		if !errors.Is(e, ErrClosed) || !strings.Contains(e.Error(), "monitor connection closed") {
			t.Fatalf("got %v, want ErrClosed", e)
		}
	}
	if _, ok := <-c.Events(); ok {
		t.Fatal("events channel still open")
	}
	if err := c.Execute(context.Background(), "after", nil, nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("after close: %v", err)
	}
}

func testFilesTravel(t *testing.T) {
	c := dialFake(t, newFakeQEMU(t, func(s *session, r *serverReq) {
		if len(r.fds) != 1 {
			s.replyErr(r, "GenericError", "No file descriptor supplied via SCM_RIGHTS")
			return
		}
		buf := make([]byte, 16)
		n, _ := unix.Read(r.fds[0], buf)
		unix.Close(r.fds[0])
		s.reply(r, string(buf[:n]))
	}))
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	if _, err := pw.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	var got string
	if err := c.ExecuteWithFiles(context.Background(), "getfd", map[string]string{"fdname": "x"}, &got, pr); err != nil {
		t.Fatal(err)
	}
	if got != "hello" {
		t.Fatalf("server read %q through the passed fd", got)
	}
}

func itoa(i int) string { b, _ := json.Marshal(i); return string(b) }

func TestDialWaitsForSocket(t *testing.T) {
	q := &fakeQEMU{t: t, path: t.TempDir() + "/late.sock", handle: func(s *session, r *serverReq) { s.reply(r, struct{}{}) }}
	go func() {
		time.Sleep(150 * time.Millisecond)
		q.listen()
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, q.path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Execute(ctx, "query-status", nil, nil); err != nil {
		t.Fatal(err)
	}
}

func TestDialGivesUpWithContext(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err := Dial(ctx, t.TempDir()+"/never.sock")
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "never.sock") {
		t.Fatalf("got %v", err)
	}
}

func TestCloseIsIdempotent(t *testing.T) {
	c := dialFake(t, newFakeQEMU(t, func(s *session, r *serverReq) {}))
	c.Close()
	c.Close()
	if err := c.Execute(context.Background(), "x", nil, nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("got %v", err)
	}
}

func TestDecode(t *testing.T) {
	tests := []struct {
		in      string
		kind    messageKind
		wantErr bool
	}{
		{greeting, kindGreeting, false},
		{`{"return": {}, "id": 7}`, kindReply, false},
		{`{"return": {}}`, kindReply, false},
		{`{"error": {"class": "GenericError", "desc": "x"}, "id": 1}`, kindReply, false},
		{`{"event": "SHUTDOWN", "data": {"guest": true}, "timestamp": {"seconds": 1, "microseconds": 2}}`, kindEvent, false},
		{`{"return": 1, "id": "abc"}`, 0, true},
		{`{"return": 1, "id": -1}`, 0, true},
		{`{}`, 0, true},
		{`[1,2]`, 0, true},
		{`not json`, 0, true},
		{"", 0, true},
	}
	for _, tt := range tests {
		m, err := decode([]byte(tt.in))
		if (err != nil) != tt.wantErr {
			t.Errorf("decode(%q) error %v, wantErr %v", tt.in, err, tt.wantErr)
			continue
		}
		if err == nil && m.kind != tt.kind {
			t.Errorf("decode(%q) kind %v, want %v", tt.in, m.kind, tt.kind)
		}
	}
}

func FuzzDecode(f *testing.F) {
	for _, s := range []string{
		greeting,
		`{"return": {"status": "running"}, "id": 3}`,
		`{"id": 4, "error": {"class": "DeviceNotFound", "desc": "no"}}`,
		`{"timestamp": {"seconds": 1, "microseconds": 999999}, "event": "DEVICE_DELETED", "data": {"device": "x"}}`,
		`{"event": "X", "timestamp": {"seconds": -1, "microseconds": -1}}`,
		`{"return": null, "id": null}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := decode(b)
		if err != nil {
			if m != nil {
				t.Fatal("message and error")
			}
			return
		}
		switch m.kind {
		case kindGreeting:
		case kindEvent:
			if m.event.Name == "" {
				t.Fatal("event without name")
			}
		case kindReply:
			if m.errRep == nil && m.ret == nil {
				t.Fatal("reply without return or error")
			}
		default:
			t.Fatalf("unknown kind %v", m.kind)
		}
	})
}
