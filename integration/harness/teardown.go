package harness

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/hypervisor/qemu"
	"github.com/podvm/podvm/internal/logfile"
)

// Close tears the environment down now (it also runs as a t.Cleanup). It is idempotent.
func (e *Env) Close(t testing.TB) {
	t.Helper()
	e.teardown(t)
}

func (e *Env) teardown(t testing.TB) {
	t.Helper()
	e.closeOnce.Do(func() {
		if t.Failed() && e.ContainerdLog != "" {
			t.Logf("harness: containerd log tail (%s):\n%s", e.ContainerdLog, e.LogTail(60))
		}
		if (t.Failed() || os.Getenv(KeepLogsEnv) != "") && e.ContainerdLog != "" {
			e.keepLog(t)
		}
		var errs string
		if t.Failed() && e.ContainerdLog != "" {
			errs = lastErrors(e.ContainerdLog, 4) // the log goes with the teardown
		}
		start := time.Now()
		e.closeErrs = e.doTeardown()
		for _, msg := range e.closeErrs {
			t.Errorf("harness teardown: %s", msg)
		}
		t.Logf("harness: teardown took %v", time.Since(start).Round(time.Millisecond))
		if t.Failed() {
			e.logWhy(t, errs)
		}
	})
}

// logWhy logs, last, where a report that keeps only the end of a failed test's output still
// shows them: containerd's last errors (errs) and the notes of NoteOnFailure.
func (e *Env) logWhy(t testing.TB, errs string) {
	if errs != "" {
		t.Logf("harness: containerd's last errors:\n%s", errs)
	}
	e.notesMu.Lock()
	defer e.notesMu.Unlock()
	for _, n := range e.notes {
		t.Logf("harness: %s", n)
	}
}

// lastErrors returns the last n error-level lines of the log at path (each cut to 400
// bytes): why a pod failed to start or stop, from the shim and from CRI, in a few lines.
func lastErrors(path string, n int) string {
	b, err := logfile.ReadTail(path, 16<<20)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	var errs []string
	for line := range strings.SplitSeq(string(b), "\n") {
		if strings.Contains(line, "level=error") || strings.Contains(line, "level=fatal") {
			if len(line) > 400 {
				line = line[:400] + "…"
			}
			errs = append(errs, line)
		}
	}
	if len(errs) == 0 {
		return "(none)"
	}
	return strings.Join(errs[max(0, len(errs)-n):], "\n")
}

func (e *Env) doTeardown() []string {
	var errs []string
	fail := func(format string, args ...any) { errs = append(errs, fmt.Sprintf(format, args...)) }
	// Teardown runs after the test's context is gone; it has its own deadline.
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	if e.Runtime != nil && e.containerd != nil && !e.containerdExited() {
		if err := e.RemoveAllPods(ctx); err != nil {
			fail("removing pods: %v", err)
		}
	}
	if e.Runtime != nil {
		_ = e.Runtime.Close(ctx)
	}
	if e.Images != nil {
		_ = e.Images.Close(ctx)
	}
	if e.containerd != nil && !e.containerdExited() {
		_ = e.containerd.Process.Signal(syscall.SIGTERM)
		select {
		case <-e.exited:
		case <-time.After(10 * time.Second):
			fail("containerd did not exit 10s after SIGTERM; killed")
			_ = e.containerd.Process.Kill()
			<-e.exited
		}
	}

	// Shims of this containerd, and anything else still running from its dirs or cgroups.
	if e.grpcAddr != "" {
		for _, p := range findProcesses(func(p Process) bool {
			return strings.Contains(p.Cmdline(), "-address "+e.grpcAddr+" ") || strings.HasSuffix(p.Cmdline(), "-address "+e.grpcAddr)
		}) {
			_ = syscall.Kill(p.PID, syscall.SIGKILL)
		}
	}
	e.killCgroupProcesses()
	for _, p := range findProcesses(e.mentionsEnvDirs) {
		_ = syscall.Kill(p.PID, syscall.SIGKILL)
	}
	waitGone(func() bool { return len(findProcesses(e.mentionsEnvDirs)) == 0 }, 5*time.Second)

	for _, d := range e.envDirs() {
		if err := unmountUnder(d); err != nil {
			fail("%v", err)
		}
	}
	if err := e.removeCgroups(); err != nil {
		fail("%v", err)
	}
	if e.reg != nil {
		sctx, scancel := context.WithTimeout(ctx, 5*time.Second)
		_ = e.reg.close(sctx)
		scancel()
	}
	if e.ns != nil {
		if err := e.ns.delete(ctx); err != nil {
			fail("%v", err)
		}
	}
	for _, c := range e.cniCaches() {
		_ = os.Remove(c)
	}
	for _, d := range e.envDirs() {
		if mounts, _ := mountsUnder(d); len(mounts) > 0 {
			fail("not removing %s: still mounted: %s", d, strings.Join(mounts, ", "))
			continue
		}
		if err := os.RemoveAll(d); err != nil {
			fail("remove %s: %v", d, err)
		}
	}
	return errs
}

func (e *Env) containerdExited() bool {
	select {
	case <-e.exited:
		return true
	default:
		return false
	}
}

// RemoveAllPods stops and removes every pod sandbox (and with them their containers).
func (e *Env) RemoveAllPods(ctx context.Context) error {
	lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	pods, err := e.Runtime.ListPodSandbox(lctx, nil)
	cancel()
	if err != nil {
		return fmt.Errorf("ListPodSandbox: %w", err)
	}
	var errs []error
	for _, p := range pods {
		sctx, cancel := context.WithTimeout(ctx, 60*time.Second)
		if err := e.Runtime.StopPodSandbox(sctx, p.Id); err != nil {
			errs = append(errs, fmt.Errorf("StopPodSandbox %s (%s): %w", p.Id, p.GetMetadata().GetName(), err))
		}
		cancel()
		rctx, cancel := context.WithTimeout(ctx, 60*time.Second)
		if err := e.Runtime.RemovePodSandbox(rctx, p.Id); err != nil {
			errs = append(errs, fmt.Errorf("RemovePodSandbox %s (%s): %w", p.Id, p.GetMetadata().GetName(), err))
		}
		cancel()
	}
	return errors.Join(errs...)
}

func (e *Env) envDirs() []string {
	var dirs []string
	for _, d := range []string{e.Dir, e.RunDir} {
		if d != "" {
			dirs = append(dirs, d)
		}
	}
	return dirs
}

func (e *Env) mentionsEnvDirs(p Process) bool {
	for _, d := range e.envDirs() {
		if strings.Contains(p.Cmdline(), d) {
			return true
		}
	}
	return false
}

// cgroupDirs returns this env's cgroup parent in every mounted cgroup hierarchy.
func (e *Env) cgroupDirs() []string {
	if e.CgroupParent == "" {
		return nil
	}
	var dirs []string
	hierarchies, _ := filepath.Glob("/sys/fs/cgroup/*")
	hierarchies = append(hierarchies, "/sys/fs/cgroup")
	for _, h := range hierarchies {
		d := filepath.Join(h, e.CgroupParent)
		if st, err := os.Stat(d); err == nil && st.IsDir() {
			dirs = append(dirs, d)
		}
	}
	return dirs
}

func (e *Env) killCgroupProcesses() {
	for _, d := range e.cgroupDirs() {
		_ = filepath.WalkDir(d, func(p string, de os.DirEntry, err error) error {
			if err != nil {
				// Best effort: a cgroup removed mid-walk has no processes left to kill; go on
				// with the others.
				return nil //nolint:nilerr // see above
			}
			if de.IsDir() || de.Name() != "cgroup.procs" {
				return nil
			}
			b, _ := os.ReadFile(p)
			for _, f := range strings.Fields(string(b)) {
				if pid, err := strconv.Atoi(f); err == nil && pid != os.Getpid() {
					_ = syscall.Kill(pid, syscall.SIGKILL)
				}
			}
			return nil
		})
	}
}

// removeCgroups removes the cgroup parent's tree, deepest first, once its processes are gone.
func (e *Env) removeCgroups() error {
	var leftover []string
	for _, d := range e.cgroupDirs() {
		var sub []string
		_ = filepath.WalkDir(d, func(p string, de os.DirEntry, err error) error {
			if err == nil && de.IsDir() {
				sub = append(sub, p)
			}
			return nil
		})
		sort.Slice(sub, func(i, j int) bool { return len(sub[i]) > len(sub[j]) })
		for _, s := range sub {
			var err error
			for range 50 { // a killed process leaves its cgroup a moment later
				if err = unix.Rmdir(s); err == nil || errors.Is(err, unix.ENOENT) {
					err = nil
					break
				}
				time.Sleep(100 * time.Millisecond)
			}
			if err != nil {
				leftover = append(leftover, fmt.Sprintf("%s (%v)", s, err))
			}
		}
	}
	if len(leftover) > 0 {
		return fmt.Errorf("cgroups left behind: %s", strings.Join(leftover, ", "))
	}
	return nil
}

// mountsUnder lists the mount points under dir (dir itself included), deepest first.
func mountsUnder(dir string) ([]string, error) {
	infos, err := mountinfo.GetMounts(func(m *mountinfo.Info) (skip, stop bool) {
		return !(m.Mountpoint == dir || strings.HasPrefix(m.Mountpoint, dir+"/")), false
	})
	if err != nil {
		return nil, err
	}
	var mps []string
	for _, m := range infos {
		mps = append(mps, m.Mountpoint)
	}
	sort.Slice(mps, func(i, j int) bool { return len(mps[i]) > len(mps[j]) })
	return mps, nil
}

func unmountUnder(dir string) error {
	for range 5 { // stacked mounts need several rounds
		mps, err := mountsUnder(dir)
		if err != nil {
			return fmt.Errorf("read mounts: %w", err)
		}
		if len(mps) == 0 {
			return nil
		}
		for _, mp := range mps {
			_ = unix.Unmount(mp, unix.MNT_DETACH)
		}
	}
	mps, _ := mountsUnder(dir)
	if len(mps) > 0 {
		return fmt.Errorf("could not unmount under %s: %s", dir, strings.Join(mps, ", "))
	}
	return nil
}

// findProcesses returns every live process (not this one, not a zombie) for which match is
// true.
func findProcesses(match func(Process) bool) []Process {
	var out []Process
	for _, p := range Processes() {
		if p.PID != os.Getpid() && p.State != 'Z' && p.State != 'X' && match(p) {
			out = append(out, p)
		}
	}
	return out
}

func waitGone(done func() bool, timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for !done() && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
}

// AssertNoLeaks tears the environment down (if it is still up) and checks that nothing is left:
// no process mentioning the env's directories, no mounts under them, the directories, cgroups
// and network namespace gone, no process matching Options.LeakProcessNames, and
// Options.LeakDirs empty or absent.
func (e *Env) AssertNoLeaks(t testing.TB) {
	t.Helper()
	e.teardown(t)
	waitGone(func() bool { return len(e.leaks()) == 0 }, 5*time.Second)
	for _, l := range e.leaks() {
		t.Errorf("leak: %s", l)
	}
}

func (e *Env) leaks() []string {
	var leaks []string
	for _, p := range findProcesses(e.mentionsEnvDirs) {
		leaks = append(leaks, fmt.Sprintf("process %d still running: %s", p.PID, p.Cmdline()))
	}
	if len(e.opts.LeakProcessNames) > 0 {
		for _, p := range findProcesses(func(p Process) bool {
			for _, n := range e.opts.LeakProcessNames {
				if strings.HasPrefix(p.Comm, n) || strings.HasPrefix(p.Argv0(), n) {
					return true
				}
			}
			return false
		}) {
			leaks = append(leaks, fmt.Sprintf("process %d (%s) still running: %s", p.PID, p.Comm, p.Cmdline()))
		}
	}
	for _, d := range e.envDirs() {
		if mps, _ := mountsUnder(d); len(mps) > 0 {
			leaks = append(leaks, fmt.Sprintf("mounts under %s: %s", d, strings.Join(mps, ", ")))
		}
		if _, err := os.Stat(d); err == nil {
			leaks = append(leaks, "directory still exists: "+d)
		}
	}
	for _, d := range e.cgroupDirs() {
		leaks = append(leaks, "cgroup still exists: "+d)
	}
	if e.NetNS != "" {
		if _, err := os.Stat("/run/netns/" + e.NetNS); err == nil {
			leaks = append(leaks, "network namespace still exists: "+e.NetNS)
		}
	}
	if caches := e.cniCaches(); len(caches) > 0 {
		leaks = append(leaks, "CNI result cache left: "+strings.Join(caches, ", "))
	}
	for _, d := range e.opts.LeakDirs {
		// The C virtiofsd's lock file on its socket path (in the state dir), which it leaves
		// in /run/virtiofsd: it makes none when it is handed its socket, as podvm does.
		if locks := qemu.VirtiofsdLockFiles(d); len(locks) > 0 {
			leaks = append(leaks, fmt.Sprintf("virtiofsd lock files of %s left: %s", d, strings.Join(locks, ", ")))
		}
		entries, err := os.ReadDir(d)
		if err == nil && len(entries) > 0 {
			var names []string
			for _, de := range entries {
				if !slices.Contains(e.opts.LeakDirsKeep, de.Name()) {
					names = append(names, de.Name())
				}
			}
			if len(names) > 0 {
				leaks = append(leaks, fmt.Sprintf("%s not empty: %s", d, strings.Join(names, ", ")))
			}
		}
	}
	return leaks
}

// cniCaches lists libcni's result cache files (always in the host-global /var/lib/cni/results)
// that belong to this env: those of its bridge network, and those of containerd's built-in
// loopback network whose netns lives under the env's state dir. A clean CNI DEL removes them;
// a crashed containerd leaves them.
func (e *Env) cniCaches() []string {
	var out []string
	files, _ := filepath.Glob("/var/lib/cni/results/*")
	for _, f := range files {
		if e.netName != "" && strings.HasPrefix(filepath.Base(f), e.netName+"-") {
			out = append(out, f)
			continue
		}
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		var c struct {
			NetNS string `json:"netns"`
		}
		if json.Unmarshal(b, &c) == nil && e.RunDir != "" && strings.HasPrefix(c.NetNS, e.RunDir+"/") {
			out = append(out, f)
		}
	}
	return out
}

// ArtifactsEnv names a directory where a failed test's whole containerd log (shim logs
// included) is kept; `make integration` sets it to _output/artifacts. With KeepLogsEnv set
// (to anything), passing tests' logs are kept too, e.g. to read a pod start's timeline.
const (
	ArtifactsEnv = "PODVM_IT_ARTIFACTS"
	KeepLogsEnv  = "PODVM_IT_KEEP_LOGS"
)

func (e *Env) keepLog(t testing.TB) {
	dir := os.Getenv(ArtifactsEnv)
	if dir == "" {
		return
	}
	b, err := os.ReadFile(e.ContainerdLog)
	if err != nil {
		return
	}
	name := strings.NewReplacer("/", "_", " ", "_").Replace(t.Name()) + "-containerd.log"
	if err := os.MkdirAll(dir, 0o755); err == nil {
		p := filepath.Join(dir, name)
		if os.WriteFile(p, b, 0o644) == nil {
			t.Logf("harness: containerd log kept in %s", p)
		}
	}
}
