package integration

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/podvm/podvm/integration/harness"
)

// TestVolumesHostSubMountRemoved: a hostPath volume has a tmpfs mounted at sub/ on the node
// before the pod starts. While the pod runs, the node's admin detaches it (`umount -l
// vol/sub`) and removes its mount point (`rmdir vol/sub`): both must work with either
// runtime, since the runtime's own copies of the volume must not keep the node's directory a
// mount point. Afterwards the container sees sub/ gone (the kernel detaches the copies in
// other mount namespaces when their mount point is removed), the volume keeps working both
// ways, and a container started later in the pod gets the volume as it now is.
func TestVolumesHostSubMountRemoved(t *testing.T) {
	require(t, needRoot())
	env := volEnv(t, "") // runs runc pods too
	for _, handler := range []string{"runc", "podvm"} {
		t.Run(handler, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
			defer cancel()
			vol := volumeWithSubMount(t)
			sub := filepath.Join(vol, "sub")
			pod := runPodWithBusybox(ctx, t, env, harness.PodOptions{Name: "vol-submount-" + handler, Namespace: "it", Handler: handler})
			mk := func(name string) *runtimeapi.ContainerConfig {
				return env.ContainerConfig(harness.ContainerOptions{
					Name: name, Command: []string{"sleep", "3600"},
					Mounts: []*runtimeapi.Mount{{ContainerPath: "/data", HostPath: vol}},
				})
			}
			a := startContainer(t, ctx, env, pod, mk("a"))
			if got := volMust(ctx, t, env, a, "cat /data/sub/file"); got != "in the sub-mount" {
				t.Fatalf("/data/sub/file reads %q before the removal", got)
			}

			if err := unix.Unmount(sub, unix.MNT_DETACH); err != nil {
				t.Fatalf("umount -l %s: %v", sub, err)
			}
			if err := os.Remove(sub); err != nil {
				t.Fatalf("rmdir %s after umount -l, with a %s pod using the volume: %v", sub, handler, err)
			}

			// What the container sees: sub/ is gone (virtio-fs may answer from its cache for
			// up to a second).
			gone := waitGone(ctx, t, env, a, "/data/sub")
			if !gone {
				t.Errorf("/data/sub still exists in the container after its host directory was removed")
			}
			// The volume itself keeps working both ways.
			volMust(ctx, t, env, a, "echo from-a > /data/out && sync")
			if got := strings.TrimSpace(readHostFile(t, filepath.Join(vol, "out"))); got != "from-a" {
				t.Errorf("host reads %q from the volume, want from-a", got)
			}
			writeFile(t, filepath.Join(vol, "in"), "from-host")
			if got := volMust(ctx, t, env, a, "cat /data/in"); got != "from-host" {
				t.Errorf("container reads %q, want from-host", got)
			}
			// A container started now gets the volume as it is now.
			b := startContainer(t, ctx, env, pod, mk("b"))
			if got := volMust(ctx, t, env, b, "cat /data/in; echo; test -e /data/sub || echo no-sub"); got != "from-host\nno-sub" {
				t.Errorf("a later container reads %q, want from-host and no sub/", got)
			}
			removePod(ctx, t, env, pod)
		})
	}
	env.AssertNoLeaks(t)
}

// waitGone waits a few seconds for path to disappear in container id.
func waitGone(ctx context.Context, t *testing.T, env *harness.Env, id, path string) bool {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		code, _, _ := volSh(ctx, t, env, id, "test -e "+path)
		if code != 0 {
			return true
		}
		if time.Now().After(deadline) || errors.Is(ctx.Err(), context.Canceled) {
			return false
		}
		time.Sleep(200 * time.Millisecond)
	}
}
