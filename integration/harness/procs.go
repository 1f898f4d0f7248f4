package harness

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// Shim is a serving shim of the harness's containerd and the sandbox it serves (its -id).
type Shim struct {
	PID int
	ID  string
}

// Shims lists the serving shims (not `start` or `delete` runs) of runtime class rc that e's
// containerd started. A child a shim is starting carries the shim's command line from fork to
// exec (Go's os/exec clones with CLONE_VM): podvm's QEMU and runc's `runc create` look like
// their shim for a moment, and a test killing one instead of the shim tests another fault. A
// shim's parent is never a serving shim (it is the shim's `start` run, or init), a child's
// always is, so those are left out; so is a process gone before its parent was read.
func (e *Env) Shims(rc string) []Shim {
	var found []Shim
	pids := map[int]bool{}
	procs, _ := filepath.Glob("/proc/[0-9]*")
	for _, p := range procs {
		pid, err := strconv.Atoi(filepath.Base(p))
		if err != nil {
			continue
		}
		args := cmdline(pid)
		if len(args) < 2 || filepath.Base(args[0]) != "containerd-shim-"+rc+"-v2" {
			continue
		}
		if last := args[len(args)-1]; last == "start" || last == "delete" {
			continue
		}
		if strings.HasPrefix(argAfter(args, "-address"), e.RunDir+"/") {
			found = append(found, Shim{PID: pid, ID: argAfter(args, "-id")})
			pids[pid] = true
		}
	}
	return slices.DeleteFunc(found, func(s Shim) bool {
		ppid := ParentPID(s.PID)
		return ppid == 0 || pids[ppid]
	})
}

// RunsQEMU reports whether a QEMU of the shim's sandbox runs as its child: the podvm shim's VM
// has started (and a QEMU the shim is still forking, which looks like the shim, is not it).
func (s Shim) RunsQEMU() bool {
	return slices.ContainsFunc(QEMUs(s.ID), func(q int) bool { return ParentPID(q) == s.PID })
}

// QEMUs lists the QEMU processes of podvm sandbox id.
func QEMUs(id string) []int {
	if id == "" {
		return nil
	}
	out, _ := exec.Command("pgrep", "-f", "qemu-system-x86_64 -name podvm-"+id).Output()
	var pids []int
	for _, f := range strings.Fields(string(out)) {
		if pid, err := strconv.Atoi(f); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids
}

// Stat is what /proc/<pid>/stat says of a process: its name, state and parent.
type Stat struct {
	Comm  string
	State byte // R, S, D, Z, X, ...
	PPID  int
}

// ReadStat reads /proc/<pid>/stat; ok is false when pid is gone.
func ReadStat(pid int) (st Stat, ok bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return Stat{}, false
	}
	// pid (comm) state ppid ...: comm may hold spaces and parentheses; the last ')' ends it.
	open, end := bytes.IndexByte(b, '('), bytes.LastIndexByte(b, ')')
	if open < 0 || end < open {
		return Stat{}, false
	}
	f := strings.Fields(string(b[end+1:]))
	if len(f) < 2 || len(f[0]) != 1 {
		return Stat{}, false
	}
	ppid, _ := strconv.Atoi(f[1])
	return Stat{Comm: string(b[open+1 : end]), State: f[0][0], PPID: ppid}, true
}

// Process is one of the machine's processes as /proc shows it.
type Process struct {
	PID int
	Stat
	Args []string // its command line; none for a kernel thread
}

// Cmdline is the process's arguments joined by spaces.
func (p Process) Cmdline() string { return strings.Join(p.Args, " ") }

// Argv0 is the base name of the process's first argument, "" if it has none.
func (p Process) Argv0() string {
	if len(p.Args) == 0 {
		return ""
	}
	return filepath.Base(p.Args[0])
}

// Processes lists the machine's processes, zombies and this one included; a process gone
// while /proc is read is left out. The leak checks and the benchmarks' process trees read it.
func Processes() []Process {
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	var out []Process
	for _, d := range dirs {
		pid, err := strconv.Atoi(filepath.Base(d))
		if err != nil {
			continue
		}
		st, ok := ReadStat(pid)
		if !ok {
			continue
		}
		out = append(out, Process{PID: pid, Stat: st, Args: cmdline(pid)})
	}
	return out
}

// ParentPID is pid's parent, 0 when pid is gone.
func ParentPID(pid int) int {
	st, _ := ReadStat(pid)
	return st.PPID
}

// ShimPIDs lists the serving shims of runtime class rc for sandbox id (see Shims).
func (e *Env) ShimPIDs(rc, id string) []int {
	var pids []int
	for _, sh := range e.Shims(rc) {
		if sh.ID == id {
			pids = append(pids, sh.PID)
		}
	}
	return pids
}

// cmdline is pid's arguments; none if it is gone or a kernel thread.
func cmdline(pid int) []string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || len(b) == 0 {
		return nil
	}
	return strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
}

// argAfter returns the argument after flag in args, or "".
func argAfter(args []string, flag string) string {
	for i := 0; i+1 < len(args); i++ {
		if args[i] == flag {
			return args[i+1]
		}
	}
	return ""
}
