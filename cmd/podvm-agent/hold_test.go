package main

import (
	"errors"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"github.com/podvm/podvm/agent/guest"
)

// childEnv marks a run of this test binary as the holder under test: if hold.go's
// constructor does not take over, Go starts and TestMain exits instead of running the tests
// again.
const childEnv = "PODVM_TEST_HOLD_CHILD"

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		os.Exit(3)
	}
	os.Exit(m.Run())
}

// This test binary carries hold.go's constructor: run as "<binary> hold" it is the holder,
// before the Go runtime (and the testing package) start.
func startHold(t *testing.T) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0], guest.HoldArg)
	cmd.Env = append(os.Environ(), childEnv+"=1")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	return cmd
}

func TestHolderRunsUntilSIGTERM(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		cmd := startHold(t)
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			t.Fatalf("the holder exited by itself: %v (does hold.go still match guest.HoldArg %q?)", err, guest.HoldArg)
		case <-time.After(200 * time.Millisecond):
		}
		// SIGCHLD alone does not end it.
		if err := cmd.Process.Signal(syscall.SIGCHLD); err != nil {
			t.Fatal(err)
		}
		if err := cmd.Process.Signal(sig); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-done:
			var ee *exec.ExitError
			if err != nil && !errors.As(err, &ee) {
				t.Fatal(err)
			}
			if err != nil {
				t.Fatalf("holder after %v: %v, want exit status 0", sig, err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("holder still running 5 s after %v", sig)
		}
	}
}
