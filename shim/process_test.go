package shim

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
)

// The whole state machine: every op in every status, legal or not.
func TestProcessTransitionTable(t *testing.T) {
	const illegal = status(-1)
	want := map[status]map[op]status{
		statusCreated: {opStart: statusRunning, opPause: illegal, opResume: illegal, opExit: statusStopped, opDelete: illegal},
		statusRunning: {opStart: illegal, opPause: statusPaused, opResume: illegal, opExit: statusStopped, opDelete: illegal},
		statusPaused:  {opStart: illegal, opPause: illegal, opResume: statusRunning, opExit: statusStopped, opDelete: illegal},
		statusStopped: {opStart: illegal, opPause: illegal, opResume: illegal, opExit: illegal, opDelete: statusDeleted},
		statusDeleted: {opStart: illegal, opPause: illegal, opResume: illegal, opExit: illegal, opDelete: illegal},
	}
	if len(want) != len(transitions) {
		t.Fatalf("the table has %d statuses, the test %d", len(transitions), len(want))
	}
	for from, row := range want {
		for o, to := range row {
			p := newProcess("c1", "e1", stdioPaths{})
			p.status = from
			err := p.apply(o)
			if to == illegal {
				if !errdefs.IsFailedPrecondition(err) {
					t.Errorf("%s in %s: %v, want failed precondition", o, from, err)
				} else if msg := err.Error(); !strings.Contains(msg, "c1/e1") || !strings.Contains(msg, "it is "+from.String()) {
					t.Errorf("%s in %s: message %q does not name the process and its status", o, from, msg)
				}
				if p.status != from {
					t.Errorf("illegal %s moved %s to %s", o, from, p.status)
				}
				continue
			}
			if err != nil || p.status != to {
				t.Errorf("%s in %s: %v, now %s; want %s", o, from, err, p.status, to)
			}
		}
	}
}

func TestProcessExitIsRecordedOnce(t *testing.T) {
	p := newProcess("c1", "", stdioPaths{})
	if err := p.apply(opStart); err != nil {
		t.Fatal(err)
	}
	at := time.Unix(100, 0)
	if !p.exit(3, at) {
		t.Fatal("first exit not recorded")
	}
	if p.exit(4, time.Now()) {
		t.Error("second exit recorded")
	}
	code, got, err := p.wait(context.Background())
	if err != nil || code != 3 || !got.Equal(at) {
		t.Errorf("wait: %d %v %v, want 3 at %v", code, got, err, at)
	}
	if err := p.apply(opDelete); err != nil {
		t.Fatal(err)
	}
	if p.exit(5, time.Now()) {
		t.Error("exit of a deleted process recorded")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, _, err := newProcess("c2", "", stdioPaths{}).wait(ctx); err == nil {
		t.Error("wait with a cancelled context returned no error")
	}
}

func TestProcessNames(t *testing.T) {
	init, exec := newProcess("c1", "", stdioPaths{}), newProcess("c1", "e1", stdioPaths{})
	if init.String() != "c1" || exec.String() != "c1/e1" || init.eventID() != "c1" || exec.eventID() != "e1" {
		t.Errorf("names %q %q, event ids %q %q", init, exec, init.eventID(), exec.eventID())
	}
	for s, name := range map[status]string{statusCreated: "created", statusRunning: "running", statusPaused: "paused",
		statusStopped: "stopped", statusDeleted: "deleted", status(9): "status(9)"} {
		if s.String() != name {
			t.Errorf("status %d is %q, want %q", int(s), s, name)
		}
	}
}
