package shim

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/podvm/podvm/internal/nodeslots"
	"github.com/podvm/podvm/shim/config"
)

// stateLeft lists what is in the state dir but the node-wide start slots, which outlive pods.
func stateLeft(stateDir string) []string {
	var left []string
	entries, _ := os.ReadDir(stateDir)
	for _, e := range entries {
		if e.Name() != config.StartSlotsDirName {
			left = append(left, e.Name())
		}
	}
	return left
}

// slotFree reports whether the one start slot (sandbox.max_parallel_starts = 1) of the node
// with state dir stateDir can be taken now.
func slotFree(t *testing.T, stateDir string) bool {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	s, _, err := nodeslots.Acquire(ctx, filepath.Join(stateDir, config.StartSlotsDirName), 1, time.Millisecond)
	s.Release()
	return err == nil
}

// TestVMStartWaitsItsTurn: with sandbox.max_parallel_starts = 1 and the node's one slot held
// (another pod's VM starting), a sandbox's VM does not start until the slot is free; its turn
// ends once the agent answered, so the next pod's VM can start while this one is set up.
func TestVMStartWaitsItsTurn(t *testing.T) {
	r := newRig(t)
	r.maxParallelStarts = 1
	other, _, err := nodeslots.Acquire(r.ctx, filepath.Join(r.stateDir, config.StartSlotsDirName), 1, time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	created := make(chan error, 1)
	go func() {
		_, err := r.create("pod1", sandboxAnnotations("pod1"), podNetns)
		created <- err
	}()
	select {
	case err := <-created:
		t.Fatalf("the sandbox was made while the node's one start slot was held: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
	if r.vm.Pid() != 0 {
		t.Fatal("the VM started while the node's one start slot was held")
	}
	other.Release()
	select {
	case err := <-created:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the sandbox was not made once the slot was free")
	}
	if r.vm.Pid() == 0 {
		t.Fatal("no VM started")
	}
	if !slotFree(t, r.stateDir) {
		t.Error("the running pod still holds the start slot")
	}
}
