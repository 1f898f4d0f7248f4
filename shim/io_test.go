package shim

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/agent"
	"github.com/podvm/podvm/agent/api"
)

// ioAgent is a fake agent with one container "c" whose stdout says hello.
func ioAgent(t *testing.T) *agent.Fake {
	t.Helper()
	ag := agent.NewFake()
	if _, err := ag.CreateContainer(context.Background(), &api.CreateContainerRequest{ContainerId: "c"}); err != nil {
		t.Fatal(err)
	}
	ag.Output("c", "", []byte("hello\n"))
	return ag
}

func TestFileURIGetsOutput(t *testing.T) {
	ag := ioAgent(t)
	logPath := filepath.Join(t.TempDir(), "logs", "c.log")
	h, err := startIO(context.Background(), ag, "ns", "c", "", stdioPaths{stdout: "file://" + logPath})
	if err != nil {
		t.Fatal(err)
	}
	ag.Exit("c", "", 0)
	h.drain()
	h.close()
	if b, _ := os.ReadFile(logPath); string(b) != "hello\n" {
		t.Fatalf("log file has %q, want %q", b, "hello\n")
	}
}

// TestBinaryURIRunsTheLogger checks containerd's binary:// protocol: the logger reads stdout on
// fd 3 and stderr on fd 4, gets CONTAINER_ID and CONTAINER_NAMESPACE, and closes fd 5 when ready.
func TestBinaryURIRunsTheLogger(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "out")
	logger := filepath.Join(dir, "logger.sh")
	script := "#!/bin/sh\nexec 5>&-\necho \"$CONTAINER_NAMESPACE/$CONTAINER_ID $1\" > " + out + ".env\ncat <&3 > " + out + "\n"
	if err := os.WriteFile(logger, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	ag := ioAgent(t)
	h, err := startIO(context.Background(), ag, "k8s.io", "c", "", stdioPaths{stdout: "binary://" + logger + "?tag", stderr: "binary://" + logger + "?tag"})
	if err != nil {
		t.Fatal(err)
	}
	ag.Exit("c", "", 0)
	h.drain()
	h.close() // waits for the logger to exit
	if b, _ := os.ReadFile(out); string(b) != "hello\n" {
		t.Errorf("logger got %q on fd 3, want %q", b, "hello\n")
	}
	if b, _ := os.ReadFile(out + ".env"); strings.TrimSpace(string(b)) != "k8s.io/c tag" {
		t.Errorf("logger environment and args %q, want %q", b, "k8s.io/c tag")
	}
}

func TestUnsupportedStdioScheme(t *testing.T) {
	ag := ioAgent(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := startIO(ctx, ag, "ns", "c", "", stdioPaths{stdout: "tcp://example:1"}); err == nil || !strings.Contains(err.Error(), "unsupported scheme") {
		t.Fatalf("startIO with tcp://: %v, want an unsupported-scheme error", err)
	}
}

// stdinFifo makes a stdin fifo as containerd does.
func stdinFifo(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "stdin")
	if err := unix.Mkfifo(p, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// stdinIO starts the IO of process "c" with a stdin fifo, and opens the fifo's write end as
// containerd does.
func stdinIO(t *testing.T) (*agent.Fake, *hostIO, *os.File) {
	t.Helper()
	ag := ioAgent(t)
	path := stdinFifo(t)
	h, err := startIO(context.Background(), ag, "ns", "c", "", stdioPaths{stdin: path})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.close)
	w, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	return ag, h, w
}

// waitStdin waits until the fake agent saw the end of the process's stdin.
func waitStdin(t *testing.T, ag *agent.Fake, cid string) []byte {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		b, closed := ag.Stdin(cid, "")
		if closed {
			return b
		}
		if time.Now().After(deadline) {
			t.Fatalf("the guest's stdin was never closed (%d bytes arrived)", len(b))
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestCloseIODeliversAllStdinThenEOF is `echo x | kubectl exec -i -- cat`: containerd writes
// everything into the stdin fifo, closes its end and calls CloseIO at once. All of it must
// reach the guest, then the end of it, as it does with runc.
func TestCloseIODeliversAllStdinThenEOF(t *testing.T) {
	ctx := context.Background()
	ag, h, w := stdinIO(t)
	payload := []byte(strings.Repeat("0123456789abcdef", 12<<10)) // more than a fifo holds
	written := make(chan error, 1)
	go func() { _, err := w.Write(payload); written <- errors.Join(err, w.Close()) }()
	h.startStdin(ctx, ag, "c", "")
	if err := <-written; err != nil {
		t.Fatal(err)
	}
	h.closeStdin() // CloseIO, right after the client closed its end
	if got := waitStdin(t, ag, "c"); string(got) != string(payload) {
		t.Errorf("the guest got %d of %d bytes of stdin", len(got), len(payload))
	}
}

// TestCloseIOWithAWriterLeftEndsStdin: if something still holds the fifo open after CloseIO,
// the copy is cut after a grace period and the guest's stdin closed anyway.
func TestCloseIOWithAWriterLeftEndsStdin(t *testing.T) {
	ctx := context.Background()
	ag, h, w := stdinIO(t)
	defer func() { _ = w.Close() }()
	if _, err := w.Write([]byte("partial")); err != nil {
		t.Fatal(err)
	}
	h.startStdin(ctx, ag, "c", "")
	h.closeStdin()
	if got := waitStdin(t, ag, "c"); string(got) != "partial" {
		t.Errorf("the guest got %q, want %q", got, "partial")
	}
}

// TestStdinReachesTheGuestInLargeCalls is `kubectl cp` into a pod, or `kubectl exec -i` with a
// file piped in: containerd writes the client's stream into the stdin fifo as fast as it comes.
// Each WriteStdin is a round trip to the guest, so each must carry what containerd put in
// meanwhile, not the 64 KiB a fifo holds by default.
func TestStdinReachesTheGuestInLargeCalls(t *testing.T) {
	ctx := context.Background()
	ag, h, w := stdinIO(t)
	payload := bytes.Repeat([]byte("x"), 600<<10)
	written := make(chan error, 1)
	go func() { _, err := w.Write(payload); written <- errors.Join(err, w.Close()) }()
	h.startStdin(ctx, ag, "c", "")
	if err := <-written; err != nil {
		t.Fatal(err)
	}
	if got := waitStdin(t, ag, "c"); !bytes.Equal(got, payload) {
		t.Fatalf("the guest got %d of %d bytes of stdin", len(got), len(payload))
	}
	writes := 0
	for _, c := range ag.Calls() {
		if strings.HasPrefix(c, "WriteStdin ") {
			writes++
		}
	}
	if writes > 3 {
		t.Errorf("600 KiB of stdin took %d WriteStdin calls, want at most 3", writes)
	}
}
