package flock

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func open(t *testing.T, path string) *os.File {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.Close() })
	return f
}

// TestTry: the first open file takes the lock, a second finds it held until the first is
// closed.
func TestTry(t *testing.T) {
	path := filepath.Join(t.TempDir(), "lock")
	a, b := open(t, path), open(t, path)
	if ok, err := Try(int(a.Fd())); !ok || err != nil {
		t.Fatalf("first Try: %v, %v; want the lock", ok, err)
	}
	if ok, err := Try(int(b.Fd())); ok || err != nil {
		t.Fatalf("second Try while the first holds it: %v, %v; want false, nil", ok, err)
	}
	_ = a.Close()
	if ok, err := Try(int(b.Fd())); !ok || err != nil {
		t.Fatalf("Try after the holder closed: %v, %v; want the lock", ok, err)
	}
}

// TestTryBadFD: an error that is not "held" comes back as one.
func TestTryBadFD(t *testing.T) {
	if ok, err := Try(-1); ok || err == nil {
		t.Fatalf("Try(-1): %v, %v; want an error", ok, err)
	}
}

// TestWait: a waiter gets the lock once its holder lets go, and gives up with its context's
// cause when it ends first.
func TestWait(t *testing.T) {
	path := filepath.Join(t.TempDir(), "lock")
	a, b := open(t, path), open(t, path)
	if err := Wait(t.Context(), int(a.Fd()), time.Millisecond); err != nil {
		t.Fatal(err)
	}
	cause := errors.New("the caller gave up")
	ctx, cancel := context.WithCancelCause(t.Context())
	time.AfterFunc(50*time.Millisecond, func() { cancel(cause) })
	if err := Wait(ctx, int(b.Fd()), time.Millisecond); !errors.Is(err, cause) || !strings.Contains(err.Error(), "another process holds the lock") {
		t.Fatalf("Wait while held until the context ended: %v, want it to say the lock was held and wrap %v", err, cause)
	}
	time.AfterFunc(50*time.Millisecond, func() { _ = a.Close() })
	start := time.Now()
	if err := Wait(t.Context(), int(b.Fd()), time.Millisecond); err != nil {
		t.Fatalf("Wait for a lock let go after 50ms: %v", err)
	}
	if took := time.Since(start); took < 40*time.Millisecond {
		t.Errorf("Wait returned after %v, before the holder let go", took)
	}
}
