package metrics

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
)

// fakeProc writes /proc/<pid>/{cmdline,smaps_rollup,status} under root for a process whose
// command line mentions marker.
func fakeProc(t *testing.T, root string, pid int, marker string, rssKB, pssKB, shmemKB int) {
	t.Helper()
	dir := filepath.Join(root, strconv.Itoa(pid))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	files := map[string]string{
		"cmdline":      "qemu-system-x86_64\x00-pidfile\x00" + marker + "/qemu.pid\x00",
		"smaps_rollup": "5590-7ffd ---p 00000000 00:00 0   [rollup]\nRss:  " + strconv.Itoa(rssKB) + " kB\nPss:   " + strconv.Itoa(pssKB) + " kB\nPss_Anon:  1 kB\n",
		"status":       "Name:\tqemu\nVmRSS:\t" + strconv.Itoa(rssKB) + " kB\nRssShmem:\t" + strconv.Itoa(shmemKB) + " kB\n",
		"stat":         strconv.Itoa(pid) + " (qemu (x) y) S 1 2 3 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 100 1000 100\n",
	}
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// sandboxAt makes a sandbox dir under root with a served Sandbox whose QEMU is the fake pid.
func sandboxAt(t *testing.T, root, procRoot, id string, qemuPid int) *Sandbox {
	t.Helper()
	dir := filepath.Join(root, id)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "qemu.pid"), []byte(strconv.Itoa(qemuPid)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	fakeProc(t, procRoot, qemuPid, dir, 200*1024, 150*1024, 100*1024)
	s := NewSandbox(id, dir, 0)
	s.procs.procRoot = procRoot
	srv, err := s.Serve(filepath.Join(dir, SocketName))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := srv.Close(context.Background()); err != nil {
			t.Error(err)
		}
	})
	return s
}

// TestNodeGathersEverySandbox: two served sandboxes and one dir whose shim serves nothing; the
// node endpoint shows both sandboxes' series and counts pods by state.
func TestNodeGathersEverySandbox(t *testing.T) {
	root, procRoot := t.TempDir(), t.TempDir()
	a := sandboxAt(t, root, procRoot, "aaaa", 4001)
	a.Ready(1500*time.Millisecond, 2, 512<<20)
	a.ObserveRPC("/podvm.agent.v1.Agent/CreateContainer", 30*time.Millisecond, nil)
	a.ObserveRPC("/podvm.agent.v1.Agent/CreateContainer", 40*time.Millisecond, errors.New("no"))
	// A guest claiming more than its VM has is capped at the VM's size.
	a.SetGuestMemory(func(context.Context) (uint64, uint64, error) { return 1 << 30, 100 << 20, nil })
	b := sandboxAt(t, root, procRoot, "bbbb", 4002) // still booting
	b.SetGuestMemory(func(context.Context) (uint64, uint64, error) { return 0, 0, errors.New("unimplemented") })
	if err := os.Mkdir(filepath.Join(root, "cccc"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "accel.json"), []byte("{}"), 0o600); err != nil {
		t.Fatal(err) // a file, not a sandbox
	}
	if err := os.Mkdir(filepath.Join(root, "templates"), 0o700); err != nil {
		t.Fatal(err) // the VM templates, not a sandbox
	}

	srv := httptest.NewServer((&Node{StateDir: root, Timeout: time.Second, NotSandboxes: []string{filepath.Join(root, "templates")}}).Handler())
	defer srv.Close()
	body := get(t, srv.URL)
	for _, want := range []string{
		`podvm_sandbox_boot_seconds{sandbox_id="aaaa"} 1.5`,
		`podvm_sandbox_boot_seconds{sandbox_id="bbbb"} 0`,
		`podvm_sandbox_memory_bytes{sandbox_id="aaaa"} 5.36870912e+08`,
		`podvm_process_resident_memory_bytes{process="qemu",sandbox_id="aaaa"} 2.097152e+08`,
		`podvm_process_proportional_memory_bytes{process="qemu",sandbox_id="bbbb"} 1.572864e+08`,
		`podvm_guest_memory_touched_bytes{sandbox_id="aaaa"} 1.048576e+08`,
		`podvm_agent_rpc_duration_seconds_count{method="CreateContainer",outcome="ok",sandbox_id="aaaa"} 1`,
		`podvm_agent_rpc_duration_seconds_count{method="CreateContainer",outcome="error",sandbox_id="aaaa"} 1`,
		`podvm_sandbox_state{sandbox_id="bbbb",state="booting"} 1`,
		`podvm_process_cpu_seconds_total{process="qemu",sandbox_id="aaaa"} 3`,
		`podvm_guest_memory_total_bytes{sandbox_id="aaaa"} 5.36870912e+08`,
		`podvm_guest_memory_used_bytes{sandbox_id="aaaa"} 4.32013312e+08`,
		`podvm_pods{state="ready"} 1`,
		`podvm_pods{state="booting"} 1`,
		`podvm_pods{state="unreachable"} 1`,
		`podvm_pods{state="stopping"} 0`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("metrics lack %s\n%s", want, body)
		}
	}
	if strings.Contains(body, `podvm_guest_memory_total_bytes{sandbox_id="bbbb"}`) {
		t.Errorf("guest memory series for a guest that did not answer:\n%s", body)
	}
	if strings.Contains(body, `process="virtiofsd"`) {
		t.Errorf("a virtiofsd series without a virtiofsd pid file:\n%s", body)
	}
}

// TestStalePidFileIgnored: a pid file whose pid now belongs to another process (its command
// line does not name the sandbox) gives no memory series.
func TestStalePidFileIgnored(t *testing.T) {
	root, procRoot := t.TempDir(), t.TempDir()
	s := sandboxAt(t, root, procRoot, "aaaa", 4001)
	fakeProc(t, procRoot, 4001, "/somewhere/else", 1, 1, 1)
	fams, err := s.Gatherer().Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if strings.HasPrefix(f.GetName(), "podvm_process_") || f.GetName() == "podvm_guest_memory_touched_bytes" {
			t.Errorf("series %s from a reused pid: %v", f.GetName(), f.GetMetric())
		}
	}
}

// TestServerCloseRemovesSocket: Close leaves nothing in the state dir.
func TestServerCloseRemovesSocket(t *testing.T) {
	dir := t.TempDir()
	s := NewSandbox("x", dir, os.Getpid())
	srv, err := s.Serve(filepath.Join(dir, SocketName))
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(filepath.Join(dir, SocketName)); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket: %v %v, want mode 0600", fi, err)
	}
	if err := srv.Close(t.Context()); err != nil {
		t.Fatal(err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Fatalf("left in the state dir: %v", entries)
	}
}

// TestNoStateDir: before any pod ran there is no state dir; the endpoint still answers.
func TestNoStateDir(t *testing.T) {
	fams, err := (&Node{StateDir: filepath.Join(t.TempDir(), "absent")}).Gather(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if len(fams) != 1 || fams[0].GetName() != "podvm_pods" {
		t.Fatalf("families %v, want podvm_pods only", names(fams))
	}
}

func TestKBFields(t *testing.T) {
	got := kBFields([]byte("Rss:   12 kB\nPss: x kB\nName: qemu\nVmFlags: rd wr\nRssShmem:\t3 kB\n"))
	if len(got) != 2 || got["Rss"] != 12*1024 || got["RssShmem"] != 3*1024 {
		t.Fatalf("kBFields = %v", got)
	}
}

func get(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET: %s %v", resp.Status, err)
	}
	return string(b)
}

func names(fams []*dto.MetricFamily) []string {
	var out []string
	for _, f := range fams {
		out = append(out, f.GetName())
	}
	return out
}

// TestProcCPUOfThisProcess checks ProcCPU against CPU this process burns: it must count it,
// in seconds, and not count sleep.
func TestProcCPUOfThisProcess(t *testing.T) {
	before, err := ProcCPU("/proc", os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	spin := time.Now()
	n := 0
	for time.Since(spin) < 300*time.Millisecond {
		n++
	}
	after, err := ProcCPU("/proc", os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	// The spinning and what the runtime's other threads did meanwhile, but not the sleep
	// (that would make it 0.6 s or more); at least a sixth of the spinning, however loaded
	// the machine.
	if d := after - before; d < 0.05 || d > 0.45 {
		t.Fatalf("ProcCPU grew by %.3f s over 300 ms asleep and 300 ms spinning (%d loops), want 0.05..0.45 s", d, n)
	}
}
