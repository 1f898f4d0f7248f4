package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/log"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/hypervisor"
	"github.com/podvm/podvm/hypervisor/qemu"
	"github.com/podvm/podvm/rootfs/guestimage"
	"github.com/podvm/podvm/shim/config"
)

// shimName is the binary containerd runs for runtime_type io.containerd.podvm.v2.
const shimName = "containerd-shim-podvm-v2"

func runCheck(ctx context.Context, e *env, args []string) error {
	const name = "podvm check"
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	path := configFlag(fs)
	boot := fs.Bool("boot", true, "boot throw-away guests under TCG and KVM to measure which accelerator works (as accel \"auto\" does; needs root, takes about twice the guest's boot time); false checks /dev/kvm only")
	setUsage(fs, name+" [flags]",
		"Checks that this node can run podvm pods: config, QEMU, guest image, virtiofsd, KVM,\nvhost devices, /dev/net/tun, the state directory and the shim binary, then boots the guest\nimage under TCG and KVM and reports the measured boot times and which accelerator pods get\n(refreshing accel \"auto\"'s cached choice). Prints one line per check (ok, warn or FAIL, and\nwhat to do) and exits 1 if a requirement is not met; a KVM that is unusable while TCG works\nis a warning.")
	if err := parseFlags(e, fs, args); err != nil {
		return err
	}
	h := hostProbe{
		lookPath:    exec.LookPath,
		stat:        os.Stat,
		readFile:    os.ReadFile,
		access:      unix.Access,
		detectAccel: qemu.DetectAccel,
		version:     commandVersion,
		readDir:     os.ReadDir,
	}
	if *boot {
		h.probeAccel = probeAccel
		h.euid = os.Geteuid
		// The throw-away VMs log their start at info level: check prints its own lines.
		ctx = log.WithLogger(ctx, quietLogger(e.stderr))
	}
	results := h.check(ctx, *path)
	failed := 0
	for _, r := range results {
		fmt.Fprintln(e.stdout, r)
		if r.status == statusFail {
			failed++
		}
	}
	if failed > 0 {
		return fmt.Errorf("%d of %d checks failed: this node cannot run podvm pods until they pass", failed, len(results))
	}
	fmt.Fprintln(e.stdout, "podvm check: this node can run podvm pods")
	return nil
}

// quietLogger logs warnings and errors only, to w.
func quietLogger(w io.Writer) *log.Entry {
	l := logrus.New()
	l.SetOutput(w)
	l.SetLevel(logrus.WarnLevel)
	return logrus.NewEntry(l)
}

type status string

const (
	statusOK   status = "ok"
	statusWarn status = "warn" // works, but slower or degraded
	statusFail status = "FAIL" // a requirement: pods will not start
)

type checkResult struct {
	status status
	name   string
	detail string
}

func (r checkResult) String() string {
	return fmt.Sprintf("%-4s  %-15s %s", r.status, r.name, r.detail)
}

// hostProbe is how check looks at the host; tests replace it.
type hostProbe struct {
	lookPath    func(string) (string, error)
	stat        func(string) (fs.FileInfo, error)
	readFile    func(string) ([]byte, error)
	access      func(path string, mode uint32) error
	detectAccel func() string
	version     func(ctx context.Context, path string) (string, error)
	// probeAccel boots the guest image under each accelerator (qemu's accelerator probe);
	// nil skips the boot check and checks /dev/kvm only. euid says whether it can run.
	probeAccel func(ctx context.Context, cfg *config.Config) (qemu.ProbeResult, error)
	euid       func() int
	// readDir lists a directory (the VM templates); nil: there is none.
	readDir func(string) ([]os.DirEntry, error)
}

// check runs every check against the config at path.
func (h hostProbe) check(ctx context.Context, path string) []checkResult {
	var r report
	cfg := checkConfig(&r, path)
	hc := cfg.Hypervisor
	h.checkQEMU(ctx, &r, hc.QEMUPath)
	h.checkGuestImage(&r, hc)
	h.checkVirtiofsd(&r, hc.VirtiofsdPath)
	if h.probeAccel == nil {
		h.checkKVM(&r, hc.Accel)
	}
	h.checkHostDevices(&r, hc.AgentTransport)
	r.put(h.stateDir(cfg.Sandbox.StateDir))
	h.checkTemplates(&r, cfg)
	if h.probeAccel != nil {
		h.checkBoot(ctx, &r, cfg)
	}
	if p, err := h.lookPath(shimName); err != nil {
		r.add(statusFail, "shim", "%s not in PATH; run 'make install' (it goes to /usr/local/bin) and make sure containerd's PATH includes it", shimName)
	} else {
		r.add(statusOK, "shim", "%s", p)
	}
	return r
}

// report collects check results in the order they are made.
type report []checkResult

func (r *report) add(s status, name, format string, a ...any) {
	r.put(s, name, fmt.Sprintf(format, a...))
}

func (r *report) put(s status, name, msg string) {
	*r = append(*r, checkResult{s, name, msg})
}

// checkTemplates says whether templated start is on and which VM templates the node has.
func (h hostProbe) checkTemplates(r *report, cfg *config.Config) {
	if !cfg.Template.Enabled {
		r.add(statusOK, "templates", "off: pod VMs boot ([template] enabled = false; docs/templating.md)")
		return
	}
	if cfg.Hypervisor.AgentTransport == hypervisor.TransportVsock {
		r.add(statusWarn, "templates", "on, but agent_transport = \"vsock\": VM templates need virtio-serial, so pod VMs boot; set agent_transport = \"serial\"")
		return
	}
	dir := cfg.TemplateDir()
	var keys []string
	if h.readDir != nil {
		entries, _ := h.readDir(dir) // none yet is the normal first state
		for _, e := range entries {
			if _, err := h.readFile(filepath.Join(dir, e.Name(), "template.json")); err == nil {
				keys = append(keys, e.Name())
			}
		}
	}
	if len(keys) == 0 {
		r.add(statusOK, "templates", "on: none built yet in %s; the first pod of each VM shape builds one (a few seconds)", dir)
		return
	}
	r.add(statusOK, "templates", "on: %d in %s (%s)", len(keys), dir, strings.Join(keys, ", "))
}

// checkConfig loads the config at path; when it does not load, the checks go on with the
// built-in defaults.
func checkConfig(r *report, path string) *config.Config {
	cfg, err := config.Load(path)
	switch {
	case err != nil:
		r.add(statusFail, "config", "%v (the checks below use the built-in defaults)", err)
		cfg = config.Default()
	case cfg.Path == "":
		r.add(statusOK, "config", "no %s: built-in defaults (see 'podvm config')", config.DefaultPath)
	default:
		r.add(statusOK, "config", "%s loads", cfg.Path)
	}
	return cfg
}

// checkQEMU finds the QEMU binary and asks it for its version.
func (h hostProbe) checkQEMU(ctx context.Context, r *report, qemuPath string) {
	if p, err := h.lookPath(qemuPath); err != nil {
		r.add(statusFail, "qemu", "%s: not found or not executable; install QEMU (Debian: apt-get install qemu-system-x86) or set hypervisor.qemu_path", qemuPath)
	} else if v, err := h.version(ctx, p); err != nil {
		r.add(statusFail, "qemu", "%s --version: %v; check the QEMU installation", p, err)
	} else {
		r.add(statusOK, "qemu", "%s: %s", p, v)
	}
}

// checkGuestImage checks the guest kernel and what it boots from (the root image, else the
// initrd), and reads the image manifest next to the kernel.
func (h hostProbe) checkGuestImage(r *report, hc config.Hypervisor) {
	kernel := hc.Kernel
	missingImage := "run 'make install' (or 'podvm image build --output " + filepath.Dir(kernel) + "') or set hypervisor.%s"
	boot := struct{ name, key, path string }{"guest initrd", "initrd", hc.Initrd}
	if hc.Image != "" {
		boot = struct{ name, key, path string }{"guest rootfs", "image", hc.Image}
	}
	for _, f := range []struct{ name, key, path string }{{"guest kernel", "kernel", kernel}, boot} {
		if fi, err := h.stat(f.path); err != nil {
			r.add(statusFail, f.name, "%s: %s; "+missingImage, f.path, errText(err), f.key)
		} else if !fi.Mode().IsRegular() {
			r.add(statusFail, f.name, "%s: not a regular file; "+missingImage, f.path, f.key)
		} else if f.key == "image" && fi.Size()%guestimage.RootImageAlign != 0 {
			r.add(statusFail, f.name, "%s: %d bytes, not a multiple of 2 MiB (the guest maps it in 2 MiB sections); rebuild it with 'podvm image build'", f.path, fi.Size())
		} else {
			r.add(statusOK, f.name, "%s (%d bytes)", f.path, fi.Size())
		}
	}
	manifest := filepath.Join(filepath.Dir(kernel), guestimage.ManifestFile)
	var m guestimage.Manifest
	if b, err := h.readFile(manifest); err != nil {
		r.add(statusWarn, "guest image", "%s: %s; the kernel version is unknown ('podvm image build' writes it next to the kernel)", manifest, errText(err))
	} else if err := json.Unmarshal(b, &m); err != nil || m.KernelVersion == "" {
		r.add(statusWarn, "guest image", "%s: not a podvm image manifest; rebuild the image with 'podvm image build'", manifest)
	} else {
		r.add(statusOK, "guest image", "kernel %s, %d modules, built %s", m.KernelVersion, len(m.Modules), m.BuildTime.UTC().Format(time.RFC3339))
	}
}

// checkVirtiofsd finds the virtiofsd the VM will use.
func (h hostProbe) checkVirtiofsd(r *report, configured string) {
	if p := h.virtiofsd(configured); p != "" {
		r.add(statusOK, "virtiofsd", "%s", p)
	} else if configured != "" {
		r.add(statusFail, "virtiofsd", "%s: not executable; fix hypervisor.virtiofsd_path or set it to \"\" to search", configured)
	} else {
		r.add(statusFail, "virtiofsd", "not in /usr/libexec, PATH or /usr/lib/qemu; install it (Debian 12: qemu-system-x86 ships /usr/lib/qemu/virtiofsd; later: apt-get install virtiofsd) or set hypervisor.virtiofsd_path")
	}
}

// checkKVM compares the configured accelerator with what /dev/kvm offers.
func (h hostProbe) checkKVM(r *report, accel string) {
	detected := h.detectAccel()
	switch {
	case accel == hypervisor.AccelKVM && detected != qemu.AccelKVM:
		r.add(statusFail, "kvm", "accel = \"kvm\" but /dev/kvm is not usable (missing, no permission, or KVM_CREATE_VM fails); enable virtualization / load kvm_intel or kvm_amd, or set accel = \"tcg\"")
	case accel == hypervisor.AccelKVM:
		r.add(statusOK, "kvm", "/dev/kvm usable; accel = \"kvm\"")
	case accel == hypervisor.AccelTCG:
		note := "not usable"
		if detected == qemu.AccelKVM {
			note = "usable: set accel = \"auto\" to use it"
		}
		r.add(statusOK, "kvm", "accel = \"tcg\" forced (software emulation, slow); /dev/kvm %s", note)
	case detected == qemu.AccelKVM:
		r.add(statusOK, "kvm", "/dev/kvm usable; accel \"auto\" picks kvm")
	default:
		r.add(statusWarn, "kvm", "/dev/kvm not usable (missing, no permission, or KVM_CREATE_VM fails): accel \"auto\" will use TCG (slow); enable virtualization / load kvm_intel or kvm_amd for KVM")
	}
}

// checkHostDevices checks /dev/vhost-vsock (against the agent transport), /dev/vhost-net and
// /dev/net/tun.
func (h hostProbe) checkHostDevices(r *report, agentTransport string) {
	_, vsockErr := h.stat("/dev/vhost-vsock")
	switch {
	case agentTransport == hypervisor.TransportVsock && vsockErr != nil:
		r.add(statusFail, "vhost-vsock", "agent_transport = \"vsock\" but /dev/vhost-vsock: %s; modprobe vhost_vsock, or set agent_transport = \"\" to fall back to virtio-serial", errText(vsockErr))
	case agentTransport == hypervisor.TransportSerial:
		r.add(statusOK, "vhost-vsock", "agent_transport = \"serial\": agent over virtio-serial")
	case vsockErr != nil:
		r.add(statusWarn, "vhost-vsock", "no /dev/vhost-vsock: agent over virtio-serial (works; modprobe vhost_vsock for vsock)")
	default:
		r.add(statusOK, "vhost-vsock", "/dev/vhost-vsock: agent over vsock")
	}

	if _, err := h.stat("/dev/vhost-net"); err != nil {
		r.add(statusWarn, "vhost-net", "no /dev/vhost-net: virtio-net without vhost (slower networking); modprobe vhost_net")
	} else {
		r.add(statusOK, "vhost-net", "/dev/vhost-net: virtio-net with vhost")
	}

	if err := h.access("/dev/net/tun", unix.R_OK|unix.W_OK); err != nil {
		r.add(statusFail, "tun", "/dev/net/tun: %s; modprobe tun (pods' network goes through a tap device)", errText(err))
	} else {
		r.add(statusOK, "tun", "/dev/net/tun")
	}
}

// virtiofsd returns the virtiofsd the VM will use (as qemu.Config.Resolve picks it), or "".
func (h hostProbe) virtiofsd(configured string) string {
	if configured != "" {
		if h.access(configured, unix.X_OK) == nil {
			return configured
		}
		return ""
	}
	return qemu.FindVirtiofsd(h.access, h.lookPath)
}

// stateDir checks that dir is writable, or can be created, without changing anything.
func (h hostProbe) stateDir(dir string) (status, string, string) {
	const name = "state dir"
	fi, err := h.stat(dir)
	switch {
	case err == nil && !fi.IsDir():
		return statusFail, name, fmt.Sprintf("%s: not a directory; remove it or set sandbox.state_dir", dir)
	case err == nil:
		if err := h.access(dir, unix.W_OK|unix.X_OK); err != nil {
			return statusFail, name, fmt.Sprintf("%s: not writable (%s); run the shim as root or set sandbox.state_dir", dir, errText(err))
		}
		return statusOK, name, dir + " writable"
	case !errors.Is(err, fs.ErrNotExist):
		return statusFail, name, fmt.Sprintf("%s: %s; set sandbox.state_dir", dir, errText(err))
	}
	parent := filepath.Dir(dir)
	for parent != filepath.Dir(parent) {
		if _, err := h.stat(parent); err == nil {
			break
		}
		parent = filepath.Dir(parent)
	}
	if err := h.access(parent, unix.W_OK|unix.X_OK); err != nil {
		return statusFail, name, fmt.Sprintf("%s does not exist and %s is not writable (%s); create it or set sandbox.state_dir", dir, parent, errText(err))
	}
	return statusOK, name, dir + " (created by the shim at the first pod)"
}

// errText is err without the path the message already shows.
func errText(err error) string {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		err = pe.Err
	}
	return err.Error()
}

// commandVersion runs "path --version" and returns the first line of its output.
func commandVersion(ctx context.Context, path string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, path, "--version").Output()
	if err != nil {
		return "", err
	}
	line, _, _ := bufio.NewReader(bytes.NewReader(out)).ReadLine()
	if s := strings.TrimSpace(string(line)); s != "" {
		return s, nil
	}
	return "", errors.New("printed no version")
}
