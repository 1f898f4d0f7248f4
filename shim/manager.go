package shim

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	bootapi "github.com/containerd/containerd/api/runtime/bootstrap/v1"
	"github.com/containerd/containerd/api/types"
	_ "github.com/containerd/containerd/v2/core/runtime" // the OCI features type, named as containerd reads it
	"github.com/containerd/containerd/v2/defaults"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/containerd/containerd/v2/pkg/shutdown"
	"github.com/containerd/containerd/v2/plugins"
	"github.com/containerd/log"
	"github.com/containerd/plugin"
	"github.com/containerd/plugin/registry"
	"github.com/containerd/typeurl/v2"
	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/agent"
	"github.com/podvm/podvm/hypervisor"
	"github.com/podvm/podvm/rootfs"
	"github.com/podvm/podvm/version"
)

// RuntimeName is the containerd runtime type this shim implements.
const RuntimeName = "io.containerd.podvm.v2"

// Run is the shim binary's main: containerd's shim lifecycle with podvm's task service, running
// pods on the given hypervisor drivers (the node config's hypervisor.kind picks one).
func Run(ctx context.Context, drivers ...hypervisor.Driver) {
	hv := hypervisor.NewDrivers(drivers...)
	registry.Register(&plugin.Registration{
		Type:     plugins.TTRPCPlugin,
		ID:       "task",
		Requires: []plugin.Type{plugins.EventPlugin, plugins.InternalPlugin},
		InitFn: func(ic *plugin.InitContext) (any, error) {
			// This runs in the serving shim before it listens and long before it starts
			// any child: the task API socket containerd handed over as fd 3 stays open in
			// this process but must reach no child.
			if err := closeOnExecFrom(3); err != nil {
				return nil, fmt.Errorf("keep the shim's fds out of its children: %w", err)
			}
			pp, err := ic.GetByID(plugins.EventPlugin, "publisher")
			if err != nil {
				return nil, err
			}
			ss, err := ic.GetByID(plugins.InternalPlugin, "shutdown")
			if err != nil {
				return nil, err
			}
			return NewService(ic.Context, pp.(shim.Publisher), ss.(shutdown.Service), defaultBackend(hv))
		},
	})
	// The shim's children are QEMU and virtiofsd, waited for by os/exec: containerd's implicit
	// reaper would take their exit statuses, and as a subreaper the shim would inherit
	// orphans nobody reaps. Container processes live in the guest.
	shim.RunShim(ctx, manager{drivers: hv}, func(c *shim.Config) {
		c.NoReaper = true
		c.NoSubreaper = true
	})
}

type manager struct {
	drivers hypervisor.Drivers
}

func (manager) Name() string { return RuntimeName }

// groupAnnotation puts every container of a CRI pod into the shim of its sandbox.
const groupAnnotation = annotationSandboxID

// Start starts (or finds) the shim for a container: one per pod.
func (manager) Start(ctx context.Context, opts *bootapi.BootstrapParams) (_ *bootapi.BootstrapResult, retErr error) {
	result := &bootapi.BootstrapResult{Version: 3, Protocol: "ttrpc"}
	id := opts.GetInstanceID()
	grouping := id
	var spec struct {
		Annotations map[string]string `json:"annotations"`
	}
	if b, err := os.ReadFile("config.json"); err == nil {
		if err := json.Unmarshal(b, &spec); err != nil {
			return nil, fmt.Errorf("config.json: %w", err)
		}
		if g := spec.Annotations[groupAnnotation]; g != "" {
			grouping = g
		}
	}
	socketDir := opts.GetSocketDir()
	if socketDir == "" {
		socketDir = filepath.Join(defaults.DefaultStateDir, "s")
	}
	address, err := shim.CreateSocketAddress(ctx, socketDir, opts.GetContainerdGrpcAddress(), grouping, false)
	if err != nil {
		return nil, err
	}
	socket, err := shim.NewSocket(address)
	if err != nil {
		if !shim.SocketEaddrinuse(err) {
			return nil, fmt.Errorf("create shim socket: %w", err)
		}
		if shim.CanConnect(address) {
			// The pod's shim is running: this container joins it.
			result.Address = address
			return result, nil
		}
		if err := shim.RemoveSocket(address); err != nil {
			return nil, fmt.Errorf("remove stale shim socket: %w", err)
		}
		if socket, err = shim.NewSocket(address); err != nil {
			return nil, fmt.Errorf("create shim socket: %w", err)
		}
	}
	defer func() {
		if retErr != nil {
			_ = socket.Close() // best effort: the start failed, the error says why
			_ = shim.RemoveSocket(address)
		}
	}()
	f, err := socket.File()
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }() // the shim inherits its own copy

	ns, err := namespaces.NamespaceRequired(ctx)
	if err != nil {
		return nil, err
	}
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	args := []string{"-namespace", ns, "-id", id, "-address", opts.GetContainerdGrpcAddress()}
	if opts.GetLogLevel() <= bootapi.LogLevel_LOG_LEVEL_DEBUG {
		args = append(args, "-debug")
	}
	cmd := exec.Command(self, args...)
	cmd.Dir, _ = os.Getwd()
	cmd.Env = append(os.Environ(), "GOMAXPROCS=4")
	cmd.ExtraFiles = []*os.File{f}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start shim: %w", err)
	}
	go func() { _ = cmd.Wait() }()
	if err := shim.AdjustOOMScore(cmd.Process.Pid); err != nil {
		log.G(ctx).WithError(err).Warn("adjust the shim's OOM score")
	}
	result.Address = address
	return result, nil
}

// Stop is `containerd-shim-podvm-v2 delete`: containerd runs it (in the container's bundle
// dir) when the shim is gone, to clean up from what is on disk.
func (m manager) Stop(ctx context.Context, id string) (shim.StopStatus, error) {
	bundle, err := os.Getwd()
	if err != nil {
		return shim.StopStatus{}, err
	}
	status := shim.StopStatus{ExitedAt: time.Now(), ExitStatus: 128 + int(unix.SIGKILL)}
	rec, err := readRecord(bundle)
	if errors.Is(err, os.ErrNotExist) {
		// The container never got as far as a VM: nothing of podvm's to clean.
		return status, nil
	}
	if err != nil {
		return status, err
	}
	if !rec.OwnsVM {
		cleanupContainer(ctx, *rec, id)
		return status, nil
	}
	drv, err := rec.driver(m.drivers)
	if err != nil {
		log.G(ctx).WithError(err).Error("the VM's processes cannot be cleaned up by this shim")
	}
	// containerd runs this beside a live shim it gave up on, too: that shim may still be
	// cleaning up the same VM. Its lock on the state dir says so; this waits for it.
	lctx, cancel := context.WithTimeout(ctx, deleteLockWait)
	defer cancel()
	lock, err := lockStateDir(lctx, rec.StateDir)
	switch {
	case errors.Is(err, errStateDirGone):
		return status, nil // the shim cleaned up
	case err != nil:
		log.G(ctx).WithError(err).Warn("the pod's shim is still cleaning up its VM; leaving that to it")
		return status, nil
	}
	defer lock.unlock()
	cleanupState(ctx, drv, *rec)
	return status, nil
}

// cleanupContainer is `shim delete` of a container that does not own the VM. containerd runs
// it whenever its connection for the container closes, which is at every delete of the
// container, while the pod's shim lives on. A live shim (its lock on the state dir) cleans up
// its own containers, and the sandbox's `shim delete` (the same lock) everything: then this
// leaves the files alone without waiting. Only when nobody holds the lock, the shim died,
// does it clean up the container's files, holding the lock meanwhile.
func cleanupContainer(ctx context.Context, rec record, id string) {
	if rec.StateDir == "" {
		return
	}
	now, cancel := context.WithCancel(ctx)
	cancel() // one try: a held lock is an owner, not something to wait for
	lock, err := lockStateDir(now, rec.StateDir)
	switch {
	case errors.Is(err, errStateDirGone):
		return
	case errors.Is(err, context.Canceled):
		log.G(ctx).WithField("id", id).Debug("the pod's shim or its delete holds the state dir; leaving the container's files to it")
		return
	case err != nil:
		log.G(ctx).WithError(err).Warn("clean up the container's shared filesystems")
		return
	}
	defer lock.unlock()
	if err := rootfs.CleanupContainer(ctx, rec.StateDir, id); err != nil {
		log.G(ctx).WithError(err).Warn("clean up the container's shared filesystems")
	}
}

// deleteLockWait bounds how long `shim delete` waits for a live shim to finish cleaning up its
// sandbox: less than containerd's shim clean-up timeout (io.containerd.timeout.shim.cleanup,
// 5 s by default), after which containerd kills `shim delete`.
const deleteLockWait = 4 * time.Second

// Info describes the runtime (`containerd-shim-podvm-v2 -info`): containerd reads the OCI
// features of its containers from it and advertises them as the CRI runtime handler's
// (recursive read-only mounts; user namespaces only with ID-mapped mounts, see
// agent.Features).
func (manager) Info(ctx context.Context, optionsR io.Reader) (*types.RuntimeInfo, error) {
	feat, err := typeurl.MarshalAnyToProto(agent.Features())
	if err != nil {
		return nil, fmt.Errorf("marshal the runtime features: %w", err)
	}
	return &types.RuntimeInfo{
		Name:     RuntimeName,
		Version:  &types.RuntimeVersion{Version: version.Version},
		Features: feat,
	}, nil
}
