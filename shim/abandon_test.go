package shim

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/errdefs"

	"github.com/podvm/podvm/hypervisor"
	"github.com/podvm/podvm/rootfs"
)

// What containerd does when its Create call of a task gives up (the CRI call's deadline
// passed while the guest did not answer): it deletes the task (not found: still being
// created), shuts the shim down, closes the connection and runs `shim delete`
// (core/runtime/v2 cleanupStartedShim). These tests replay that against the task service.

// giveUp is containerd's Delete and Shutdown of a task whose create it gave up on.
func (r *rig) giveUp(id string) {
	r.t.Helper()
	if _, err := r.svc.Delete(r.ctx, &taskAPI.DeleteRequest{ID: id}); !errdefs.IsNotFound(native(err)) {
		r.t.Fatalf("delete of %s while it is created: %v, want not found", id, err)
	}
	r.shutdownAfterGiveUp(id)
}

// shutdownAfterGiveUp is containerd's Shutdown after it gave up on id. The shim may have
// ended already (the create was undone): then the call fails, as containerd expects.
func (r *rig) shutdownAfterGiveUp(id string) {
	r.t.Helper()
	_, err := r.svc.Shutdown(r.ctx, &taskAPI.ShutdownRequest{ID: id})
	select {
	case <-r.sd.Done():
	default:
		if err != nil {
			r.t.Fatal(err)
		}
	}
}

// gone checks that the pod's VM, its state dir and the shim are gone, or go within a moment.
func (r *rig) gone(id string) {
	r.t.Helper()
	select {
	case <-r.sd.Done():
	case <-time.After(5 * time.Second):
		r.t.Error("the shim did not end after containerd gave up on its only create and shut it down")
	}
	if _, stopped, _ := r.vm.State(); !stopped {
		r.t.Error("the VM of the create containerd gave up on is still running")
	}
	if _, err := os.Stat(filepath.Join(r.stateDir, id)); !errors.Is(err, os.ErrNotExist) {
		r.t.Errorf("the state dir of the create containerd gave up on is left: %v", err)
	}
}

// A guest that does not answer: containerd gives up first, and the shim's boot, still waiting
// for the agent, is cancelled and undone rather than left to its own timeout; then the shim
// ends, as containerd asked.
func TestCreateContainerdGaveUpOnIsUndone(t *testing.T) {
	r := newRig(t)
	waiting := make(chan struct{})
	r.beforeConnect = func(ctx context.Context) error {
		close(waiting)
		<-ctx.Done()
		return ctx.Err()
	}
	created := make(chan error, 1)
	go func() {
		_, err := r.create("pod1", sandboxAnnotations("pod1"), podNetns)
		created <- err
	}()
	<-waiting
	r.giveUp("pod1")
	select {
	case err := <-created:
		if err == nil {
			t.Error("a create containerd gave up on succeeded")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the create containerd gave up on still waits for the guest")
	}
	r.gone("pod1")
}

// A create that finishes just after containerd gave up on it must not leave a pod containerd
// will never delete.
func TestCreateFinishedAfterContainerdGaveUpIsUndone(t *testing.T) {
	r := newRig(t)
	waiting, answer := make(chan struct{}), make(chan struct{})
	r.beforeConnect = func(context.Context) error {
		close(waiting)
		<-answer // the guest answers late, whatever the shim wants
		return nil
	}
	created := make(chan error, 1)
	go func() {
		_, err := r.create("pod1", sandboxAnnotations("pod1"), podNetns)
		created <- err
	}()
	<-waiting
	if _, err := r.svc.Delete(r.ctx, &taskAPI.DeleteRequest{ID: "pod1"}); !errdefs.IsNotFound(native(err)) {
		t.Fatalf("delete of pod1 while it is created: %v, want not found", err)
	}
	close(answer)
	select {
	case err := <-created:
		if err == nil {
			t.Error("a create containerd gave up on (it deleted the task) succeeded")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the create did not return")
	}
	r.shutdownAfterGiveUp("pod1")
	r.gone("pod1")
}

// `shim delete` beside a live shim that still runs (or cleans up) the pod's VM waits for it
// rather than cleaning up the same VM at the same time, and has nothing left to do after.
func TestShimDeleteWaitsForTheLiveShim(t *testing.T) {
	r := newRig(t)
	bundle := r.bundle("pod1", sandboxAnnotations("pod1"), podNetns)
	if _, err := r.svc.Create(r.ctx, &taskAPI.CreateTaskRequest{ID: "pod1", Bundle: bundle}); err != nil {
		t.Fatal(err)
	}
	r.mustStart("pod1", "")
	state := filepath.Join(r.stateDir, "pod1")
	cleanups := 0
	drv := r.fakeDriver()
	drv.Cleanup = func(context.Context, string) error { cleanups++; return nil }
	m := manager{drivers: hypervisor.NewDrivers(drv)}
	t.Chdir(bundle)
	done := make(chan error, 1)
	go func() {
		_, err := m.Stop(r.ctx, "pod1")
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("shim delete returned (%v) while the live shim runs the pod", err)
	case <-time.After(300 * time.Millisecond):
	}
	if _, err := os.Stat(state); err != nil {
		t.Fatalf("shim delete removed the state dir of a live shim's pod: %v", err)
	}
	r.deleteSandbox("pod1")
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("shim delete still waits after the live shim cleaned up")
	}
	if cleanups != 0 {
		t.Errorf("shim delete cleaned up %d times after the live shim did", cleanups)
	}
}

// containerd runs `shim delete` for a workload container whenever its connection for the
// container closes (core/runtime/v2: the ttrpc client's close callback), which is at every
// delete of the container, while the pod's shim lives on. The live shim owns the container's
// files (its lock on the state dir says so): `shim delete` leaves them alone, at once, rather
// than doing the shim's clean-up beside it. In the node's mount namespace there is little to
// take (the share is mounted in the shim's own); during a create, mnt/<id> holds containerd's
// rootfs mount there for a moment. The test's directories stand in for such files.
func TestShimDeleteOfAContainerLeavesTheLiveShimsFiles(t *testing.T) {
	r := newRig(t)
	r.mustCreate("pod1", sandboxAnnotations("pod1"))
	r.mustStart("pod1", "")
	bundle := r.bundle("c1", workloadAnnotations("pod1"), podNetns)
	if _, err := r.svc.Create(r.ctx, &taskAPI.CreateTaskRequest{ID: "c1", Bundle: bundle}); err != nil {
		t.Fatal(err)
	}
	r.mustStart("c1", "")
	state := filepath.Join(r.stateDir, "pod1")
	var points []string
	for _, dir := range []string{rootfs.StagingDir, rootfs.MountDir} {
		p := filepath.Join(state, dir, "c1", "rootfs")
		if err := os.MkdirAll(p, 0o700); err != nil {
			t.Fatal(err)
		}
		points = append(points, p)
	}
	t.Chdir(bundle)
	done := make(chan error, 1)
	go func() {
		_, err := manager{drivers: hypervisor.NewDrivers(r.fakeDriver())}.Stop(r.ctx, "c1")
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(time.Second):
		t.Fatal("shim delete of a container waits for the live shim of its pod; it has nothing to do")
	}
	for _, p := range points {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("shim delete of c1 removed its files while the pod's shim runs it: %v", err)
		}
	}
}

// Once the pod's shim is gone, `shim delete` of a container cleans up the container's files.
func TestShimDeleteOfAContainerCleansUpAfterADeadShim(t *testing.T) {
	bundle, state := t.TempDir(), filepath.Join(t.TempDir(), "pod1")
	var points []string
	for _, dir := range []string{rootfs.StagingDir, rootfs.MountDir} {
		p := filepath.Join(state, dir, "c1", "rootfs")
		if err := os.MkdirAll(p, 0o700); err != nil {
			t.Fatal(err)
		}
		points = append(points, filepath.Dir(p))
	}
	if err := (record{SandboxID: "pod1", StateDir: state}).write(bundle); err != nil {
		t.Fatal(err)
	}
	t.Chdir(bundle)
	if _, err := (manager{}).Stop(context.Background(), "c1"); err != nil {
		t.Fatal(err)
	}
	for _, p := range points {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("shim delete of c1 after its shim died left %s: %v", p, err)
		}
	}
	if _, err := os.Stat(state); err != nil {
		t.Errorf("shim delete of a container removed the pod's state dir: %v", err)
	}
}
