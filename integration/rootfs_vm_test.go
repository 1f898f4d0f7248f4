package integration

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/oci"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/podvm/podvm/agent/api"
	"github.com/podvm/podvm/rootfs"
)

// TestRootfsShareInVM runs two containers of one pod in a real VM with their filesystems
// shared by package rootfs: an overlay rootfs each (over one busybox lower dir), a read-only
// configMap dir, an emptyDir shared between them, a file bind onto /etc/hostname and the
// pod's /dev/shm. It checks from inside the guest what each should see and that nothing
// stays mounted after Release.
func TestRootfsShareInVM(t *testing.T) {
	ctx, stateDir := vmTest(t, 5*time.Minute)
	// Runs after the VM's stop and before checkNoLeftovers. VM.Stop returns once the
	// virtiofsd it started has exited, but the C virtiofsd's sandbox child (same command
	// line) can still be exiting for a moment (it was when it held the last reference to a
	// detached overlay rootfs; Release now syncs first). Allow that, and say so, rather than
	// fail on a process that is already going away.
	t.Cleanup(func() { waitProcessesGone(t, stateDir, 10*time.Second) })
	g := bootVMWith(t, ctx, stateDir, vmOptions{Share: true})
	p := newSharedPod(t, ctx, g)

	p.prepare("a", "sh", "-c", `cat /cfg/key
if echo x > /cfg/key; then echo "configmap WRITABLE"; fi
cat /etc/hostname
echo from-a > /data/shared
echo shm-from-a > /dev/shm/seg
echo rootfs-write > /written`)
	stdout, stderr, code := p.run("a")
	t.Logf("container a: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	p.checkWriter(stdout, stderr, code)

	p.prepare("b", "sh", "-c", `cat /data/shared; cat /dev/shm/seg; test -e /written && echo "rootfs LEAKED"; true`)
	stdout, stderr, code = p.run("b")
	if code != 0 || stdout != "from-a\nshm-from-a\n" {
		t.Errorf("container b: exit %d stdout %q stderr %q; want a's emptyDir file and shm segment, and not a's rootfs",
			code, stdout, stderr)
	}

	// The share's mounts are in its own namespace: the node's has none of them (so none
	// keeps a volume's directory busy there).
	if left := mountsIn(t, "/proc/self/root", stateDir); len(left) > 0 {
		t.Errorf("the share has mounts in the node's mount namespace: %v", left)
	}
	for _, id := range []string{"a", "b"} {
		if err := p.share.Release(ctx, id); err != nil {
			t.Fatalf("release %s: %v", id, err)
		}
	}
	root := shareRoot(t, stateDir)
	if left := mountsIn(t, root, g.sharedDir); len(left) > 0 {
		t.Errorf("mounts left under the shared dir after Release: %v", left)
	}
	if entries, err := os.ReadDir(root + g.sharedDir); err != nil || len(entries) > 0 {
		t.Errorf("%d entries left in the shared dir after Release (%v)", len(entries), err)
	}
	if got := readHostFile(t, filepath.Join(p.emptyDir, "shared")); got != "from-a\n" {
		t.Errorf("Release disturbed the emptyDir: %q", got)
	}
}

// sharedPod is TestRootfsShareInVM's pod: the host side (a snapshot-like lower dir and
// kubelet-like volumes) and the VM whose share its containers go through.
type sharedPod struct {
	t                                *testing.T
	ctx                              context.Context
	g                                *guestVM
	share                            *rootfs.Share
	host, lower                      string
	configMap, emptyDir, etcHostname string
	mounts                           []specs.Mount
	uppers                           map[string]string // container ID -> its overlay's upper dir
}

func newSharedPod(t *testing.T, ctx context.Context, g *guestVM) *sharedPod {
	host := t.TempDir()
	p := &sharedPod{t: t, ctx: ctx, g: g, share: g.share, host: host, lower: filepath.Join(host, "lower"),
		configMap: filepath.Join(host, "volumes", "configmap"), emptyDir: filepath.Join(host, "volumes", "emptydir"),
		etcHostname: filepath.Join(host, "etc-hostname"), uppers: map[string]string{}}
	busyboxTree(t, p.lower)
	for _, d := range []string{p.configMap, p.emptyDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	writeFile(t, filepath.Join(p.configMap, "key"), "cm-value\n")
	writeFile(t, p.etcHostname, "pod-hostname\n")
	p.mounts = []specs.Mount{
		{Destination: "/cfg", Type: "bind", Source: p.configMap, Options: []string{"rbind", "rprivate", "ro"}},
		{Destination: "/data", Type: "bind", Source: p.emptyDir, Options: []string{"rbind", "rprivate", "rw"}},
		{Destination: "/etc/hostname", Type: "bind", Source: p.etcHostname, Options: []string{"rbind", "rprivate", "ro"}},
		// What CRI gives every container of a pod: a bind of the sandbox's shm.
		{Destination: "/dev/shm", Type: "bind", Source: "/run/containerd/io.containerd.grpc.v1.cri/sandboxes/sb/shm", Options: []string{"rbind", "rprivate", "rw"}},
	}
	return p
}

// prepare makes container id's overlay rootfs over the lower dir, prepares it and the pod's
// mounts through the share (released at cleanup) and creates the container in the guest.
func (p *sharedPod) prepare(id string, args ...string) {
	t := p.t
	t.Helper()
	snap := filepath.Join(p.host, "snapshots", id)
	upper, work := filepath.Join(snap, "fs"), filepath.Join(snap, "work")
	for _, d := range []string{upper, work} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	p.uppers[id] = upper
	rootMounts := []mount.Mount{{Type: "overlay", Source: "overlay",
		Options: []string{"lowerdir=" + p.lower, "upperdir=" + upper, "workdir=" + work}}}
	var spec specs.Spec
	if err := json.Unmarshal(defaultSpec(t, id, "rootfs", oci.WithProcessArgs(args...),
		oci.WithoutMounts("/dev/shm"), oci.WithMounts(p.mounts)), &spec); err != nil {
		t.Fatal(err)
	}
	att, err := p.share.Prepare(p.ctx, id, "/nonexistent-bundle", &spec, rootMounts)
	if err != nil {
		t.Fatalf("prepare %s: %v", id, err)
	}
	t.Cleanup(func() {
		if err := p.share.Release(context.Background(), id); err != nil {
			t.Errorf("release %s: %v", id, err)
		}
	})
	b, err := json.Marshal(att.Spec)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.g.agent.CreateContainer(p.ctx, &api.CreateContainerRequest{ContainerId: id, Spec: b,
		Stdio: &api.Stdio{Stdout: true, Stderr: true}, BlockMounts: att.BlockMounts, Devices: att.Devices}); err != nil {
		t.Fatalf("create %s: %v", id, err)
	}
}

// run starts the prepared container id, waits for it and removes it.
func (p *sharedPod) run(id string) (stdout, stderr string, code uint32) {
	p.t.Helper()
	stdout, stderr, code = startGuestContainer(p.t, p.ctx, p.g.agent, id)
	removeGuestContainer(p.t, p.ctx, p.g.agent, id)
	return stdout, stderr, code
}

// checkWriter checks what container a saw and what its writes did on the host: the configMap
// readable and read-only, the /etc/hostname bind, the rootfs write in its upper dir, the
// emptyDir write in the host dir.
func (p *sharedPod) checkWriter(stdout, stderr string, code uint32) {
	t := p.t
	t.Helper()
	if !strings.Contains(stdout, "cm-value\n") {
		t.Errorf("the configMap file is not readable in the guest: stdout %q", stdout)
	}
	if strings.Contains(stdout, "WRITABLE") || !strings.Contains(stderr, "Read-only file system") {
		t.Errorf("the read-only configMap is writable in the guest: stdout %q, stderr %q", stdout, stderr)
	}
	if !strings.Contains(stdout, "pod-hostname\n") {
		t.Errorf("the /etc/hostname file bind does not show the host file: stdout %q", stdout)
	}
	if code != 0 {
		t.Errorf("container a exit status %d, want 0 (the last writes failed?)", code)
	}
	if got := readHostFile(t, filepath.Join(p.uppers["a"], "written")); got != "rootfs-write\n" {
		t.Errorf("a write to the rootfs did not land in the overlay's upper dir on the host: %q", got)
	}
	if got := readHostFile(t, filepath.Join(p.emptyDir, "shared")); got != "from-a\n" {
		t.Errorf("a write to the emptyDir did not reach the host dir: %q", got)
	}
	if got := readHostFile(t, filepath.Join(p.configMap, "key")); got != "cm-value\n" {
		t.Errorf("the configMap changed on the host: %q", got)
	}
}

// busyboxTree makes a minimal busybox root filesystem in dir: /bin/busybox with a link per
// applet, /etc/passwd and the usual mount points.
func busyboxTree(t testing.TB, dir string) {
	t.Helper()
	require(t, needFile("/bin/busybox"))
	for _, d := range []string{"bin", "etc", "proc", "sys", "dev", "tmp"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	b, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Fatal(err)
	}
	writeFileMode(t, filepath.Join(dir, "bin/busybox"), string(b), 0o755)
	out, err := exec.Command("/bin/busybox", "--list").Output()
	if err != nil {
		t.Fatal(err)
	}
	for _, applet := range strings.Fields(string(out)) {
		if applet != "busybox" {
			_ = os.Symlink("busybox", filepath.Join(dir, "bin", applet))
		}
	}
	writeFile(t, filepath.Join(dir, "etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")
}

func writeFile(t testing.TB, p, content string) {
	t.Helper()
	writeFileMode(t, p, content, 0o644)
}

func writeFileMode(t testing.TB, p, content string, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(p, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
}

func readHostFile(t testing.TB, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Errorf("%v", err)
	}
	return string(b)
}

// waitProcessesGone waits until no process has stateDir on its command line, at most limit.
func waitProcessesGone(t testing.TB, stateDir string, limit time.Duration) {
	t.Helper()
	start := time.Now()
	for waited := false; time.Since(start) < limit; waited = true {
		out, _ := exec.Command("pgrep", "-f", stateDir).Output()
		if len(strings.TrimSpace(string(out))) == 0 {
			if waited {
				t.Logf("processes of %s exited %s after the VM was stopped", stateDir, time.Since(start).Round(time.Millisecond))
			}
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}
