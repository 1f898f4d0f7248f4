package integration

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/podvm/podvm/integration/harness"
)

// TestRuntimeFeatures checks what containerd's CRI says each runtime handler supports, as
// kubelet reads it from Status, and that a recursive read-only volume (kubelet sends it only
// to a handler that advertises it) is read-only down to its sub-mounts, where a plain
// read-only one leaves them as they are. podvm does not
// advertise user namespaces: its guest kernel cannot ID-map virtio-fs (docs/pod-semantics.md).
func TestRuntimeFeatures(t *testing.T) {
	for _, handler := range handlers {
		t.Run(handler, func(t *testing.T) {
			env := envFor(t, handler)
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
			defer cancel()
			h := runtimeHandler(t, ctx, env, handler)
			if !h.GetFeatures().GetRecursiveReadOnlyMounts() {
				t.Errorf("handler %s: features %v, want recursive read-only mounts", handler, h.GetFeatures())
			}
			t.Logf("handler %s: %v", handler, h.GetFeatures())
			if handler == "podvm" && h.GetFeatures().GetUserNamespaces() {
				t.Errorf("podvm advertises user namespaces, which its guest kernel cannot ID-map")
			}

			vol := volumeWithSubMount(t)
			pod := runPodWithBusybox(ctx, t, env, harness.PodOptions{Name: "rro", Namespace: "it", Handler: handler})
			id := startContainer(t, ctx, env, pod, env.ContainerConfig(harness.ContainerOptions{
				Name: "rro", Command: []string{"sleep", "3600"},
				Mounts: []*runtimeapi.Mount{
					{ContainerPath: "/vol", HostPath: vol, Readonly: true, RecursiveReadOnly: true,
						Propagation: runtimeapi.MountPropagation_PROPAGATION_PRIVATE},
					{ContainerPath: "/vol-ro", HostPath: vol, Readonly: true},
				},
			}))
			if got := sh(t, ctx, env, id, "cat /vol/sub/file"); got != "in the sub-mount" {
				t.Errorf("/vol/sub/file reads %q", got)
			}
			// rro: read-only all the way down; ro: only the volume's own mount.
			for p, writable := range map[string]bool{"/vol/new": false, "/vol/sub/new": false, "/vol-ro/new": false, "/vol-ro/sub/new": true} {
				if code, _, errOut := volSh(ctx, t, env, id, "touch "+p); (code == 0) != writable {
					t.Errorf("touch %s: exit %d (%s), want writable=%v", p, code, errOut, writable)
				}
			}
			env.AssertNoLeaks(t)
		})
	}
}

// runtimeHandler returns the CRI runtime handler name from containerd's Status.
func runtimeHandler(t *testing.T, ctx context.Context, env *harness.Env, name string) *runtimeapi.RuntimeHandler {
	t.Helper()
	sctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	st, err := env.Runtime.Status(sctx, false)
	if err != nil {
		t.Fatalf("Status: %v", err)
	}
	for _, h := range st.GetRuntimeHandlers() {
		if h.GetName() == name {
			return h
		}
	}
	t.Fatalf("Status lists no runtime handler %q: %v", name, st.GetRuntimeHandlers())
	return nil
}

// volumeWithSubMount makes a host directory with a writable tmpfs mounted at sub/ in it,
// holding sub/file; the tmpfs is unmounted when the test ends.
func volumeWithSubMount(t *testing.T) string {
	t.Helper()
	vol := t.TempDir()
	sub := filepath.Join(vol, "sub")
	if err := os.Mkdir(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", sub, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatalf("mount a tmpfs at %s: %v", sub, err)
	}
	t.Cleanup(func() { _ = unix.Unmount(sub, unix.MNT_DETACH) })
	if err := os.WriteFile(filepath.Join(sub, "file"), []byte("in the sub-mount"), 0o644); err != nil {
		t.Fatal(err)
	}
	return vol
}

// TestDefaultHostname runs a pod whose config names no hostname: its containers see the
// node's, as a new UTS namespace starts with it.
func TestDefaultHostname(t *testing.T) {
	node, err := os.Hostname()
	if err != nil {
		t.Fatal(err)
	}
	for _, handler := range handlers {
		t.Run(handler, func(t *testing.T) {
			env := envFor(t, handler)
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
			defer cancel()
			podCfg := env.PodSandboxConfig(harness.PodOptions{Name: "nohost", Namespace: "it", Handler: handler})
			podCfg.Hostname = ""
			pod := runPodConfig(t, ctx, env, podCfg, handler)
			id := startContainer(t, ctx, env, pod, env.ContainerConfig(harness.ContainerOptions{Command: []string{"sleep", "3600"}}))
			if got := sh(t, ctx, env, id, "hostname"); got != node {
				t.Errorf("hostname in the container %q, want the node's %q", got, node)
			}
			env.AssertNoLeaks(t)
		})
	}
}
