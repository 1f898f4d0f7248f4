package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sync"
)

// Call is one command recorded by FakeMonitor.
type Call struct {
	Cmd  string
	Args json.RawMessage // the arguments as QEMU would have received them; nil for none
	// Files is how many descriptors came with the command (ExecuteWithFiles).
	Files int
}

// FakeMonitor is an in-memory Monitor for unit tests. Unscripted commands succeed with an
// empty object as their return value. Replies are scripted per command with SetReply
// (every call) or QueueReply (next calls, in order, before falling back to SetReply), and a
// Hook can compute replies and inject events (e.g. DEVICE_DELETED after device_del).
// Events use the same bounded, drop-oldest buffer as Client.
type FakeMonitor struct {
	mu     sync.Mutex
	calls  []Call
	sticky map[string]fakeReply
	queued map[string][]fakeReply
	hook   func(cmd string, args json.RawMessage) (ret any, handled bool, err error)
	events chan Event
	closed bool
}

type fakeReply struct {
	ret any
	err error
}

var _ Monitor = (*FakeMonitor)(nil)

// NewFakeMonitor returns an open FakeMonitor with no scripted replies.
func NewFakeMonitor() *FakeMonitor {
	return &FakeMonitor{
		sticky: make(map[string]fakeReply),
		queued: make(map[string][]fakeReply),
		events: make(chan Event, EventBuffer),
	}
}

// SetReply makes every call of cmd return ret (marshalled to JSON, then decoded into the
// caller's out) or err. Use a *Error for err to mimic a QMP error reply.
func (f *FakeMonitor) SetReply(cmd string, ret any, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.sticky[cmd] = fakeReply{ret, err}
}

// QueueReply scripts the reply to the next not yet scripted call of cmd.
func (f *FakeMonitor) QueueReply(cmd string, ret any, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.queued[cmd] = append(f.queued[cmd], fakeReply{ret, err})
}

// SetHook installs fn, consulted before scripted replies. When it returns handled=false the
// scripted reply (or the default) is used. fn runs without the monitor's lock held, so it may
// call InjectEvent.
func (f *FakeMonitor) SetHook(fn func(cmd string, args json.RawMessage) (ret any, handled bool, err error)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.hook = fn
}

// InjectEvent delivers ev on Events (dropping the oldest buffered event when full).
func (f *FakeMonitor) InjectEvent(ev Event) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return
	}
	select {
	case f.events <- ev:
		return
	default:
	}
	select {
	case <-f.events:
	default:
	}
	select {
	case f.events <- ev:
	default:
	}
}

// Calls returns a copy of the commands executed so far, in order.
func (f *FakeMonitor) Calls() []Call {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]Call(nil), f.calls...)
}

// Commands returns the names of the commands executed so far, in order.
func (f *FakeMonitor) Commands() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	names := make([]string, len(f.calls))
	for i, c := range f.calls {
		names[i] = c.Cmd
	}
	return names
}

// Execute implements Monitor.
func (f *FakeMonitor) Execute(ctx context.Context, cmd string, args, out any) error {
	return f.ExecuteWithFiles(ctx, cmd, args, out)
}

// ExecuteWithFiles implements Monitor.
func (f *FakeMonitor) ExecuteWithFiles(ctx context.Context, cmd string, args, out any, files ...*os.File) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	var raw json.RawMessage
	if args != nil {
		b, err := json.Marshal(args)
		if err != nil {
			return fmt.Errorf("qmp: %s: encoding arguments: %w", cmd, err)
		}
		raw = b
	}
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return fmt.Errorf("qmp: %s: %w: closed by client", cmd, ErrClosed)
	}
	f.calls = append(f.calls, Call{Cmd: cmd, Args: raw, Files: len(files)})
	hook := f.hook
	f.mu.Unlock()

	var (
		rep     fakeReply
		handled bool
	)
	if hook != nil {
		rep.ret, handled, rep.err = hook(cmd, raw)
	}
	if !handled {
		f.mu.Lock()
		if q := f.queued[cmd]; len(q) > 0 {
			rep, f.queued[cmd] = q[0], q[1:]
		} else if s, ok := f.sticky[cmd]; ok {
			rep = s
		} else {
			rep = fakeReply{ret: struct{}{}}
		}
		f.mu.Unlock()
	}
	if rep.err != nil {
		var qe *Error
		if errors.As(rep.err, &qe) {
			e := *qe
			e.Cmd = cmd
			return &e
		}
		return rep.err
	}
	if out != nil {
		ret := rep.ret
		if ret == nil {
			ret = struct{}{}
		}
		b, err := json.Marshal(ret)
		if err != nil {
			return fmt.Errorf("qmp fake: %s: encoding scripted reply: %w", cmd, err)
		}
		if err := json.Unmarshal(b, out); err != nil {
			return fmt.Errorf("qmp: %s: decoding reply: %w", cmd, err)
		}
	}
	return nil
}

// Events implements Monitor.
func (f *FakeMonitor) Events() <-chan Event { return f.events }

// Close implements Monitor; it closes the Events channel. Closing twice is fine.
func (f *FakeMonitor) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.closed {
		f.closed = true
		close(f.events)
	}
	return nil
}

// Closed reports whether Close was called.
func (f *FakeMonitor) Closed() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.closed
}
