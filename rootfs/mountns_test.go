package rootfs

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestMountNSThread: each share's namespace is held by a thread of its own that is never the
// process's main thread (whose namespace /proc/self shows and must stay the node's), and
// that thread ends with close.
func TestMountNSThread(t *testing.T) {
	needRoot(t)
	own, err := os.Readlink("/proc/self/ns/mnt")
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 20; i++ {
		n, err := newMountNS()
		if err != nil {
			t.Fatal(err)
		}
		task := filepath.Dir(n.view())
		ns, err := os.Readlink(filepath.Join(task, "ns", "mnt"))
		if err != nil {
			t.Fatal(err)
		}
		var tid int
		if err := n.run(func() error { tid = unix.Gettid(); return nil }); err != nil {
			t.Fatal(err)
		}
		if tid != n.tid || tid == unix.Getpid() || ns == own {
			t.Fatalf("run on thread %d (namespace's %d, main %d), namespace %s (process's %s)", tid, n.tid, unix.Getpid(), ns, own)
		}
		if now, _ := os.Readlink("/proc/self/ns/mnt"); now != own {
			t.Fatalf("the process's namespace became %s", now)
		}
		n.close()
		if err := n.run(func() error { return nil }); !errors.Is(err, errNSClosed) {
			t.Errorf("run after close: %v", err)
		}
		deadline := time.Now().Add(5 * time.Second)
		for {
			if _, err := os.Stat(task); errors.Is(err, os.ErrNotExist) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("thread %s still there after close", task)
			}
			time.Sleep(time.Millisecond)
		}
	}
}
