package guest

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"os"
	"strconv"
	"strings"
	"sync"

	cgroupstats "github.com/containerd/cgroups/v3/cgroup2/stats"
	"golang.org/x/sys/unix"
)

// cgroupStats reads one cgroup's statistics, the same cgroupstats.Metrics that
// containerd/cgroups' Manager.Stat returns, through descriptors it opens once and keeps.
//
// containerd's CRI asks for every container's stats once a second. Manager.Stat opens, reads
// and closes about 20 files on each call; under TCG that cost an idle pod's VM about half of
// its host CPU (docs/benchmarks.md, "What an idle pod costs"). A cgroup file's content is made anew by every read from
// offset 0, so a kept descriptor reads as fresh a value as a new one. Files that do not exist
// when the cgroup is first read (controllers not enabled, or older than the guest kernel) stay
// absent and read as Manager.Stat reads a missing file.
type cgroupStats struct {
	dir string // absolute path of the cgroup

	mu     sync.Mutex
	fds    map[string]int // open files by name, nil until the first Read; a name not in it is absent
	closed bool
	buf    []byte
}

// statFileNames are the files Manager.Stat reads, hugetlb's aside.
var statFileNames = []string{
	"pids.current", "pids.max",
	"cpu.stat", "cpu.pressure",
	"memory.stat", "memory.current", "memory.max", "memory.peak",
	"memory.swap.current", "memory.swap.max", "memory.swap.peak",
	"memory.pressure", "memory.events",
	"io.stat", "io.pressure",
	"rdma.current", "rdma.max",
}

func newCgroupStats(dir string) *cgroupStats {
	return &cgroupStats{dir: dir}
}

// errStatsClosed is returned once the cgroup's container is destroyed.
var errStatsClosed = errors.New("cgroup statistics closed: the container is gone")

// Read returns the cgroup's statistics.
func (s *cgroupStats) Read() (*cgroupstats.Metrics, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, errStatsClosed
	}
	if s.fds == nil {
		if err := s.open(); err != nil {
			return nil, err
		}
	}
	var m cgroupstats.Metrics
	m.Pids = &cgroupstats.PidsStat{Current: s.uint("pids.current"), Limit: s.uint("pids.max")}

	cpu, ok, err := s.kv("cpu.stat")
	switch {
	case err != nil:
		return nil, err
	case !ok:
		m.CPU = &cgroupstats.CPUStat{}
	default:
		m.CPU = &cgroupstats.CPUStat{
			UsageUsec: cpu["usage_usec"], UserUsec: cpu["user_usec"], SystemUsec: cpu["system_usec"],
			NrPeriods: cpu["nr_periods"], NrThrottled: cpu["nr_throttled"], ThrottledUsec: cpu["throttled_usec"],
			NrBursts: cpu["nr_bursts"], BurstUsec: cpu["burst_usec"],
			PSI: s.psi("cpu.pressure"),
		}
	}

	mem, ok, err := s.kv("memory.stat")
	switch {
	case err != nil:
		return nil, err
	case !ok:
		m.Memory = &cgroupstats.MemoryStat{}
	default:
		m.Memory = &cgroupstats.MemoryStat{
			Anon: mem["anon"], File: mem["file"], KernelStack: mem["kernel_stack"], Slab: mem["slab"],
			Sock: mem["sock"], Shmem: mem["shmem"], FileMapped: mem["file_mapped"],
			FileDirty: mem["file_dirty"], FileWriteback: mem["file_writeback"], AnonThp: mem["anon_thp"],
			InactiveAnon: mem["inactive_anon"], ActiveAnon: mem["active_anon"],
			InactiveFile: mem["inactive_file"], ActiveFile: mem["active_file"],
			Unevictable: mem["unevictable"], SlabReclaimable: mem["slab_reclaimable"],
			SlabUnreclaimable: mem["slab_unreclaimable"], Pgfault: mem["pgfault"],
			Pgmajfault: mem["pgmajfault"], WorkingsetRefault: mem["workingset_refault"],
			WorkingsetActivate: mem["workingset_activate"], WorkingsetNodereclaim: mem["workingset_nodereclaim"],
			Pgrefill: mem["pgrefill"], Pgscan: mem["pgscan"], Pgsteal: mem["pgsteal"],
			Pgactivate: mem["pgactivate"], Pgdeactivate: mem["pgdeactivate"],
			Pglazyfree: mem["pglazyfree"], Pglazyfreed: mem["pglazyfreed"],
			ThpFaultAlloc: mem["thp_fault_alloc"], ThpCollapseAlloc: mem["thp_collapse_alloc"],
			Usage: s.uint("memory.current"), UsageLimit: s.uint("memory.max"), MaxUsage: s.uint("memory.peak"),
			SwapUsage: s.uint("memory.swap.current"), SwapLimit: s.uint("memory.swap.max"),
			SwapMaxUsage: s.uint("memory.swap.peak"),
			PSI:          s.psi("memory.pressure"),
		}
	}

	ev, _, err := s.kv("memory.events")
	if err != nil {
		return nil, err
	}
	if len(ev) > 0 {
		m.MemoryEvents = &cgroupstats.MemoryEvents{
			Low: ev["low"], High: ev["high"], Max: ev["max"], Oom: ev["oom"],
			OomKill: ev["oom_kill"], OomGroupKill: ev["oom_group_kill"],
		}
	}

	m.Io = &cgroupstats.IOStat{Usage: parseIOStat(s.read("io.stat")), PSI: s.psi("io.pressure")}
	m.Rdma = &cgroupstats.RdmaStat{Current: parseRdma(s.read("rdma.current")), Limit: parseRdma(s.read("rdma.max"))}

	sizes := hugePageSizes()
	m.Hugetlb = make([]*cgroupstats.HugeTlbStat, len(sizes))
	for i, size := range sizes {
		ev, _, _ := s.kv("hugetlb." + size + ".events") // a bad line: Failcnt 0, as for Manager.Stat
		m.Hugetlb[i] = &cgroupstats.HugeTlbStat{
			Max:      s.uint("hugetlb." + size + ".max"),
			Current:  s.uint("hugetlb." + size + ".current"),
			Pagesize: size,
			Failcnt:  ev["max"],
		}
	}
	return &m, nil
}

// Close closes the kept descriptors; Read fails from then on.
func (s *cgroupStats) Close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, fd := range s.fds {
		_ = unix.Close(fd)
	}
	s.fds = nil
	s.closed = true
}

// open opens the cgroup's files. A cgroup that is not there (yet) is an error that the next
// Read tries again; a file that is not there is absent for good.
func (s *cgroupStats) open() error {
	dfd, err := unix.Open(s.dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("cgroup statistics: %w", &os.PathError{Op: "open", Path: s.dir, Err: err})
	}
	defer func() { _ = unix.Close(dfd) }()
	names := statFileNames
	for _, size := range hugePageSizes() {
		names = append(names[:len(names):len(names)], "hugetlb."+size+".max", "hugetlb."+size+".current", "hugetlb."+size+".events")
	}
	s.fds = make(map[string]int, len(names))
	for _, name := range names {
		fd, err := unix.Openat(dfd, name, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
		if err == nil {
			s.fds[name] = fd
		}
	}
	return nil
}

// read returns the current content of file name, or nil if it is absent or cannot be read
// (as for Manager.Stat, which treats both as a missing file). The slice is valid until the
// next read.
func (s *cgroupStats) read(name string) []byte {
	fd, ok := s.fds[name]
	if !ok {
		return nil
	}
	if s.buf == nil {
		s.buf = make([]byte, 8<<10)
	}
	for {
		n, err := unix.Pread(fd, s.buf, 0)
		if err != nil {
			return nil
		}
		// A cgroup file is a seq_file made in one go: a read shorter than the buffer has it all.
		if n < len(s.buf) {
			return s.buf[:n]
		}
		s.buf = make([]byte, 2*len(s.buf))
	}
}

// uint reads a file of one number, or "max" (math.MaxUint64); 0 if absent or not a number.
func (s *cgroupStats) uint(name string) uint64 {
	b := s.read(name)
	if b == nil {
		return 0
	}
	if len(b) > 32 { // Manager.Stat reads no more
		b = b[:32]
	}
	v := string(bytes.TrimSpace(b))
	if v == "max" {
		return math.MaxUint64
	}
	n, _ := parseStatUint(v)
	return n
}

// kv reads a file of "key value" lines; ok is false if it is absent. A line that is not
// one is an error, as it is for Manager.Stat.
func (s *cgroupStats) kv(name string) (_ map[string]uint64, ok bool, _ error) {
	b := s.read(name)
	if b == nil {
		return nil, false, nil
	}
	out := make(map[string]uint64, 48)
	for line := range strings.Lines(string(b)) {
		f := strings.Fields(line)
		if len(f) != 2 {
			return out, true, fmt.Errorf("cgroup %s/%s: line %q is not \"key value\"", s.dir, name, strings.TrimSuffix(line, "\n"))
		}
		v, err := parseStatUint(f[1])
		if err != nil {
			return out, true, fmt.Errorf("cgroup %s/%s: %w", s.dir, name, err)
		}
		out[f[0]] = v
	}
	return out, true, nil
}

// psi reads a pressure file; nil if it is absent or not in the kernel's format.
func (s *cgroupStats) psi(name string) *cgroupstats.PSIStats {
	b := s.read(name)
	if b == nil {
		return nil
	}
	p := &cgroupstats.PSIStats{}
	for line := range strings.Lines(string(b)) {
		f := strings.Fields(line)
		if len(f) == 0 {
			return nil
		}
		var d *cgroupstats.PSIData
		switch f[0] {
		case "some":
			p.Some = &cgroupstats.PSIData{}
			d = p.Some
		case "full":
			p.Full = &cgroupstats.PSIData{}
			d = p.Full
		}
		if d != nil && !parsePSI(f[1:], d) {
			return nil
		}
	}
	return p
}

// parseStatUint parses a 64-bit counter as containerd/cgroups does: a negative number is 0.
func parseStatUint(v string) (uint64, error) { return parseStatUintN(v, 64) }

// parseStatUintN is parseStatUint for a number of bits bits.
func parseStatUintN(v string, bits int) (uint64, error) {
	n, err := strconv.ParseUint(v, 10, bits)
	if err == nil {
		return n, nil
	}
	i, ierr := strconv.ParseInt(v, 10, bits)
	if (ierr == nil || errors.Is(ierr, strconv.ErrRange)) && i < 0 {
		return 0, nil
	}
	return 0, err
}

// parsePSI parses a pressure line's fields after "some" or "full".
func parsePSI(fields []string, d *cgroupstats.PSIData) bool {
	for _, f := range fields {
		k, v, ok := strings.Cut(f, "=")
		if !ok {
			return false
		}
		var err error
		switch k {
		case "avg10":
			d.Avg10, err = strconv.ParseFloat(v, 64)
		case "avg60":
			d.Avg60, err = strconv.ParseFloat(v, 64)
		case "avg300":
			d.Avg300, err = strconv.ParseFloat(v, 64)
		case "total":
			d.Total, err = strconv.ParseUint(v, 10, 64)
		}
		if err != nil {
			return false
		}
	}
	return true
}

// parseIOStat parses io.stat: "MAJ:MIN rbytes=N wbytes=N rios=N wios=N ..." per device.
func parseIOStat(b []byte) []*cgroupstats.IOEntry {
	var out []*cgroupstats.IOEntry
	for line := range strings.Lines(string(b)) {
		parts := strings.Split(strings.TrimSuffix(line, "\n"), " ")
		if len(parts) < 2 {
			continue
		}
		maj, mnr, ok := strings.Cut(parts[0], ":")
		if !ok || strings.Contains(mnr, ":") {
			continue
		}
		major, err := strconv.ParseUint(maj, 10, 0)
		if err != nil {
			return out
		}
		minor, err := strconv.ParseUint(mnr, 10, 0)
		if err != nil {
			return out
		}
		e := &cgroupstats.IOEntry{Major: major, Minor: minor}
		for _, kv := range parts[1:] {
			k, v, ok := strings.Cut(kv, "=")
			if !ok || strings.Contains(v, "=") {
				continue
			}
			n, err := strconv.ParseUint(v, 10, 0)
			if err != nil {
				continue
			}
			switch k {
			case "rbytes":
				e.Rbytes = n
			case "wbytes":
				e.Wbytes = n
			case "rios":
				e.Rios = n
			case "wios":
				e.Wios = n
			}
		}
		out = append(out, e)
	}
	return out
}

// parseRdma parses rdma.current or rdma.max: "DEVICE hca_handle=N hca_object=N" per device.
func parseRdma(b []byte) []*cgroupstats.RdmaEntry {
	var out []*cgroupstats.RdmaEntry
	for line := range strings.Lines(string(b)) {
		f := strings.Fields(line)
		if len(f) != 3 {
			continue
		}
		e := &cgroupstats.RdmaEntry{Device: f[0]}
		for _, kv := range f[1:] {
			k, v, ok := strings.Cut(kv, "=")
			if !ok {
				continue
			}
			n := uint64(math.MaxUint32)
			if v != "max" {
				var err error
				if n, err = parseStatUintN(v, 32); err != nil {
					continue
				}
			}
			switch k {
			case "hca_handle":
				e.HcaHandles = uint32(n)
			case "hca_object":
				e.HcaObjects = uint32(n)
			}
		}
		out = append(out, e)
	}
	return out
}

// hugePageSizes are the kernel's huge page sizes as cgroup v2 names them ("2MB", "1GB"),
// read once, in the directory's order (as containerd/cgroups lists them).
var hugePageSizes = sync.OnceValue(func() []string {
	d, err := os.Open("/sys/kernel/mm/hugepages")
	if err != nil {
		return nil
	}
	defer func() { _ = d.Close() }()
	names, err := d.Readdirnames(0)
	if err != nil {
		return nil
	}
	var sizes []string
	for _, name := range names {
		kb, ok := strings.CutPrefix(name, "hugepages-")
		if !ok {
			continue
		}
		kb, ok = strings.CutSuffix(kb, "kB")
		if !ok {
			continue
		}
		n, err := strconv.Atoi(kb)
		if err != nil {
			continue
		}
		switch {
		case n >= 1<<20:
			sizes = append(sizes, strconv.Itoa(n>>20)+"GB")
		case n >= 1<<10:
			sizes = append(sizes, strconv.Itoa(n>>10)+"MB")
		default:
			sizes = append(sizes, kb+"KB")
		}
	}
	return sizes
})
