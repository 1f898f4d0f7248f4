package integration

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/podvm/podvm/integration/harness"
)

// TestEmptyDirMemory gives two containers of a pod an `emptyDir: {medium: Memory, sizeLimit:
// 16Mi}` as kubelet does (a 16 MiB tmpfs at pods/<uid>/volumes/kubernetes.io~empty-dir/<name>,
// bound in): both see one tmpfs of that size, full at 16 MiB. With runc that tmpfs is the
// host's; with podvm it is a tmpfs in the guest, of the same size, whose pages are the VM's:
// nothing written to it lands on the host.
func TestEmptyDirMemory(t *testing.T) {
	for _, handler := range handlers {
		t.Run(handler, func(t *testing.T) {
			env := envFor(t, handler)
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
			defer cancel()
			vol := memoryEmptyDir(t, "16m")
			pod := runPodWithBusybox(ctx, t, env, harness.PodOptions{Name: "memdir", Namespace: "it", Handler: handler})
			mounts := []*runtimeapi.Mount{{ContainerPath: "/cache", HostPath: vol}}
			a := startContainer(t, ctx, env, pod, env.ContainerConfig(harness.ContainerOptions{Name: "a", Command: []string{"sleep", "3600"}, Mounts: mounts}))
			b := startContainer(t, ctx, env, pod, env.ContainerConfig(harness.ContainerOptions{Name: "b", Command: []string{"sleep", "3600"}, Mounts: mounts}))

			if fs := sh(t, ctx, env, a, "stat -f -c %T /cache"); fs != "tmpfs" {
				t.Errorf("/cache is %q, want tmpfs", fs)
			}
			if size := sh(t, ctx, env, a, "df -k /cache | tail -1 | awk '{print $2}'"); size != "16384" {
				t.Errorf("/cache is %s KiB, want 16384 (the sizeLimit)", size)
			}
			if mode := sh(t, ctx, env, a, "stat -c %a /cache"); mode != "777" {
				t.Errorf("/cache has mode %s, want 777 as kubelet makes emptyDirs", mode)
			}
			sh(t, ctx, env, a, "echo from-a > /cache/note")
			if got := sh(t, ctx, env, b, "cat /cache/note"); got != "from-a" {
				t.Errorf("container b reads %q from the shared emptyDir, want from-a", got)
			}
			if code, _, _ := volSh(ctx, t, env, b, "dd if=/dev/zero of=/cache/big bs=1M count=20"); code == 0 {
				t.Errorf("20 MiB fit in a 16 MiB emptyDir")
			}
			_, onHost := os.Stat(filepath.Join(vol, "note"))
			if handler == "runc" && onHost != nil {
				t.Errorf("runc: the note is not in the host tmpfs: %v", onHost)
			}
			if handler == "podvm" && onHost == nil {
				t.Errorf("podvm: the note landed in the host tmpfs, want it in guest memory")
			}
			env.AssertNoLeaks(t)
		})
	}
}

// memoryEmptyDir makes a memory-backed emptyDir as kubelet does: a tmpfs of the given size,
// mode 0777, mounted at <tmp>/pods/<uid>/volumes/kubernetes.io~empty-dir/cache; it is
// unmounted when the test ends.
func memoryEmptyDir(t *testing.T, size string) string {
	t.Helper()
	vol := podVolume(t, t.TempDir(), "uid-"+strings.ToLower(t.Name()[len(t.Name())-4:]), "empty-dir", "cache", nil)
	if err := unix.Mount("tmpfs", vol, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "size="+size); err != nil {
		t.Fatalf("mount a tmpfs at %s: %v", vol, err)
	}
	t.Cleanup(func() { _ = unix.Unmount(vol, unix.MNT_DETACH) })
	if err := os.Chmod(vol, 0o777); err != nil {
		t.Fatal(err)
	}
	return vol
}
