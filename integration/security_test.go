package integration

// The VM boundary, tried from the attacker's side: a privileged container in a podvm pod
// (which owns the guest kernel, so it stands for a compromised guest) mounts the pod's
// virtio-fs share itself and goes after the host through it.

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/podvm/podvm/hypervisor/qemu"
	"github.com/podvm/podvm/integration/harness"
	"github.com/podvm/podvm/rootfs"
)

// hostTree lists everything under dir (path, mode, size), for "the host is unchanged".
func hostTree(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	err := filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		out = append(out, fmt.Sprintf("%s %v %d", p, fi.Mode(), fi.Size()))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(out)
	return out
}

// inGuest runs a script in the guest's own mount namespace (the agent's, where the whole
// share is mounted at /run/podvm/shared), as a privileged hostPID container can: nsenter into
// PID 1, with the container's busybox reached through its rootfs in the share.
const inGuest = `B=/run/podvm/shared/%[1]s/rootfs/bin/busybox; exec nsenter -t 1 -m $B sh -c '%[2]s' $B`

// attackScript is what the attacker runs in the guest's mount namespace ($0 is busybox).
// Every line it prints is an attack that worked; "done" ends a run that got through them all.
const attackScript = `
B=$0
S=/run/podvm/shared
$B grep -q " $S virtiofs " /proc/mounts || { echo "no share at $S"; exit 9; }
for d in $S $S/* $S/*/mounts; do
	$B touch "$d/fill" 2>/dev/null && echo "WROTE $d/fill"
	$B ln -s %[1]s "$d/evil" 2>/dev/null && echo "LINKED $d/evil"
	$B mkdir "$d/dir" 2>/dev/null && echo "MKDIR $d/dir"
done
for d in $S/*/mounts $S/*/rootfs $S/*; do
	$B mv "$d" "$d.x" 2>/dev/null && echo "MOVED $d"
done
$B dd if=/dev/zero of=$S/big bs=1M count=8 2>/dev/null && echo "FILLED the share"
for v in $S/*/mounts/*-data; do
	$B mknod "$v/disk" b 8 0 2>/dev/null && echo "MKNOD on a volume"
	$B cp $B "$v/suid" && $B chmod 4755 "$v/suid" || echo "no setuid file"
done
for r in $S/*/rootfs; do
	$B mknod "$r/disk" b 8 0 2>/dev/null && echo "MKNOD on a rootfs"
done
echo done
`

// swapLoop keeps trying to swap the share's dirs for symlinks to the victim while the test
// creates and deletes another container, until /tmp/stop-swapping exists in the guest.
const swapLoop = `
B=$0
S=/run/podvm/shared
while [ ! -e /tmp/stop-swapping ]; do
	for d in $S/* $S/*/mounts; do
		$B ln -s %[1]s "$d.new" 2>/dev/null && echo "LINKED $d.new"
		$B mv -f "$d" "$d.old" 2>/dev/null && echo "MOVED $d"
		$B rmdir "$d" 2>/dev/null && echo "REMOVED $d"
		$B rm -f "$d" 2>/dev/null
	done
done
echo swapped
`

// guestSh runs script in the guest's mount namespace from container id.
func guestSh(t *testing.T, ctx context.Context, env *harness.Env, id, script string) string {
	t.Helper()
	return sh(t, ctx, env, id, fmt.Sprintf(inGuest, id, strings.ReplaceAll(script, "'", `'\''`)))
}

// TestPodvmGuestCannotReachHost: a privileged hostPID container of a podvm pod owns the guest
// and goes after the host through the pod's share, during other containers' lifecycles, by
// flooding the console, and by looking for QEMU privileges and the shim's socket.
func TestPodvmGuestCannotReachHost(t *testing.T) {
	env, ctx := podvmTest(t, 10*time.Minute)

	host := t.TempDir()
	a := &attack{t: t, ctx: ctx, env: env, victim: filepath.Join(host, "victim")}
	if err := os.MkdirAll(filepath.Join(a.victim, "etc", "cron.d"), 0o755); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(a.victim, "precious"), "keep me\n")
	a.before = hostTree(t, a.victim)
	vol := kubeletVolume(t, host, "empty-dir", "data", nil)
	job := kubeletVolume(t, host, "configmap", "job", map[string]string{"payload": "* * * * * root touch /pwned\n"})
	a.start(vol)

	a.throughShare(vol)         // 1.
	a.swapDuringContainers(job) // 2.
	a.consoleFlood()            // 3.
	a.checkPrivileges()         // 4.

	rctx, rcancel := context.WithTimeout(ctx, 2*time.Minute)
	defer rcancel()
	if err := env.RemoveAllPods(rctx); err != nil {
		t.Fatal(err)
	}
	a.checkVictim("the victim dir changed at pod teardown")
	env.AssertNoLeaks(t)
}

// attack is TestPodvmGuestCannotReachHost's attacker container, its pod, and the host dir it
// must not change (before: its tree at the start).
type attack struct {
	t        *testing.T
	ctx      context.Context
	env      *harness.Env
	victim   string
	before   []string
	pod      *harness.Pod
	stateDir string // the pod's podvm state dir
	attacker string // the container
}

// checkVictim fails the test if the victim dir changed.
func (a *attack) checkVictim(what string) {
	a.t.Helper()
	if got := hostTree(a.t, a.victim); !reflect.DeepEqual(got, a.before) {
		a.t.Errorf("%s:\n%v", what, got)
	}
}

// start runs the pod and the attacker with vol at /data. Privileged and hostPID: inside a
// podvm pod that means root in the guest's own PID namespace, i.e. the guest kernel and the
// agent are the attacker's.
func (a *attack) start(vol string) {
	t, env := a.t, a.env
	t.Helper()
	podCfg := env.PodSandboxConfig(harness.PodOptions{Name: "attacker", Namespace: "it", Handler: "podvm"})
	podCfg.Linux.SecurityContext.Privileged = true
	podCfg.Linux.SecurityContext.NamespaceOptions.Pid = runtimeapi.NamespaceMode_NODE
	rctx, rcancel := context.WithTimeout(a.ctx, 2*time.Minute)
	podID, err := env.Runtime.RunPodSandbox(rctx, podCfg, "podvm")
	rcancel()
	if err != nil {
		t.Fatalf("RunPodSandbox: %v", err)
	}
	a.pod = &harness.Pod{ID: podID, Handler: "podvm", Config: podCfg}
	if _, err := env.PullImage(a.ctx, env.BusyboxImage, podCfg); err != nil {
		t.Fatal(err)
	}
	a.stateDir = filepath.Join(podvmStateDir, podID)
	acfg := env.ContainerConfig(harness.ContainerOptions{Name: "attacker", Command: []string{"sleep", "3600"},
		Mounts: []*runtimeapi.Mount{{ContainerPath: "/data", HostPath: vol}}})
	acfg.Linux.SecurityContext.Privileged = true
	acfg.Linux.SecurityContext.NamespaceOptions.Pid = runtimeapi.NamespaceMode_NODE
	a.attacker = startContainer(t, a.ctx, env, a.pod, acfg)
}

// throughShare: writes, links, renames and fills through the share; device nodes and setuid
// binaries on a volume.
func (a *attack) throughShare(vol string) {
	t := a.t
	t.Helper()
	out := guestSh(t, a.ctx, a.env, a.attacker, fmt.Sprintf(attackScript, a.victim))
	if out != "done" {
		t.Errorf("attacks that worked from the guest:\n%s", out)
	}
	a.checkVictim("the victim dir changed")
	// The share is mounted in the shim's own mount namespace, seen here through its /proc.
	root := shareRoot(t, a.stateDir)
	entries, _ := os.ReadDir(root + filepath.Join(a.stateDir, rootfs.StagingDir))
	for _, e := range entries {
		if !e.IsDir() || strings.ContainsAny(e.Name(), ".") {
			t.Errorf("the guest made %s in the share", e.Name())
		}
	}
	if _, err := os.Lstat(filepath.Join(vol, "disk")); err == nil {
		t.Error("the guest made a device node on the host volume")
	}
	// The setuid bit reaches the volume as it would from a runc container; the host-side
	// mounts of the share never honour it.
	var sfs unix.Statfs_t
	binds, _ := filepath.Glob(root + filepath.Join(a.stateDir, rootfs.StagingDir, "*", "mounts", "*-data"))
	if len(binds) != 1 {
		t.Fatalf("host-side binds of the volume: %v", binds)
	}
	if err := unix.Statfs(binds[0], &sfs); err != nil || sfs.Flags&unix.ST_NOSUID == 0 || sfs.Flags&unix.ST_NODEV == 0 {
		t.Errorf("host-side bind %s: flags %#x (%v), want nosuid,nodev", binds[0], sfs.Flags, err)
	}
}

// swapDuringContainers: swaps during another container's create, start, stop and delete (the
// shim's Prepare and Release run while the guest races them), that container binding job.
func (a *attack) swapDuringContainers(job string) {
	t, ctx, env := a.t, a.ctx, a.env
	t.Helper()
	swapDone := make(chan string, 1)
	go func() {
		script := fmt.Sprintf(inGuest, a.attacker, strings.ReplaceAll(fmt.Sprintf(swapLoop, a.victim), "'", `'\''`))
		stdout, _, _ := env.Runtime.ExecSync(ctx, a.attacker, []string{"sh", "-c", script}, 5*time.Minute)
		swapDone <- strings.TrimSpace(string(stdout))
	}()
	for i := 0; i < 3; i++ {
		vcfg := env.ContainerConfig(harness.ContainerOptions{Name: "victim-" + strconv.Itoa(i), Command: []string{"true"},
			Mounts: []*runtimeapi.Mount{{ContainerPath: "/etc/cron.d", HostPath: job, Readonly: true}}})
		id := startContainer(t, ctx, env, a.pod, vcfg)
		wctx, wcancel := context.WithTimeout(ctx, callTimeout)
		_, err := env.WaitContainerState(wctx, id, runtimeapi.ContainerState_CONTAINER_EXITED)
		wcancel()
		if err != nil {
			t.Fatal(err)
		}
		removeContainer(ctx, t, env, id, 1)
	}
	guestSh(t, ctx, env, a.attacker, "$0 touch /tmp/stop-swapping")
	if got := <-swapDone; got != "swapped" {
		t.Errorf("swaps that worked from the guest:\n%s", got)
	}
	a.checkVictim("the victim dir changed")
}

// consoleFlood: the console log on the host stays bounded.
func (a *attack) consoleFlood() {
	t := a.t
	t.Helper()
	sh(t, a.ctx, a.env, a.attacker, "mknod /dev/serial0 c 4 64 && head -c 3145728 /dev/zero | tr '\\0' A > /dev/serial0; true")
	var logBytes int64
	logs, _ := filepath.Glob(filepath.Join(a.stateDir, qemu.ConsoleLog+"*"))
	for _, p := range logs {
		if fi, err := os.Stat(p); err == nil {
			logBytes += fi.Size()
		}
	}
	if logBytes == 0 || logBytes > 2*qemu.ConsoleLogMax+64<<10 {
		t.Errorf("console logs %v hold %d bytes after a 3 MiB flood, want at most %d", logs, logBytes, 2*qemu.ConsoleLogMax)
	}
}

// checkPrivileges: QEMU runs unprivileged; no child holds the shim's task-API socket.
func (a *attack) checkPrivileges() {
	t := a.t
	t.Helper()
	b, err := os.ReadFile(filepath.Join(a.stateDir, qemu.QEMUPidFile))
	if err != nil {
		t.Fatal(err)
	}
	qemuPid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatalf("%s: %v", qemu.QEMUPidFile, err)
	}
	status := procStatus(t, qemuPid)
	if uids := strings.Fields(status["Uid"]); len(uids) != 4 || uids[0] == "0" || uids[1] == "0" || uids[2] == "0" || uids[3] == "0" {
		t.Errorf("QEMU (pid %d) Uid %q, want no root uid", qemuPid, status["Uid"])
	}
	if status["CapEff"] != "0000000000000000" || status["CapPrm"] != "0000000000000000" {
		t.Errorf("QEMU CapEff %s CapPrm %s, want none", status["CapEff"], status["CapPrm"])
	}
	shim := shimPid(t, a.pod.ID)
	listeners := listeningSockets(t, shim)
	if len(listeners) == 0 {
		t.Fatalf("shim %d has no listening unix socket", shim)
	}
	for _, l := range listeners {
		if holders := fdHolders(l, shim); len(holders) > 0 {
			t.Errorf("processes other than the shim hold its listening socket %s: %v", l, holders)
		}
	}
}

// shimPid finds the serving podvm shim of a sandbox.
func shimPid(t *testing.T, podID string) int {
	t.Helper()
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, _ := os.ReadFile(p)
		args := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
		if len(args) == 0 || filepath.Base(args[0]) != "containerd-shim-podvm-v2" {
			continue
		}
		for i, a := range args {
			if a == "-id" && i+1 < len(args) && args[i+1] == podID {
				pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(p)))
				return pid
			}
		}
	}
	t.Fatalf("no podvm shim serves sandbox %s", podID)
	return 0
}

// listeningSockets lists the listening unix sockets pid holds, as fd link targets
// ("socket:[inode]"), from the unix socket table of its network namespace.
func listeningSockets(t *testing.T, pid int) []string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/unix", pid))
	if err != nil {
		t.Fatal(err)
	}
	const soAcceptCon = 0x10000
	listening := map[string]bool{}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 7 {
			continue
		}
		if flags, err := strconv.ParseUint(f[3], 16, 32); err == nil && flags&soAcceptCon != 0 {
			listening["socket:["+f[6]+"]"] = true
		}
	}
	var out []string
	fds, _ := filepath.Glob(fmt.Sprintf("/proc/%d/fd/*", pid))
	for _, fd := range fds {
		if l, err := os.Readlink(fd); err == nil && listening[l] {
			out = append(out, l)
		}
	}
	return out
}

// fdHolders lists the processes other than except that have an fd on link (e.g. socket:[N]).
func fdHolders(link string, except int) []string {
	var out []string
	fds, _ := filepath.Glob("/proc/[0-9]*/fd/*")
	for _, fd := range fds {
		pid, _ := strconv.Atoi(strings.Split(fd, "/")[2])
		if pid == except {
			continue
		}
		if l, err := os.Readlink(fd); err == nil && l == link {
			b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
			out = append(out, fmt.Sprintf("%d (%s)", pid, strings.ReplaceAll(string(b), "\x00", " ")))
		}
	}
	return out
}
