package harness

import (
	"context"
	"fmt"
	"os/exec"
	"sync"
	"syscall"
	"testing"
	"time"
)

// This file lets a test run its own node daemons (a kubelet, an API server) next to the
// harness's containerd, and restart containerd as an operator would.

// StartInNetNS starts cmd inside the harness's network namespace; its mount namespace stays
// the host's (unlike `ip netns exec`), so mounts it makes are the ones the teardown sees.
// The caller waits for cmd and stops it.
func (e *Env) StartInNetNS(cmd *exec.Cmd) error {
	if err := e.ns.do(cmd.Start); err != nil {
		return fmt.Errorf("start %s in netns %s: %w", cmd.Path, e.NetNS, err)
	}
	return nil
}

// ID is the environment's random id, part of every name it creates.
func (e *Env) ID() string { return e.id }

// RestartContainerd stops containerd with SIGTERM (its shims, and so the pods, keep running),
// starts it again with the same config and waits until its CRI is ready. The CRI clients are
// reconnected.
func (e *Env) RestartContainerd(ctx context.Context) error {
	if !e.containerdExited() {
		_ = e.containerd.Process.Signal(syscall.SIGTERM)
		select {
		case <-e.exited:
		case <-time.After(10 * time.Second):
			return fmt.Errorf("containerd did not exit 10s after SIGTERM")
		}
	}
	e.exited = make(chan struct{})
	e.exitErr = nil
	if err := e.startContainerd(); err != nil {
		return err
	}
	return e.waitCRI(ctx)
}

// Supervise restarts containerd whenever it exits, a second later, as systemd's
// Restart=always does for containerd's unit: for tests of tools that restart containerd by
// stopping it. The returned stop ends the supervision (before the env's teardown: register it
// with t.Cleanup after Start). The CRI clients reconnect by themselves.
func (e *Env) Supervise(t testing.TB) (stop func()) {
	done, finished := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(finished)
		for {
			select {
			case <-done:
				return
			case <-e.exited:
			}
			select {
			case <-done:
				return
			case <-time.After(time.Second):
			}
			t.Logf("harness: containerd exited (%v); supervisor starts it again", e.exitErr)
			e.exited, e.exitErr = make(chan struct{}), nil
			if err := e.startContainerd(); err != nil {
				t.Errorf("harness: supervisor: %v", err)
				return
			}
		}
	}()
	var once sync.Once
	return func() { once.Do(func() { close(done); <-finished }) }
}
