package shim

import (
	"context"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/v2/core/events"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/shutdown"
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

// The rig the Service tests run on: a Service wired to fakes, called as containerd calls it.

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
	// template, if set, switches templating on and is the driver's template (or templateErr
	// its error).
	template    *hypervisor.FakeTemplate
	templateErr error
	// discovered is what the fake network found (nil: no netns path given).
	discoverErr error
	ports       fakePorts
	// Optional wrappers around the fakes, for a test that changes one of their behaviours.
	wrapVM    func(*hypervisor.Fake) hypervisor.Hypervisor
	wrapAgent func(*agent.Fake) agentConn
	wrapShare func(*rootfs.Fake) rootfs.Provider
	// beforeConnect, if set, runs when the shim connects to the agent; its error fails the
	// connection (e.g. a guest that never answers).
	beforeConnect func(ctx context.Context) error
	// pingInterval is the node config's sandbox.agent_ping_interval (0, no pings, unless a
	// test sets it).
	pingInterval time.Duration
	// maxParallelStarts is the node config's sandbox.max_parallel_starts (0: the default).
	maxParallelStarts int
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
	// containerd's calls have a context of their own, which the shim's shutdown does not
	// cancel: a reply the shim sends as it shuts down still arrives.
	ctx := namespaces.WithNamespace(context.Background(), "test")
	sctx, sd := shutdown.WithShutdown(ctx)
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
			cfg.Template.Enabled = r.template != nil || r.templateErr != nil
			cfg.Sandbox.AgentPingInterval = config.Duration{Duration: r.pingInterval}
			cfg.Sandbox.MaxParallelStarts = r.maxParallelStarts
			return cfg, nil
		},
		// The node's start slots are real lock files, in the rig's state dir.
		startTurn: startTurn,
		// The shim sees its VMs only through a hypervisor.Driver: the fake plugs in as QEMU does.
		drivers: hypervisor.NewDrivers(r.fakeDriver()),
		connect: func(ctx context.Context, vm hypervisor.Hypervisor) (agentConn, error) {
			if r.beforeConnect != nil {
				if err := r.beforeConnect(ctx); err != nil {
					return nil, err
				}
			}
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
	r.vm.VMPid = fakeVMPid
	svc, err := NewService(sctx, r.pub, sd, b)
	if err != nil {
		t.Fatal(err)
	}
	r.service = svc
	r.svc = serveTTRPC(t, sctx, svc)
	t.Cleanup(func() { sd.Shutdown() })
	return r
}

// fakeDriver is the fake hypervisor as a Driver, with the rig's template.
func (r *rig) fakeDriver() hypervisor.Driver {
	d := hypervisor.FakeDriver(func(_ context.Context, cfg hypervisor.Config) (hypervisor.Hypervisor, error) {
		r.vmCfg = &cfg
		if r.wrapVM != nil {
			return r.wrapVM(r.vm), nil
		}
		return r.vm, nil
	})
	d.Template = func(context.Context, hypervisor.Config, string) (hypervisor.Template, error) {
		if r.templateErr != nil {
			return nil, r.templateErr
		}
		return r.template, nil
	}
	return d
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

// execSpec is an Exec request's process spec.
func execSpec(t *testing.T) *anypb.Any {
	t.Helper()
	b, err := json.Marshal(&specs.Process{Args: []string{"sh"}, Cwd: "/"})
	if err != nil {
		t.Fatal(err)
	}
	return &anypb.Any{TypeUrl: "types.containerd.io/opencontainers/runtime-spec/1/Process", Value: b}
}

func (r *rig) mustExec(id, execID string) {
	r.t.Helper()
	if _, err := r.svc.Exec(r.ctx, &taskAPI.ExecProcessRequest{ID: id, ExecID: execID, Spec: execSpec(r.t)}); err != nil {
		r.t.Fatalf("exec %s %s: %v", id, execID, err)
	}
}

// running creates and starts the sandbox pod1 and the workload c1.
func (r *rig) running() {
	r.t.Helper()
	r.mustCreate("pod1", sandboxAnnotations("pod1"))
	r.mustStart("pod1", "")
	r.mustCreate("c1", workloadAnnotations("pod1"))
	r.mustStart("c1", "")
}

// published waits until an event satisfying match was published.
func (r *rig) published(what string, match func(any) bool) {
	r.t.Helper()
	if !r.pub.waitFor(10*time.Second, func(events []any) bool { return slices.ContainsFunc(events, match) }) {
		r.t.Fatalf("no %s was published", what)
	}
}

// shutdownRefused calls Shutdown, which must leave the shim running (why: the failure).
func (r *rig) shutdownRefused(why string) {
	r.t.Helper()
	if _, err := r.svc.Shutdown(r.ctx, &taskAPI.ShutdownRequest{}); err != nil {
		r.t.Fatal(err)
	}
	select {
	case <-r.sd.Done():
		r.t.Fatal(why)
	default:
	}
}

// deleteSandbox kills, waits for and deletes the sandbox id, which must stop its VM.
func (r *rig) deleteSandbox(id string) {
	r.t.Helper()
	if _, err := r.svc.Kill(r.ctx, &taskAPI.KillRequest{ID: id, Signal: 9}); err != nil {
		r.t.Fatal(err)
	}
	r.wait(id, "")
	if _, err := r.svc.Delete(r.ctx, &taskAPI.DeleteRequest{ID: id}); err != nil {
		r.t.Fatal(err)
	}
	if _, stopped, _ := r.vm.State(); !stopped {
		r.t.Errorf("deleting the sandbox %s did not stop the VM", id)
	}
}
