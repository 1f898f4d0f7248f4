package metrics

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// clockTicks is USER_HZ, the unit of /proc/<pid>/stat's CPU times: 100 on every Linux
// architecture podvm runs on.
const clockTicks = 100

// ProcCPU returns the CPU time (user + system, every thread's, exited ones included)
// <procRoot>/<pid>/stat gives for pid, in seconds; its unit is the clock tick (10 ms).
func ProcCPU(procRoot string, pid int) (float64, error) {
	b, err := os.ReadFile(filepath.Join(procRoot, strconv.Itoa(pid), "stat"))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may hold spaces and parentheses: count from its end.
	i := bytes.LastIndexByte(b, ')')
	f := strings.Fields(string(b[i+1:]))
	if i < 0 || len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: too few fields", pid)
	}
	// Fields 14 and 15 (utime, stime) are the 12th and 13th after the name.
	ut, err1 := strconv.ParseUint(f[11], 10, 64)
	st, err2 := strconv.ParseUint(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("/proc/%d/stat: bad utime or stime", pid)
	}
	return float64(ut+st) / clockTicks, nil
}

// procMem is one process's memory as /proc shows it, in bytes.
type procMem struct {
	RSS, PSS uint64
	// Shmem is the shared memory the process has touched (RssShmem): for QEMU, the guest
	// RAM (a memfd shared with virtiofsd) the guest has used so far.
	Shmem uint64
}

// readProcMem reads /proc/<pid>/smaps_rollup and /proc/<pid>/status under procRoot.
func readProcMem(procRoot string, pid int) (procMem, error) {
	dir := filepath.Join(procRoot, strconv.Itoa(pid))
	rollup, err := os.ReadFile(filepath.Join(dir, "smaps_rollup"))
	if err != nil {
		return procMem{}, err
	}
	status, err := os.ReadFile(filepath.Join(dir, "status"))
	if err != nil {
		return procMem{}, err
	}
	r, s := kBFields(rollup), kBFields(status)
	rss, okR := r["Rss"]
	pss, okP := r["Pss"]
	if !okR || !okP {
		return procMem{}, fmt.Errorf("/proc/%d/smaps_rollup: no Rss or Pss line", pid)
	}
	return procMem{RSS: rss, PSS: pss, Shmem: s["RssShmem"]}, nil
}

// kBFields parses "Name:   123 kB" lines into bytes by name; other lines are skipped.
func kBFields(b []byte) map[string]uint64 {
	out := map[string]uint64{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		name, rest, ok := strings.Cut(sc.Text(), ":")
		f := strings.Fields(rest)
		if !ok || len(f) != 2 || f[1] != "kB" {
			continue
		}
		if n, err := strconv.ParseUint(f[0], 10, 64); err == nil {
			out[name] = n * 1024
		}
	}
	return out
}

// pidFromFile reads a pid file and returns the pid if /proc/<pid>/cmdline mentions marker
// (the sandbox's state dir): a stale file whose pid was reused is not taken for the VM.
func pidFromFile(procRoot, path, marker string) (int, bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, false
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, false
	}
	cmdline, err := os.ReadFile(filepath.Join(procRoot, strconv.Itoa(pid), "cmdline"))
	if err != nil || !bytes.Contains(cmdline, []byte(marker)) {
		return 0, false
	}
	return pid, true
}
