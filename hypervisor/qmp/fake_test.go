package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"testing"
)

func TestFakeMonitor(t *testing.T) {
	ctx := context.Background()
	f := NewFakeMonitor()
	f.SetReply("query-status", map[string]any{"status": "running"}, nil)
	f.QueueReply("query-status", nil, &Error{Class: "GenericError", Desc: "once"})
	f.SetHook(func(cmd string, args json.RawMessage) (any, bool, error) {
		if cmd == "device_del" {
			f.InjectEvent(Event{Name: "DEVICE_DELETED", Data: args})
			return nil, true, nil
		}
		return nil, false, nil
	})

	var qe *Error
	if err := f.Execute(ctx, "query-status", nil, nil); !errors.As(err, &qe) || qe.Cmd != "query-status" || qe.Desc != "once" {
		t.Fatalf("queued reply: %v", err)
	}
	var st struct{ Status string }
	if err := f.Execute(ctx, "query-status", nil, &st); err != nil || st.Status != "running" {
		t.Fatalf("sticky reply: %+v %v", st, err)
	}
	if err := f.Execute(ctx, "device_del", map[string]string{"id": "d"}, nil); err != nil {
		t.Fatal(err)
	}
	if ev := <-f.Events(); ev.Name != "DEVICE_DELETED" || string(ev.Data) != `{"id":"d"}` {
		t.Fatalf("event %+v", ev)
	}
	calls := f.Calls()
	if len(calls) != 3 || calls[2].Cmd != "device_del" || string(calls[2].Args) != `{"id":"d"}` || calls[0].Args != nil {
		t.Fatalf("calls %+v", calls)
	}
	f.Close()
	if err := f.Execute(ctx, "x", nil, nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("after Close: %v", err)
	}
	if _, ok := <-f.Events(); ok {
		t.Fatal("events open after Close")
	}
}
