package guest

import (
	"fmt"
	"os"
	"sync"

	cgroupstats "github.com/containerd/cgroups/v3/cgroup2/stats"
	"github.com/containerd/console"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/runc/libcontainer/utils"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// fakeRuntime is a containerRuntime without containers: its processes hold the stdio the
// server gave them (so output, EOF and terminals behave as with libcontainer) and run until
// a signal or exit ends them. fail injects an error into one operation.
type fakeRuntime struct {
	mu         sync.Mutex
	containers map[string]*fakeContainer
	fail       map[string]error
	nextPid    int
	// beforeCreate, if set, runs at the start of Create (outside mu), so a test can hold a
	// create in progress.
	beforeCreate func(id string)
}

// The operations fail can name.
const (
	opCreate    = "create"
	opStart     = "start"
	opExec      = "exec"
	opPid       = "pid"
	opSignalAll = "signalAll"
	opProcesses = "processes"
	opPause     = "pause"
	opResume    = "resume"
	opUpdate    = "update"
	opStats     = "stats"
	opWatchOOM  = "watchOOM"
	opDestroy   = "destroy"
)

func newFakeRuntime() *fakeRuntime {
	return &fakeRuntime{containers: map[string]*fakeContainer{}, fail: map[string]error{}, nextPid: 100}
}

// failOn makes op fail with err from now on (nil: succeed again).
func (r *fakeRuntime) failOn(op string, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err == nil {
		delete(r.fail, op)
		return
	}
	r.fail[op] = err
}

func (r *fakeRuntime) err(op string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.fail[op]
}

func (r *fakeRuntime) get(id string) *fakeContainer {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.containers[id]
}

func (r *fakeRuntime) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.containers)
}

func (r *fakeRuntime) Create(id string, spec *specs.Spec, init *procConfig) (runtimeContainer, runtimeProcess, error) {
	if r.beforeCreate != nil {
		r.beforeCreate(id)
	}
	if err := r.err(opCreate); err != nil {
		return nil, nil, err
	}
	p, err := r.newProcess(init)
	if err != nil {
		return nil, nil, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.containers[id]; ok {
		p.exit(255)
		return nil, nil, fmt.Errorf("container %s exists: %w", id, errdefs.ErrAlreadyExists)
	}
	c := &fakeContainer{rt: r, id: id, init: p, spec: spec}
	r.containers[id] = c
	return c, p, nil
}

// newProcess "starts" a process: it keeps its own copies of the stdio ends, as a child would,
// and in terminal mode makes a pty and sends its master over the console socket.
func (r *fakeRuntime) newProcess(cfg *procConfig) (*fakeProcess, error) {
	r.mu.Lock()
	r.nextPid++
	p := &fakeProcess{rt: r, pid: r.nextPid, done: make(chan struct{})}
	r.mu.Unlock()
	if cfg.consoleSocket != nil {
		pty, slave, err := console.NewPty()
		if err != nil {
			return nil, err
		}
		defer pty.Close()
		fd, err := unix.Dup(int(pty.Fd()))
		if err != nil {
			return nil, err
		}
		master := os.NewFile(uintptr(fd), "ptmx")
		defer master.Close()
		// The counterpart of process.go's RecvFile, deprecated alike with no public successor yet.
		if err := utils.SendFile(cfg.consoleSocket, master); err != nil { //nolint:staticcheck // SA1019
			return nil, err
		}
		if p.out, err = os.OpenFile(slave, os.O_RDWR|unix.O_NOCTTY, 0); err != nil {
			return nil, err
		}
		return p, nil
	}
	var err error
	for _, f := range []struct {
		from *os.File
		to   **os.File
	}{{cfg.stdin, &p.in}, {cfg.stdout, &p.out}, {cfg.stderr, &p.errf}} {
		if f.from == nil {
			continue
		}
		if *f.to, err = dup(f.from); err != nil {
			p.exit(255)
			return nil, err
		}
	}
	return p, nil
}

func dup(f *os.File) (*os.File, error) {
	fd, err := unix.Dup(int(f.Fd()))
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(fd), f.Name()), nil
}

type fakeContainer struct {
	rt   *fakeRuntime
	id   string
	init *fakeProcess
	spec *specs.Spec

	mu        sync.Mutex
	started   bool
	paused    bool
	destroyed bool
	execs     []*fakeProcess
	resources *specs.LinuxResources
	onOOM     func()
}

func (c *fakeContainer) Start() error {
	if err := c.rt.err(opStart); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.started {
		return fmt.Errorf("container %s already started: %w", c.id, errdefs.ErrFailedPrecondition)
	}
	c.started = true
	return nil
}

func (c *fakeContainer) Exec(cfg *procConfig) (runtimeProcess, error) {
	if err := c.rt.err(opExec); err != nil {
		return nil, err
	}
	p, err := c.rt.newProcess(cfg)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.execs = append(c.execs, p)
	return p, nil
}

func (c *fakeContainer) Signal(sig unix.Signal) error { return c.init.Signal(sig) }

func (c *fakeContainer) SignalAll(sig unix.Signal) error {
	if err := c.rt.err(opSignalAll); err != nil {
		return err
	}
	for _, p := range c.processes() {
		_ = p.Signal(sig)
	}
	return nil
}

func (c *fakeContainer) processes() []*fakeProcess {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]*fakeProcess{c.init}, c.execs...)
}

func (c *fakeContainer) Processes() ([]int, error) {
	if err := c.rt.err(opProcesses); err != nil {
		return nil, err
	}
	var pids []int
	for _, p := range c.processes() {
		if !p.exited() {
			pids = append(pids, p.pid)
		}
	}
	return pids, nil
}

func (c *fakeContainer) Pause() error  { return c.setPaused(opPause, true) }
func (c *fakeContainer) Resume() error { return c.setPaused(opResume, false) }

// setPaused refuses, as libcontainer does, to pause a paused container or resume a running one.
func (c *fakeContainer) setPaused(op string, paused bool) error {
	if err := c.rt.err(op); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.paused == paused {
		return fmt.Errorf("container %s: %s: paused=%v: %w", c.id, op, c.paused, errdefs.ErrFailedPrecondition)
	}
	c.paused = paused
	return nil
}

func (c *fakeContainer) isPaused() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.paused
}

func (c *fakeContainer) Update(r *specs.LinuxResources) error {
	return c.set(opUpdate, func() { c.resources = r })
}

// set fails as the runtime was told op fails, or calls f under the container's lock.
func (c *fakeContainer) set(op string, f func()) error {
	if err := c.rt.err(op); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	f()
	return nil
}

// Stats reports the number of live processes as the pids count.
func (c *fakeContainer) Stats() (*cgroupstats.Metrics, error) {
	if err := c.rt.err(opStats); err != nil {
		return nil, err
	}
	pids, _ := c.Processes()
	return &cgroupstats.Metrics{Pids: &cgroupstats.PidsStat{Current: uint64(len(pids))}}, nil
}

func (c *fakeContainer) WatchOOM(onOOM func()) error {
	return c.set(opWatchOOM, func() { c.onOOM = onOOM })
}

// oom plays the kernel OOM-killing a process of the container.
func (c *fakeContainer) oom() {
	c.mu.Lock()
	on := c.onOOM
	c.mu.Unlock()
	if on != nil {
		on()
	}
}

func (c *fakeContainer) Destroy() error {
	if err := c.rt.err(opDestroy); err != nil {
		return err
	}
	if !c.init.exited() {
		return fmt.Errorf("container %s is running: %w", c.id, errdefs.ErrFailedPrecondition)
	}
	c.mu.Lock()
	c.destroyed = true
	c.mu.Unlock()
	c.rt.mu.Lock()
	delete(c.rt.containers, c.id)
	c.rt.mu.Unlock()
	return nil
}

type fakeProcess struct {
	rt   *fakeRuntime
	pid  int
	done chan struct{}
	once sync.Once
	// The process's ends of its stdio (out is the pty slave in terminal mode).
	in, out, errf *os.File
	status        uint32
}

func (p *fakeProcess) Pid() (int, error) {
	if err := p.rt.err(opPid); err != nil {
		return 0, err
	}
	return p.pid, nil
}

func (p *fakeProcess) Wait() uint32 {
	<-p.done
	return p.status
}

// Signal ends the process with 128+sig; 0 only checks that it lives.
func (p *fakeProcess) Signal(sig unix.Signal) error {
	if p.exited() {
		return fmt.Errorf("%w: %w", os.ErrProcessDone, errdefs.ErrNotFound)
	}
	if sig != 0 {
		p.exit(128 + uint32(sig))
	}
	return nil
}

// exit ends the process with status, closing its stdio ends.
func (p *fakeProcess) exit(status uint32) {
	p.once.Do(func() {
		for _, f := range []*os.File{p.in, p.out, p.errf} {
			if f != nil {
				f.Close()
			}
		}
		p.status = status
		close(p.done)
	})
}

func (p *fakeProcess) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}
