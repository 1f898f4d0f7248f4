package nodeslots

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const poll = time.Millisecond

// TestMain runs the tests, or with $NODESLOTS_HOLD set is the other process of
// TestSlotOfADeadHolderIsFree: it takes the one slot of that dir, says so and waits to be
// killed.
func TestMain(m *testing.M) {
	dir := os.Getenv("NODESLOTS_HOLD")
	if dir == "" {
		os.Exit(m.Run())
	}
	if _, _, err := Acquire(context.Background(), dir, 1, poll); err != nil {
		fmt.Println(err)
		os.Exit(1)
	}
	fmt.Println("held")
	time.Sleep(time.Minute)
	os.Exit(1)
}

func TestAcquireWaitsForAFreeSlot(t *testing.T) {
	ctx := t.Context()
	dir := filepath.Join(t.TempDir(), "slots")
	a, waited, err := Acquire(ctx, dir, 2, poll)
	if err != nil || waited > 100*time.Millisecond {
		t.Fatalf("first slot: %v after %v", err, waited)
	}
	b, _, err := Acquire(ctx, dir, 2, poll)
	if err != nil {
		t.Fatalf("second slot: %v", err)
	}
	got := make(chan time.Duration)
	go func() {
		c, waited, err := Acquire(ctx, dir, 2, poll)
		if err != nil {
			t.Error(err)
		}
		c.Release()
		got <- waited
	}()
	select {
	case w := <-got:
		t.Fatalf("a third slot of two after %v", w)
	case <-time.After(200 * time.Millisecond):
	}
	b.Release()
	select {
	case w := <-got:
		// Its clock starts inside Acquire, a scheduling delay after this test's 200ms began
		// (a run found 199.9ms), so it must report most of them, not all.
		if w < 150*time.Millisecond {
			t.Errorf("the third holder reported waiting %v, want most of the 200ms the slots were held", w)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a released slot was not taken")
	}
	a.Release()
	a.Release() // twice is fine
	var none *Slot
	none.Release()
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("slots dir: %v %v, want mode 0700", fi.Mode(), err)
	}
}

func TestAcquireGivesUpWithTheContext(t *testing.T) {
	dir := t.TempDir()
	held, _, err := Acquire(t.Context(), dir, 1, poll)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Release()
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	s, _, err := Acquire(ctx, dir, 1, poll)
	if !errors.Is(err, context.DeadlineExceeded) || s != nil {
		t.Fatalf("Acquire with every slot held past its deadline: %v, %v", s, err)
	}
	if !strings.Contains(err.Error(), "all 1 slots held for") {
		t.Errorf("error %q does not say why", err)
	}
}

// A holder that dies frees its slot: the lock goes with its last descriptor. The holder is
// this test binary run again with $NODESLOTS_HOLD (TestMain).
func TestSlotOfADeadHolderIsFree(t *testing.T) {
	dir := t.TempDir()
	holder := exec.Command(os.Args[0])
	holder.Env = append(os.Environ(), "NODESLOTS_HOLD="+dir)
	out, err := holder.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if line != "held\n" {
		_ = holder.Process.Kill()
		t.Fatalf("the holder said %q, %v", line, err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	if _, _, err := Acquire(ctx, dir, 1, poll); err == nil {
		t.Fatal("a slot another process holds was taken")
	}
	_ = holder.Process.Kill()
	_ = holder.Wait()
	ctx, cancel = context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	s, _, err := Acquire(ctx, dir, 1, poll)
	if err != nil {
		t.Fatalf("the slot of a killed holder: %v", err)
	}
	s.Release()
}

func TestAcquireRefusesBadSlots(t *testing.T) {
	dir := t.TempDir()
	if _, _, err := Acquire(t.Context(), dir, 0, poll); err == nil {
		t.Error("0 slots accepted")
	}
	if err := os.Symlink("/etc/hostname", filepath.Join(dir, "0")); err != nil {
		t.Fatal(err)
	}
	if _, _, err := Acquire(t.Context(), dir, 1, poll); err == nil {
		t.Error("a slot that is a symlink was followed")
	}
}

// Waiters queue behind the first, which alone polls; each gets the slot in turn, and one that
// gives up while queued does not hold up the others.
func TestWaitersTakeTurns(t *testing.T) {
	dir := t.TempDir()
	held, _, err := Acquire(t.Context(), dir, 1, poll)
	if err != nil {
		t.Fatal(err)
	}
	const waiters = 5
	done := make(chan error, waiters)
	for range waiters {
		go func() {
			s, _, err := Acquire(t.Context(), dir, 1, poll)
			if err == nil {
				time.Sleep(10 * time.Millisecond)
				s.Release()
			}
			done <- err
		}()
	}
	time.Sleep(50 * time.Millisecond) // they queue
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	if _, _, err := Acquire(ctx, dir, 1, poll); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("a waiter past its deadline: %v", err)
	}
	held.Release()
	for range waiters {
		select {
		case err := <-done:
			if err != nil {
				t.Error(err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the queued waiters did not all get the slot")
		}
	}
}
