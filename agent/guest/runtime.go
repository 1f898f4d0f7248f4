package guest

import (
	"os"

	cgroupstats "github.com/containerd/cgroups/v3/cgroup2/stats"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// containerRuntime makes the guest's containers: libcontainer in the guest
// (libcontainerRuntime), a fake in the unit tests. The Server keeps the lifecycle (ids, process
// states, stdio, errors); the runtime only does what runc would.
type containerRuntime interface {
	// Create makes container id from spec and its init process, stopped before the init's
	// program runs (runc create). A failed Create leaves nothing behind.
	Create(id string, spec *specs.Spec, init *procConfig) (runtimeContainer, runtimeProcess, error)
}

// runtimeContainer is one container of a containerRuntime.
type runtimeContainer interface {
	// Start lets the created init run its program (runc start).
	Start() error
	// Exec runs another process in the container (runc exec).
	Exec(p *procConfig) (runtimeProcess, error)
	// Signal signals the init process.
	Signal(sig unix.Signal) error
	// SignalAll signals every process in the container's cgroup.
	SignalAll(sig unix.Signal) error
	// Processes lists the pids in the container.
	Processes() ([]int, error)
	Pause() error
	Resume() error
	Update(r *specs.LinuxResources) error
	Stats() (*cgroupstats.Metrics, error)
	// WatchOOM calls onOOM, from another goroutine, each time the kernel OOM-kills a process
	// of the container.
	WatchOOM(onOOM func()) error
	// Destroy removes the container; its processes must have exited.
	Destroy() error
}

// runtimeProcess is a started process of a runtimeContainer.
type runtimeProcess interface {
	Pid() (int, error)
	// Wait blocks until the process exited and returns its status: the exit code, or 128 +
	// the signal that ended it; 255 when the status is unknown.
	Wait() uint32
	Signal(sig unix.Signal) error
}

// procConfig is what a runtime needs to start one process.
type procConfig struct {
	spec *specs.Process
	// init is the container's first process.
	init bool
	// The process's standard streams; nil is /dev/null. Unused in terminal mode.
	stdin, stdout, stderr *os.File
	// consoleSocket, in terminal mode, receives the pty master the runtime makes.
	consoleSocket               *os.File
	consoleWidth, consoleHeight uint16
}
