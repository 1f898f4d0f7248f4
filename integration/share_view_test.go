package integration

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/rootfs"
)

// shareRoot finds the mount namespace a pod's share (state dir stateDir) is mounted in: the
// shim's thread that holds it (rootfs/mountns.go), or this test process's for a share the
// test made. It returns that thread's root as a path of ours, /proc/<pid>/task/<tid>/root.
func shareRoot(t testing.TB, stateDir string) string {
	t.Helper()
	own, err := os.Readlink("/proc/self/ns/mnt")
	if err != nil {
		t.Fatal(err)
	}
	staging := filepath.Join(stateDir, rootfs.StagingDir)
	tasks, _ := filepath.Glob("/proc/[0-9]*/task/[0-9]*")
	for _, task := range tasks {
		if ns, err := os.Readlink(task + "/ns/mnt"); err != nil || ns == own {
			continue
		}
		var stx unix.Statx_t
		if unix.Statx(unix.AT_FDCWD, task+"/root"+staging, unix.AT_SYMLINK_NOFOLLOW, unix.STATX_BASIC_STATS, &stx) != nil {
			continue
		}
		if stx.Attributes_mask&unix.STATX_ATTR_MOUNT_ROOT != 0 && stx.Attributes&unix.STATX_ATTR_MOUNT_ROOT != 0 {
			return task + "/root"
		}
	}
	t.Fatalf("no mount namespace has the share of %s mounted", stateDir)
	return ""
}

// mountsIn lists the mount points strictly below dir in the mount namespace whose root is
// root (shareRoot, or /proc/self/root for the test's own), as paths of that namespace.
func mountsIn(t testing.TB, root, dir string) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(filepath.Dir(root), "mountinfo"))
	if err != nil {
		t.Fatal(err)
	}
	var below []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && strings.HasPrefix(f[4], dir+"/") {
			below = append(below, f[4])
		}
	}
	return below
}
