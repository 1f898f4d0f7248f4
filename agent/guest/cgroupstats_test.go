package guest

import (
	"bufio"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/cgroups/v3/cgroup2"
	cgroupstats "github.com/containerd/cgroups/v3/cgroup2/stats"
	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/proto"
)

// fullCgroup is a cgroup with every file Manager.Stat reads, in the kernel's formats,
// including the odd values: "max", a negative counter, two block devices, an RDMA device.
func fullCgroup(t *testing.T, dir string) {
	t.Helper()
	files := map[string]string{
		"pids.current":        "3\n",
		"pids.max":            "max\n",
		"cpu.stat":            "usage_usec 123456\nuser_usec 100000\nsystem_usec 23456\nnr_periods 10\nnr_throttled 2\nthrottled_usec 5000\nnr_bursts 1\nburst_usec 7\n",
		"cpu.pressure":        "some avg10=1.25 avg60=0.50 avg300=0.10 total=98765\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=12\n",
		"memory.stat":         "anon 4096000\nfile 8192\nkernel_stack 16384\nslab 1000\nsock 0\nshmem 4096\nfile_mapped 8192\nfile_dirty 0\nfile_writeback 0\nanon_thp 0\ninactive_anon 100\nactive_anon 4095900\ninactive_file 4096\nactive_file 4096\nunevictable 0\nslab_reclaimable 500\nslab_unreclaimable 500\npgfault 1234\npgmajfault 5\nworkingset_refault_anon 0\nworkingset_refault 1\nworkingset_activate 2\nworkingset_nodereclaim 3\npgrefill 4\npgscan 5\npgsteal 6\npgactivate 7\npgdeactivate 8\npglazyfree 9\npglazyfreed 10\nthp_fault_alloc 11\nthp_collapse_alloc 12\n",
		"memory.current":      "4202496\n",
		"memory.max":          "100663296\n",
		"memory.peak":         "5000000\n",
		"memory.swap.current": "-1\n",
		"memory.swap.max":     "max\n",
		"memory.pressure":     "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
		"memory.events":       "low 0\nhigh 1\nmax 2\noom 3\noom_kill 4\noom_group_kill 5\n",
		"io.stat":             "254:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n8:16 rbytes=1 wbytes=2 rios=3 wios=4 dbytes=5 dios=6\n",
		"io.pressure":         "some avg10=0.00 avg60=0.00 avg300=0.00 total=44\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=33\n",
		"rdma.current":        "mlx4_0 hca_handle=2 hca_object=2000\n",
		"rdma.max":            "mlx4_0 hca_handle=max hca_object=max\n",
	}
	for _, size := range hugePageSizes() {
		files["hugetlb."+size+".max"] = "max\n"
		files["hugetlb."+size+".current"] = "2097152\n"
		files["hugetlb."+size+".events"] = "max 7\n"
	}
	writeFiles(t, dir, files)
}

func writeFiles(t *testing.T, dir string, files map[string]string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// managerStat is what containerd/cgroups reads from mnt/grp: the reference.
func managerStat(t *testing.T, mnt string) *cgroupstats.Metrics {
	t.Helper()
	m, err := cgroup2.Load("/grp", cgroup2.WithMountpoint(mnt))
	if err != nil {
		t.Fatal(err)
	}
	st, err := m.Stat()
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func readStats(t *testing.T, s *cgroupStats) *cgroupstats.Metrics {
	t.Helper()
	st, err := s.Read()
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// TestCgroupStatsSameAsManager: the kept-open reader returns what Manager.Stat returns for
// the same files, for a cgroup with every file, one with none but cpu.stat, and a copy of a
// live cgroup v2 of this machine.
func TestCgroupStatsSameAsManager(t *testing.T) {
	cases := map[string]func(t *testing.T, dir string){
		"every file": fullCgroup,
		"cpu.stat only": func(t *testing.T, dir string) {
			writeFiles(t, dir, map[string]string{"cpu.stat": "usage_usec 1\nuser_usec 1\nsystem_usec 0\n"})
		},
		"empty": func(t *testing.T, dir string) { writeFiles(t, dir, nil) },
		"live copy": func(t *testing.T, dir string) {
			src := cgroup2Mount(t)
			ents, err := os.ReadDir(src)
			if err != nil {
				t.Fatal(err)
			}
			files := map[string]string{}
			for _, e := range ents {
				if b, err := os.ReadFile(filepath.Join(src, e.Name())); err == nil && e.Type().IsRegular() {
					files[e.Name()] = string(b)
				}
			}
			if files["cpu.stat"] == "" {
				t.Fatalf("%s has no cpu.stat to compare", src)
			}
			writeFiles(t, dir, files)
		},
	}
	for name, fill := range cases {
		t.Run(name, func(t *testing.T) {
			mnt := t.TempDir()
			dir := filepath.Join(mnt, "grp")
			fill(t, dir)
			want := managerStat(t, mnt)
			s := newCgroupStats(dir)
			defer s.Close()
			if got := readStats(t, s); !proto.Equal(want, got) {
				t.Errorf("kept-open reader differs from Manager.Stat:\nManager.Stat: %s\nreader:       %s", prototext.Format(want), prototext.Format(got))
			}
			if name == "empty" {
				return // nothing to read again: files absent at the first read stay absent
			}
			// The second read, through the same descriptors, sees the files as they are now.
			if err := os.WriteFile(filepath.Join(dir, "cpu.stat"), []byte("usage_usec 999999999\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			got := readStats(t, s)
			if u := got.GetCPU().GetUsageUsec(); u != 999999999 {
				t.Errorf("second read: usage_usec %d, want the file's new 999999999", u)
			}
			if !proto.Equal(managerStat(t, mnt), got) {
				t.Errorf("second read differs from Manager.Stat")
			}
		})
	}
}

// TestCgroupStatsLive reads a live cgroup v2 twice through the kept descriptors: the kernel
// makes a cgroup file's content anew at each read from offset 0, so CPU time must grow.
func TestCgroupStatsLive(t *testing.T) {
	s := newCgroupStats(cgroup2Mount(t))
	defer s.Close()
	first := readStats(t, s).GetCPU().GetUsageUsec()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		for x, i := 0, 0; i < 1e6; i++ {
			x += i
		}
		if readStats(t, s).GetCPU().GetUsageUsec() > first {
			return
		}
	}
	t.Fatalf("usage_usec stayed at %d for 10 s of busy loops: the kept descriptor does not read fresh values", first)
}

func TestCgroupStatsErrors(t *testing.T) {
	mnt := t.TempDir()
	dir := filepath.Join(mnt, "grp")

	s := newCgroupStats(dir)
	if _, err := s.Read(); err == nil || !strings.Contains(err.Error(), dir) {
		t.Fatalf("Read of a cgroup that is not there: %v, want an error naming it", err)
	}
	// Not there yet is not for good: the next Read opens it.
	fullCgroup(t, dir)
	if got := readStats(t, s).GetPids().GetCurrent(); got != 3 {
		t.Fatalf("pids.current %d after the cgroup appeared, want 3", got)
	}

	// A malformed cpu.stat fails the read, as it fails Manager.Stat.
	writeFiles(t, dir, map[string]string{"cpu.stat": "usage_usec\n"})
	if _, err := s.Read(); err == nil || !strings.Contains(err.Error(), "cpu.stat") {
		t.Fatalf("Read with a bad cpu.stat: %v, want an error naming the file", err)
	}
	if m, err := cgroup2.Load("/grp", cgroup2.WithMountpoint(mnt)); err != nil {
		t.Fatal(err)
	} else if _, err := m.Stat(); err == nil {
		t.Fatal("Manager.Stat accepts the bad cpu.stat: the reader should too")
	}

	s.Close()
	if _, err := s.Read(); err == nil {
		t.Fatal("Read after Close succeeded")
	}
}

// cgroup2Mount is a cgroup v2 directory of this machine: the first cgroup2 mount.
func cgroup2Mount(t *testing.T) string {
	t.Helper()
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if f := strings.Fields(pre); ok && len(f) >= 5 && strings.HasPrefix(post, "cgroup2 ") {
			return f[4]
		}
	}
	t.Fatal("no cgroup2 mount on this machine (/proc/self/mountinfo)")
	return ""
}
