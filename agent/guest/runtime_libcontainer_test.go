package guest

import (
	"errors"
	"fmt"
	"os"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/runc/libcontainer"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

func TestTypedLibcontainerErrors(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want error
	}{
		{libcontainer.ErrExist, errdefs.ErrAlreadyExists},
		{libcontainer.ErrNotExist, errdefs.ErrNotFound},
		{libcontainer.ErrCgroupNotExist, errdefs.ErrNotFound},
		{libcontainer.ErrInvalidID, errdefs.ErrInvalidArgument},
		{libcontainer.ErrPaused, errdefs.ErrFailedPrecondition},
		{libcontainer.ErrRunning, errdefs.ErrFailedPrecondition},
		{fmt.Errorf("pause: %w", libcontainer.ErrNotRunning), errdefs.ErrFailedPrecondition},
		{libcontainer.ErrNotPaused, errdefs.ErrFailedPrecondition},
	} {
		got := typed(tc.err)
		if !errors.Is(got, tc.want) || !errors.Is(got, tc.err) {
			t.Errorf("typed(%v) = %v, want it to be %v too", tc.err, got, tc.want)
		}
	}
	if typed(nil) != nil {
		t.Error("typed(nil) is not nil")
	}
	plain := errors.New("x")
	if typed(plain) != plain { //nolint:errorlint // identity: the very same error must come back
		t.Error("an unclassified error was changed")
	}
}

func TestToLibcontainerProcessStdio(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	spec := &specs.Process{Args: []string{"sh"}, ConsoleSize: &specs.Box{Width: 10, Height: 5}}
	lp, err := toLibcontainerProcess(&procConfig{spec: spec, init: true, stdout: w})
	if err != nil {
		t.Fatal(err)
	}
	// An absent stream must stay a nil interface (/dev/null), not a nil *os.File.
	if !lp.Init || lp.Stdout != w || lp.Stdin != nil || lp.Stderr != nil {
		t.Fatalf("init=%v stdin=%v stdout=%v stderr=%v", lp.Init, lp.Stdin, lp.Stdout, lp.Stderr)
	}
	lp, err = toLibcontainerProcess(&procConfig{spec: spec, consoleSocket: r, consoleWidth: 80, consoleHeight: 24})
	if err != nil {
		t.Fatal(err)
	}
	if lp.ConsoleSocket != r || lp.ConsoleWidth != 80 || lp.ConsoleHeight != 24 || lp.Stdout != nil {
		t.Fatalf("terminal: socket=%v size=%dx%d stdout=%v", lp.ConsoleSocket, lp.ConsoleWidth, lp.ConsoleHeight, lp.Stdout)
	}
	lp, _ = toLibcontainerProcess(&procConfig{spec: spec, consoleSocket: r})
	if lp.ConsoleWidth != 10 || lp.ConsoleHeight != 5 {
		t.Fatalf("the spec's console size was not kept: %dx%d", lp.ConsoleWidth, lp.ConsoleHeight)
	}
	if _, err := toLibcontainerProcess(&procConfig{spec: &specs.Process{Args: []string{"sh"}, Rlimits: []specs.POSIXRlimit{{Type: "RLIMIT_X"}}}}); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("bad rlimit: %v", err)
	}
}
