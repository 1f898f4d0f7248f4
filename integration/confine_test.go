package integration

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/podvm/podvm/hypervisor/qemu"
)

// TestQEMUConfined boots a real VM (virtio-fs share, agent over its transport) and checks the
// jail QEMU runs in once started: its own unprivileged uid and gid, no capabilities, seccomp,
// and an empty root-owned directory as its root; virtiofsd without CAP_MKNOD/CAP_SETFCAP.
func TestQEMUConfined(t *testing.T) {
	ctx, stateDir := vmTest(t, 3*time.Minute)
	g := bootVM(t, ctx, stateDir) // the guest reached its agent and mounted the share
	checkQEMUJail(t, g.vm, stateDir)
	checkVirtiofsdCaps(t, stateDir)

	// QMP still works from the jail (query-status, stop/cont), and the console reaches its
	// capped log through the pipe.
	if err := g.vm.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	if err := g.vm.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	if s, err := g.vm.Status(ctx); err != nil || s != "running" {
		t.Fatalf("status after resume: %q %v", s, err)
	}
	if fi, err := os.Stat(g.vm.ConsolePath()); err != nil {
		t.Fatalf("console log: %v", err)
	} else if fi.Size() > qemu.ConsoleLogMax {
		t.Fatalf("console log is %d bytes, over its cap %d", fi.Size(), qemu.ConsoleLogMax)
	}
}

// checkQEMUJail checks the running QEMU's credentials, capabilities, seccomp mode and root.
func checkQEMUJail(t *testing.T, vm *qemu.VM, stateDir string) {
	t.Helper()
	pid := vm.Pid()
	qcfg := vm.Config()
	uid, gid := qcfg.RunAs()
	st := procStatus(t, pid)
	for _, k := range []string{"Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp"} {
		t.Logf("/proc/%d/status %s:\t%s", pid, k, st[k])
	}
	for key, id := range map[string]uint32{"Uid": uid, "Gid": gid} {
		f := strings.Fields(st[key]) // real, effective, saved, filesystem
		if len(f) != 4 {
			t.Fatalf("%s line %q", key, st[key])
		}
		for _, v := range f {
			if v == "0" || v != strconv.FormatUint(uint64(id), 10) {
				t.Errorf("QEMU %s %q: want %d (non-root) in every field", key, st[key], id)
				break
			}
		}
	}
	for _, k := range []string{"CapEff", "CapPrm", "CapAmb"} {
		if st[k] != "0000000000000000" {
			t.Errorf("QEMU %s = %s, want no capabilities", k, st[k])
		}
	}
	if st["Seccomp"] != "2" {
		t.Errorf("QEMU Seccomp = %q, want 2 (its -sandbox filter)", st["Seccomp"])
	}
	root, err := os.Readlink("/proc/" + strconv.Itoa(pid) + "/root")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("/proc/%d/root -> %s", pid, root)
	want := filepath.Join(stateDir, qemu.ChrootDir)
	if root != want {
		t.Errorf("QEMU's root is %q, want the chroot %q", root, want)
	}
	fi, err := os.Stat(want)
	if err != nil {
		t.Fatal(err)
	}
	if ents, _ := os.ReadDir(want); len(ents) != 0 || fi.Mode().Perm()&0o222 != 0 {
		t.Errorf("chroot %s: %d entries, mode %v; want empty and read-only", want, len(ents), fi.Mode())
	}
}

// checkVirtiofsdCaps: virtiofsd (the C one forks into its sandbox) keeps no CAP_MKNOD or
// CAP_SETFCAP.
func checkVirtiofsdCaps(t *testing.T, stateDir string) {
	t.Helper()
	const capMknod, capSetfcap = 27, 31
	pids := virtiofsdPIDs(stateDir)
	for _, p := range pids {
		eff, err := strconv.ParseUint(procStatus(t, p)["CapEff"], 16, 64)
		if err != nil {
			continue
		}
		t.Logf("virtiofsd pid %d CapEff %016x", p, eff)
		if eff&(1<<capMknod|1<<capSetfcap) != 0 {
			t.Errorf("virtiofsd pid %d has CAP_MKNOD or CAP_SETFCAP (CapEff %016x)", p, eff)
		}
	}
	if len(pids) == 0 {
		t.Error("no virtiofsd process for this VM")
	}
}

// virtiofsdPIDs are the virtiofsd processes serving the VM of stateDir (the C virtiofsd is
// two: it forks into its sandbox), known by their stderr, the VM's virtiofsd log (their
// command line names no socket: the shim hands virtiofsd its socket as a descriptor).
func virtiofsdPIDs(stateDir string) []int {
	logPath := filepath.Join(stateDir, qemu.VirtiofsdLog)
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmd, _ := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		argv0, _, _ := strings.Cut(string(cmd), "\x00")
		stderr, _ := os.Readlink("/proc/" + e.Name() + "/fd/2")
		if stderr == logPath && strings.Contains(filepath.Base(argv0), "virtiofsd") {
			pids = append(pids, p)
		}
	}
	return pids
}

// procStatus reads /proc/<pid>/status into a map.
func procStatus(t *testing.T, pid int) map[string]string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatalf("reading /proc/%d/status: %v", pid, err)
	}
	m := map[string]string{}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok {
			m[k] = strings.TrimSpace(v)
		}
	}
	return m
}
