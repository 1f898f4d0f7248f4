package qemu

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/agent"
	"github.com/podvm/podvm/internal/flock"
	"github.com/podvm/podvm/internal/logfile"
)

// The accelerator probe. /dev/kvm opening and KVM_CREATE_VM succeeding say little: under
// nested virtualisation QEMU can abort at the first vCPU register write (-cpu host: "failed
// to set MSR 0x10a") or run a guest far slower than TCG does. So accel "auto" decides from a
// measurement instead: boot the node's real guest image (kernel + initrd, the agent as
// /init) in a throw-away VM made exactly as a pod's (machine, memory, agent transport,
// confinement), once under TCG and once under KVM, and time QEMU start to the agent's first
// answer. KVM is used only when its guest answers and is not slower than TCG's
// (KVMMaxSlowdown). The agent answering is the marker because it is what a pod waits for:
// a kernel that prints its banner but never gets its agent up (a CPU model missing a feature
// the guest needs) is no use.
//
// The result is cached per node in <state dir>/accel.json (the shim's state_dir, the parent of
// every VM's dir; a tmpfs, so once per node boot) keyed by the QEMU binary, guest kernel,
// initrd, firmware, agent transport, host kernel release and ProbeVersion. Shims take
// <state dir>/accel.lock while they look, so only one of them probes.

const (
	// ProbeVersion is part of the cache key: bump it when the probe or its decision changes.
	ProbeVersion = 1
	// CPUHost is the CPU model tried first under KVM: the host's CPU, every feature passed on.
	CPUHost = "host"
	// KVMMaxSlowdown is how much slower than TCG's a KVM boot may be and still be used:
	// 1.0, KVM must at least match TCG. A healthy KVM boots several times faster; one that
	// does not is nested virtualisation at its worst, which also runs the pod slower.
	KVMMaxSlowdown = 1.0
	// ProbeTimeout bounds the TCG boot (and KVM's when TCG does not boot). KVM's boot is
	// bounded by TCG's time times KVMMaxSlowdown: it is not going to be used after that.
	ProbeTimeout = 60 * time.Second
)

// Files in the node's state dir (the parent of every VM's StateDir).
const (
	// AccelCacheFile holds the probe's ProbeResult as JSON.
	AccelCacheFile = "accel.json"
	// AccelLockFile is flocked while a process reads the cache or probes.
	AccelLockFile = "accel.lock"
)

// KVMCPUModels are the CPU models the probe tries under KVM, in order. The next one is tried
// only when QEMU aborts with the one before, as it does when the host refuses an MSR the
// model sets: nested hosts commonly refuse IA32_ARCH_CAPABILITIES (MSR 0x10a), which the
// second model masks; qemu64 is a named model with nothing host-specific.
func KVMCPUModels() []string {
	return []string{CPUHost, "host,arch-capabilities=off", "qemu64"}
}

// Attempt is one probe boot.
type Attempt struct {
	Accel string `json:"accel"`
	CPU   string `json:"cpu,omitempty"`
	// Booted: the agent answered, BootTime after QEMU was started.
	Booted   bool          `json:"booted"`
	BootTime time.Duration `json:"bootTimeNs,omitempty"`
	// Aborted: QEMU exited (or failed to start) before the agent answered, rather than
	// running out of time.
	Aborted bool `json:"aborted,omitempty"`
	// Reason says why it did not boot: QEMU's complaint, or the time limit.
	Reason string `json:"reason,omitempty"`
}

func (a Attempt) String() string {
	what := a.Accel
	if a.CPU != "" {
		what += " -cpu " + a.CPU
	}
	if a.Booted {
		return fmt.Sprintf("%s: agent answered %s after QEMU start", what, roundDuration(a.BootTime))
	}
	return what + ": " + a.Reason
}

// FileID identifies a file's version without reading it.
type FileID struct {
	Path    string `json:"path,omitempty"`
	Size    int64  `json:"size,omitempty"`
	ModTime int64  `json:"mtimeNs,omitempty"`
}

// ProbeKey is what a probe result depends on; a cached result with another key is stale.
type ProbeKey struct {
	ProbeVersion int    `json:"probeVersion"`
	HostKernel   string `json:"hostKernel"`
	QEMU         FileID `json:"qemu"`
	Kernel       FileID `json:"kernel"`
	Initrd       FileID `json:"initrd"`
	RootImage    FileID `json:"rootImage"`
	Firmware     FileID `json:"firmware"`
	Transport    string `json:"transport"`
}

// ProbeResult is what the probe measured and decided.
type ProbeResult struct {
	Key         ProbeKey  `json:"key"`
	Time        time.Time `json:"time"`
	QEMUVersion string    `json:"qemuVersion,omitempty"`
	// Accel is what "auto" uses: AccelKVM or AccelTCG; CPU the model under KVM.
	Accel string `json:"accel"`
	CPU   string `json:"cpu,omitempty"`
	// Reason says why KVM is not used (empty when it is).
	Reason string    `json:"reason,omitempty"`
	TCG    Attempt   `json:"tcg"`
	KVM    []Attempt `json:"kvm,omitempty"`
	// Cached: this result came from the cache file, not a probe just now (not stored).
	Cached bool `json:"-"`
}

// bootFunc boots one throw-away guest with accel and cpu, giving up after limit.
type bootFunc func(ctx context.Context, accel, cpu string, limit time.Duration) Attempt

// prober runs the probe for one resolved config; tests replace boot and kvmDevice.
type prober struct {
	cfg     Config
	nodeDir string
	// boot boots one guest; kvmDevice says why /dev/kvm cannot be used (nil: it can);
	// key computes the cache key; qemuVersion names the QEMU binary.
	boot        bootFunc
	kvmDevice   func() error
	key         func() (ProbeKey, error)
	qemuVersion func(ctx context.Context) string
	models      []string
	now         func() time.Time
}

func newProber(cfg Config, nodeDir string) *prober {
	p := &prober{cfg: cfg, nodeDir: nodeDir, kvmDevice: kvmDeviceError, models: KVMCPUModels(), now: time.Now}
	p.boot = p.bootGuest
	p.key = func() (ProbeKey, error) { return probeKey(&p.cfg) }
	p.qemuVersion = func(ctx context.Context) string { return binaryVersion(ctx, p.cfg.Binary) }
	return p
}

// ProbeAccel boots throw-away guests with cfg (resolved but for Accel; its StateDir is
// ignored) in dirs under nodeDir, and returns what it measured and which accelerator "auto"
// should use. It neither reads nor writes the cache. The error is non-nil only when the
// guest booted under no accelerator; the result then still says what each boot did.
func ProbeAccel(ctx context.Context, cfg Config, nodeDir string) (ProbeResult, error) {
	return newProber(cfg, nodeDir).probe(ctx)
}

// RefreshAccel probes as ProbeAccel and stores the result in nodeDir's cache, replacing what
// was there (podvm check does, so what it reports is what pods get).
func RefreshAccel(ctx context.Context, cfg Config, nodeDir string) (ProbeResult, error) {
	return newProber(cfg, nodeDir).cached(ctx, true)
}

// CachedAccel returns the cached probe result for cfg in nodeDir, probing (and caching) when
// there is none or it was made with other files. Concurrent callers, in any process, wait for
// one probe.
func CachedAccel(ctx context.Context, cfg Config, nodeDir string) (ProbeResult, error) {
	return newProber(cfg, nodeDir).cached(ctx, false)
}

// resolveAutoAccel sets Accel (and CPU) from the cached probe result; the node's state dir
// is the parent of the VM's.
func (c *Config) resolveAutoAccel(ctx context.Context) error {
	if !filepath.IsAbs(c.StateDir) {
		return fmt.Errorf("accel \"auto\": StateDir %q must be an absolute path: the accelerator probe's result is cached in its parent", c.StateDir)
	}
	r, err := CachedAccel(ctx, *c, filepath.Dir(c.StateDir))
	if err != nil {
		return fmt.Errorf("accel \"auto\": %w; run 'podvm check' for details", err)
	}
	c.Accel = r.Accel
	if c.Accel == AccelKVM && c.CPU == "" {
		c.CPU = r.CPU
	}
	return nil
}

func (p *prober) cached(ctx context.Context, refresh bool) (ProbeResult, error) {
	key, err := p.key()
	if err != nil {
		return ProbeResult{}, err
	}
	path := filepath.Join(p.nodeDir, AccelCacheFile)
	if !refresh {
		if r, ok := readAccelCache(path, key); ok {
			return r, nil
		}
	}
	if err := os.MkdirAll(p.nodeDir, 0o711); err != nil {
		return ProbeResult{}, fmt.Errorf("accelerator probe: %w", err)
	}
	unlock, err := lockFile(ctx, filepath.Join(p.nodeDir, AccelLockFile))
	if err != nil {
		return ProbeResult{}, fmt.Errorf("accelerator probe: %w", err)
	}
	defer unlock()
	if !refresh {
		// Another process may have probed while this one waited for the lock.
		if r, ok := readAccelCache(path, key); ok {
			return r, nil
		}
	}
	r, err := p.probe(ctx)
	r.Key = key
	if err != nil {
		// Not cached: the next VM tries again (after the image is fixed, say).
		return r, err
	}
	if err := writeAccelCache(path, r); err != nil {
		return r, fmt.Errorf("accelerator probe: caching the result: %w", err)
	}
	return r, nil
}

// probe runs TCG, then the KVM CPU models (the next only when QEMU aborted with the one
// before), and decides.
func (p *prober) probe(ctx context.Context) (ProbeResult, error) {
	cleanStaleProbes(ctx, p.nodeDir)
	r := ProbeResult{Time: p.now().UTC(), QEMUVersion: p.qemuVersion(ctx)}
	r.TCG = p.boot(ctx, AccelTCG, "", ProbeTimeout)
	kvmErr := p.kvmDevice()
	if kvmErr == nil {
		limit := ProbeTimeout
		if r.TCG.Booted {
			limit = time.Duration(float64(r.TCG.BootTime) * KVMMaxSlowdown)
		}
		for _, m := range p.models {
			a := p.boot(ctx, AccelKVM, m, limit)
			r.KVM = append(r.KVM, a)
			if !a.Aborted || ctx.Err() != nil {
				break
			}
		}
	}
	var err error
	r.Accel, r.CPU, r.Reason, err = decideAccel(r.TCG, r.KVM, kvmErr)
	return r, err
}

// decideAccel picks the accelerator from the probe's boots: KVM with the CPU model of its
// last attempt when that guest answered no slower than TCG's (times KVMMaxSlowdown), else
// TCG, with the reason KVM is not used. kvmErr is why /dev/kvm cannot be used at all.
func decideAccel(tcg Attempt, kvm []Attempt, kvmErr error) (accel, cpu, reason string, err error) {
	var last Attempt
	if len(kvm) > 0 {
		last = kvm[len(kvm)-1]
	}
	limit := time.Duration(float64(tcg.BootTime) * KVMMaxSlowdown)
	if last.Booted && (!tcg.Booted || last.BootTime <= limit) {
		return AccelKVM, last.CPU, "", nil
	}
	switch {
	case kvmErr != nil:
		reason = "/dev/kvm is not usable: " + kvmErr.Error()
	case len(kvm) == 0:
		reason = "KVM was not tried"
	default:
		var parts []string
		for _, a := range kvm {
			switch {
			case a.Booted:
				parts = append(parts, fmt.Sprintf("-cpu %s: the guest booted in %s, slower than under TCG (%s)", a.CPU, roundDuration(a.BootTime), roundDuration(tcg.BootTime)))
			case a.Aborted:
				parts = append(parts, fmt.Sprintf("-cpu %s: QEMU aborted: %s", a.CPU, a.Reason))
			case tcg.Booted:
				parts = append(parts, fmt.Sprintf("-cpu %s: %s, slower than under TCG (%s)", a.CPU, a.Reason, roundDuration(tcg.BootTime)))
			default:
				parts = append(parts, fmt.Sprintf("-cpu %s: %s", a.CPU, a.Reason))
			}
		}
		reason = "KVM " + strings.Join(parts, "; ")
	}
	if !tcg.Booted {
		return "", "", reason, fmt.Errorf("the guest image boots under no accelerator: TCG: %s; %s", tcg.Reason, reason)
	}
	return AccelTCG, "", reason, nil
}

func roundDuration(d time.Duration) time.Duration { return d.Round(time.Millisecond) }

// kvmDeviceError says why /dev/kvm cannot make VMs, nil when it can. What to do about it is
// podvm check's to say (cmd/podvm), not part of the reason.
func kvmDeviceError() error {
	if DetectAccel() == AccelKVM {
		return nil
	}
	if _, err := os.Stat("/dev/kvm"); err != nil {
		return err
	}
	return errors.New("/dev/kvm does not open read-write or KVM_CREATE_VM fails (permissions, or another hypervisor holds VT-x/AMD-V)")
}

// bootGuest boots the config's guest image under accel (and cpu) in a VM dir of its own
// under the node dir, and waits up to limit for its agent. It leaves nothing running.
func (p *prober) bootGuest(ctx context.Context, accel, cpu string, limit time.Duration) Attempt {
	a := Attempt{Accel: accel, CPU: cpu}
	c := p.cfg
	c.ID = "accel-probe-" + accel
	c.StateDir = filepath.Join(p.nodeDir, fmt.Sprintf("accel-probe-%d-%s", os.Getpid(), accel))
	c.Accel, c.CPU = accel, cpu
	c.SharedDir, c.NetDevices, c.HotplugSlots = "", nil, 0
	if c.AgentTransport == TransportVsock {
		var b [4]byte
		if _, err := rand.Read(b[:]); err != nil {
			a.Aborted, a.Reason = true, err.Error()
			return a
		}
		c.VsockCID = 3 + binary.LittleEndian.Uint32(b[:])%(1<<31)
	}
	defer func() { _ = os.RemoveAll(c.StateDir) }() // the throw-away VM's dir; nothing in it matters
	bctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	vm := newVM(c)
	start := time.Now()
	err := vm.Start(bctx)
	if err == nil {
		var cl *agent.Client
		if cl, err = agent.Connect(bctx, vm.DialAgent, vm.Done()); err == nil {
			a.Booted, a.BootTime = true, time.Since(start)
			_ = cl.Close() // the VM is stopped next
		}
	}
	exited := false
	select {
	case <-vm.Done():
		exited = true
	default:
	}
	qemuLog := qemuComplaint(c.path(QEMULog))
	sctx, scancel := context.WithTimeout(context.WithoutCancel(ctx), killWait+quitGrace)
	defer scancel()
	_ = vm.Stop(sctx) // Stop kills what does not quit; the attempt's outcome is already known
	if a.Booted {
		return a
	}
	switch {
	case bctx.Err() != nil && ctx.Err() == nil && !exited:
		a.Reason = fmt.Sprintf("no answer from the guest agent within %s", roundDuration(limit))
	case ctx.Err() != nil:
		a.Reason = "probe cancelled: " + ctx.Err().Error()
	default:
		a.Aborted = true
		a.Reason = err.Error()
		if qemuLog != "" {
			a.Reason = qemuLog
		}
	}
	return a
}

// cleanStaleProbes stops and removes what probes of processes that died mid-boot left in
// nodeDir (QEMU loses its parent-death signal when it drops to its own uid). A live
// process's probe dir is left alone.
func cleanStaleProbes(ctx context.Context, nodeDir string) {
	dirs, _ := filepath.Glob(filepath.Join(nodeDir, "accel-probe-*-*"))
	for _, dir := range dirs {
		var pid int
		var accel string
		if n, _ := fmt.Sscanf(filepath.Base(dir), "accel-probe-%d-%s", &pid, &accel); n != 2 || pid <= 0 {
			continue
		}
		if err := unix.Kill(pid, 0); err == nil || errors.Is(err, unix.EPERM) {
			continue // its prober still runs (or the pid was reused: then it is removed later)
		}
		if err := Cleanup(ctx, dir); err != nil {
			log.G(ctx).WithError(err).Warn("accelerator probe: cleaning up a dead probe's VM")
			continue
		}
		_ = os.RemoveAll(dir) // only a dead probe's logs and sockets
	}
}

// qemuComplaint is the line of QEMU's log that says why it stopped: the refused MSR if there
// is one, else its first error, else its last line.
func qemuComplaint(path string) string {
	b, err := logfile.ReadTail(path, 8<<10)
	if err != nil {
		return ""
	}
	var first, last string
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" {
			continue
		}
		// "-msg timestamp=on" prefixes a time; the program name follows.
		if i := strings.Index(line, "qemu-system"); i > 0 {
			line = line[i:]
		}
		if strings.Contains(line, "failed to set MSR") {
			return line
		}
		if first == "" && strings.Contains(line, "error") {
			first = line
		}
		last = line
	}
	if first != "" {
		return first
	}
	return last
}

// probeKey identifies the files and host a probe result was made with.
func probeKey(c *Config) (ProbeKey, error) {
	k := ProbeKey{ProbeVersion: ProbeVersion, Transport: c.AgentTransport}
	var u unix.Utsname
	if err := unix.Uname(&u); err == nil {
		k.HostKernel = unix.ByteSliceToString(u.Release[:])
	}
	for _, f := range []struct {
		id       *FileID
		path     string
		optional bool
	}{{&k.QEMU, c.Binary, false}, {&k.Kernel, c.Kernel, false}, {&k.Initrd, c.Initrd, true}, {&k.RootImage, c.RootImage, true}, {&k.Firmware, c.Firmware, true}} {
		if f.path == "" && f.optional {
			continue
		}
		path := f.path
		if !strings.Contains(path, "/") { // a binary looked up in PATH, as exec does
			p, err := exec.LookPath(path)
			if err != nil {
				return k, fmt.Errorf("accelerator probe: %w", err)
			}
			path = p
		}
		st, err := os.Stat(path)
		if err != nil {
			return k, fmt.Errorf("accelerator probe: %w", err)
		}
		*f.id = FileID{Path: f.path, Size: st.Size(), ModTime: st.ModTime().UnixNano()}
	}
	return k, nil
}

// readAccelCache returns the result cached at path if it was made with key.
func readAccelCache(path string, key ProbeKey) (ProbeResult, bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return ProbeResult{}, false
	}
	var r ProbeResult
	if json.Unmarshal(b, &r) != nil || r.Key != key || (r.Accel != AccelKVM && r.Accel != AccelTCG) {
		return ProbeResult{}, false
	}
	if r.Accel == AccelKVM && r.CPU != "" && !validCPUModel(r.CPU) {
		return ProbeResult{}, false
	}
	r.Cached = true
	return r, true
}

// writeAccelCache replaces the cache at path with r, atomically.
func writeAccelCache(path string, r ProbeResult) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), AccelCacheFile+".*")
	if err != nil {
		return err
	}
	_, werr := tmp.Write(append(b, '\n'))
	if cerr := tmp.Close(); werr == nil {
		werr = cerr
	}
	if werr == nil {
		werr = os.Chmod(tmp.Name(), 0o644)
	}
	if werr == nil {
		werr = os.Rename(tmp.Name(), path)
	}
	if werr != nil {
		_ = os.Remove(tmp.Name()) // the write failed already; that error is the one to report
	}
	return werr
}

// lockFile takes an exclusive flock on path (creating it), waiting until ctx ends; the
// returned func releases it.
func lockFile(ctx context.Context, path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, err
	}
	if err := flock.Wait(ctx, int(f.Fd()), 50*time.Millisecond); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	return func() { _ = f.Close() }, nil // closing drops the lock
}

// binaryVersion is the first line of "path --version", or "" when it says nothing.
func binaryVersion(ctx context.Context, path string) string {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, path, "--version").Output()
	if err != nil {
		return ""
	}
	line, _, _ := bytes.Cut(out, []byte("\n"))
	return strings.TrimSpace(string(line))
}

// kvmCPU is the -cpu value under KVM: the configured (or probed) model, else host.
func (c *Config) kvmCPU() string {
	if c.CPU != "" {
		return c.CPU
	}
	return CPUHost
}

// validCPUModel reports whether s looks like a QEMU CPU model with options: a name of
// letters, digits, '-', '_' and '.', then ",key=value" options of the same characters.
func validCPUModel(s string) bool {
	name, opts, _ := strings.Cut(s, ",")
	if !validID(name) {
		return false
	}
	if opts == "" {
		return !strings.HasSuffix(s, ",")
	}
	for _, o := range strings.Split(opts, ",") {
		k, v, ok := strings.Cut(o, "=")
		if !ok || !validID(k) || !validID(v) {
			return false
		}
	}
	return true
}
