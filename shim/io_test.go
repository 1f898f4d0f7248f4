package shim

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

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
