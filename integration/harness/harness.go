// Package harness runs a real containerd, driven through the CRI exactly as kubelet drives it,
// for podvm's integration tests.
//
// Start gives each test its own containerd: own root, state, sockets, shim socket dir and runc
// root, running inside a network namespace the harness creates. The CNI bridge subnet, the
// in-process image registry and the CRI streaming server all live only inside that namespace, so
// a test never sends traffic anywhere but loopback and namespaces it created. Images (busybox
// from the host's busybox-static, and a pause image built from integration/testimages/pause) are
// built locally and pulled through containerd's registry mirrors, under their usual names.
//
// Everything Start creates is torn down by a t.Cleanup, also when the test fails: pods, containerd,
// its shims, mounts, cgroups, the namespace and the directories. Env.AssertNoLeaks tears down
// early and checks that nothing is left.
package harness

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	internalapi "k8s.io/cri-api/pkg/apis"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	criclient "k8s.io/cri-client/pkg"

	"github.com/podvm/podvm/internal/logfile"
	"github.com/podvm/podvm/shim/config"
)

// Options configures one harness environment. The zero value runs containerd with the runc
// runtime and a podvm runtime whose shim is not on PATH.
type Options struct {
	// DevDir holds bin/ (containerd, containerd-shim-runc-v2, runc) and cni/ (plugins).
	// Default: $PODVM_DEV, else /opt/podvm-dev.
	DevDir string
	// ShimDir is where the test built containerd-shim-podvm-v2; it comes first in containerd's
	// PATH. May be empty.
	ShimDir string
	// PodvmConfigPath is the podvm runtime's ConfigPath option (the node config the shim reads).
	PodvmConfigPath string
	// ExtraImages are pushed to the test registry next to busybox and pause, keyed by reference
	// (e.g. "podvm.test/tools:1"; the registry must be one of MirroredRegistries).
	ExtraImages map[string]v1.Image
	// ContainerdLogLevel defaults to "debug".
	ContainerdLogLevel string
	// LeakProcessNames are process names (matched against the start of /proc/<pid>/comm and of
	// the base name of argv[0]) that AssertNoLeaks requires to be absent machine-wide, e.g.
	// "qemu-system", "virtiofsd", "containerd-shim-podvm-v2".
	LeakProcessNames []string
	// LeakDirs are directories that AssertNoLeaks requires to be empty or absent, e.g. /run/podvm.
	LeakDirs []string
	// LeakDirsKeep are names AssertNoLeaks allows in LeakDirs: node-wide files that outlive
	// pods by design (the accelerator probe's cache and lock).
	LeakDirsKeep []string
	// SetupTimeout bounds Start (image builds, containerd start). Default 3 minutes.
	SetupTimeout time.Duration
	// ConfigFile is where containerd's config.toml goes; default <Dir>/config.toml. A test
	// that installs podvm into a root of its own puts it at <root>/etc/containerd/config.toml.
	ConfigFile string
	// NoPodvmRuntime leaves the podvm runtime out of containerd's config: it comes from a
	// drop-in (Imports, or one an installer adds).
	NoPodvmRuntime bool
	// Imports are containerd's config imports, e.g. the installed drop-in.
	Imports []string
	// BridgeMTU is the MTU the CNI bridge plugin gives the bridge and every pod veth; 0 leaves
	// the plugin's default (1500). A non-default value lets tests see that it reaches the pod.
	BridgeMTU int
}

// Env is one running containerd and its CRI clients.
type Env struct {
	// Runtime and Images are kubelet's own CRI clients, connected to this containerd.
	Runtime internalapi.RuntimeService
	Images  internalapi.ImageManagerService

	// BusyboxImage and PauseImage are the references tests pull (PauseImage is also the
	// sandbox image).
	BusyboxImage string
	PauseImage   string

	// Endpoint is the CRI endpoint (unix://...).
	Endpoint string
	// NetNS is the name of the network namespace containerd runs in (ip netns list).
	NetNS string
	// Subnet is the CNI bridge subnet; pod IPs come from it.
	Subnet *net.IPNet
	// Dir holds containerd's root, config, logs and pod log directories.
	Dir string
	// RunDir holds containerd's state, sockets, shim sockets and runc state; short on purpose.
	RunDir string
	// CgroupParent is the cgroup (cgroupfs) under which pods made by PodSandboxConfig run.
	CgroupParent string
	// ContainerdLog is containerd's log file.
	ContainerdLog string

	id         string
	opts       Options
	grpcAddr   string
	netName    string
	ns         *netNS
	reg        *testRegistry
	containerd *exec.Cmd
	exited     chan struct{} // closed when containerd exits
	exitErr    error

	closeOnce sync.Once
	closeErrs []string
	notesMu   sync.Mutex
	notes     []string
}

// NoteOnFailure adds a note that a failed test's output ends with, after containerd's last
// errors: what a component saw (the cluster's warning events, say), where a report that
// keeps only the end of the output still shows it.
func (e *Env) NoteOnFailure(note string) {
	e.notesMu.Lock()
	defer e.notesMu.Unlock()
	e.notes = append(e.notes, note)
}

// DevDir resolves Options.DevDir.
func (o Options) devDir() string {
	if o.DevDir != "" {
		return o.DevDir
	}
	if d := os.Getenv("PODVM_DEV"); d != "" {
		return d
	}
	return "/opt/podvm-dev"
}

// RequirePrerequisites skips the test (or fails it when CI=true) if something the harness
// needs is missing.
func RequirePrerequisites(t testing.TB, opts Options) {
	t.Helper()
	missing := missingPrerequisites(opts)
	if len(missing) == 0 {
		return
	}
	msg := "integration prerequisites missing: " + strings.Join(missing, "; ") +
		" (run `make deps` as root, or set PODVM_DEV to where they are installed)"
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

func missingPrerequisites(opts Options) []string {
	var missing []string
	if os.Geteuid() != 0 {
		missing = append(missing, "must run as root")
	}
	dev := opts.devDir()
	for _, f := range []string{"bin/containerd", "bin/containerd-shim-runc-v2", "bin/runc",
		"cni/bridge", "cni/loopback", "cni/host-local", "cni/portmap"} {
		if !isExecutable(filepath.Join(dev, f)) {
			missing = append(missing, filepath.Join(dev, f))
		}
	}
	if !isExecutable("/bin/busybox") {
		missing = append(missing, "/bin/busybox (apt-get install busybox-static)")
	}
	for _, tool := range []string{"ip", "iptables"} {
		if _, err := exec.LookPath(tool); err != nil {
			missing = append(missing, tool+" (apt-get install iproute2 iptables)")
		}
	}
	if _, err := exec.LookPath("go"); err != nil && !isExecutable("/usr/local/go/bin/go") {
		missing = append(missing, "the go tool (to build the pause image)")
	}
	return missing
}

func isExecutable(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0
}

func randomID() string {
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// Start runs a fresh containerd for t and returns once its CRI answers and reports the runtime and
// network ready. Everything is torn down when t ends.
func Start(t testing.TB, opts Options) *Env {
	t.Helper()
	RequirePrerequisites(t, opts)
	if opts.ContainerdLogLevel == "" {
		opts.ContainerdLogLevel = "debug"
	}
	if opts.SetupTimeout == 0 {
		opts.SetupTimeout = 3 * time.Minute
	}
	ctx, cancel := context.WithTimeout(t.Context(), opts.SetupTimeout)
	defer cancel()

	id := randomID()
	e := &Env{
		id:           id,
		opts:         opts,
		NetNS:        "podvm-it-" + id,
		RunDir:       "/run/pit-" + id,
		CgroupParent: "/pit-" + id,
		netName:      "pit-" + id,
		exited:       make(chan struct{}),
	}
	t.Cleanup(func() { e.teardown(t) })
	if err := e.start(ctx, t); err != nil {
		t.Fatalf("harness: %v", err)
	}
	return e
}

func (e *Env) start(ctx context.Context, t testing.TB) error {
	dir, err := os.MkdirTemp("", "podvm-it-"+e.id+"-")
	if err != nil {
		return err
	}
	e.Dir = dir
	if err := os.Mkdir(e.RunDir, 0o711); err != nil {
		return fmt.Errorf("create %s: %w", e.RunDir, err)
	}

	ns, err := createNetNS(ctx, e.NetNS)
	if err != nil {
		return err
	}
	e.ns = ns

	regLog, err := os.Create(filepath.Join(e.Dir, "registry.log"))
	if err != nil {
		return err
	}
	t.Cleanup(func() { _ = regLog.Close() })
	reg, err := startRegistry(ns, regLog)
	if err != nil {
		return err
	}
	e.reg = reg

	if err := e.pushImages(ctx); err != nil {
		return err
	}
	if err := e.writeConfig(); err != nil {
		return err
	}
	if err := e.startContainerd(); err != nil {
		return err
	}
	t.Logf("harness: containerd in netns %s, dir %s, run dir %s, log %s", e.NetNS, e.Dir, e.RunDir, e.ContainerdLog)
	return e.waitCRI(ctx)
}

func (e *Env) pushImages(ctx context.Context) error {
	busybox, err := BuildBusyboxImage(ctx, "/bin/busybox")
	if err != nil {
		return err
	}
	buildDir := filepath.Join(e.Dir, "build")
	if err := os.MkdirAll(buildDir, 0o755); err != nil {
		return err
	}
	pause, err := BuildPauseImage(ctx, buildDir)
	if err != nil {
		return err
	}
	images := map[string]v1.Image{BusyboxImage: busybox, PauseImage: pause}
	for ref, img := range e.opts.ExtraImages {
		images[ref] = img
	}
	for ref, img := range images {
		if err := e.reg.push(ctx, ref, img); err != nil {
			return err
		}
	}
	e.BusyboxImage, e.PauseImage = BusyboxImage, PauseImage
	return nil
}

// PushImage adds an image to the test registry after Start (ref's registry must be one of
// MirroredRegistries).
func (e *Env) PushImage(ctx context.Context, ref string, img v1.Image) error {
	return e.reg.push(ctx, ref, img)
}

func (e *Env) writeConfig() error {
	dev := e.opts.devDir()
	cniConf := filepath.Join(e.Dir, "cni", "conf")
	certs := filepath.Join(e.Dir, "certs.d")
	for _, d := range []string{cniConf, filepath.Join(e.Dir, "cni", "ipam"), filepath.Join(e.Dir, "pods")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	for _, r := range MirroredRegistries() {
		d := filepath.Join(certs, r)
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(d, "hosts.toml"), []byte(hostsTOML(e.reg.addr)), 0o644); err != nil {
			return err
		}
	}

	b := make([]byte, 1)
	_, _ = rand.Read(b)
	_, subnet, _ := net.ParseCIDR(fmt.Sprintf("10.88.%d.0/24", b[0]))
	e.Subnet = subnet
	conflist, err := cniConflist(e.netName, "pit"+e.id, subnet.String(), filepath.Join(e.Dir, "cni", "ipam"), e.opts.BridgeMTU)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(cniConf, "10-"+e.netName+".conflist"), conflist, 0o644); err != nil {
		return err
	}

	e.grpcAddr = filepath.Join(e.RunDir, "c.sock")
	e.Endpoint = "unix://" + e.grpcAddr
	cfg := containerdConfig{
		Root:            filepath.Join(e.Dir, "root"),
		State:           filepath.Join(e.RunDir, "state"),
		Temp:            filepath.Join(e.RunDir, "tmp"),
		Opt:             filepath.Join(e.Dir, "opt"),
		GRPCAddress:     e.grpcAddr,
		TTRPCAddress:    e.grpcAddr + ".ttrpc",
		SocketDir:       filepath.Join(e.RunDir, "s"),
		RuncRoot:        filepath.Join(e.RunDir, "runc"),
		RuncBinary:      filepath.Join(dev, "bin", "runc"),
		CNIBinDir:       filepath.Join(dev, "cni"),
		CNIConfDir:      cniConf,
		RegistryConfig:  certs,
		SandboxImage:    PauseImage,
		PodvmConfigPath: e.opts.PodvmConfigPath,
		NoPodvmRuntime:  e.opts.NoPodvmRuntime,
		Imports:         e.opts.Imports,
		LogLevel:        e.opts.ContainerdLogLevel,
	}
	if len(cfg.SocketDir) > 42 {
		return fmt.Errorf("shim socket dir %s is longer than containerd's limit of 42 characters", cfg.SocketDir)
	}
	toml, err := cfg.render()
	if err != nil {
		return fmt.Errorf("containerd config: %w", err)
	}
	return os.WriteFile(e.ConfigPath(), []byte(toml), 0o644)
}

// ConfigPath is the containerd config.toml the harness wrote.
func (e *Env) ConfigPath() string {
	if e.opts.ConfigFile != "" {
		return e.opts.ConfigFile
	}
	return filepath.Join(e.Dir, "config.toml")
}

func (e *Env) startContainerd() error {
	dev := e.opts.devDir()
	e.ContainerdLog = filepath.Join(e.Dir, "containerd.log")
	// Appended to: a restarted containerd keeps the log of its first run.
	logf, err := os.OpenFile(e.ContainerdLog, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer func() { _ = logf.Close() }()

	var path []string
	if e.opts.ShimDir != "" {
		path = append(path, e.opts.ShimDir)
	}
	path = append(path, filepath.Join(dev, "bin"), "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")

	cmd := exec.Command(filepath.Join(dev, "bin", "containerd"), "--config", e.ConfigPath())
	cmd.Env = []string{"PATH=" + strings.Join(path, ":"), "HOME=/root", "TMPDIR=" + filepath.Join(e.RunDir, "tmp")}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Dir = e.Dir
	// Pdeathsig: if the test binary dies, containerd goes with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := os.MkdirAll(filepath.Join(e.RunDir, "tmp"), 0o700); err != nil {
		return err
	}
	// Forked from a thread inside the netns, containerd starts in it; its mount namespace stays
	// the host's, so the harness sees (and cleans) its mounts.
	if err := e.ns.do(cmd.Start); err != nil {
		return fmt.Errorf("start containerd in netns %s: %w", e.NetNS, err)
	}
	e.containerd = cmd
	go func() {
		e.exitErr = cmd.Wait()
		close(e.exited)
	}()
	return nil
}

// waitCRI waits until the CRI answers Version and reports RuntimeReady and NetworkReady.
func (e *Env) waitCRI(ctx context.Context) error {
	var lastErr error
	for {
		select {
		case <-e.exited:
			return fmt.Errorf("containerd exited during startup (%v); log tail:\n%s", e.exitErr, e.LogTail(40))
		case <-ctx.Done():
			return fmt.Errorf("containerd's CRI not ready: %v (%w); log tail:\n%s", lastErr, ctx.Err(), e.LogTail(40))
		case <-time.After(200 * time.Millisecond):
		}
		if lastErr = e.connectCRI(ctx); lastErr != nil {
			continue
		}
		var ready bool
		if ready, lastErr = e.criReady(ctx); ready {
			return nil
		}
	}
}

// connectCRI makes whichever of kubelet's CRI clients is still missing, once containerd's
// socket exists.
func (e *Env) connectCRI(ctx context.Context) error {
	if e.Runtime == nil {
		if _, err := os.Stat(e.grpcAddr); err != nil {
			return err
		}
		rt, err := withTimeout(ctx, 5*time.Second, criclient.NewRemoteRuntimeServiceBuilder().WithEndpoint(e.Endpoint).
			WithConnectionTimeout(30*time.Second).Build)
		if err != nil {
			return err
		}
		e.Runtime = rt
	}
	if e.Images == nil {
		is, err := withTimeout(ctx, 5*time.Second, criclient.NewRemoteImageServiceBuilder().WithEndpoint(e.Endpoint).
			WithConnectionTimeout(5*time.Minute).Build)
		if err != nil {
			return err
		}
		e.Images = is
	}
	return nil
}

// criReady asks the CRI's Status whether RuntimeReady and NetworkReady hold; when not, the
// error says why (the call's error, or the last condition that is false).
func (e *Env) criReady(ctx context.Context) (bool, error) {
	st, err := withTimeout(ctx, 5*time.Second, func(ctx context.Context) (*runtimeapi.StatusResponse, error) {
		return e.Runtime.Status(ctx, false)
	})
	if err != nil {
		return false, err
	}
	var notReady error
	ready := map[string]bool{}
	for _, c := range st.GetStatus().GetConditions() {
		ready[c.Type] = c.Status
		if !c.Status {
			notReady = fmt.Errorf("%s: %s %s", c.Type, c.Reason, c.Message)
		}
	}
	return ready[runtimeapi.RuntimeReady] && ready[runtimeapi.NetworkReady], notReady
}

// withTimeout calls f with ctx bounded to d.
func withTimeout[T any](ctx context.Context, d time.Duration, f func(context.Context) (T, error)) (T, error) {
	cctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	return f(cctx)
}

// LogTail returns the last n lines of containerd's log.
func (e *Env) LogTail(n int) string {
	return logfile.TailLines(e.ContainerdLog, n)
}

// LeakDirs are the directories AssertNoLeaks requires empty (Options.LeakDirs): for podvm,
// the shim's state dir.
func (e *Env) LeakDirs() []string { return e.opts.LeakDirs }

// TemplateEnv names the variable that, set to 1, has the suites run their podvm pods
// restored from VM templates ([template] enabled in the podvm config they write) instead of
// booted: the same tests, on the other way a pod VM starts (make e2e-template). Tests of the
// boot itself boot either way.
const TemplateEnv = "PODVM_IT_TEMPLATE"

// Templated reports whether TemplateEnv asks for templated start.
func Templated() bool { return os.Getenv(TemplateEnv) == "1" }

// WithTemplates turns templated start on in body, the podvm config of a shim whose state dir
// is stateDir, and adds the templates' directory to keep, the state dir's entries the leak
// check leaves alone. The templates go when the test ends, after the env's teardown (call it
// before Start).
func WithTemplates(t testing.TB, stateDir, body string, keep []string) (string, []string) {
	t.Helper()
	templates := filepath.Join(stateDir, config.TemplateDirName)
	t.Cleanup(func() {
		if err := os.RemoveAll(templates); err != nil {
			t.Error(err)
		}
	})
	return body + "\n[template]\nenabled = true\n", append(keep, config.TemplateDirName)
}
