package metrics

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Sandbox is one pod VM's metrics, kept by its shim.
type Sandbox struct {
	reg   *prometheus.Registry
	boot  prometheus.Gauge
	vcpus prometheus.Gauge
	mem   prometheus.Gauge
	rpc   *prometheus.HistogramVec
	procs *procCollector

	mu    sync.Mutex
	state string
	// vmBytes is the VM's memory (Ready); the guest's figures are capped at it.
	vmBytes uint64
	// guestMem asks the guest agent for its memory (SetGuestMemory); nil: not yet.
	guestMem func(ctx context.Context) (total, available uint64, err error)
	// guest is the last answer, ok when it came.
	guest struct {
		total, used uint64
		ok          bool
	}
}

// NewSandbox returns the metrics of sandbox id, whose VM keeps its state (pid files) in
// stateDir; selfPid is the shim's pid. Its state starts as StateBooting.
func NewSandbox(id, stateDir string, selfPid int) *Sandbox {
	s := &Sandbox{reg: prometheus.NewRegistry(), state: StateBooting}
	r := prometheus.WrapRegistererWith(prometheus.Labels{LabelSandbox: id}, s.reg)
	s.boot = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: namespace, Name: "sandbox_boot_seconds",
		Help: "Time from the sandbox's creation to its guest being ready (VM started, agent answered, pod set up)."})
	s.vcpus = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: namespace, Name: "sandbox_vcpus",
		Help: "vCPUs of the pod VM."})
	s.mem = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: namespace, Name: "sandbox_memory_bytes",
		Help: "Memory of the pod VM (guest RAM size)."})
	s.rpc = prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: namespace, Name: "agent_rpc_duration_seconds",
		Help:    "Latency of the shim's calls to the guest agent, by method and outcome (ReadStdio waits for output, so it is as long as the process is quiet).",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16)}, []string{"method", "outcome"})
	s.procs = &procCollector{procRoot: "/proc", stateDir: stateDir, selfPid: selfPid, state: s.State, guest: s.guestMemory}
	r.MustRegister(s.boot, s.vcpus, s.mem, s.rpc, s.procs)
	return s
}

// Ready records a booted VM: how long it took and its size.
func (s *Sandbox) Ready(boot time.Duration, vcpus int, memoryBytes int64) {
	s.boot.Set(boot.Seconds())
	s.vcpus.Set(float64(vcpus))
	s.mem.Set(float64(memoryBytes))
	s.mu.Lock()
	s.vmBytes = uint64(max(memoryBytes, 0))
	s.mu.Unlock()
	s.SetState(StateReady)
}

// SetGuestMemory gives the sandbox the call that asks the guest for its memory (the agent's
// MemInfo); each scrape makes it, bounded by guestTimeout.
func (s *Sandbox) SetGuestMemory(f func(ctx context.Context) (total, available uint64, err error)) {
	s.mu.Lock()
	s.guestMem = f
	s.mu.Unlock()
}

// guestTimeout bounds the guest memory call of one scrape.
const guestTimeout = time.Second

// refreshGuest asks the guest for its memory. The answer is the guest's word: it is capped
// at the VM's size, so a hostile guest can only misreport its own pod's figures.
func (s *Sandbox) refreshGuest(ctx context.Context) {
	s.mu.Lock()
	f, vm := s.guestMem, s.vmBytes
	s.mu.Unlock()
	if f == nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, guestTimeout)
	defer cancel()
	total, avail, err := f(ctx)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.guest.ok = err == nil
	if vm > 0 {
		total = min(total, vm)
	}
	s.guest.total, s.guest.used = total, total-min(avail, total)
}

// guestMemory returns the guest's last memory answer.
func (s *Sandbox) guestMemory() (total, used uint64, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.guest.total, s.guest.used, s.guest.ok
}

// SetState sets the sandbox's state (StateBooting, StateReady, StateStopping).
func (s *Sandbox) SetState(state string) {
	s.mu.Lock()
	s.state = state
	s.mu.Unlock()
}

// State returns the sandbox's state.
func (s *Sandbox) State() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.state
}

// ObserveRPC records one agent RPC: its full method name, how long it took and its error.
func (s *Sandbox) ObserveRPC(method string, d time.Duration, err error) {
	outcome := "ok"
	if err != nil {
		outcome = "error"
	}
	s.rpc.WithLabelValues(filepath.Base(method), outcome).Observe(d.Seconds())
}

// Gatherer is the sandbox's registry.
func (s *Sandbox) Gatherer() prometheus.Gatherer { return s.reg }

// Server serves a Sandbox's metrics on a unix socket.
type Server struct {
	srv  *http.Server
	path string
	done chan struct{}
}

// Serve serves the metrics in the Prometheus text format over HTTP on the unix socket path
// (mode 0600; a stale socket there is replaced) until Close.
func (s *Sandbox) Serve(path string) (*Server, error) {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("metrics socket: %w", err)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("metrics socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		_ = l.Close()
		return nil, fmt.Errorf("metrics socket: %w", err)
	}
	mux := http.NewServeMux()
	h := promhttp.HandlerFor(s.reg, promhttp.HandlerOpts{})
	mux.HandleFunc("/metrics", func(w http.ResponseWriter, r *http.Request) {
		s.refreshGuest(r.Context())
		h.ServeHTTP(w, r)
	})
	srv := &Server{srv: &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}, path: path, done: make(chan struct{})}
	go func() {
		defer close(srv.done)
		_ = srv.srv.Serve(l) // returns http.ErrServerClosed on Close
	}()
	return srv, nil
}

// Close stops serving and removes the socket.
func (s *Server) Close(ctx context.Context) error {
	err := s.srv.Shutdown(ctx)
	if err != nil {
		err = errors.Join(err, s.srv.Close())
	}
	<-s.done
	if rerr := os.Remove(s.path); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
		err = errors.Join(err, rerr)
	}
	return err
}

// pidSuffix ends the pid files a hypervisor driver keeps in the state dir.
const pidSuffix = ".pid"

// procCollector reads, at each scrape, the memory of the sandbox's processes and its state.
type procCollector struct {
	procRoot string
	stateDir string
	selfPid  int
	state    func() string
	guest    func() (total, used uint64, ok bool)
}

var (
	rssDesc = prometheus.NewDesc(namespace+"_process_resident_memory_bytes",
		"Resident memory (RSS) of a process of the pod VM: qemu, virtiofsd or shim.", []string{"process"}, nil)
	pssDesc = prometheus.NewDesc(namespace+"_process_proportional_memory_bytes",
		"Proportional set size (PSS: shared pages divided among their users) of a process of the pod VM: qemu, virtiofsd or shim.", []string{"process"}, nil)
	guestMemDesc = prometheus.NewDesc(namespace+"_guest_memory_touched_bytes",
		"Guest RAM the guest has touched so far, as the host sees it (QEMU's resident shared memory: the memfd backing guest RAM). Guest RAM is not returned to the host once used.", nil, nil)
	cpuDesc = prometheus.NewDesc(namespace+"_process_cpu_seconds_total",
		"CPU time (user and system) of a process of the pod VM: qemu, virtiofsd or shim.", []string{"process"}, nil)
	guestTotalDesc = prometheus.NewDesc(namespace+"_guest_memory_total_bytes",
		"Memory the guest kernel manages (its MemTotal), as the guest agent reports it.", nil, nil)
	guestUsedDesc = prometheus.NewDesc(namespace+"_guest_memory_used_bytes",
		"Memory in use in the guest (MemTotal - MemAvailable), as the guest agent reports it.", nil, nil)
	stateDesc = prometheus.NewDesc(namespace+"_sandbox_state",
		"1 for the sandbox's current state (booting, ready, stopping), 0 for the others.", []string{"state"}, nil)
)

func (c *procCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- rssDesc
	ch <- pssDesc
	ch <- guestMemDesc
	ch <- cpuDesc
	ch <- guestTotalDesc
	ch <- guestUsedDesc
	ch <- stateDesc
}

func (c *procCollector) Collect(ch chan<- prometheus.Metric) {
	cur := c.state()
	for _, st := range States {
		v := 0.0
		if st == cur {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(stateDesc, prometheus.GaugeValue, v, st)
	}
	if total, used, ok := c.guest(); ok {
		ch <- prometheus.MustNewConstMetric(guestTotalDesc, prometheus.GaugeValue, float64(total))
		ch <- prometheus.MustNewConstMetric(guestUsedDesc, prometheus.GaugeValue, float64(used))
	}
	for name, pid := range c.processes() {
		m, err := readProcMem(c.procRoot, pid)
		if err != nil {
			continue // the process exited between the pid file and /proc
		}
		ch <- prometheus.MustNewConstMetric(rssDesc, prometheus.GaugeValue, float64(m.RSS), name)
		ch <- prometheus.MustNewConstMetric(pssDesc, prometheus.GaugeValue, float64(m.PSS), name)
		if name == "qemu" {
			ch <- prometheus.MustNewConstMetric(guestMemDesc, prometheus.GaugeValue, float64(m.Shmem))
		}
		if cpu, err := ProcCPU(c.procRoot, pid); err == nil {
			ch <- prometheus.MustNewConstMetric(cpuDesc, prometheus.CounterValue, cpu, name)
		}
	}
}

// processes are the sandbox's running processes by name: the shim, and every <name>.pid in
// the state dir (the hypervisor driver's processes: qemu.pid, virtiofsd.pid) whose process
// names the state dir on its command line. One that is not running (yet, or any more) is
// left out rather than reported as 0.
func (c *procCollector) processes() map[string]int {
	out := map[string]int{}
	if c.selfPid > 0 {
		out["shim"] = c.selfPid
	}
	entries, _ := os.ReadDir(c.stateDir) // none readable: only the shim
	for _, e := range entries {
		name, ok := strings.CutSuffix(e.Name(), pidSuffix)
		if !ok || name == "" || !e.Type().IsRegular() {
			continue
		}
		if pid, ok := pidFromFile(c.procRoot, filepath.Join(c.stateDir, e.Name()), c.stateDir); ok {
			out[name] = pid
		}
	}
	return out
}
