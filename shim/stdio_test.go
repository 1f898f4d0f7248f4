package shim

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/fifo"
)

// A container's stdio over containerd's fifos: its output arrives, and CloseIO ends stdin.
func TestStdioOverFifos(t *testing.T) {
	r := newRig(t)
	r.mustCreate("pod1", sandboxAnnotations("pod1"))
	r.mustStart("pod1", "")
	dir := t.TempDir()
	stdin, stdout := filepath.Join(dir, "stdin"), filepath.Join(dir, "stdout")
	ctx, cancel := context.WithTimeout(r.ctx, 10*time.Second)
	defer cancel()
	// containerd's side: it opens the fifos first.
	out, err := fifo.OpenFifo(ctx, stdout, syscall.O_RDONLY|syscall.O_CREAT|syscall.O_NONBLOCK, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	in, err := fifo.OpenFifo(ctx, stdin, syscall.O_WRONLY|syscall.O_CREAT|syscall.O_NONBLOCK, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	r.agent.Output("c1", "", []byte("hello\n"))
	if _, err := r.svc.Create(r.ctx, &taskAPI.CreateTaskRequest{ID: "c1", Bundle: r.bundle("c1", workloadAnnotations("pod1"), podNetns),
		Stdin: stdin, Stdout: stdout}); err != nil {
		t.Fatal(err)
	}
	r.mustStart("c1", "")
	if st := r.state("c1", ""); st.Stdin != stdin || st.Stdout != stdout {
		t.Errorf("state names stdio %q %q, want %q %q", st.Stdin, st.Stdout, stdin, stdout)
	}
	buf := make([]byte, 6)
	if _, err := io.ReadFull(out, buf); err != nil || string(buf) != "hello\n" {
		t.Errorf("stdout fifo: %q %v, want hello", buf, err)
	}
	if _, err := r.svc.CloseIO(r.ctx, &taskAPI.CloseIORequest{ID: "c1", Stdin: true}); err != nil {
		t.Fatal(err)
	}
	r.agent.Exit("c1", "", 0)
	r.wait("c1", "")
	if _, err := r.svc.Delete(r.ctx, &taskAPI.DeleteRequest{ID: "c1"}); err != nil {
		t.Fatal(err)
	}
}

func TestCreateWithABrokenBundle(t *testing.T) {
	r := newRig(t)
	dir := t.TempDir()
	if _, err := r.svc.Create(r.ctx, &taskAPI.CreateTaskRequest{ID: "x", Bundle: dir}); err == nil {
		t.Error("create without config.json: no error")
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := r.svc.Create(r.ctx, &taskAPI.CreateTaskRequest{ID: "x", Bundle: dir}); err == nil {
		t.Error("create with a broken config.json: no error")
	}
}
