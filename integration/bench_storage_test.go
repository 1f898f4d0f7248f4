package integration

// BenchmarkStorage: I/O throughput inside a container, podvm next to runc in the same run, for
// the container's rootfs (podvm: overlay shared over virtio-fs), an emptyDir (podvm: a bind
// over virtio-fs) and a block volume (podvm: a loop device hot-plugged as virtio-blk). Each
// measurement is busybox dd in the container, timed by the container's /proc/uptime (10 ms
// resolution), the median of storageReps runs:
//
//	seq-write  dd bs=1M count=64 conv=fsync
//	seq-read   dd bs=1M iflag=direct          (page cache read where O_DIRECT is refused)
//	4k-write   dd bs=4k count=4096 oflag=direct (conv=fsync where O_DIRECT is refused)
//	4k-read    dd bs=4k count=4096 iflag=direct
//
// busybox dd has no random offsets, so the 4k numbers are small sequential direct I/O: the
// per-request cost of each path, not a random-access benchmark. The numbers are reported as
// MB/s metrics named <handler>-<target>-<op> and as podvm/runc ratios (x-runc), and logged as
// a table. `make bench` runs it; docs/storage.md says how to read it.

import (
	"bytes"
	"context"
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/podvm/podvm/integration/harness"
)

const (
	storageReps = 3
	storageMiB  = 64
	storage4k   = 4096 // 4 KiB blocks per 4k run (16 MiB)
)

var (
	storageOnce    sync.Once
	storageResults map[string]float64 // "<handler>-<target>-<op>" → MB/s
	storageNotes   []string
	storagePrint   sync.Once
)

// volInTest runs fn as a test of its own (harness.Start needs a *testing.T) and fails b if it
// fails.
func volInTest(b *testing.B, fn func(t *testing.T)) {
	b.Helper()
	ran := false
	ok := testing.RunTests(func(string, string) (bool, error) { return true, nil },
		[]testing.InternalTest{{Name: b.Name(), F: func(t *testing.T) { ran = true; fn(t) }}})
	if !ran || !ok {
		b.Fatal("the storage benchmark's environment failed; see the log above")
	}
}

func BenchmarkStorage(b *testing.B) {
	// Go calls a benchmark more than once (b.N = 1, then the -benchtime count); the VMs are
	// measured once and every call reports the same numbers.
	storageOnce.Do(func() { storageResults = measureStorage(b) })
	if storageResults == nil {
		b.Fatal("no measurements")
	}
	targets := []string{"rootfs", "emptydir", "block"}
	ops := []string{"seq-write", "seq-read", "4k-write", "4k-read"}
	var buf bytes.Buffer
	fmt.Fprintf(&buf, "storage throughput (MB/s, median of %d, same run)\n| target | op | runc | podvm | podvm/runc |\n| --- | --- | --- | --- | --- |\n", storageReps)
	for _, tg := range targets {
		for _, op := range ops {
			r, p := storageResults["runc-"+tg+"-"+op], storageResults["podvm-"+tg+"-"+op]
			b.ReportMetric(r, "runc-"+tg+"-"+op+"-MB/s")
			b.ReportMetric(p, "podvm-"+tg+"-"+op+"-MB/s")
			ratio := "n/a"
			if r > 0 && p > 0 {
				b.ReportMetric(p/r, tg+"-"+op+"-x-runc")
				ratio = fmt.Sprintf("%.2fx", p/r)
			}
			fmt.Fprintf(&buf, "| %s | %s | %.1f | %.1f | %s |\n", tg, op, r, p, ratio)
		}
	}
	for _, n := range storageNotes {
		fmt.Fprintf(&buf, "note: %s\n", n)
	}
	// Printed once, to stdout: Go cuts long benchmark logs short.
	storagePrint.Do(func() { fmt.Print(buf.String()) })
}

func measureStorage(b *testing.B) map[string]float64 {
	res := map[string]float64{}
	volInTest(b, func(t *testing.T) {
		env := volEnv(t, "")
		ctx, cancel := context.WithTimeout(t.Context(), 30*time.Minute)
		defer cancel()
		for _, h := range []string{"runc", "podvm"} {
			dev := losetup(t, (storageMiB+16)<<20)
			scratch := kubeletVolume(t, t.TempDir(), "empty-dir", "scratch", nil)
			pod := runPodWithBusybox(ctx, t, env, harness.PodOptions{Name: "bench-storage-" + h, Namespace: "bench", Handler: h})
			cfg := env.ContainerConfig(harness.ContainerOptions{Name: "io", Command: []string{"sleep", "3600"}})
			cfg.Mounts = []*runtimeapi.Mount{{ContainerPath: "/scratch", HostPath: scratch}}
			cfg.Devices = []*runtimeapi.Device{{ContainerPath: "/dev/xvdb", HostPath: dev, Permissions: "rwm"}}
			id := startContainer(t, ctx, env, pod, cfg)
			for _, tg := range []struct{ name, file string }{
				{"rootfs", "/bench.dat"}, {"emptydir", "/scratch/bench.dat"}, {"block", "/dev/xvdb"},
			} {
				for op, v := range storageRun(ctx, t, env, id, h, tg.name, tg.file) {
					res[h+"-"+tg.name+"-"+op] = v
				}
			}
			removePod(ctx, t, env, pod)
		}
		env.AssertNoLeaks(t)
	})
	return res
}

// storageRun measures the four operations on file in container id; it returns MB/s by op.
func storageRun(ctx context.Context, t *testing.T, env *harness.Env, id, handler, target, file string) map[string]float64 {
	t.Helper()
	// Does the path take O_DIRECT? virtio-fs does only with some cache modes.
	volMust(ctx, t, env, id, fmt.Sprintf("dd if=/dev/zero of=%s bs=1M count=%d conv=fsync 2>/dev/null", file, storageMiB))
	direct := true
	if code, _, _ := volSh(ctx, t, env, id, fmt.Sprintf("dd if=%s of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null", file)); code != 0 {
		direct = false
		storageNotes = append(storageNotes, fmt.Sprintf("%s %s: O_DIRECT refused; reads are page cache reads, 4k writes use conv=fsync", handler, target))
	}
	rflag, wflag := "iflag=direct", "oflag=direct"
	if !direct {
		rflag, wflag = "", "conv=fsync"
	}
	cmds := map[string]struct {
		cmd   string
		bytes float64
	}{
		"seq-write": {fmt.Sprintf("dd if=/dev/zero of=%s bs=1M count=%d conv=fsync", file, storageMiB), storageMiB << 20},
		"seq-read":  {fmt.Sprintf("dd if=%s of=/dev/null bs=1M count=%d %s", file, storageMiB, rflag), storageMiB << 20},
		"4k-write":  {fmt.Sprintf("dd if=/dev/zero of=%s bs=4k count=%d %s", file, storage4k, wflag), storage4k * 4096},
		"4k-read":   {fmt.Sprintf("dd if=%s of=/dev/null bs=4k count=%d %s", file, storage4k, rflag), storage4k * 4096},
	}
	if !strings.HasPrefix(file, "/dev/") {
		// Writes replace the file without truncating it, as on the device.
		for k, c := range cmds {
			if strings.Contains(c.cmd, "of="+file) {
				c.cmd += " conv=notrunc"
				c.cmd = strings.Replace(c.cmd, "conv=fsync conv=notrunc", "conv=fsync,notrunc", 1)
				cmds[k] = c
			}
		}
	}
	out := map[string]float64{}
	for _, op := range []string{"seq-write", "seq-read", "4k-write", "4k-read"} {
		c := cmds[op]
		var rates []float64
		for range storageReps {
			script := "a=$(cut -d' ' -f1 /proc/uptime); " + c.cmd + " 2>/tmp/dd.err || { cat /tmp/dd.err >&2; exit 1; }; b=$(cut -d' ' -f1 /proc/uptime); echo $a $b"
			f := strings.Fields(volMust(ctx, t, env, id, script))
			if len(f) != 2 {
				t.Fatalf("%s %s %s: unexpected output %q", handler, target, op, f)
			}
			t0, err0 := strconv.ParseFloat(f[0], 64)
			t1, err1 := strconv.ParseFloat(f[1], 64)
			if err0 != nil || err1 != nil {
				t.Fatalf("%s %s %s: bad times %q", handler, target, op, f)
			}
			dt := math.Max(t1-t0, 0.01) // /proc/uptime has 10 ms resolution
			rates = append(rates, c.bytes/dt/1e6)
		}
		sort.Float64s(rates)
		out[op] = rates[len(rates)/2]
		t.Logf("%s %s %s: %.1f MB/s (runs %v)", handler, target, op, out[op], rates)
	}
	return out
}
