package shim

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/v2/core/events"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/shutdown"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/ttrpc"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/podvm/podvm/agent"
	"github.com/podvm/podvm/agent/api"
	"github.com/podvm/podvm/hypervisor"
	"github.com/podvm/podvm/network"
	"github.com/podvm/podvm/rootfs"
	"github.com/podvm/podvm/shim/config"
)

// recorder is a shim.Publisher that keeps the events and tells waiters of each new one.
type recorder struct {
	mu      sync.Mutex
	events  []any
	changed chan struct{} // closed and replaced at every Publish
}

func (r *recorder) Publish(ctx context.Context, topic string, event events.Event) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events = append(r.events, event)
	if r.changed != nil {
		close(r.changed)
		r.changed = nil
	}
	return nil
}

// waitFor waits until done(events so far) holds, or timeout; it reports whether it held.
func (r *recorder) waitFor(timeout time.Duration, done func([]any) bool) bool {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		r.mu.Lock()
		if done(append([]any(nil), r.events...)) {
			r.mu.Unlock()
			return true
		}
		if r.changed == nil {
			r.changed = make(chan struct{})
		}
		changed := r.changed
		r.mu.Unlock()
		select {
		case <-changed:
		case <-deadline.C:
			return false
		}
	}
}

func (r *recorder) Close() error { return nil }

func (r *recorder) list() []any {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]any(nil), r.events...)
}

// rig is a Service wired to fakes. Tests call it as containerd does: through a ttrpc
// client, so errors pass the same edge (the interceptor) as in the shim.
type rig struct {
	t *testing.T
	// svc is a ttrpc client of service.
	svc      taskAPI.TTRPCTaskService
	service  *Service
	ctx      context.Context
	pub      *recorder
	vm       *hypervisor.Fake
	agent    *agent.Fake
	share    *rootfs.Fake
	nic      *network.Fake
	stateDir string
	sd       shutdown.Service
	vmCfg    *hypervisor.Config
	// discovered is what the fake network found (nil: no netns path given).
	discoverErr error
	ports       fakePorts
	// Optional wrappers around the fakes, for a test that changes one of their behaviours.
	wrapVM    func(*hypervisor.Fake) hypervisor.Hypervisor
	wrapAgent func(*agent.Fake) agentConn
	wrapShare func(*rootfs.Fake) rootfs.Provider
}

// fakePorts records the port forwarder the shim starts and stops.
type fakePorts struct {
	mu       sync.Mutex
	netns    string
	closed   int
	startErr error
}

func (f *fakePorts) Close(ctx context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed++
	return nil
}

func (f *fakePorts) state() (string, int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.netns, f.closed
}

func newRig(t *testing.T) *rig {
	t.Helper()
	ctx := namespaces.WithNamespace(context.Background(), "test")
	ctx, sd := shutdown.WithShutdown(ctx)
	r := &rig{t: t, ctx: ctx, pub: &recorder{}, vm: hypervisor.NewFake(), agent: agent.NewFake(),
		share: &rootfs.Fake{GuestDir: agent.GuestSharedDir}, stateDir: t.TempDir(), sd: sd,
		nic: &network.Fake{Iface: &api.Interface{Name: "eth0", Mac: "02:00:00:00:00:01", Addresses: []string{"10.1.2.3/24"}}}}
	b := backend{
		loadConfig: func(path string) (*config.Config, error) {
			cfg := config.Default()
			cfg.Hypervisor.Kind = hypervisor.FakeKind
			cfg.Sandbox.StateDir = r.stateDir
			cfg.Annotations.Allowed = []string{"memory", "vcpus"}
			cfg.Sandbox.MaxVCPUs = 4
			return cfg, nil
		},
		// The shim sees its VMs only through a hypervisor.Driver: the fake plugs in as QEMU does.
		drivers: hypervisor.NewDrivers(hypervisor.FakeDriver(func(cfg hypervisor.Config) (hypervisor.Hypervisor, error) {
			r.vmCfg = &cfg
			if r.wrapVM != nil {
				return r.wrapVM(r.vm), nil
			}
			return r.vm, nil
		})),
		connect: func(ctx context.Context, vm hypervisor.Hypervisor) (agentConn, error) {
			if r.wrapAgent != nil {
				return r.wrapAgent(r.agent), nil
			}
			return r.agent, nil
		},
		discover: func(ctx context.Context, netns string) (*network.Pod, error) {
			if r.discoverErr != nil {
				return nil, r.discoverErr
			}
			return &network.Pod{Endpoints: []network.Endpoint{r.nic},
				Routes: []*api.Route{{Gateway: "10.1.2.1", Device: "eth0"}}}, nil
		},
		newShare: func(_ context.Context, stateDir, guestDir string, _ *config.Config) (rootfs.Provider, error) {
			r.share.Export = filepath.Join(stateDir, rootfs.ExportDir)
			if r.wrapShare != nil {
				return r.wrapShare(r.share), nil
			}
			return r.share, nil
		},
		forwardPorts: func(ctx context.Context, netns string, dial network.GuestDialer) (portForwarder, error) {
			r.ports.mu.Lock()
			defer r.ports.mu.Unlock()
			if r.ports.startErr != nil {
				return nil, r.ports.startErr
			}
			r.ports.netns = netns
			return &r.ports, nil
		},
	}
	svc, err := NewService(ctx, r.pub, sd, b)
	if err != nil {
		t.Fatal(err)
	}
	r.service = svc
	r.svc = serveTTRPC(t, ctx, svc)
	t.Cleanup(func() { sd.Shutdown() })
	return r
}

// serveTTRPC serves svc on a unix socket with its interceptor, as pkg/shim does, and returns
// a client of it.
func serveTTRPC(t *testing.T, ctx context.Context, svc *Service) taskAPI.TTRPCTaskService {
	t.Helper()
	dir, err := os.MkdirTemp("", "podvm-shim-test") // short: a unix socket path has a limit
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	l, err := net.Listen("unix", filepath.Join(dir, "s"))
	if err != nil {
		t.Fatal(err)
	}
	server, err := ttrpc.NewServer(ttrpc.WithUnaryServerInterceptor(svc.UnaryServerInterceptor()))
	if err != nil {
		t.Fatal(err)
	}
	if err := svc.RegisterTTRPC(server); err != nil {
		t.Fatal(err)
	}
	go func() { _ = server.Serve(context.WithoutCancel(ctx), l) }()
	conn, err := net.Dial("unix", filepath.Join(dir, "s"))
	if err != nil {
		t.Fatal(err)
	}
	client := ttrpc.NewClient(conn)
	t.Cleanup(func() {
		client.Close()
		server.Close()
	})
	return taskAPI.NewTTRPCTaskClient(client)
}

// bundle writes an OCI bundle for a container and returns its dir.
func (r *rig) bundle(id string, annotations map[string]string, netns *specs.LinuxNamespace) string {
	dir := filepath.Join(r.t.TempDir(), id)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		r.t.Fatal(err)
	}
	spec := &specs.Spec{Version: specs.Version, Hostname: "pod-host", Annotations: annotations,
		Root:    &specs.Root{Path: "rootfs"},
		Process: &specs.Process{Args: []string{"sleep", "1000"}, Cwd: "/"},
		Linux:   &specs.Linux{Namespaces: []specs.LinuxNamespace{{Type: specs.PIDNamespace}, {Type: specs.MountNamespace}}}}
	if netns != nil {
		spec.Linux.Namespaces = append(spec.Linux.Namespaces, *netns)
	}
	b, _ := json.Marshal(spec)
	if err := os.WriteFile(filepath.Join(dir, "config.json"), b, 0o644); err != nil {
		r.t.Fatal(err)
	}
	return dir
}

var podNetns = &specs.LinuxNamespace{Type: specs.NetworkNamespace, Path: "/var/run/netns/cni-test"}

func sandboxAnnotations(id string) map[string]string {
	return map[string]string{annotationContainerType: containerTypeSandbox, annotationSandboxID: id}
}

func workloadAnnotations(sandbox string) map[string]string {
	return map[string]string{annotationContainerType: "container", annotationSandboxID: sandbox}
}

func (r *rig) create(id string, ann map[string]string, netns *specs.LinuxNamespace) (*taskAPI.CreateTaskResponse, error) {
	return r.svc.Create(r.ctx, &taskAPI.CreateTaskRequest{ID: id, Bundle: r.bundle(id, ann, netns)})
}

func (r *rig) mustCreate(id string, ann map[string]string) {
	r.t.Helper()
	if _, err := r.create(id, ann, podNetns); err != nil {
		r.t.Fatalf("create %s: %v", id, err)
	}
}

func (r *rig) mustStart(id, execID string) {
	r.t.Helper()
	if _, err := r.svc.Start(r.ctx, &taskAPI.StartRequest{ID: id, ExecID: execID}); err != nil {
		r.t.Fatalf("start %s %s: %v", id, execID, err)
	}
}

func (r *rig) wait(id, execID string) *taskAPI.WaitResponse {
	r.t.Helper()
	ctx, cancel := context.WithTimeout(r.ctx, 10*time.Second)
	defer cancel()
	resp, err := r.svc.Wait(ctx, &taskAPI.WaitRequest{ID: id, ExecID: execID})
	if err != nil {
		r.t.Fatalf("wait %s %s: %v", id, execID, err)
	}
	return resp
}

func (r *rig) state(id, execID string) *taskAPI.StateResponse {
	r.t.Helper()
	st, err := r.svc.State(r.ctx, &taskAPI.StateRequest{ID: id, ExecID: execID})
	if err != nil {
		r.t.Fatalf("state %s: %v", id, err)
	}
	return st
}

func native(err error) error { return errgrpc.ToNative(err) }

func TestSandboxBootsVMAndWiresThePod(t *testing.T) {
	r := newRig(t)
	ann := sandboxAnnotations("pod1")
	ann["podvm.io/memory"] = "768Mi"
	ann["podvm.io/vcpus"] = "2"
	r.mustCreate("pod1", ann)
	if started, _, _ := r.vm.State(); !started {
		t.Fatal("the VM was not started")
	}
	if r.vmCfg.MemoryMiB != 768 || r.vmCfg.VCPUs != 2 || len(r.vmCfg.NetDevices) != 1 {
		t.Errorf("VM config: %d MiB, %d vCPUs, %d NICs; want 768, 2, 1", r.vmCfg.MemoryMiB, r.vmCfg.VCPUs, len(r.vmCfg.NetDevices))
	}
	setup := r.agent.Setup()
	if setup == nil || setup.Hostname != "pod-host" || setup.SharedFsTag != hypervisor.SharedFSTag ||
		len(setup.Interfaces) != 1 || setup.Interfaces[0].Mac != "02:00:00:00:00:01" || len(setup.Routes) != 1 {
		t.Errorf("SetupSandbox = %+v", setup)
	}
	if st := r.state("pod1", ""); st.Status != task.Status_CREATED || st.Pid == 0 {
		t.Errorf("state after create: %v pid %d", st.Status, st.Pid)
	}
	if _, err := os.Stat(filepath.Join(r.stateDir, "pod1", recordFile)); err != nil {
		t.Errorf("no recovery record in the state dir: %v", err)
	}
}

func TestLifecycleEventsAndExitOrder(t *testing.T) {
	r := newRig(t)
	r.mustCreate("pod1", sandboxAnnotations("pod1"))
	r.mustStart("pod1", "")
	r.mustCreate("c1", workloadAnnotations("pod1"))
	r.mustStart("c1", "")
	if st := r.state("c1", ""); st.Status != task.Status_RUNNING {
		t.Fatalf("c1 is %v, want running", st.Status)
	}
	spec, _ := json.Marshal(&specs.Process{Args: []string{"sh"}, Cwd: "/"})
	if _, err := r.svc.Exec(r.ctx, &taskAPI.ExecProcessRequest{ID: "c1", ExecID: "e1", Spec: &anypb.Any{TypeUrl: "types.containerd.io/opencontainers/runtime-spec/1/Process", Value: spec}}); err != nil {
		t.Fatal(err)
	}
	r.mustStart("c1", "e1")

	// The init dies: its exec dies with it, and is reported first.
	r.agent.Exit("c1", "", 137)
	r.agent.Exit("c1", "e1", 137)
	if w := r.wait("c1", ""); w.ExitStatus != 137 {
		t.Errorf("c1 exit %d, want 137", w.ExitStatus)
	}
	// Events go out asynchronously, in order.
	var exits []string
	r.pub.waitFor(5*time.Second, func(events []any) bool {
		exits = nil
		for _, e := range events {
			if x, ok := e.(*eventstypes.TaskExit); ok {
				exits = append(exits, x.ID)
			}
		}
		return len(exits) >= 2
	})
	if len(exits) != 2 || exits[0] != "e1" || exits[1] != "c1" {
		t.Errorf("exit events %v, want the exec's before the init's: [e1 c1]", exits)
	}

	// Kill of a stopped task succeeds (StopPodSandbox retries), Delete works once.
	if _, err := r.svc.Kill(r.ctx, &taskAPI.KillRequest{ID: "c1", Signal: 9}); err != nil {
		t.Errorf("kill of a stopped task: %v", err)
	}
	if _, err := r.svc.Delete(r.ctx, &taskAPI.DeleteRequest{ID: "c1", ExecID: "e1"}); err != nil {
		t.Errorf("delete exec: %v", err)
	}
	d, err := r.svc.Delete(r.ctx, &taskAPI.DeleteRequest{ID: "c1"})
	if err != nil || d.ExitStatus != 137 {
		t.Errorf("delete c1: %v, exit %d", err, d.GetExitStatus())
	}
	if _, err := r.svc.Delete(r.ctx, &taskAPI.DeleteRequest{ID: "c1"}); !errdefs.IsNotFound(native(err)) {
		t.Errorf("second delete: %v, want not found", err)
	}
	if got := r.share.Released(); len(got) != 1 || got[0] != "c1" {
		t.Errorf("released filesystems %v, want [c1]", got)
	}

	// The sandbox: kill, wait, delete stops the VM and removes its state.
	if _, err := r.svc.Kill(r.ctx, &taskAPI.KillRequest{ID: "pod1", Signal: 9}); err != nil {
		t.Fatal(err)
	}
	r.wait("pod1", "")
	if _, err := r.svc.Delete(r.ctx, &taskAPI.DeleteRequest{ID: "pod1"}); err != nil {
		t.Fatal(err)
	}
	if _, stopped, _ := r.vm.State(); !stopped {
		t.Error("deleting the sandbox did not stop the VM")
	}
	if _, err := os.Stat(filepath.Join(r.stateDir, "pod1")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("state dir left: %v", err)
	}
	if r.nic.Attached() != r.nic.Detached() {
		t.Error("pod interface still attached")
	}
	if netns, closed := r.ports.state(); netns != podNetns.Path || closed != 1 {
		t.Errorf("port forwarder: started for %q, closed %d times; want %s, once", netns, closed, podNetns.Path)
	}
}

// A node where port-forward cannot be set up (no iptables) still runs pods.
func TestPortForwardFailureDoesNotFailThePod(t *testing.T) {
	r := newRig(t)
	r.ports.startErr = errors.New("port-forward needs iptables in PATH")
	r.mustCreate("pod1", sandboxAnnotations("pod1"))
	if _, closed := r.ports.state(); closed != 0 {
		t.Errorf("closed %d times a forwarder that never started", closed)
	}
}

func TestRunningProcessCannotBeDeleted(t *testing.T) {
	r := newRig(t)
	r.mustCreate("pod1", sandboxAnnotations("pod1"))
	r.mustStart("pod1", "")
	if _, err := r.svc.Delete(r.ctx, &taskAPI.DeleteRequest{ID: "pod1"}); !errdefs.IsFailedPrecondition(native(err)) {
		t.Errorf("delete of a running task: %v, want failed precondition", err)
	}
	if _, err := r.svc.Start(r.ctx, &taskAPI.StartRequest{ID: "pod1"}); !errdefs.IsFailedPrecondition(native(err)) {
		t.Errorf("second start: %v, want failed precondition", err)
	}
}

func TestCreateFailuresLeaveNothing(t *testing.T) {
	for _, tc := range []struct {
		name  string
		ann   map[string]string
		netns *specs.LinuxNamespace
		setup func(r *rig)
		want  func(error) bool
	}{
		{"bad memory annotation", map[string]string{"podvm.io/memory": "abc"}, podNetns, nil, errdefs.IsInvalidArgument},
		{"host network", nil, nil, nil, errdefs.IsInvalidArgument},
		{"VM does not start", nil, podNetns, func(r *rig) { r.vm.StartErr = errors.New("qemu: boom") }, errdefs.IsUnknown},
		{"network discovery fails", nil, podNetns, func(r *rig) { r.discoverErr = errors.New("no netns") }, errdefs.IsUnknown},
		{"agent refuses the container", nil, podNetns, func(r *rig) { r.agent.CreateErr = errdefs.ErrInvalidArgument }, errdefs.IsInvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t)
			if tc.setup != nil {
				tc.setup(r)
			}
			ann := sandboxAnnotations("pod1")
			for k, v := range tc.ann {
				ann[k] = v
			}
			_, err := r.create("pod1", ann, tc.netns)
			if err == nil || !tc.want(native(err)) {
				t.Fatalf("create: %v", err)
			}
			entries, _ := os.ReadDir(r.stateDir)
			if len(entries) != 0 {
				t.Errorf("state left behind: %v", entries)
			}
			if r.nic.Attached() != r.nic.Detached() {
				t.Error("pod interface left attached")
			}
			if started, stopped, _ := r.vm.State(); started && !stopped {
				t.Error("VM left running")
			}
			if _, err := r.svc.State(r.ctx, &taskAPI.StateRequest{ID: "pod1"}); !errdefs.IsNotFound(native(err)) {
				t.Errorf("failed container still known: %v", err)
			}
		})
	}
}

func TestWorkloadNeedsItsSandbox(t *testing.T) {
	r := newRig(t)
	_, err := r.create("c1", workloadAnnotations("elsewhere"), podNetns)
	if !errdefs.IsFailedPrecondition(native(err)) {
		t.Fatalf("create: %v, want failed precondition", err)
	}
}

func TestCheckpointIsNotSupported(t *testing.T) {
	r := newRig(t)
	if _, err := r.svc.Checkpoint(r.ctx, &taskAPI.CheckpointTaskRequest{ID: "x"}); !errdefs.IsNotImplemented(native(err)) {
		t.Fatalf("checkpoint: %v", err)
	}
}

func TestVMDeathEndsProcesses(t *testing.T) {
	r := newRig(t)
	r.mustCreate("pod1", sandboxAnnotations("pod1"))
	r.mustStart("pod1", "")
	r.agent.Close() // the guest is gone
	r.vm.Exit()
	if w := r.wait("pod1", ""); w.ExitStatus != 255 {
		t.Errorf("exit status after VM death: %d, want 255", w.ExitStatus)
	}
}

func TestAdaptSpecForGuest(t *testing.T) {
	cpus := "0-3"
	spec := &specs.Spec{
		Hooks:   &specs.Hooks{CreateRuntime: []specs.Hook{{Path: "/usr/bin/nvidia-hook"}}},
		Process: &specs.Process{ApparmorProfile: "cri-default", SelinuxLabel: "x"},
		Linux: &specs.Linux{
			Namespaces: []specs.LinuxNamespace{{Type: specs.NetworkNamespace, Path: "/var/run/netns/x"},
				{Type: specs.IPCNamespace, Path: "/proc/7/ns/ipc"}},
			Devices:     []specs.LinuxDevice{{Path: "/dev/sda", Type: "b", Major: 8}},
			Resources:   &specs.LinuxResources{CPU: &specs.LinuxCPU{Cpus: cpus}},
			MaskedPaths: []string{"/proc/kcore"},
		},
	}
	adaptSpecForGuest(spec)
	if spec.Hooks != nil || spec.Process.ApparmorProfile != "" || len(spec.Linux.Devices) != 0 || spec.Linux.Resources.CPU.Cpus != "" {
		t.Errorf("host-only settings survived: %+v", spec)
	}
	want := []specs.LinuxNamespace{{Type: specs.IPCNamespace, Path: "/proc/7/ns/ipc"}, {Type: specs.CgroupNamespace}}
	if len(spec.Linux.Namespaces) != 2 || spec.Linux.Namespaces[0] != want[0] || spec.Linux.Namespaces[1] != want[1] {
		t.Errorf("namespaces %+v, want %+v", spec.Linux.Namespaces, want)
	}
}

func TestContainerBeingCreatedIsNotFound(t *testing.T) {
	r := newRig(t)
	if _, err := r.service.pod.reserve("pod1", true); err != nil { // what Create holds while the VM boots
		t.Fatal(err)
	}
	for name, call := range map[string]func() error{
		"state": func() error { _, err := r.svc.State(r.ctx, &taskAPI.StateRequest{ID: "pod1"}); return err },
		"kill":  func() error { _, err := r.svc.Kill(r.ctx, &taskAPI.KillRequest{ID: "pod1", Signal: 9}); return err },
		"wait": func() error {
			_, err := r.svc.Wait(r.ctx, &taskAPI.WaitRequest{ID: "pod1"})
			return err
		},
		"delete": func() error { _, err := r.svc.Delete(r.ctx, &taskAPI.DeleteRequest{ID: "pod1"}); return err },
	} {
		if err := call(); !errdefs.IsNotFound(native(err)) {
			t.Errorf("%s of a container being created: %v, want not found", name, err)
		}
	}
}
