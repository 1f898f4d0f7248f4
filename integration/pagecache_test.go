package integration

import (
	"bufio"
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/podvm/podvm/integration/harness"
)

// TestRootfsPageCacheKept: a file of a container's image that the guest has read is not read
// from the host again when the container opens it again. Under TCG a page the guest reads
// anew is also code QEMU translates anew, so an image whose pages the guest dropped at every
// open made every exec read and translate its binaries again (docs/storage.md).
func TestRootfsPageCacheKept(t *testing.T) {
	env := harness.Start(t, podvmOptions(t))
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	pod := runPodWithBusybox(ctx, t, env, harness.PodOptions{Name: "pagecache", Handler: "podvm"})
	id := startSleeper(ctx, t, env, pod, "c")
	size, err := strconv.ParseInt(volMust(ctx, t, env, id, "wc -c < /bin/busybox"), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	volMust(ctx, t, env, id, "cat /bin/busybox > /dev/null")

	stateDir := filepath.Join(podvmStateDir, pod.ID)
	before := virtiofsdReadBytes(t, stateDir)
	for range 3 {
		volMust(ctx, t, env, id, "cat /bin/busybox > /dev/null")
	}
	if read := virtiofsdReadBytes(t, stateDir) - before; read > size/2 {
		t.Errorf("virtiofsd read %d bytes from the host while the container read its %d-byte /bin/busybox (and ran it) 3 more times; "+
			"the guest should have kept the file's pages ([virtiofs] cache = \"keep\", which the Rust virtiofsd cannot do)", read, size)
	} else {
		t.Logf("virtiofsd read %d bytes for 3 more reads of the %d-byte /bin/busybox", read, size)
	}
	removePod(ctx, t, env, pod)
	env.AssertNoLeaks(t)
}

// virtiofsdReadBytes is what the virtiofsd processes of the VM of stateDir have read so far
// (rchar of /proc/<pid>/io: every read, of the shared files and of its socket).
func virtiofsdReadBytes(t *testing.T, stateDir string) int64 {
	t.Helper()
	pids := virtiofsdPIDs(stateDir)
	if len(pids) == 0 {
		t.Fatalf("no virtiofsd process for %s", stateDir)
	}
	var sum int64
	for _, p := range pids {
		f, err := os.Open("/proc/" + strconv.Itoa(p) + "/io")
		if err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if v, ok := strings.CutPrefix(sc.Text(), "rchar: "); ok {
				n, err := strconv.ParseInt(v, 10, 64)
				if err != nil {
					t.Fatal(err)
				}
				sum += n
			}
		}
		_ = f.Close()
	}
	return sum
}
