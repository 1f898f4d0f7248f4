package shim

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/proto"

	"github.com/podvm/podvm/agent"
	"github.com/podvm/podvm/agent/api"
	"github.com/podvm/podvm/hypervisor"
	"github.com/podvm/podvm/internal/logfile"
	"github.com/podvm/podvm/internal/nodeslots"
	"github.com/podvm/podvm/metrics"
	"github.com/podvm/podvm/network"
	"github.com/podvm/podvm/rootfs"
	"github.com/podvm/podvm/shim/config"
	"github.com/podvm/podvm/shim/hostcgroup"
)

// agentConn is a connection to the guest agent.
type agentConn interface {
	api.AgentService
	Close() error
	// Done is closed when the connection is gone.
	Done() <-chan struct{}
}

// backend is what the shim uses from the rest of podvm. Production wires the real packages
// (DefaultBackend); unit tests wire fakes.
type backend struct {
	loadConfig func(path string) (*config.Config, error)
	// drivers are the hypervisors the shim has; the node config's hypervisor.kind picks one.
	drivers  hypervisor.Drivers
	connect  func(ctx context.Context, vm hypervisor.Hypervisor) (agentConn, error)
	discover func(ctx context.Context, netnsPath string) (*network.Pod, error)
	// newShare sets up the pod's virtio-fs share in its state dir.
	newShare func(ctx context.Context, stateDir, guestDir string, cfg *config.Config) (rootfs.Provider, error)
	// forwardPorts carries loopback TCP of the pod netns into the guest (CRI PortForward).
	forwardPorts func(ctx context.Context, netnsPath string, dial network.GuestDialer) (portForwarder, error)
	// enterCgroup creates the pod's cgroup on the host and moves the shim into it.
	enterCgroup func(path string, lim hostcgroup.Limits) (hostCgroup, error)
	// startTurn waits until the node lets one more pod VM start (sandbox.max_parallel_starts)
	// and returns how long that took and what ends the turn. nil: no waiting.
	startTurn func(ctx context.Context, cfg *config.Config) (end func(), waited time.Duration, err error)
}

// portForwarder is a running network.PortForwarder.
type portForwarder interface {
	Close(ctx context.Context) error
}

// defaultBackend runs pods with the given hypervisors, the real network wiring and virtio-fs.
func defaultBackend(drivers hypervisor.Drivers) backend {
	return backend{
		loadConfig:  config.Load,
		drivers:     drivers,
		enterCgroup: enterHostCgroup,
		startTurn:   startTurn,
		connect: func(ctx context.Context, vm hypervisor.Hypervisor) (agentConn, error) {
			c, err := agent.Connect(ctx, vm.DialAgent, vm.Done())
			if err != nil {
				return nil, err // not a nil *Client in a non-nil interface
			}
			return c, nil
		},
		discover: func(ctx context.Context, netnsPath string) (*network.Pod, error) {
			return network.Discover(ctx, netnsPath)
		},
		forwardPorts: func(ctx context.Context, netnsPath string, dial network.GuestDialer) (portForwarder, error) {
			f, err := network.ForwardPorts(ctx, netnsPath, dial)
			if err != nil {
				return nil, err // not a typed nil in the interface
			}
			return f, nil
		},
		newShare: func(ctx context.Context, stateDir, guestDir string, cfg *config.Config) (rootfs.Provider, error) {
			s, err := rootfs.CreateShare(ctx, stateDir, guestDir)
			if err != nil {
				return nil, err // not a typed nil in the interface
			}
			// [block] cache/aio, the size cap and the annotation allow-list reach disks here.
			return s.WithBlock(rootfs.BlockOptions{
				Cache: cfg.Block.Cache, AIO: cfg.Block.AIO, Allowed: cfg.Allowed, MaxDiskSize: int64(cfg.Block.MaxDiskSize),
			}), nil
		},
	}
}

// sandboxOptions is what a VM is booted from.
type sandboxOptions struct {
	id     string
	bundle string
	cfg    *config.Config
	size   config.VMSize
	netns  string
	host   string
	cgroup podCgroup
	// owner is the VM owner's container (the pod sandbox, or a standalone container): its
	// filesystems are prepared while the guest boots.
	owner ownerFiles
}

// ownerFiles is what the share prepares the VM owner's container from.
type ownerFiles struct {
	spec   *specs.Spec
	rootfs []mount.Mount
}

func (b backend) sandboxOptions(ctx context.Context, r *taskAPI.CreateTaskRequest, spec *specs.Spec) (*sandboxOptions, error) {
	var optPath string
	if r.Options != nil && r.Options.GetValue() != nil {
		v, err := typeurl.UnmarshalAny(r.Options)
		if err != nil {
			return nil, fmt.Errorf("runtime options: %w: %w", err, errdefs.ErrInvalidArgument)
		}
		if o, ok := v.(*runtimeoptions.Options); ok {
			optPath = o.ConfigPath
		}
	}
	cfg, err := b.loadConfig(config.ResolvePath(optPath))
	if err != nil {
		return nil, err
	}
	size, err := config.Size(cfg, spec.Annotations)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", err, errdefs.ErrInvalidArgument)
	}
	for _, w := range size.Warnings {
		log.G(ctx).Warn(w)
	}
	netns, ok := netnsPath(spec)
	if !ok {
		// Not ErrNotImplemented: containerd takes Unimplemented from Create as "this shim speaks
		// an older task API", retries on that and reports the retry's error instead of this one.
		return nil, fmt.Errorf("pod %s asks for the host's network (hostNetwork), which a VM cannot share; "+
			"run it without hostNetwork or with another RuntimeClass: %w", r.ID, errdefs.ErrInvalidArgument)
	}
	host := spec.Hostname
	if host == "" {
		// A new UTS namespace starts with the node's name; a runc container shows it too.
		host, _ = os.Hostname()
	}
	cg, err := sandboxCgroup(cfg, size, spec)
	if err != nil {
		return nil, err
	}
	return &sandboxOptions{id: r.ID, bundle: r.Bundle, cfg: cfg, size: size, netns: netns, host: host, cgroup: cg,
		owner: ownerFiles{spec: spec, rootfs: mount.FromProto(r.Rootfs)}}, nil
}

// sandbox is the pod's VM and what is wired to it.
type sandbox struct {
	id       string
	stateDir string
	netns    string
	driver   hypervisor.Driver
	vm       hypervisor.Hypervisor
	agent    agentConn
	share    rootfs.Provider
	// endpoints are the pod interfaces attached to the VM.
	endpoints []network.Endpoint
	// ports forwards the pod netns's loopback to the guest; nil without a netns.
	ports portForwarder
	// cgroupPath is the pod's cgroup on the host ("" for none); cgroup is set once the shim
	// is in it.
	cgroupPath string
	cgroup     hostCgroup
	// lock is the state dir's lock, held from its making until shutdown removed it.
	lock *stateLock
	// stopping is set when the shim stops the VM on purpose.
	stopping atomic.Bool
	// hung says why the shim stopped a guest that stopped answering ("" while it answers).
	hung atomic.Pointer[string]
	// pingInterval is how often watchAgent pings the guest agent (0: never).
	pingInterval time.Duration
	// ready is set once the guest is set up; containers are prepared only then.
	ready bool
	// ahead is the VM owner's preparation, started while the guest boots and taken by its
	// create (prepare); nil once taken, or if none was started.
	ahead *preparation
	// restored is set for a VM restored from a template: its NICs and share were hot-plugged.
	restored bool
	// nsPid is the guest pid of the sandbox's process, whose namespaces (/proc/<pid>/ns/*)
	// the pod's containers join; 0 until the sandbox container was created.
	nsPid atomic.Uint32
	// ownPIDNS are the guest init pids of the pod's containers that have a PID namespace of
	// their own (CRI's NamespaceMode_CONTAINER), by container id (pidTarget).
	ownPIDNS map[string]uint32

	mu sync.Mutex
	// disks are the hot-plugged block devices of each container.
	disks map[string][]string
	// owner is the init of the container that booted the VM (the pod sandbox).
	owner *process
	// ownerDeleted is closed once that container was deleted (the VM is stopped then).
	ownerDeleted     chan struct{}
	ownerDeletedOnce sync.Once

	// metrics are the sandbox's metrics and their server (metrics.go); nil if not served.
	metrics    *metrics.Sandbox
	metricsSrv *metrics.Server
}

// ownerDeletedWait bounds how long the exits of a dead VM's containers wait for containerd
// to delete the sandbox (which stops what is left of the VM) before they are published anyway.
const ownerDeletedWait = 30 * time.Second

// ownerGoneSettle is how long after that delete they still wait: containerd's CRI marks the
// sandbox NOTREADY only after the delete returned, in goroutines of its own the shim cannot
// observe (a few milliseconds here); reported sooner, a container's exit races it.
const ownerGoneSettle = time.Second

// markOwnerDeleted records that the VM owner's container was deleted.
func (sb *sandbox) markOwnerDeleted() {
	sb.ownerDeletedOnce.Do(func() { close(sb.ownerDeleted) })
}

// setOwner records the init of the container that booted the VM.
func (sb *sandbox) setOwner(p *process) {
	sb.mu.Lock()
	defer sb.mu.Unlock()
	sb.owner = p
}

// awaitOwnerGone waits (a bounded time) until the exit of the VM owner's init is queued and
// containerd has deleted it. When the VM dies, the other containers' exits wait for that:
// containerd's CRI marks the pod sandbox NOTREADY once it deleted the sandbox's task, so it
// then has the sandbox not ready before it sees them exited, as with a runc pod whose
// sandbox died, and kubelet recreates the pod instead of restarting a container in the dead
// sandbox (whose shim is gone by then).
func (sb *sandbox) awaitOwnerGone(ctx context.Context) {
	sb.mu.Lock()
	owner := sb.owner
	sb.mu.Unlock()
	if owner == nil {
		return
	}
	timeout := time.NewTimer(ownerDeletedWait)
	defer timeout.Stop()
	for _, done := range []<-chan struct{}{owner.reported, sb.ownerDeleted} {
		select {
		case <-done:
		case <-timeout.C:
			return
		case <-ctx.Done():
			return
		}
	}
	select {
	case <-time.After(ownerGoneSettle):
	case <-ctx.Done():
	}
}

// guestContainer is what the agent needs to create a container.
type guestContainer struct {
	spec        *specs.Spec
	devices     []*api.DeviceNode
	blockMounts []*api.BlockMount
	podTmpfs    []*api.PodTmpfs
}

// bootSandbox wires the pod network to a new VM, boots it and prepares the guest; alongside
// runs once the agent answers, while the guest is set up (setupGuestAlongside). On error
// everything made so far is undone.
func bootSandbox(ctx context.Context, b backend, o *sandboxOptions, alongside ownerCreate) (_ *sandbox, retErr error) {
	start := time.Now()
	drv, err := b.drivers.Get(o.cfg.Hypervisor.Kind)
	if err != nil {
		return nil, fmt.Errorf("%w (%s): %w", err, configName(o.cfg), errdefs.ErrInvalidArgument)
	}
	sb := &sandbox{id: o.id, stateDir: filepath.Join(o.cfg.Sandbox.StateDir, o.id), netns: o.netns,
		driver: drv, disks: map[string][]string{}, cgroupPath: o.cgroup.path, ownerDeleted: make(chan struct{}),
		pingInterval: o.cfg.Sandbox.AgentPingInterval.Duration}
	if sb.stateDir == o.cfg.TemplateDir() {
		return nil, fmt.Errorf("sandbox id %q: its state dir would be the VM templates dir %s; use another id: %w", o.id, sb.stateDir, errdefs.ErrInvalidArgument)
	}
	if err := context.Cause(ctx); err != nil {
		// Given up on already (Service.Shutdown): `shim delete` may have looked for this
		// sandbox's record before there was one, so nothing is made.
		return nil, err
	}
	if err := os.MkdirAll(sb.stateDir, 0o700); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	// Held until shutdown removed the dir: `shim delete` waits for it (statelock.go).
	if sb.lock, err = lockStateDir(ctx, sb.stateDir); err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			sb.shutdown(context.WithoutCancel(ctx))
		}
	}()
	sb.startMetrics(ctx)
	rec := sb.record()
	if err := rec.write(sb.stateDir); err != nil {
		return nil, err
	}
	if err := rec.write(o.bundle); err != nil {
		return nil, err
	}
	tmplStart := time.Now()
	tmpl := sb.findTemplate(ctx, o)
	tmplTime := time.Since(tmplStart)
	// Before virtiofsd and QEMU start: they are born in the pod's cgroup.
	if err := sb.enterCgroup(ctx, b, o.cgroup); err != nil {
		return nil, err
	}
	ph := phases{last: start}
	if tmpl != nil {
		ph.fields = log.Fields{"template": tmplTime.Round(time.Millisecond)}
		ph.last = time.Now()
	}
	share, err := b.newShare(ctx, sb.stateDir, agent.GuestSharedDir, o.cfg)
	if err != nil {
		return nil, fmt.Errorf("the pod's shared filesystem: %w", err)
	}
	sb.share = share
	ph.done("share")
	pod, nics, err := sb.attachNetwork(ctx, b)
	if err != nil {
		return nil, err
	}
	ph.done("network")
	if err := sb.startVM(ctx, b, o, nics, tmpl, &ph); err != nil {
		return nil, err
	}
	times, err := sb.setupGuestAlongside(ctx, b, o.host, pod, alongside)
	if err != nil {
		return nil, err
	}
	ph.done("setup_and_owner")
	ph.fields["guest_setup"] = times.setup.Round(time.Millisecond)
	if sb.restored {
		ph.fields["reseed"] = times.reseed.Round(time.Millisecond)
	}
	sb.ready = true
	sb.metricsReady(time.Since(start), o.size.VCPUs, o.size.MemoryMiB)
	if tmpl != nil {
		ph.fields["from_template"] = tmpl.Key()
	}
	log.G(ctx).WithFields(ph.fields).WithFields(log.Fields{
		"sandbox": o.id, "hypervisor": drv.Kind, "vcpus": o.size.VCPUs, "memory_mib": o.size.MemoryMiB,
		"size_from": o.size.Source, "nics": len(nics), "boot": time.Since(start).Round(time.Millisecond),
	}).Info("pod VM ready")
	return sb, nil
}

// phases times the steps of a pod VM's boot for its "pod VM ready" log line.
type phases struct {
	last   time.Time
	fields log.Fields
}

// done records the time since the previous step as step's.
func (p *phases) done(step string) {
	now := time.Now()
	if p.fields == nil {
		p.fields = log.Fields{}
	}
	p.fields[step] = now.Sub(p.last).Round(time.Millisecond)
	p.last = now
}

// record is what `shim delete` needs to clean up after this sandbox's shim died.
func (sb *sandbox) record() record {
	return record{SandboxID: sb.id, StateDir: sb.stateDir, Netns: sb.netns, OwnsVM: true, Hypervisor: sb.driver.Kind,
		Cgroup: sb.cgroupPath}
}

// attachNetwork wires every interface of the pod netns to a tap for the VM.
func (sb *sandbox) attachNetwork(ctx context.Context, b backend) (*network.Pod, []*hypervisor.NetDevice, error) {
	if sb.netns == "" {
		return nil, nil, nil
	}
	pod, err := b.discover(ctx, sb.netns)
	if err != nil {
		return nil, nil, fmt.Errorf("pod network: %w", err)
	}
	var nics []*hypervisor.NetDevice
	for _, ep := range pod.Endpoints {
		nic, err := ep.Attach(ctx)
		if err != nil {
			return nil, nil, fmt.Errorf("pod network: %w", err)
		}
		sb.endpoints = append(sb.endpoints, ep)
		nics = append(nics, nic)
	}
	return pod, nics, nil
}

// startVM boots the VM, or restores it from tmpl when that is not nil, and connects to its
// agent.
func (sb *sandbox) startVM(ctx context.Context, b backend, o *sandboxOptions, nics []*hypervisor.NetDevice, tmpl hypervisor.Template, ph *phases) error {
	vcfg := o.cfg.VMConfig(o.id, o.size)
	vcfg.StateDir, vcfg.SharedDir, vcfg.NetDevices = sb.stateDir, sb.share.ExportDir(), nics
	vcfg.SharedDirNS = sb.share.InMountNS
	cid, err := randomCID()
	if err != nil {
		return err
	}
	vcfg.VsockCID = cid
	if tmpl != nil && len(nics) > hypervisor.TemplateNICs {
		log.G(ctx).Warnf("the pod has %d network interfaces, a VM template room for %d: booting the VM", len(nics), hypervisor.TemplateNICs)
		tmpl = nil
	}
	if b.startTurn != nil {
		end, waited, err := b.startTurn(ctx, o.cfg)
		if err != nil {
			return fmt.Errorf("waiting for a turn to start the pod VM (sandbox.max_parallel_starts in %s): %w", configName(o.cfg), err)
		}
		defer end()
		ph.done("start_wait")
		if waited > time.Second {
			log.G(ctx).Infof("waited %v for a turn to start the pod VM: %d start at a time (sandbox.max_parallel_starts)", waited.Round(time.Millisecond), o.cfg.Sandbox.ParallelStarts())
		}
	}
	if tmpl != nil {
		if err := sb.restoreVM(ctx, tmpl, vcfg, ph); err != nil {
			return err
		}
	} else if err := sb.bootVM(ctx, o, vcfg, ph); err != nil {
		return err
	}
	// The guest boots for most of a second, the host has nothing else to do meanwhile, and
	// the owner's create is the first thing the guest is asked for.
	sb.prepareAhead(ctx, o)
	vm := sb.vm
	actx, cancel := context.WithTimeout(ctx, o.cfg.Sandbox.AgentTimeout.Duration)
	defer cancel()
	conn, err := b.connect(actx, vm)
	if err != nil {
		return sb.withConsole(fmt.Errorf("guest agent: %w", err))
	}
	sb.agent = conn
	sb.observeAgent(conn)
	ph.done("agent_ready")
	// A clone is made the pod's own (prepareRestored) while its setup starts.
	sb.restored = tmpl != nil
	return nil
}

// startTurn takes one of the node's sandbox.max_parallel_starts start slots; the turn ends when
// the slot is released (or the shim exits).
func startTurn(ctx context.Context, cfg *config.Config) (func(), time.Duration, error) {
	slot, waited, err := nodeslots.Acquire(ctx, filepath.Join(cfg.Sandbox.StateDir, config.StartSlotsDirName), cfg.Sandbox.ParallelStarts(), 10*time.Millisecond)
	if err != nil {
		return nil, waited, err
	}
	return slot.Release, waited, nil
}

// bootVM boots the pod's VM the ordinary way.
func (sb *sandbox) bootVM(ctx context.Context, o *sandboxOptions, vcfg hypervisor.Config, ph *phases) error {
	vm, err := sb.driver.New(ctx, vcfg)
	if err != nil {
		return fmt.Errorf("VM config (check %s): %w", configName(o.cfg), err)
	}
	if err := vm.Start(ctx); err != nil {
		return fmt.Errorf("start the pod VM: %w", err)
	}
	sb.vm = vm
	ph.done("vmm_start")
	return nil
}

// setupGuest sends the agent the host's clock and the pod's hostname, network and share, and
// meanwhile starts forwarding the pod netns's loopback ports into the guest: host work (an
// iptables run in the netns) that needs nothing from the guest, so the guest's setup hides it.
func (sb *sandbox) setupGuest(ctx context.Context, b backend, hostname string, pod *network.Pod) error {
	req := &api.SetupSandboxRequest{Hostname: hostname, SharedFsTag: hypervisor.SharedFSTag, HotPlugged: sb.restored}
	if pod != nil {
		for i, ep := range pod.Endpoints {
			ifc := ep.Guest()
			if sb.restored && i == 0 {
				// The first NIC came with the VM template, and has its MAC until the agent
				// gives it the pod's.
				ifc = proto.CloneOf(ifc)
				ifc.GuestMac = hypervisor.TemplateNICMAC
			}
			req.Interfaces = append(req.Interfaces, ifc)
		}
		req.Routes, req.Neighbors = pod.Routes, pod.Neighbors
	}
	fwd := make(chan portForwarder, 1)
	if sb.netns == "" {
		fwd <- nil
	} else {
		ag := sb.agent
		go func() {
			ports, err := b.forwardPorts(ctx, sb.netns, func(ctx context.Context, port uint16) (network.GuestConn, error) {
				return agent.DialPort(ctx, ag, uint32(port))
			})
			if err != nil {
				// A pod runs without port-forward rather than not at all (e.g. no iptables).
				log.G(ctx).WithError(err).Warn("port-forward (kubectl/crictl port-forward) to this pod will not work")
				ports = nil
			}
			fwd <- ports
		}()
	}
	req.RealtimeNs = time.Now().UnixNano()
	_, err := sb.agent.SetupSandbox(ctx, req)
	// Kept even if the setup failed: shutdown closes it.
	sb.ports = <-fwd
	if err != nil {
		return fmt.Errorf("set up the guest: %w", err)
	}
	return nil
}

// ownerCreate makes the VM owner's container in a sandbox whose guest is being set up; undo
// removes it again.
type ownerCreate func(sb *sandbox) (undo func(), err error)

// setupTimes are how long setupGuestAlongside's steps took.
type setupTimes struct {
	setup  time.Duration // SetupSandbox
	reseed time.Duration // prepareRestored, for a clone
}

// setupGuestAlongside sets up the guest while alongside makes the VM owner's container (the pod
// sandbox's namespace holder): each waits mostly on the guest, and the guest has a vCPU for
// each; the agent holds back whatever of that create needs the setup done (alongside_setup in
// agent.proto). A clone of a VM template is made the pod's own (prepareRestored) before the
// owner's container, the first thing that runs in it, and while the setup runs: the setup
// starts no process and draws no random numbers. A failure of any is the error, and an
// owner's container made for a guest whose setup failed is removed again.
func (sb *sandbox) setupGuestAlongside(ctx context.Context, b backend, hostname string, pod *network.Pod, alongside ownerCreate) (setupTimes, error) {
	start := time.Now()
	type result struct {
		took time.Duration
		err  error
	}
	setup := make(chan result, 1)
	go func() {
		err := sb.setupGuest(ctx, b, hostname, pod)
		setup <- result{time.Since(start), err}
	}()
	var times setupTimes
	if sb.restored {
		err := sb.prepareRestored(ctx)
		times.reseed = time.Since(start)
		if err != nil {
			r := <-setup
			times.setup = r.took
			return times, sb.withConsole(err)
		}
	}
	undo, ownerErr := alongside(sb)
	r := <-setup
	times.setup = r.took
	if r.err != nil {
		if ownerErr == nil {
			undo()
		}
		return times, sb.withConsoleIfLost(r.err)
	}
	return times, sb.withConsoleIfLost(ownerErr)
}

// withConsoleIfLost adds the end of the console log to err when the agent's connection was
// lost under the call: the guest most likely died, and its console says why (an oops, a
// panic).
func (sb *sandbox) withConsoleIfLost(err error) error {
	if err == nil || !(errors.Is(err, ttrpc.ErrClosed) || isConnClosed(err)) {
		return err
	}
	return sb.withConsole(err)
}

// withConsole adds the last lines of the VM's console log to a start's error: the log goes
// with the state dir when a start fails.
func (sb *sandbox) withConsole(err error) error {
	return fmt.Errorf("%w; the end of the console log:\n%s", err, consoleTail(sb.consolePath(), 20))
}

// configName names the node config in messages.
func configName(cfg *config.Config) string {
	if cfg.Path == "" {
		return config.DefaultPath + " (absent: built-in defaults)"
	}
	return cfg.Path
}

// randomCID picks a vsock context id; collisions fail QEMU's start loudly and are
// vanishingly rare in 2^32.
func randomCID() (uint32, error) {
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		return 0, err
	}
	return 3 + binary.LittleEndian.Uint32(b[:])%(1<<31), nil
}

func (sb *sandbox) consolePath() string {
	return sb.driver.ConsolePath(sb.stateDir)
}

// prepare makes a container's filesystems and disks available to the guest.
func (sb *sandbox) prepare(ctx context.Context, id, bundle string, spec *specs.Spec, mounts []mount.Mount) (_ *guestContainer, retErr error) {
	// The VM owner's container is made while the guest is set up (setupGuestAlongside).
	if !sb.ready && id != sb.id {
		return nil, fmt.Errorf("the pod VM is not ready: %w", errdefs.ErrFailedPrecondition)
	}
	att, err := sb.takeAhead(id)
	if att == nil && err == nil {
		att, err = sb.share.Prepare(ctx, id, bundle, spec, mounts)
	}
	if err != nil {
		return nil, err
	}
	// The hypervisor has its own copies of the disks' descriptors once they are plugged.
	defer att.Close()
	defer func() {
		if retErr != nil {
			sb.release(context.WithoutCancel(ctx), id)
		}
	}()
	for _, d := range att.BlockDevices {
		if err := sb.vm.Hotplug(ctx, d); err != nil {
			return nil, fmt.Errorf("hot-plug %s: %w", d.Path, err)
		}
		sb.mu.Lock()
		sb.disks[id] = append(sb.disks[id], d.ID)
		sb.mu.Unlock()
	}
	if id != sb.id {
		if err := sb.guestNamespacePaths(ctx, id, att.Spec); err != nil {
			return nil, err
		}
		if err := (record{SandboxID: sb.id, StateDir: sb.stateDir}).write(bundle); err != nil {
			return nil, err
		}
	}
	return &guestContainer{spec: att.Spec, devices: att.Devices, blockMounts: att.BlockMounts, podTmpfs: att.PodTmpfs}, nil
}

// preparation is the share's Prepare of one container, running or done.
type preparation struct {
	done chan struct{}
	att  *rootfs.Attachment
	err  error
}

// prepareAhead starts preparing the VM owner's filesystems (o.owner) on the host.
func (sb *sandbox) prepareAhead(ctx context.Context, o *sandboxOptions) {
	p := &preparation{done: make(chan struct{})}
	sb.ahead = p
	go func() {
		defer close(p.done)
		p.att, p.err = sb.share.Prepare(ctx, sb.id, o.bundle, o.owner.spec, o.owner.rootfs)
	}()
}

// takeAhead waits for the preparation started ahead for container id and returns its
// result; nil, nil when there is none (any container but the VM owner, or no VM).
func (sb *sandbox) takeAhead(id string) (*rootfs.Attachment, error) {
	if id != sb.id || sb.ahead == nil {
		return nil, nil
	}
	p := sb.ahead
	sb.ahead = nil
	<-p.done
	return p.att, p.err
}

// dropAhead undoes a preparation no create took: the guest never got that far.
func (sb *sandbox) dropAhead(ctx context.Context) {
	att, err := sb.takeAhead(sb.id)
	if att == nil || err != nil {
		return
	}
	att.Close()
	sb.release(ctx, sb.id)
}

// hostPID is the host pid containerd is told for every task of the pod: the VM's, which
// belongs to the pod, as Kata reports it (guest pids would name unrelated host processes).
func (sb *sandbox) hostPID() uint32 {
	if sb.vm == nil {
		return 0
	}
	return uint32(sb.vm.Pid())
}

// setNamespacePID records the guest pid of the sandbox's process.
func (sb *sandbox) setNamespacePID(pid uint32) { sb.nsPid.Store(pid) }

// guestNamespacePaths points a container's namespace paths at the guest: CRI writes
// /proc/<sandbox task pid>/ns/<type> into workload specs, and that pid is the host's
// (hostPID), so they become /proc/<guest pid of the sandbox>/ns/<type>. A path naming another
// pid is refused: the guest has nothing it could mean. A PID namespace path goes where
// pidTarget says.
func (sb *sandbox) guestNamespacePaths(ctx context.Context, id string, spec *specs.Spec) error {
	if spec.Linux == nil {
		return nil
	}
	host, guest := sb.hostPID(), sb.nsPid.Load()
	for i, ns := range spec.Linux.Namespaces {
		if ns.Path == "" || ns.Type == specs.NetworkNamespace {
			continue
		}
		want := fmt.Sprintf("/proc/%d/ns/", host)
		if host == 0 || guest == 0 || !strings.HasPrefix(ns.Path, want) {
			return fmt.Errorf("namespace %s path %q: a podvm container can join only its pod's namespaces (%s*): %w",
				ns.Type, ns.Path, want, errdefs.ErrInvalidArgument)
		}
		pid := guest
		if ns.Type == specs.PIDNamespace {
			pid = sb.pidTarget(ctx, id, guest)
		}
		spec.Linux.Namespaces[i].Path = fmt.Sprintf("/proc/%d/ns/%s", pid, strings.TrimPrefix(ns.Path, want))
	}
	return nil
}

// pidTarget is the guest pid whose PID namespace a container joins when CRI gave it one.
// CRI names the namespace by a task pid, and every task of a podvm pod reports QEMU's, so the
// path alone cannot say whether the container shares the pod's PID namespace
// (shareProcessNamespace) or targets another container's (kubectl debug --target). Where
// containers of the pod have PID namespaces of their own the pod does not share one, so the
// path is a target: with one such container it is that one; with several the target is
// ambiguous and the container gets the pod's namespace, as Kubernetes allows for a runtime
// without targeting (docs/pod-semantics.md).
func (sb *sandbox) pidTarget(ctx context.Context, id string, pod uint32) uint32 {
	sb.mu.Lock()
	defer sb.mu.Unlock()
	switch len(sb.ownPIDNS) {
	case 0:
		return pod
	case 1:
		for _, pid := range sb.ownPIDNS {
			return pid
		}
	}
	log.G(ctx).WithField("id", id).Warnf("container %s targets one of %d containers' PID namespaces, which podvm cannot "+
		"tell apart; it joins the pod's PID namespace instead", id, len(sb.ownPIDNS))
	return pod
}

// setOwnPIDNS records the guest init pid of a container created with a PID namespace of its
// own.
func (sb *sandbox) setOwnPIDNS(id string, spec *specs.Spec, pid uint32) {
	if spec.Linux == nil {
		return
	}
	for _, ns := range spec.Linux.Namespaces {
		if ns.Type == specs.PIDNamespace && ns.Path == "" {
			sb.mu.Lock()
			if sb.ownPIDNS == nil {
				sb.ownPIDNS = map[string]uint32{}
			}
			sb.ownPIDNS[id] = pid
			sb.mu.Unlock()
			return
		}
	}
}

// forgetPIDNS forgets a container's PID namespace (setOwnPIDNS): its init exited.
func (sb *sandbox) forgetPIDNS(id string) {
	sb.mu.Lock()
	defer sb.mu.Unlock()
	delete(sb.ownPIDNS, id)
}

// release undoes prepare; it is idempotent.
func (sb *sandbox) release(ctx context.Context, id string) {
	sb.mu.Lock()
	disks := sb.disks[id]
	delete(sb.disks, id)
	sb.mu.Unlock()
	for _, d := range disks {
		if err := sb.vm.Unplug(ctx, d); err != nil {
			log.G(ctx).WithError(err).WithField("device", d).Warn("unplug")
		}
	}
	if sb.share != nil {
		if err := sb.share.Release(ctx, id); err != nil {
			log.G(ctx).WithError(err).WithField("container", id).Warn("release filesystems")
		}
	}
}

// vmStopGrace bounds the graceful part of stopping a pod's VM; halfBootedStopGrace that of a
// VM whose guest never got ready (its boot failed, timed out or was given up by containerd),
// which is killed almost at once: containerd gives its clean-up seconds, not tens of them.
const (
	vmStopGrace         = 10 * time.Second
	halfBootedStopGrace = time.Second
)

// shutdown stops the guest and the VM and removes everything the sandbox made on the host.
// It works on a half-booted sandbox too.
func (sb *sandbox) shutdown(ctx context.Context) {
	sb.stopping.Store(true)
	sb.metricsStopping()
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if sb.ports != nil {
		// Before the agent goes: closing a forwarded connection tells the agent.
		pctx, pcancel := context.WithTimeout(ctx, 5*time.Second)
		if err := sb.ports.Close(pctx); err != nil {
			log.G(ctx).WithError(err).Warn("stop port-forward")
		}
		pcancel()
	}
	if sb.agent != nil {
		// A guest that never got ready runs nothing to stop in order, and may be the one
		// that stopped answering: it is not asked.
		if sb.ready {
			actx, acancel := context.WithTimeout(ctx, 2*time.Second)
			if _, err := sb.agent.Shutdown(actx, &api.Empty{}); err != nil && !isConnClosed(err) {
				log.G(ctx).WithError(err).Debug("agent shutdown")
			}
			acancel()
		}
		if err := sb.agent.Close(); err != nil && !isConnClosed(err) {
			log.G(ctx).WithError(err).Debug("close agent connection")
		}
	}
	if sb.vm != nil {
		grace := vmStopGrace
		if !sb.ready {
			grace = halfBootedStopGrace
		}
		sctx, scancel := context.WithTimeout(ctx, grace)
		if err := sb.vm.Stop(sctx); err != nil {
			log.G(ctx).WithError(err).Warn("stop VM")
		}
		scancel()
	}
	sb.dropAhead(ctx)
	for _, ep := range sb.endpoints {
		if err := ep.Detach(ctx); err != nil {
			log.G(ctx).WithError(err).WithField("interface", ep.Name()).Warn("detach pod interface")
		}
	}
	if sb.share != nil {
		// After the VM (virtiofsd): its mounts and mount namespace go; cleanupState below
		// removes the directories.
		if err := sb.share.Close(); err != nil {
			log.G(ctx).WithError(err).Warn("close rootfs share")
		}
	}
	sb.stopMetrics(ctx)
	// The cgroup can go only once nothing is in it, the shim included.
	sb.leaveCgroup(ctx)
	cleanupState(ctx, sb.driver, sb.record())
	sb.lock.unlock()
}

// vmGone is true once the VM's QEMU has exited.
func (sb *sandbox) vmGone() bool {
	select {
	case <-sb.vm.Done():
		return true
	default:
		return false
	}
}

// stopHung stops the VM of a guest that stopped answering (why says how that showed). What
// follows is what follows a VM's death: every process's wait fails, each is reported exited,
// the pod sandbox first, and watchVM says once why.
func (sb *sandbox) stopHung(ctx context.Context, why string) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if !sb.hung.CompareAndSwap(nil, &why) {
		select { // another caller stops it
		case <-sb.vm.Done():
		case <-ctx.Done():
		}
		return
	}
	if err := sb.vm.Stop(ctx); err != nil {
		log.G(ctx).WithError(err).Warn("stop the hung VM")
	}
	if err := sb.agent.Close(); err != nil && !isConnClosed(err) {
		log.G(ctx).WithError(err).Debug("close the hung guest's agent connection")
	}
}

func isConnClosed(err error) bool {
	return errors.Is(err, net.ErrClosed) || errors.Is(err, os.ErrClosed)
}

// consoleTail returns the last n lines of a VM's console log, for error messages: the state
// dir with the full log goes when the sandbox does. It reads only the end of the log (the
// guest writes it, and may have written a lot).
func consoleTail(path string, n int) string {
	b, err := logfile.ReadTail(path, logfile.DefaultTailBytes)
	if err != nil {
		return fmt.Sprintf("(no console log: %v)", err)
	}
	return logfile.LastLines(b, n)
}
