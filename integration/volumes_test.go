package integration

// Volumes through the CRI, as kubelet passes them: bind-mounted directories and files
// (emptyDir, configMap, secret, hostPath, subPath), block devices (volumeMode: Block) and
// disk-image volumes (podvm.io/disk.<volume>). docs/storage.md describes what each becomes in
// a VM pod.

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/podvm/podvm/integration/harness"
	"github.com/podvm/podvm/internal/testutil"
)

// volEnv is podvmEnv with a podvm state dir of its own, so that other tests' VMs running on
// the same machine at the same time are not taken for this test's leaks: its leak check looks
// for processes naming its state dir and for mounts under it. Block settings go to [block].
func volEnv(t *testing.T, block string, allowed ...string) *harness.Env {
	t.Helper()
	require(t, needRoot())
	return harness.Start(t, podvmShimOptions(t, ownStateDir(t, "pvv-"), block, allowed...))
}

// createContainer creates a container from cfg in pod.
func createContainer(ctx context.Context, env *harness.Env, pod *harness.Pod, cfg *runtimeapi.ContainerConfig) (string, error) {
	cctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	return env.Runtime.CreateContainer(cctx, pod.ID, cfg, pod.Config)
}

// volSh runs a shell script in a container and returns its exit code, stdout and stderr.
func volSh(ctx context.Context, t *testing.T, env *harness.Env, id, script string) (int, string, string) {
	t.Helper()
	cctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	stdout, stderr, err := env.Runtime.ExecSync(cctx, id, []string{"sh", "-c", script}, 100*time.Second)
	code := execSyncExitCode(err)
	if code < 0 {
		t.Fatalf("exec %q in %s: %v", script, id, err)
	}
	return code, strings.TrimSpace(string(stdout)), strings.TrimSpace(string(stderr))
}

// volMust runs a script that must succeed and returns its stdout.
func volMust(ctx context.Context, t *testing.T, env *harness.Env, id, script string) string {
	t.Helper()
	code, out, errOut := volSh(ctx, t, env, id, script)
	if code != 0 {
		t.Fatalf("exec %q in %s: exit %d (stdout %q, stderr %q)", script, id, code, out, errOut)
	}
	return out
}

// runPodWithBusybox runs a pod and pulls the busybox image for it.
func runPodWithBusybox(ctx context.Context, t testing.TB, env *harness.Env, o harness.PodOptions) *harness.Pod {
	t.Helper()
	pod, err := env.RunPod(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := env.PullImage(ctx, env.BusyboxImage, pod.Config); err != nil {
		t.Fatal(err)
	}
	return pod
}

// kubeletVolume makes a volume directory where kubelet would: <root>/pods/<uid>/volumes/
// kubernetes.io~<plugin>/<name>.
func kubeletVolume(t *testing.T, root, plugin, name string, files map[string]string) string {
	t.Helper()
	return podVolume(t, root, "uid-1", plugin, name, files)
}

// podVolume is kubeletVolume for the pod with UID uid.
func podVolume(t *testing.T, root, uid, plugin, name string, files map[string]string) string {
	t.Helper()
	d := filepath.Join(root, "pods", uid, "volumes", "kubernetes.io~"+plugin, name)
	if err := os.MkdirAll(d, 0o755); err != nil {
		t.Fatal(err)
	}
	for n, c := range files {
		writeFile(t, filepath.Join(d, n), c)
	}
	return d
}

// TestVolumesBind: the bind-mounted volumes kubelet makes, for runc and podvm alike.
func TestVolumesBind(t *testing.T) {
	require(t, needRoot())
	env := volEnv(t, "") // runs runc pods too
	for _, handler := range []string{"runc", "podvm"} {
		t.Run(handler, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
			defer cancel()
			v := newBindVolumes(t)
			pod := runPodWithBusybox(ctx, t, env, harness.PodOptions{Name: "vol-bind-" + handler, Namespace: "it", Handler: handler})
			mk := func(name string) *runtimeapi.ContainerConfig {
				cfg := env.ContainerConfig(harness.ContainerOptions{Name: name, Command: []string{"sleep", "3600"}})
				cfg.Mounts = v.mounts()
				return cfg
			}
			a := startContainer(t, ctx, env, pod, mk("a"))
			b := startContainer(t, ctx, env, pod, mk("b"))
			v.check(ctx, t, env, a, b)
			removePod(ctx, t, env, pod)
		})
	}
	env.AssertNoLeaks(t)
}

// bindVolumes are TestVolumesBind's volumes, as kubelet makes them on the node.
type bindVolumes struct {
	empty, cm, secret, hostPath string
	subFile                     string // subPath: kubelet binds a single file of a volume
}

func newBindVolumes(t *testing.T) *bindVolumes {
	root := t.TempDir()
	v := &bindVolumes{
		empty:    kubeletVolume(t, root, "empty-dir", "cache", nil),
		cm:       kubeletVolume(t, root, "configmap", "config", map[string]string{"app.properties": "color=blue\n"}),
		secret:   kubeletVolume(t, root, "secret", "creds", map[string]string{"password": "s3cret"}),
		hostPath: filepath.Join(root, "host"),
		subFile:  filepath.Join(root, "pods", "uid-1", "volume-subpaths", "config", "app", "0"),
	}
	for _, d := range []string{v.hostPath, filepath.Dir(v.subFile)} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	writeFile(t, v.subFile, "sub=path\n")
	return v
}

// mounts are the CRI mounts of a container with every volume.
func (v *bindVolumes) mounts() []*runtimeapi.Mount {
	return []*runtimeapi.Mount{
		{ContainerPath: "/cache", HostPath: v.empty},
		{ContainerPath: "/etc/config", HostPath: v.cm, Readonly: true},
		{ContainerPath: "/etc/creds", HostPath: v.secret, Readonly: true},
		{ContainerPath: "/host", HostPath: v.hostPath},
		{ContainerPath: "/etc/app.conf", HostPath: v.subFile, Readonly: true},
	}
}

// check checks each volume from containers a and b (both with mounts) and from the host.
func (v *bindVolumes) check(ctx context.Context, t *testing.T, env *harness.Env, a, b string) {
	t.Helper()
	// emptyDir: one container's write is the other's read.
	volMust(ctx, t, env, a, "echo from-a > /cache/shared")
	if got := volMust(ctx, t, env, b, "cat /cache/shared"); got != "from-a" {
		t.Errorf("emptyDir: b read %q, want from-a", got)
	}
	// configMap and secret: readable, not writable.
	if got := volMust(ctx, t, env, a, "cat /etc/config/app.properties /etc/creds/password"); got != "color=blue\ns3cret" {
		t.Errorf("configMap/secret read %q", got)
	}
	for _, p := range []string{"/etc/config/new", "/etc/creds/password"} {
		code, _, errOut := volSh(ctx, t, env, a, "echo x > "+p)
		if code == 0 {
			t.Errorf("writing %s in a read-only volume succeeded", p)
		} else if !strings.Contains(errOut, "Read-only") {
			t.Errorf("writing %s: %q, want a read-only file system error", p, errOut)
		}
	}
	if readHostFile(t, filepath.Join(v.secret, "password")) != "s3cret" {
		t.Error("secret changed on the host")
	}
	// hostPath: writes land on the host, host writes are seen.
	volMust(ctx, t, env, a, "echo to-host > /host/out && sync")
	if got := strings.TrimSpace(readHostFile(t, filepath.Join(v.hostPath, "out"))); got != "to-host" {
		t.Errorf("hostPath: host read %q, want to-host", got)
	}
	in := filepath.Join(v.hostPath, "in")
	writeFile(t, in, "from-host")
	if got := volMust(ctx, t, env, b, "cat /host/in"); got != "from-host" {
		t.Errorf("hostPath: container read %q, want from-host", got)
	}
	// A file the container has read, changed by the host in place (same inode): the
	// container sees the change, with podvm within the guest's 1 s metadata timeout. Same
	// size first, so only its mtime tells the guest, then longer.
	rewriteInPlace(t, in, "FROM-HOST")
	readsWithin(ctx, t, env, b, "cat /host/in", "FROM-HOST", 5*time.Second)
	rewriteInPlace(t, in, "FROM-HOST, longer")
	readsWithin(ctx, t, env, b, "cat /host/in", "FROM-HOST, longer", 5*time.Second)
	// subPath file: that one file, read-only.
	if got := volMust(ctx, t, env, b, "cat /etc/app.conf"); got != "sub=path" {
		t.Errorf("subPath file read %q", got)
	}
	if code, _, _ := volSh(ctx, t, env, b, "echo x >> /etc/app.conf"); code == 0 {
		t.Error("appending to a read-only subPath file succeeded")
	}
}

// rewriteInPlace writes content over the start of file p, which keeps its inode.
func rewriteInPlace(t *testing.T, p, content string) {
	t.Helper()
	f, err := os.OpenFile(p, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte(content), 0); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// readsWithin runs script in container id until its output is want, for at most limit.
func readsWithin(ctx context.Context, t *testing.T, env *harness.Env, id, script, want string, limit time.Duration) {
	t.Helper()
	start := time.Now()
	for {
		got := volMust(ctx, t, env, id, script)
		if got == want {
			t.Logf("%q read %q after %v", script, want, time.Since(start).Round(time.Millisecond))
			return
		}
		if time.Since(start) > limit {
			t.Errorf("%q: read %q %v after the host's change, want %q", script, got, limit, want)
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// losetup attaches a new sparse file of size bytes to a loop device, detached at cleanup.
func losetup(t *testing.T, size int64) string {
	t.Helper()
	require(t, needCmd("losetup"))
	dev, err := testutil.LoopDevice(t, size)
	if err != nil {
		t.Fatal(err)
	}
	return dev
}

// qemuHolds reports whether the pod's QEMU has path open.
func qemuHolds(t *testing.T, podID, path string) bool {
	t.Helper()
	for _, pid := range harness.QEMUs(podID) {
		dir := fmt.Sprintf("/proc/%d/fd", pid)
		fds, _ := os.ReadDir(dir)
		for _, fd := range fds {
			if l, err := os.Readlink(filepath.Join(dir, fd.Name())); err == nil && l == path {
				return true
			}
		}
	}
	return false
}

// TestVolumesBlockDevice: a CRI Device (a PVC with volumeMode: Block) is hot-plugged into the
// pod's VM, appears at its container path, keeps its data across pods, and is unplugged when
// its container goes while the pod's other containers keep running.
func TestVolumesBlockDevice(t *testing.T) {
	require(t, needRoot())
	dev := losetup(t, 64<<20)
	env := volEnv(t, "")
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
	defer cancel()
	const payload = "podvm-block-volume-data"

	pod := runPodWithBusybox(ctx, t, env, harness.PodOptions{Name: "vol-block", Namespace: "it", Handler: "podvm"})
	other := startContainer(t, ctx, env, pod, env.ContainerConfig(harness.ContainerOptions{Name: "other", Command: []string{"sleep", "3600"}}))
	cfg := env.ContainerConfig(harness.ContainerOptions{Name: "writer", Command: []string{"sleep", "3600"}})
	cfg.Devices = []*runtimeapi.Device{{ContainerPath: "/dev/xvda", HostPath: dev, Permissions: "rwm"}}
	writer := startContainer(t, ctx, env, pod, cfg)
	if !qemuHolds(t, pod.ID, dev) {
		t.Errorf("QEMU has no open %s after the container was created", dev)
	}
	if got := volMust(ctx, t, env, writer, "test -b /dev/xvda && echo block"); got != "block" {
		t.Fatalf("/dev/xvda in the container: %q", got)
	}
	volMust(ctx, t, env, writer, "printf "+payload+" > /tmp/p && dd if=/tmp/p of=/dev/xvda bs=512 conv=sync,fsync 2>/dev/null")
	// The guest's disks, by serial (sysfs is the guest's, whichever container reads it).
	const serials = "for d in /sys/block/vd*; do test -e $d/serial && { cat $d/serial; echo; }; done; true"
	disks := volMust(ctx, t, env, other, serials)
	if disks == "" {
		t.Fatal("the guest lists no virtio disk while the block device is attached")
	}

	// Unplug with the container: the disk leaves the guest and QEMU lets go of the device,
	// while the pod's other container keeps answering.
	start := time.Now()
	removeContainer(ctx, t, env, writer, 1)
	t.Logf("removing the container with the block device (device_del + blockdev-del) took %v", time.Since(start).Round(time.Millisecond))
	if got := volMust(ctx, t, env, other, serials); got != "" {
		t.Errorf("guest still has disks %q after the container was removed (had %q)", got, disks)
	}
	if qemuHolds(t, pod.ID, dev) {
		t.Errorf("QEMU still holds %s after the container was removed", dev)
	}
	if got := volMust(ctx, t, env, other, "echo alive"); got != "alive" {
		t.Errorf("the other container: %q", got)
	}
	b, err := os.ReadFile(dev)
	if err != nil || !bytes.HasPrefix(b, []byte(payload)) {
		t.Errorf("the host device does not start with what the container wrote (%v): %q", err, b[:min(len(b), 32)])
	}
	removePod(ctx, t, env, pod)

	// A new pod reads it back, from a read-only device at another path.
	pod = runPodWithBusybox(ctx, t, env, harness.PodOptions{Name: "vol-block-2", Namespace: "it", Handler: "podvm"})
	cfg = env.ContainerConfig(harness.ContainerOptions{Name: "reader", Command: []string{"sleep", "3600"}})
	cfg.Devices = []*runtimeapi.Device{{ContainerPath: "/dev/data", HostPath: dev, Permissions: "r"}}
	reader := startContainer(t, ctx, env, pod, cfg)
	if got := volMust(ctx, t, env, reader, "dd if=/dev/data bs=512 count=1 2>/dev/null | head -c 23"); got != payload {
		t.Errorf("new pod read %q, want %q", got, payload)
	}
	if code, _, _ := volSh(ctx, t, env, reader, "echo x | dd of=/dev/data conv=fsync 2>/dev/null"); code == 0 {
		t.Error("writing a device given with permissions \"r\" succeeded")
	}
	removePod(ctx, t, env, pod)
	env.AssertNoLeaks(t)
}

// TestVolumesBlockDeviceWithoutIOUring: on a host that refuses io_uring to QEMU
// (kernel.io_uring_disabled = 2 here; a seccomp profile does the same), a block volume with
// the default block.aio still reaches the container, through aio threads, and the shim's log
// says so.
func TestVolumesBlockDeviceWithoutIOUring(t *testing.T) {
	require(t, needRoot())
	const knob = "/proc/sys/kernel/io_uring_disabled"
	old, err := os.ReadFile(knob)
	if err != nil {
		// Kernels before 6.6 have no switch to refuse io_uring with.
		require(t, knob+" (Linux 6.6 or later)")
	}
	if err := os.WriteFile(knob, []byte("2"), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := os.WriteFile(knob, old, 0o644); err != nil {
			t.Errorf("restoring %s: %v", knob, err)
		}
	})
	dev := losetup(t, 16<<20)
	env := volEnv(t, "")
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
	defer cancel()
	pod := runPodWithBusybox(ctx, t, env, harness.PodOptions{Name: "vol-nouring", Namespace: "it", Handler: "podvm"})
	cfg := env.ContainerConfig(harness.ContainerOptions{Name: "writer", Command: []string{"sleep", "3600"}})
	cfg.Devices = []*runtimeapi.Device{{ContainerPath: "/dev/xvda", HostPath: dev, Permissions: "rwm"}}
	writer := startContainer(t, ctx, env, pod, cfg)
	const payload = "without-io-uring"
	volMust(ctx, t, env, writer, "printf "+payload+" > /tmp/p && dd if=/tmp/p of=/dev/xvda bs=512 conv=sync,fsync 2>/dev/null")
	if got := volMust(ctx, t, env, writer, "head -c "+strconv.Itoa(len(payload))+" /dev/xvda"); got != payload {
		t.Errorf("read back %q from the block device, want %q", got, payload)
	}
	b, err := os.ReadFile(env.ContainerdLog)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), "the host refuses io_uring: block devices use aio threads") {
		t.Error("the shim's log does not say that the VM's disks fell back to aio threads")
	}
	removePod(ctx, t, env, pod)
	env.AssertNoLeaks(t)
}

// TestVolumesDiskImage: podvm.io/disk.<volume> makes a filesystem volume a virtio-blk disk
// backed by disk.img in the volume's directory; it keeps its data across pods and stays a
// valid ext4 image. A corrupt image fails the container with an error naming the volume.
func TestVolumesDiskImage(t *testing.T) {
	require(t, needRoot(), needCmd("e2fsck"), needCmd("debugfs"))
	env := volEnv(t, `cache = "writeback"`+"\n"+`aio = "threads"`, "disk.*")
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
	defer cancel()
	root := t.TempDir()
	// Disk images are only ever made in the pod's own volume dirs (pods/<its uid>/...).
	data := podVolume(t, root, "uid-vd1", "csi", "data", nil)
	junk := podVolume(t, root, "uid-vd1", "csi", "junk", map[string]string{"disk.img": strings.Repeat("not ext4", 1024)})
	ann := map[string]string{"podvm.io/disk.data": "64Mi", "podvm.io/disk.junk": "64Mi"}
	withVolume := func(name, vol, hostDir string) *runtimeapi.ContainerConfig {
		cfg := env.ContainerConfig(harness.ContainerOptions{Name: name, Command: []string{"sleep", "3600"}})
		cfg.Mounts = []*runtimeapi.Mount{{ContainerPath: "/" + vol, HostPath: hostDir}}
		return cfg
	}

	pod := runPodWithBusybox(ctx, t, env, harness.PodOptions{Name: "vol-disk", Namespace: "it", UID: "uid-vd1", Handler: "podvm", Annotations: ann})
	w := startContainer(t, ctx, env, pod, withVolume("writer", "data", data))
	volMust(ctx, t, env, w, "echo disk-image-data > /data/hello && sync")
	if got := volMust(ctx, t, env, w, "grep ' /data ' /proc/mounts | cut -d' ' -f3"); got != "ext4" {
		t.Errorf("/data in the container is %q, want ext4", got)
	}
	if _, err := os.Stat(filepath.Join(data, "hello")); err == nil {
		t.Error("the write went to the shared volume directory, not the disk image")
	}
	// CRI creates the task (and so the shim prepares its volumes) at StartContainer.
	bad, err := createContainer(ctx, env, pod, withVolume("bad", "junk", junk))
	if err == nil {
		sctx, scancel := context.WithTimeout(ctx, callTimeout)
		err = env.Runtime.StartContainer(sctx, bad)
		scancel()
	}
	if err == nil || !strings.Contains(err.Error(), "volume junk") || !strings.Contains(err.Error(), "podvm.io/disk.junk") {
		t.Errorf("a corrupt image: err = %v, want one naming the volume and the annotation", err)
	} else {
		t.Logf("corrupt image refused: %v", err)
	}
	removePod(ctx, t, env, pod)

	// The volume moves on to the next pod, as a PVC's data does.
	next := filepath.Join(root, "pods", "uid-vd2", "volumes", "kubernetes.io~csi", "data")
	if err := os.MkdirAll(filepath.Dir(next), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(data, next); err != nil {
		t.Fatal(err)
	}
	data = next
	pod = runPodWithBusybox(ctx, t, env, harness.PodOptions{Name: "vol-disk-2", Namespace: "it", UID: "uid-vd2", Handler: "podvm", Annotations: ann})
	r := startContainer(t, ctx, env, pod, withVolume("reader", "data", data))
	if got := volMust(ctx, t, env, r, "cat /data/hello"); got != "disk-image-data" {
		t.Errorf("next pod read %q, want disk-image-data", got)
	}
	removePod(ctx, t, env, pod)

	img := filepath.Join(data, "disk.img")
	if out, err := exec.Command("e2fsck", "-n", "-f", img).CombinedOutput(); err != nil {
		t.Errorf("e2fsck -n %s: %v\n%s", img, err, out)
	}
	if out, err := exec.Command("debugfs", "-R", "cat /hello", img).Output(); err != nil || strings.TrimSpace(string(out)) != "disk-image-data" {
		t.Errorf("debugfs cat /hello in %s: %q, %v", img, out, err)
	}
	if b, _ := os.ReadFile(filepath.Join(junk, "disk.img")); !bytes.HasPrefix(b, []byte("not ext4")) {
		t.Error("the corrupt image was changed")
	}
	env.AssertNoLeaks(t)
}
