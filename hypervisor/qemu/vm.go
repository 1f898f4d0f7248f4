package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/mdlayher/vsock"

	"github.com/podvm/podvm/hypervisor"
	"github.com/podvm/podvm/hypervisor/qmp"
	"github.com/podvm/podvm/internal/logfile"
)

const (
	// quitGrace is how long Stop waits for QEMU to exit after QMP quit before SIGKILL.
	quitGrace = 5 * time.Second
	// killWait bounds waiting for a SIGKILLed QEMU to be reaped.
	killWait = 10 * time.Second
)

type vmState int

const (
	stateNew vmState = iota
	stateStarting
	stateRunning
	stateStopped
)

func (s vmState) String() string {
	return [...]string{"new", "starting", "running", "stopped"}[s]
}

// VM is one QEMU virtual machine. It implements hypervisor.Hypervisor.
type VM struct {
	cfg Config

	// life serialises Start and Stop.
	life sync.Mutex

	mu      sync.Mutex
	state   vmState
	cmd     *exec.Cmd
	mon     qmp.Monitor
	fs      *virtiofsd
	exitErr error

	done     chan struct{} // closed when QEMU exits
	doneOnce sync.Once

	// hot-plug bookkeeping, guarded by hp
	hp      sync.Mutex
	plugged map[string]*pluggedBlock // by hypervisor device ID
	slots   []string                 // root port index -> device ID, "" = free
	// noIOUring: the host refused io_uring to a block device; the next ones use threads.
	noIOUring bool

	waitMu  sync.Mutex
	deleted map[string]chan struct{} // QEMU device id -> closed on DEVICE_DELETED
}

var _ hypervisor.Hypervisor = (*VM)(nil)

// Kind is this driver's hypervisor kind (the node config's hypervisor.kind).
const Kind = "qemu"

// Driver is QEMU as a hypervisor.Driver.
func Driver() hypervisor.Driver {
	return hypervisor.Driver{
		Kind: Kind,
		New: func(ctx context.Context, cfg hypervisor.Config) (hypervisor.Hypervisor, error) {
			vm, err := New(ctx, cfg)
			if err != nil {
				return nil, err // not a typed nil in the interface
			}
			return vm, nil
		},
		Cleanup:     Cleanup,
		ConsolePath: func(stateDir string) string { return filepath.Join(stateDir, ConsoleLog) },
		Template: func(ctx context.Context, cfg hypervisor.Config, dir string) (hypervisor.Template, error) {
			t, err := FindTemplate(ctx, cfg, dir)
			if err != nil {
				return nil, err // not a typed nil in the interface
			}
			return t, nil
		},
	}
}

// New resolves and validates cfg and checks that the files it names exist. It starts nothing.
func New(ctx context.Context, hc hypervisor.Config) (*VM, error) {
	cfg, err := Config(hc).Resolve(ctx)
	if err != nil {
		return nil, fmt.Errorf("invalid qemu config: %w", err)
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	var errs []error
	if _, err := exec.LookPath(cfg.Binary); err != nil {
		errs = append(errs, fmt.Errorf("qemu binary %q (Binary, hypervisor.qemu_path): not an executable: %w", cfg.Binary, err))
	}
	for _, f := range []struct{ field, path string }{{"Kernel", cfg.Kernel}, {"Initrd", cfg.Initrd}, {"RootImage", cfg.RootImage}, {"Firmware", cfg.Firmware}} {
		if f.path == "" {
			continue
		}
		if st, err := os.Stat(f.path); err != nil {
			errs = append(errs, fmt.Errorf("%s %q: %w", f.field, f.path, err))
		} else if !st.Mode().IsRegular() {
			errs = append(errs, fmt.Errorf("%s %q: not a regular file", f.field, f.path))
		}
	}
	if cfg.SharedDir != "" {
		if st, err := os.Stat(cfg.SharedDir); err != nil {
			errs = append(errs, fmt.Errorf("SharedDir %q: %w; create it before starting the VM", cfg.SharedDir, err))
		} else if !st.IsDir() {
			errs = append(errs, fmt.Errorf("SharedDir %q: not a directory", cfg.SharedDir))
		}
		if _, err := exec.LookPath(cfg.VirtiofsdPath); err != nil {
			errs = append(errs, fmt.Errorf("VirtiofsdPath %q: not an executable: %w", cfg.VirtiofsdPath, err))
		}
	}
	if cfg.Accel == AccelKVM && DetectAccel() != AccelKVM {
		errs = append(errs, errors.New("accel \"kvm\" (Accel): /dev/kvm is missing or unusable here; load kvm_intel/kvm_amd, or use Accel \"tcg\" or \"auto\""))
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("invalid qemu config: %w", errors.Join(errs...))
	}
	return newVM(cfg), nil
}

func newVM(cfg Config) *VM {
	slots := max(cfg.HotplugSlots, 0)
	return &VM{
		cfg:     cfg,
		done:    make(chan struct{}),
		plugged: make(map[string]*pluggedBlock),
		slots:   make([]string, slots),
		deleted: make(map[string]chan struct{}),
	}
}

// Config returns the resolved configuration.
func (v *VM) Config() Config { return v.cfg }

// StateDir is the VM's state directory.
func (v *VM) StateDir() string { return v.cfg.StateDir }

// ConsolePath is the file the guest's serial console is written to: at most ConsoleLogMax
// bytes, with the part before in ConsolePath()+logfile.RotatedSuffix. Read its end with logfile.ReadTail
// or logfile.TailLines.
func (v *VM) ConsolePath() string { return v.cfg.path(ConsoleLog) }

// Done implements hypervisor.Hypervisor. It is also closed by Stop of a VM never started.
func (v *VM) Done() <-chan struct{} { return v.done }

// Pid implements hypervisor.Hypervisor.
func (v *VM) Pid() int {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.cmd == nil || v.cmd.Process == nil {
		return 0
	}
	return v.cmd.Process.Pid
}

// ExitError is how QEMU exited (nil for status 0); meaningful once Done is closed.
func (v *VM) ExitError() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.exitErr
}

func (v *VM) logger(ctx context.Context) *log.Entry {
	return log.G(ctx).WithField("vm", v.cfg.ID)
}

// Start implements hypervisor.Hypervisor: virtiofsd (with SharedDir), then QEMU, then the
// QMP handshake. On failure everything it started is stopped again.
func (v *VM) Start(ctx context.Context) error {
	v.life.Lock()
	defer v.life.Unlock()
	v.mu.Lock()
	if v.state != stateNew {
		st := v.state
		v.mu.Unlock()
		return fmt.Errorf("starting VM %s: already %s: %w", v.cfg.ID, st, errdefs.ErrFailedPrecondition)
	}
	v.state = stateStarting
	v.mu.Unlock()

	err := v.start(ctx)
	if err != nil {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), killWait)
		defer cancel()
		if terr := v.teardown(cctx, false); terr != nil {
			v.logger(ctx).WithError(terr).Error("cleaning up after failed start")
		}
		v.setState(stateStopped)
		return fmt.Errorf("starting VM %s: %w", v.cfg.ID, err)
	}
	v.setState(stateRunning)
	return nil
}

func (v *VM) setState(s vmState) {
	v.mu.Lock()
	v.state = s
	v.mu.Unlock()
}

func (v *VM) start(ctx context.Context) error {
	cfg := &v.cfg
	// Tap files belong to the VM: QEMU has its own copies once started, and on failure nobody
	// else needs them.
	defer closeHandedOver(cfg)
	// Meanwhile the clone's memory is copied; its file stays open until the copy is done.
	fill := inBackground(cfg.MemoryFill)
	defer func() { _ = fill() }()
	if cfg.Templated && len(cfg.NetDevices) == 0 {
		// The template's NIC (templateNICArgs) needs a tap: the template's own boot, or a
		// clone of a pod without a network, gets one that leads nowhere.
		tap, err := danglingTap()
		if err != nil {
			return fmt.Errorf("a tap for the template's NIC: %w", err)
		}
		cfg.NetDevices = []*hypervisor.NetDevice{{ID: "template", TapFiles: []*os.File{tap}}}
	}
	if err := preloadKernel(cfg); err != nil {
		return err
	}
	args, err := cfg.Args()
	if err != nil {
		return err
	}
	if err := prepareStateDir(cfg); err != nil {
		return err
	}
	// virtiofsd starts beside QEMU: its socket listens from here on (listenUnix), and QEMU,
	// which connects to it as it creates a booted VM's device or when a clone's is
	// hot-plugged, waits in the socket's backlog until virtiofsd takes the connection.
	fsReady := inBackground(nil)
	if cfg.SharedDir != "" {
		l, err := listenUnix(cfg.path(VirtiofsdSocket))
		if err != nil {
			return err
		}
		fsReady = inBackground(func() error {
			fs, err := startVirtiofsd(ctx, cfg, l)
			v.fs = fs
			return err
		})
		// Until virtiofsd has started (or failed), v.fs is not for teardown to read.
		defer func() { _ = fsReady() }()
	}
	if err := makeChroot(cfg.path(ChrootDir)); err != nil {
		return err
	}
	cmd, err := v.launchQEMU(ctx, args)
	if err != nil {
		return err
	}
	mon, err := v.dialMonitor(ctx)
	if err != nil {
		return errors.Join(err, v.fsFailure(fsReady))
	}
	v.logger(ctx).WithField("qemu", mon.Version().String()).WithField("pid", cmd.Process.Pid).Info("VM started")
	v.attachMonitor(ctx, mon)
	if err := fsReady(); err != nil {
		return err
	}
	if cfg.Incoming != nil {
		if err := fill(); err != nil {
			return fmt.Errorf("copying the template's memory: %w", err)
		}
		if err := v.restore(ctx, mon); err != nil {
			return errors.Join(err, v.fsFailure(fsReady))
		}
	}
	return nil
}

// fsFailure is virtiofsd's part in a failed start: its own start's error, or how it exited
// (QEMU cannot start, or plug a clone's device, once virtiofsd has gone).
func (v *VM) fsFailure(fsReady func() error) error {
	if err := fsReady(); err != nil || v.fs == nil {
		return err
	}
	return v.fs.exited(200 * time.Millisecond)
}

// inBackground runs fn (nil: nothing) in the background; the returned func waits for its
// result, and can be called again for the same result.
func inBackground(fn func() error) func() error {
	if fn == nil {
		return func() error { return nil }
	}
	done := make(chan error, 1)
	go func() { done <- fn() }()
	var once sync.Once
	var err error
	return func() error {
		once.Do(func() { err = <-done })
		return err
	}
}

// closeHandedOver closes the files cfg hands to QEMU (tap files, a templated VM's memory and
// state): QEMU has its own copies once started, and on failure nobody else needs them.
func closeHandedOver(cfg *Config) {
	files := cfg.ExtraFiles()
	if cfg.Templated {
		for i, nd := range cfg.NetDevices {
			if i > 0 && nd != nil { // the first is in ExtraFiles
				files = append(files, nd.TapFiles...)
			}
		}
		files = append(files, cfg.Incoming)
	}
	for _, f := range files {
		if f != nil {
			_ = f.Close()
		}
	}
}

// prepareStateDir creates the state dir and removes the sockets an earlier start left there.
func prepareStateDir(cfg *Config) error {
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("creating state dir: %w", err)
	}
	for _, f := range []string{QMPSocket, AgentSocket, VirtiofsdSocket} {
		// Best effort: QEMU and virtiofsd bind these anew, and say in their logs if they cannot.
		_ = os.Remove(cfg.path(f))
	}
	return nil
}

// openLogs creates QEMU's own log and the console log, both capped: the guest can make QEMU
// print, and writes its console at will.
func openLogs(cfg *Config) (qemuLog, consoleLog *logfile.Capped, err error) {
	qemuLog, err = logfile.NewCapped(cfg.path(QEMULog), ConsoleLogMax)
	if err != nil {
		return nil, nil, fmt.Errorf("creating QEMU log: %w", err)
	}
	consoleLog, err = logfile.NewCapped(cfg.path(ConsoleLog), ConsoleLogMax)
	if err != nil {
		_ = qemuLog.Close() // nothing written to it yet
		return nil, nil, fmt.Errorf("creating console log: %w", err)
	}
	return qemuLog, consoleLog, nil
}

// launchQEMU starts QEMU with args, its output going to QEMU's log and the guest's console
// into a pipe drained into the console log, and starts reaping it (see reap).
func (v *VM) launchQEMU(ctx context.Context, args []string) (*exec.Cmd, error) {
	cfg := &v.cfg
	qemuLog, consoleLog, err := openLogs(cfg)
	if err != nil {
		return nil, err
	}
	// On the failure paths below nothing has been written to the logs yet: closing them
	// cannot report anything.
	consoleR, consoleW, err := os.Pipe()
	if err != nil {
		_ = qemuLog.Close()
		_ = consoleLog.Close()
		return nil, fmt.Errorf("creating console pipe: %w", err)
	}
	cmd := exec.Command(cfg.Binary, args...)
	cmd.Stdout, cmd.Stderr = qemuLog, qemuLog
	cmd.ExtraFiles = append(cfg.ExtraFiles(), consoleW)
	cmd.SysProcAttr = childProcAttr()
	v.logger(ctx).WithField("args", args).Debug("starting qemu")
	err = cmd.Start()
	// QEMU holds the only write end now: the drain ends when QEMU exits. Closing our copy of
	// a pipe end cannot fail in a way that matters.
	_ = consoleW.Close()
	if err != nil {
		_ = consoleR.Close()
		_ = consoleLog.Close()
		_ = qemuLog.Close()
		return nil, fmt.Errorf("running %s: %w", cfg.Binary, err)
	}
	v.mu.Lock()
	v.cmd = cmd
	v.mu.Unlock()
	v.reap(ctx, cmd, qemuLog, consoleR, consoleLog)
	return cmd, nil
}

// reap drains the console pipe into the console log and waits for QEMU to exit; then it
// records how QEMU exited and closes v.done.
func (v *VM) reap(ctx context.Context, cmd *exec.Cmd, qemuLog io.Closer, consoleR io.ReadCloser, consoleLog io.WriteCloser) {
	consoleDone := make(chan struct{})
	go func() {
		defer close(consoleDone)
		if err := logfile.Drain(consoleR, consoleLog); err != nil {
			v.logger(ctx).WithError(err).Warn("console log")
		}
	}()
	go func() {
		werr := cmd.Wait() // also waits for qemu.log's copy to end
		if err := qemuLog.Close(); err != nil {
			v.logger(ctx).WithError(err).Warn("qemu log")
		}
		// Done means the console log is complete too; the bound is for a write end that
		// something other than QEMU holds open (none should).
		select {
		case <-consoleDone:
		case <-time.After(2 * time.Second):
			_ = consoleR.Close() // only to end the drain: it reports the console log's errors
		}
		v.mu.Lock()
		v.exitErr = werr
		v.mu.Unlock()
		v.doneOnce.Do(func() { close(v.done) })
	}()
}

// dialMonitor connects to QEMU's QMP socket, giving up when ctx ends or QEMU exits.
func (v *VM) dialMonitor(ctx context.Context) (*qmp.Client, error) {
	qemuLog := v.cfg.path(QEMULog)
	dctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-v.done:
			cancel()
		case <-dctx.Done():
		}
	}()
	mon, err := qmp.Dial(dctx, v.cfg.path(QMPSocket))
	if err != nil {
		// QEMU exiting usually shows up first as a closed monitor: give it a moment to be
		// reaped so the error carries QEMU's own complaint.
		t := time.NewTimer(time.Second)
		defer t.Stop()
		select {
		case <-v.done:
			return nil, fmt.Errorf("qemu exited during startup (%v): %s", v.ExitError(), logTail(qemuLog))
		case <-t.C:
		}
		return nil, fmt.Errorf("connecting to QMP: %w (%s)", err, logTail(qemuLog))
	}
	return mon, nil
}

// makeChroot makes dir the empty, root-owned directory QEMU chroots into. A leftover from an
// earlier start is reused only when it is still an empty directory.
func makeChroot(dir string) error {
	if err := os.Remove(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("QEMU chroot %s: %w; it must be an empty directory, remove it", dir, err)
	}
	if err := os.Mkdir(dir, 0o555); err != nil {
		return fmt.Errorf("creating QEMU chroot: %w", err)
	}
	if err := os.Chown(dir, 0, 0); err != nil {
		return fmt.Errorf("QEMU chroot %s: %w", dir, err)
	}
	return nil
}

// attachMonitor makes mon the VM's monitor and starts dispatching its events. Tests use it
// with a qmp.FakeMonitor.
func (v *VM) attachMonitor(ctx context.Context, mon qmp.Monitor) {
	v.mu.Lock()
	v.mon = mon
	v.mu.Unlock()
	go v.eventLoop(context.WithoutCancel(ctx), mon)
}

func (v *VM) eventLoop(ctx context.Context, mon qmp.Monitor) {
	for ev := range mon.Events() {
		switch ev.Name {
		case "DEVICE_DELETED":
			var d struct {
				Device string `json:"device"`
			}
			if json.Unmarshal(ev.Data, &d) == nil && d.Device != "" {
				v.waitMu.Lock()
				if ch, ok := v.deleted[d.Device]; ok {
					close(ch)
					delete(v.deleted, d.Device)
				}
				v.waitMu.Unlock()
			}
		case "SHUTDOWN", "GUEST_PANICKED", "RESET", "STOP", "RESUME":
			v.logger(ctx).WithField("event", ev.Name).WithField("data", string(ev.Data)).Debug("qemu event")
		}
	}
}

func (v *VM) monitor() (qmp.Monitor, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.state != stateRunning || v.mon == nil {
		return nil, fmt.Errorf("VM %s is %s, not running: %w", v.cfg.ID, v.state, errdefs.ErrFailedPrecondition)
	}
	return v.mon, nil
}

// Stop implements hypervisor.Hypervisor: QMP quit, SIGKILL after a short grace or when ctx
// ends, then virtiofsd. It is idempotent and safe after a failed Start.
func (v *VM) Stop(ctx context.Context) error {
	v.life.Lock()
	defer v.life.Unlock()
	v.mu.Lock()
	st := v.state
	v.mu.Unlock()
	switch st {
	case stateStopped:
		return nil
	case stateNew:
		v.setState(stateStopped)
		v.doneOnce.Do(func() { close(v.done) })
		return nil
	}
	err := v.teardown(ctx, true)
	v.setState(stateStopped)
	if err != nil {
		return fmt.Errorf("stopping VM %s: %w", v.cfg.ID, err)
	}
	return nil
}

// removePidFile removes the pidfile of a process that has exited. Like Cleanup, it treats
// failing to remove one as an error: a pidfile says the process may still be running.
func removePidFile(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing pidfile: %w", err)
	}
	return nil
}

// teardown stops whatever start got to. graceful asks QEMU to quit first.
func (v *VM) teardown(ctx context.Context, graceful bool) error {
	var errs []error
	v.mu.Lock()
	cmd, mon := v.cmd, v.mon
	v.mu.Unlock()
	if cmd != nil {
		if err := v.stopQEMU(ctx, cmd, mon, graceful); err != nil {
			errs = append(errs, err)
		}
		errs = append(errs, removePidFile(v.cfg.path(QEMUPidFile)))
	}
	if mon != nil {
		_ = mon.Close() // QEMU is gone or being killed: the connection only has to be released
	}
	if v.fs != nil {
		if err := v.fs.stop(ctx); err != nil {
			errs = append(errs, err)
		}
		errs = append(errs, removePidFile(v.cfg.path(VirtiofsdPid)))
		v.fs = nil
	}
	return errors.Join(errs...)
}

func (v *VM) stopQEMU(ctx context.Context, cmd *exec.Cmd, mon qmp.Monitor, graceful bool) error {
	select {
	case <-v.done:
		return nil
	default:
	}
	if graceful && mon != nil {
		qctx, cancel := context.WithTimeout(ctx, quitGrace)
		err := mon.Execute(qctx, "quit", nil, nil)
		cancel()
		// QEMU may close the monitor before its reply to quit arrives.
		if err != nil && !errors.Is(err, qmp.ErrClosed) {
			v.logger(ctx).WithError(err).Warn("qmp quit failed; killing qemu")
		} else {
			t := time.NewTimer(quitGrace)
			select {
			case <-v.done:
			case <-ctx.Done():
			case <-t.C:
			}
			t.Stop()
		}
	}
	select {
	case <-v.done:
		return nil
	default:
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("killing qemu (pid %d): %w", cmd.Process.Pid, err)
	}
	select {
	case <-v.done:
		return nil
	case <-time.After(killWait):
		return fmt.Errorf("qemu (pid %d) did not exit %s after SIGKILL", cmd.Process.Pid, killWait)
	}
}

// Pause implements hypervisor.Hypervisor (QMP stop).
func (v *VM) Pause(ctx context.Context) error {
	mon, err := v.monitor()
	if err != nil {
		return fmt.Errorf("pausing: %w", err)
	}
	if err := mon.Execute(ctx, "stop", nil, nil); err != nil {
		return fmt.Errorf("pausing VM %s: %w", v.cfg.ID, err)
	}
	return nil
}

// Resume implements hypervisor.Hypervisor (QMP cont).
func (v *VM) Resume(ctx context.Context) error {
	mon, err := v.monitor()
	if err != nil {
		return fmt.Errorf("resuming: %w", err)
	}
	if err := mon.Execute(ctx, "cont", nil, nil); err != nil {
		return fmt.Errorf("resuming VM %s: %w", v.cfg.ID, err)
	}
	return nil
}

// Status is QEMU's run state (query-status), e.g. "running" or "paused".
func (v *VM) Status(ctx context.Context) (string, error) {
	mon, err := v.monitor()
	if err != nil {
		return "", err
	}
	var st struct {
		Status string `json:"status"`
	}
	if err := mon.Execute(ctx, "query-status", nil, &st); err != nil {
		return "", fmt.Errorf("querying VM %s status: %w", v.cfg.ID, err)
	}
	return st.Status, nil
}

// DialAgent implements hypervisor.Hypervisor.
func (v *VM) DialAgent(ctx context.Context) (net.Conn, error) {
	if v.cfg.AgentTransport == TransportSerial {
		var d net.Dialer
		c, err := d.DialContext(ctx, "unix", v.cfg.path(AgentSocket))
		if err != nil {
			return nil, fmt.Errorf("dialing agent serial socket: %w", err)
		}
		return c, nil
	}
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		c, err := vsock.Dial(v.cfg.VsockCID, hypervisor.AgentVsockPort, nil)
		if err != nil {
			ch <- result{nil, err}
			return
		}
		ch <- result{c, nil}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			return nil, fmt.Errorf("dialing agent on vsock %d:%d: %w", v.cfg.VsockCID, hypervisor.AgentVsockPort, r.err)
		}
		return r.c, nil
	case <-ctx.Done():
		go func() {
			if r := <-ch; r.c != nil {
				_ = r.c.Close() // a late connection nobody asked for any more
			}
		}()
		return nil, ctx.Err()
	}
}
