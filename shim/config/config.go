// Package config is podvm's node configuration (/etc/podvm/config.toml) and the pod annotations
// it lets through: which podvm.io/<key> annotations a pod may set, and how big its VM is.
//
// The file is decoded strictly: an unknown key is an error, and every bad value is reported with
// the key, what is wrong and an example of a good value. Keys left out keep their defaults
// (Default), so an empty file, or no file at the default path, is a working configuration.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path"
	"path/filepath"
	"reflect"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"

	"github.com/podvm/podvm/hypervisor"
)

const (
	// DefaultPath is where the node config lives unless the containerd runtime option
	// ConfigPath or the environment variable EnvPath says otherwise.
	DefaultPath = "/etc/podvm/config.toml"
	// EnvPath names an environment variable holding the config path; the runtime option
	// ConfigPath overrides it.
	EnvPath = "PODVM_CONFIG"
)

// DefaultKind is the hypervisor kind when the file names none.
const DefaultKind = "qemu"

// Limits on the VM size.
const (
	// MinMemory is the smallest VM podvm starts: the guest kernel and agent need about this much.
	MinMemory = 128 * MiB
	// MaxVCPUsLimit is QEMU's limit on vCPUs for the q35 machine without an IOMMU.
	MaxVCPUsLimit = 255
	// DefaultVCPUs is sandbox.default_vcpus when the file does not set it, or max_vcpus if
	// that is lower. Two, not one: a pod without a CPU limit may use every CPU of the node
	// under runc, and with one vCPU the agent, each container's runc init and its process
	// take turns on it. Under TCG a second vCPU halved create+start's ratio to runc and cut
	// exec's by a quarter, at the same idle cost (docs/benchmarks.md); under KVM an idle
	// vCPU costs nothing.
	DefaultVCPUs = 2
)

// Config is the node configuration. Field tags are the TOML keys.
type Config struct {
	Hypervisor  Hypervisor  `toml:"hypervisor"`
	Sandbox     Sandbox     `toml:"sandbox"`
	Annotations Annotations `toml:"annotations"`
	Virtiofs    Virtiofs    `toml:"virtiofs"`
	Block       Block       `toml:"block"`
	Template    Template    `toml:"template"`

	// Path is the file the config was read from; "" when no file exists at DefaultPath and
	// the config is the built-in defaults. Messages name it.
	Path string `toml:"-"`
}

// Hypervisor is the [hypervisor] section: the VMM process and the guest image.
//
// The doc comment of each field is its entry in docs/reference/config.md (go generate
// ./internal/refdoc): write it for the node's admin.
type Hypervisor struct {
	// Kind is the VMM implementation; "qemu" is the one podvm has. A kind the shim does not
	// have fails the pod with an error naming the kinds it has.
	Kind string `toml:"kind"`
	// QEMUPath is the QEMU binary: an absolute path, or a command name looked up in PATH.
	QEMUPath string `toml:"qemu_path"`
	// Accel is the accelerator: "auto" (boot a throw-away guest under TCG and KVM once per
	// node boot and use KVM only if it works and is no slower; cached in
	// <state_dir>/accel.json), "kvm" (always; pods fail where KVM does not boot the guest)
	// or "tcg" (software emulation; no probe).
	Accel string `toml:"accel"`
	// Kernel is the guest kernel; make install and the package put it here.
	Kernel string `toml:"kernel"`
	// Initrd is the guest initrd, which holds the podvm agent; used only when image is "".
	Initrd string `toml:"initrd"`
	// Image is the guest's root filesystem image, which holds the podvm agent: read-only,
	// mapped into every pod VM from the host's page cache instead of copied into each
	// guest's memory (virtio-pmem with DAX). 'podvm image build' makes it for podvm's own
	// kernel; "" boots from initrd instead (a kernel without virtio-pmem and DAX built in,
	// such as Debian's).
	Image string `toml:"image"`
	// KernelParams are extra guest kernel parameters, one per element, appended to podvm's
	// own, e.g. ["loglevel=7"].
	KernelParams []string `toml:"kernel_params"`
	// Firmware is the BIOS image; "" = /usr/share/qemu/qboot.rom when installed, else QEMU's
	// SeaBIOS.
	Firmware string `toml:"firmware"`
	// VirtiofsdPath is the virtiofsd binary; "" = the first of /usr/libexec/virtiofsd,
	// virtiofsd in PATH and /usr/lib/qemu/virtiofsd (QEMU 7.2's C one).
	VirtiofsdPath string `toml:"virtiofsd_path"`
	// AgentTransport is the host-guest agent channel: "" or "auto" (vsock when
	// /dev/vhost-vsock exists, else virtio-serial), "vsock" or "serial".
	AgentTransport string `toml:"agent_transport"`
	// Debug is true for verbose guest kernel and agent logs, in the guest console log
	// <state_dir>/<sandbox id>/console.log.
	Debug bool `toml:"debug"`
	// HotplugSlots is how many PCIe root ports the VM gets for hot-plugged block devices
	// (PVC block volumes, disk images): 0 to 30.
	HotplugSlots int `toml:"hotplug_slots"`
	// UIDBase is the first uid (and gid, the same number) QEMU runs as: it drops to one uid of
	// uid_base .. uid_base+uid_count-1, picked by sandbox id, with no capabilities and
	// chrooted into an empty directory, once it has opened what it needs. Keep the range clear
	// of real users, user-namespace ranges (/etc/subuid) and other services; at least 1000,
	// and the range must not include 65534.
	UIDBase int64 `toml:"uid_base"`
	// UIDCount is how many uids the range of uid_base holds.
	UIDCount int64 `toml:"uid_count"`
}

// Sandbox is the [sandbox] section: VM sizes and per-sandbox state.
type Sandbox struct {
	// DefaultVCPUs is the VM's vCPUs when neither podvm.io/vcpus (if allowed) nor the pod's
	// CPU limit (rounded up to whole vCPUs) says otherwise.
	DefaultVCPUs int `toml:"default_vcpus"`
	// DefaultMemory is the guest RAM of a VM whose size no podvm.io/memory (if allowed) sets:
	// the guest kernel, agent and page cache, and room for containers without a memory limit.
	// The containers' memory limits are added to it (Kata's rule), so a container without a
	// limit is not squeezed by its neighbours' limits.
	DefaultMemory Bytes `toml:"default_memory"`
	// MaxVCPUs is the most vCPUs a pod's VM may have (at most 255).
	MaxVCPUs int `toml:"max_vcpus"`
	// MaxMemory is the most memory a pod's VM may have.
	MaxMemory Bytes `toml:"max_memory"`
	// MemoryOverhead is host memory a pod's VM uses beyond its guest RAM: QEMU (device
	// emulation, the TCG translation cache), virtiofsd and the shim. It is not part of the
	// guest: the pod's cgroup on the host is limited to the guest RAM plus this. Keep
	// default_memory + memory_overhead in step with overhead.podFixed.memory of the
	// RuntimeClass ('podvm overhead' measures what it should be).
	MemoryOverhead Bytes `toml:"memory_overhead"`
	// StateDir is the directory of per-sandbox state (sockets, logs, metrics) in
	// <state_dir>/<sandbox id>, and of the accelerator probe's cache. Keep it short: unix socket paths under it are
	// limited to 107 bytes.
	StateDir string `toml:"state_dir"`
	// AgentTimeout is how long to wait for the guest agent when the VM boots.
	AgentTimeout Duration `toml:"agent_timeout"`
	// AgentPingInterval is how often the shim asks a running pod's guest agent whether it
	// answers. A guest that leaves three pings in a row unanswered, each for this long, is
	// hung: the shim stops its VM and reports the pod's containers exited, so kubelet makes
	// the pod anew instead of showing it running. Each answer carries the guest's clock, which
	// the shim corrects when it drifted from the host's. "0s" turns the pings off.
	AgentPingInterval Duration `toml:"agent_ping_interval"`
	// MaxParallelStarts is how many pod VMs of the node may start at the same time (from
	// QEMU's start, or a template's restore, until the guest agent answers); the others wait
	// their turn. A VM's start keeps a CPU busy, and VMs starting side by side slow each
	// other down more than taking turns does. 0: one for every two of the host's CPUs, at
	// least one.
	MaxParallelStarts int `toml:"max_parallel_starts"`
}

// ParallelStarts is how many pod VMs may start at once: MaxParallelStarts, or when that is 0
// one for every two of the host's CPUs, at least one.
func (s *Sandbox) ParallelStarts() int {
	if s.MaxParallelStarts > 0 {
		return s.MaxParallelStarts
	}
	return max(1, runtime.NumCPU()/2)
}

// Annotations is the [annotations] section.
type Annotations struct {
	// Allowed are the podvm.io/<key> pod annotations the shim honours, as <key> without the
	// podvm.io/ prefix: exact keys ("memory") or globs ("disk.*", "*" for all). Others are
	// ignored with a warning in the shim log. None by default: annotations let pod authors
	// change what their pod costs the node. See annotations.md.
	Allowed []string `toml:"allowed"`
}

// Virtiofs is the [virtiofs] section.
type Virtiofs struct {
	// Cache is how the guest caches the shared container filesystems (images and volumes):
	// "keep" (a file's data is kept across opens until its size or mtime changes on the host;
	// names and attributes are checked again after 1 s), "auto" (data is read again at every
	// open), "always" (nothing is checked again: the host's changes, such as a configMap's
	// update, may never be seen) or "never" (no cache). With the Rust virtiofsd "keep" is "auto".
	Cache string `toml:"cache"`
}

// Block is the [block] section: hot-plugged block devices.
type Block struct {
	// Cache is the host cache for block devices: "none" (O_DIRECT) or "writeback".
	Cache string `toml:"cache"`
	// AIO is the host I/O: "io_uring", "threads" or "native" (Linux AIO; needs cache =
	// "none"). Where the host refuses io_uring to QEMU (kernel.io_uring_disabled, a seccomp
	// profile), a VM's disks use "threads" instead, with a warning in the shim's log.
	AIO string `toml:"aio"`
	// MaxDiskSize is the largest disk image a podvm.io/disk.<volume> annotation may ask for.
	// Images are sparse, but a pod can fill its image: this is host disk one pod may take.
	MaxDiskSize Bytes `toml:"max_disk_size"`
}

// Template is the [template] section: templated start (docs/templating.md). Off by default.
type Template struct {
	// Enabled starts pod VMs from a VM template instead of booting them: one VM per VM
	// shape (kernel, initrd, vCPUs, memory, QEMU, podvm version) is booted once to its
	// agent and saved, and each pod's VM is restored from it with its own copy of the
	// template's memory, fresh random numbers, clock, NICs and share. The first pod of a
	// shape builds the template (a few seconds); later pods start in a fraction of a boot.
	// Pods with more than 2 network interfaces, and nodes whose agent transport is vsock,
	// boot the ordinary way.
	Enabled bool `toml:"enabled"`
	// Dir holds the templates: "" = <state_dir>/templates. Each takes about the memory its
	// guest touched while booting (~100 MiB for the default guest) on that filesystem;
	// keep it on a tmpfs (as /run is) so restores read memory, not disk. Only root reads it.
	Dir string `toml:"dir"`
}

// TemplateDirName is the VM templates' directory in the state dir when [template] dir is "".
const TemplateDirName = "templates"

// StartSlotsDirName is the directory in the state dir of the node's pod VM start slots
// (sandbox.max_parallel_starts): lock files the shims hold while their VMs start.
const StartSlotsDirName = "start-slots"

// TemplateDir is where the VM templates are: [template] dir, else <state_dir>/templates.
func (c *Config) TemplateDir() string {
	if c.Template.Dir != "" {
		return c.Template.Dir
	}
	return filepath.Join(c.Sandbox.StateDir, TemplateDirName)
}

// Default returns the built-in configuration. MaxVCPUs is the host's CPU count, and
// DefaultVCPUs 2 or that count if lower.
func Default() *Config {
	maxVCPUs := min(runtime.NumCPU(), MaxVCPUsLimit)
	return &Config{
		Hypervisor: Hypervisor{
			Kind:     DefaultKind,
			QEMUPath: "qemu-system-x86_64",
			Accel:    hypervisor.AccelAuto,
			// guestimage.DefaultOutputDir: where `make install` puts the guest image.
			Kernel:       "/usr/share/podvm/vmlinuz",
			Initrd:       "/usr/share/podvm/initrd.img",
			Image:        "/usr/share/podvm/root.img",
			KernelParams: []string{},
			HotplugSlots: 2,
			UIDBase:      hypervisor.DefaultUIDBase,
			UIDCount:     hypervisor.DefaultUIDCount,
		},
		Sandbox: Sandbox{
			DefaultVCPUs:      defaultVCPUs(maxVCPUs),
			DefaultMemory:     512 * MiB,
			MaxVCPUs:          maxVCPUs,
			MaxMemory:         16 * GiB,
			MemoryOverhead:    256 * MiB,
			StateDir:          "/run/podvm",
			AgentTimeout:      Duration{60 * time.Second},
			AgentPingInterval: Duration{10 * time.Second},
		},
		Annotations: Annotations{Allowed: []string{}},
		Virtiofs:    Virtiofs{Cache: "keep"},
		Block:       Block{Cache: "none", AIO: "io_uring", MaxDiskSize: 32 * GiB},
	}
}

// ResolvePath returns the config file to load: optionPath (containerd's runtime option
// ConfigPath) when set, else $PODVM_CONFIG when set, else DefaultPath.
func ResolvePath(optionPath string) string {
	if optionPath != "" {
		return optionPath
	}
	if p := os.Getenv(EnvPath); p != "" {
		return p
	}
	return DefaultPath
}

// Load reads and validates the config file at path ("" = DefaultPath). No file at DefaultPath
// means the built-in defaults; no file at any other path is an error.
func Load(path string) (*Config, error) { return load(path, DefaultPath) }

// load is Load with the default path as a parameter, for tests.
func load(path, defaultPath string) (*Config, error) {
	if path == "" {
		path = defaultPath
	}
	data, err := os.ReadFile(path)
	switch {
	case errors.Is(err, fs.ErrNotExist) && filepath.Clean(path) == defaultPath:
		return Default(), nil
	case errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("podvm config %s: %w; create it (make install puts a commented one at %s) or fix the path given by containerd's runtime option ConfigPath or $%s",
			path, fs.ErrNotExist, DefaultPath, EnvPath)
	case err != nil:
		return nil, fmt.Errorf("podvm config: %w", err)
	}
	return Parse(data, path)
}

// Parse decodes and validates a config file's contents; name is the file for messages.
func Parse(data []byte, name string) (*Config, error) {
	c := Default()
	c.Path = name
	h := &c.Hypervisor
	h.Image, h.Initrd = unset, unset
	c.Sandbox.DefaultVCPUs = unsetVCPUs
	dec := toml.NewDecoder(bytes.NewReader(data)).DisallowUnknownFields()
	if err := dec.Decode(c); err != nil {
		return nil, decodeError(name, data, err)
	}
	h.bootFrom()
	if c.Sandbox.DefaultVCPUs == unsetVCPUs {
		// A node that lowers max_vcpus below the default need not lower default_vcpus too.
		c.Sandbox.DefaultVCPUs = defaultVCPUs(c.Sandbox.MaxVCPUs)
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return c, nil
}

// unset marks a key the file does not set while Parse decodes it: no path is empty-byte.
const unset = "\x00unset"

// unsetVCPUs marks sandbox.default_vcpus unset while Parse decodes: no file says it.
const unsetVCPUs = math.MinInt

// defaultVCPUs is sandbox.default_vcpus on a node that does not set it: DefaultVCPUs, or
// maxVCPUs if lower (at least 1: an invalid max_vcpus is reported as such).
func defaultVCPUs(maxVCPUs int) int { return max(min(DefaultVCPUs, maxVCPUs), 1) }

// bootFrom fills in image and initrd where the file leaves them out. A file that names
// initrd but not image (a node booting Debian's kernel, or one configured before root images)
// keeps booting from its initrd; otherwise the default image is used (a non-empty image
// wins over initrd).
func (h *Hypervisor) bootFrom() {
	def := Default().Hypervisor
	switch {
	case h.Image == unset && h.Initrd == unset:
		h.Image, h.Initrd = def.Image, def.Initrd
	case h.Image == unset:
		h.Image = ""
	case h.Initrd == unset:
		h.Initrd = def.Initrd
	}
}

// TOML encodes c as a config file that Parse reads back to the same values.
func (c *Config) TOML() ([]byte, error) {
	var buf bytes.Buffer
	enc := toml.NewEncoder(&buf).SetIndentTables(false)
	if err := enc.Encode(c); err != nil {
		return nil, fmt.Errorf("encode podvm config: %w", err)
	}
	return buf.Bytes(), nil
}

// source names the config for messages: the file, or the default path when the built-in
// defaults are in use (that is where a value would be changed).
func (c *Config) source() string {
	if c.Path != "" {
		return c.Path
	}
	return DefaultPath
}

// Validate checks every value and reports all bad ones, each with its key, what is wrong and an
// example of a good value.
func (c *Config) Validate() error {
	var p problems
	validateHypervisor(&p, &c.Hypervisor)
	validateSandbox(&p, &c.Sandbox)
	for _, a := range c.Annotations.Allowed {
		if problem := checkPattern(a); problem != "" {
			p.bad("annotations.allowed", c.Annotations.Allowed, fmt.Sprintf("%q %s", a, problem))
		}
	}
	if !slices.Contains([]string{"keep", "auto", "always", "never"}, c.Virtiofs.Cache) {
		p.bad("virtiofs.cache", c.Virtiofs.Cache, `must be "keep", "auto", "always" or "never"`)
	}
	validateBlock(&p, &c.Block)
	p.absPath("template.dir", c.Template.Dir, true)
	if len(p) == 0 {
		return nil
	}
	return &Error{File: c.source(), Errs: []error(p)}
}

// problems collects what Validate finds wrong, in the order it checks.
type problems []error

// bad records that key = value is wrong because of problem.
func (p *problems) bad(key string, value any, problem string) {
	*p = append(*p, fmt.Errorf("%s = %s: %s; use e.g. %s", key, tomlValue(value), problem, example(key)))
}

// absPath checks that path, the value of key, is absolute (or empty when optional).
func (p *problems) absPath(key, path string, optional bool) {
	switch {
	case path == "" && optional:
	case path == "":
		p.bad(key, path, "empty")
	case !filepath.IsAbs(path):
		p.bad(key, path, "must be an absolute path")
	}
}

// validateHypervisor checks the [hypervisor] section.
func validateHypervisor(p *problems, h *Hypervisor) {
	if h.Kind == "" || strings.ContainsAny(h.Kind, " \t/") {
		p.bad("hypervisor.kind", h.Kind, "must name a hypervisor implementation")
	}
	switch {
	case h.QEMUPath == "":
		p.bad("hypervisor.qemu_path", h.QEMUPath, "empty")
	case strings.ContainsRune(h.QEMUPath, '/') && !filepath.IsAbs(h.QEMUPath):
		p.bad("hypervisor.qemu_path", h.QEMUPath, "must be an absolute path or a command name looked up in PATH")
	}
	if !slices.Contains([]string{hypervisor.AccelAuto, hypervisor.AccelKVM, hypervisor.AccelTCG}, h.Accel) {
		p.bad("hypervisor.accel", h.Accel, `must be "auto", "kvm" or "tcg"`)
	}
	p.absPath("hypervisor.kernel", h.Kernel, false)
	p.absPath("hypervisor.initrd", h.Initrd, h.Image != "")
	p.absPath("hypervisor.image", h.Image, true)
	p.absPath("hypervisor.firmware", h.Firmware, true)
	p.absPath("hypervisor.virtiofsd_path", h.VirtiofsdPath, true)
	for _, kp := range h.KernelParams {
		if kp == "" || strings.ContainsAny(kp, " \t\r\n") {
			p.bad("hypervisor.kernel_params", h.KernelParams, fmt.Sprintf("%q is not one kernel parameter (empty or contains whitespace); give one parameter per element", kp))
			break
		}
	}
	if !slices.Contains([]string{"", hypervisor.TransportAuto, hypervisor.TransportVsock, hypervisor.TransportSerial}, h.AgentTransport) {
		p.bad("hypervisor.agent_transport", h.AgentTransport, `must be "" (auto), "vsock" or "serial"`)
	}
	if h.HotplugSlots < 0 || h.HotplugSlots > hypervisor.MaxHotplugSlots {
		p.bad("hypervisor.hotplug_slots", h.HotplugSlots, fmt.Sprintf("must be between 0 and %d", hypervisor.MaxHotplugSlots))
	}
	switch {
	case h.UIDBase < 0:
		p.bad("hypervisor.uid_base", h.UIDBase, "must not be negative")
	case h.UIDCount < 0:
		p.bad("hypervisor.uid_count", h.UIDCount, "must not be negative")
	default:
		if err := hypervisor.ValidateUIDRange(uint64(h.UIDBase), uint64(h.UIDCount)); err != nil {
			p.bad("hypervisor.uid_base/uid_count", fmt.Sprintf("%d/%d", h.UIDBase, h.UIDCount), err.Error())
		}
	}
}

// validateSandbox checks the [sandbox] section: each default within its maximum (when that
// maximum is itself valid), the overhead, the state dir and the agent timeout.
func validateSandbox(p *problems, s *Sandbox) {
	maxOK := true
	if s.MaxVCPUs < 1 || s.MaxVCPUs > MaxVCPUsLimit {
		p.bad("sandbox.max_vcpus", s.MaxVCPUs, fmt.Sprintf("must be between 1 and %d", MaxVCPUsLimit))
		maxOK = false
	}
	switch {
	case s.DefaultVCPUs < 1:
		p.bad("sandbox.default_vcpus", s.DefaultVCPUs, "must be at least 1")
	case maxOK && s.DefaultVCPUs > s.MaxVCPUs:
		p.bad("sandbox.default_vcpus", s.DefaultVCPUs, fmt.Sprintf("more than max_vcpus = %d", s.MaxVCPUs))
	}
	maxOK = true
	if s.MaxMemory < MinMemory {
		p.bad("sandbox.max_memory", s.MaxMemory, "less than the minimum "+MinMemory.String())
		maxOK = false
	}
	switch {
	case s.DefaultMemory < MinMemory:
		p.bad("sandbox.default_memory", s.DefaultMemory, "less than the minimum "+MinMemory.String())
	case maxOK && s.DefaultMemory > s.MaxMemory:
		p.bad("sandbox.default_memory", s.DefaultMemory, "more than max_memory = "+s.MaxMemory.String())
	}
	if s.MemoryOverhead < 0 {
		p.bad("sandbox.memory_overhead", s.MemoryOverhead, "must not be negative")
	}
	p.absPath("sandbox.state_dir", s.StateDir, false)
	if s.AgentTimeout.Duration < time.Second {
		p.bad("sandbox.agent_timeout", s.AgentTimeout, "must be at least 1s")
	}
	if d := s.AgentPingInterval.Duration; d != 0 && d < time.Second {
		p.bad("sandbox.agent_ping_interval", s.AgentPingInterval, `must be "0s" (no pings) or at least 1s`)
	}
	if s.MaxParallelStarts < 0 {
		p.bad("sandbox.max_parallel_starts", s.MaxParallelStarts, "must be 0 (one for every two CPUs) or more")
	}
}

// validateBlock checks the [block] section.
func validateBlock(p *problems, b *Block) {
	if !slices.Contains([]string{"none", "writeback"}, b.Cache) {
		p.bad("block.cache", b.Cache, `must be "none" or "writeback"`)
	}
	switch b.AIO {
	case "threads", "io_uring":
	case "native":
		if b.Cache != "none" {
			p.bad("block.aio", b.AIO, `needs block.cache = "none" (O_DIRECT); with "writeback" use "threads" or "io_uring"`)
		}
	default:
		p.bad("block.aio", b.AIO, `must be "threads", "native" or "io_uring"`)
	}
	if b.MaxDiskSize < 16*MiB {
		p.bad("block.max_disk_size", b.MaxDiskSize.String(), `must be at least 16Mi (the smallest disk image); e.g. "32Gi"`)
	}
}

// Error is a config file that does not decode or validate; Errs has one error per problem.
type Error struct {
	File string
	Errs []error
}

func (e *Error) Error() string {
	if len(e.Errs) == 1 {
		return "podvm config " + e.File + ": " + e.Errs[0].Error()
	}
	var b strings.Builder
	fmt.Fprintf(&b, "podvm config %s: %d problems:", e.File, len(e.Errs))
	for _, err := range e.Errs {
		b.WriteString("\n  ")
		b.WriteString(err.Error())
	}
	return b.String()
}

func (e *Error) Unwrap() []error { return e.Errs }

// checkPattern returns what is wrong with an annotations.allowed entry, or "".
func checkPattern(p string) string {
	switch {
	case p == "":
		return "is empty"
	case strings.HasPrefix(p, AnnotationPrefix):
		return "starts with " + AnnotationPrefix + ": list the key without the prefix"
	case strings.ContainsAny(p, "/ \t\r\n"):
		return "contains '/' or whitespace, which no podvm.io annotation key has"
	}
	if _, err := path.Match(p, ""); err != nil {
		return "is not a valid glob"
	}
	return ""
}

// tomlValue formats v as it would appear in the file, for messages.
func tomlValue(v any) string {
	switch v := v.(type) {
	case string:
		return fmt.Sprintf("%q", v)
	case Bytes:
		return fmt.Sprintf("%q", v.String())
	case Duration:
		return fmt.Sprintf("%q", v.String())
	case []string:
		q := make([]string, len(v))
		for i, s := range v {
			q[i] = fmt.Sprintf("%q", s)
		}
		return "[" + strings.Join(q, ", ") + "]"
	}
	return fmt.Sprint(v)
}

// example returns a good setting of key ("section.key"), for messages.
func example(key string) string {
	ex := map[string]string{
		"hypervisor":                    "[hypervisor]",
		"hypervisor.kind":               `kind = "qemu"`,
		"hypervisor.qemu_path":          `qemu_path = "/usr/bin/qemu-system-x86_64"`,
		"hypervisor.accel":              `accel = "tcg"`,
		"hypervisor.kernel":             `kernel = "/usr/share/podvm/vmlinuz"`,
		"hypervisor.initrd":             `initrd = "/usr/share/podvm/initrd.img"`,
		"hypervisor.image":              `image = "/usr/share/podvm/root.img"`,
		"hypervisor.kernel_params":      `kernel_params = ["loglevel=4"]`,
		"hypervisor.firmware":           `firmware = "/usr/share/qemu/qboot.rom"`,
		"hypervisor.virtiofsd_path":     `virtiofsd_path = "/usr/libexec/virtiofsd"`,
		"hypervisor.agent_transport":    `agent_transport = "serial"`,
		"hypervisor.debug":              `debug = true`,
		"hypervisor.hotplug_slots":      `hotplug_slots = 2`,
		"hypervisor.uid_base":           `uid_base = 2000000000`,
		"hypervisor.uid_count":          `uid_count = 1048576`,
		"hypervisor.uid_base/uid_count": `uid_base = 2000000000 and uid_count = 1048576`,
		"sandbox":                       "[sandbox]",
		"sandbox.default_vcpus":         `default_vcpus = 1`,
		"sandbox.default_memory":        `default_memory = "512Mi"`,
		"sandbox.max_vcpus":             `max_vcpus = 4`,
		"sandbox.max_memory":            `max_memory = "16Gi"`,
		"sandbox.memory_overhead":       `memory_overhead = "256Mi"`,
		"sandbox.state_dir":             `state_dir = "/run/podvm"`,
		"sandbox.agent_timeout":         `agent_timeout = "60s"`,
		"sandbox.max_parallel_starts":   `max_parallel_starts = 0`,
		"sandbox.agent_ping_interval":   `agent_ping_interval = "10s"`,
		"annotations":                   "[annotations]",
		"annotations.allowed":           `allowed = ["vcpus", "memory", "disk.*"]`,
		"virtiofs":                      "[virtiofs]",
		"virtiofs.cache":                `cache = "keep"`,
		"block":                         "[block]",
		"block.cache":                   `cache = "none"`,
		"block.aio":                     `aio = "threads"`,
		"template":                      "[template]",
		"template.enabled":              `enabled = true`,
		"template.dir":                  `dir = "/run/podvm/templates"`,
	}[key]
	return ex
}

// decodeError turns go-toml's errors into messages naming the file, position, key and a good
// value.
func decodeError(file string, data []byte, err error) error {
	var strict *toml.StrictMissingError
	if errors.As(err, &strict) {
		errs := make([]error, 0, len(strict.Errors))
		for _, de := range strict.Errors {
			errs = append(errs, unknownKey(&de))
		}
		return &Error{File: file, Errs: errs}
	}
	var de *toml.DecodeError
	if !errors.As(err, &de) {
		// go-toml passes a non-string value to a TextUnmarshaler (Duration) as text and
		// returns its error without the key: find the key.
		if e := nonStringValue(data); e != nil {
			err = e
		}
		return &Error{File: file, Errs: []error{err}}
	}
	row, col := de.Position()
	key := strings.Join(de.Key(), ".")
	msg := strings.TrimPrefix(de.Error(), "toml: ")
	var e error
	switch f, ok := field(reflect.TypeFor[Config](), de.Key()); {
	case key == "" || !ok:
		e = fmt.Errorf("line %d column %d: %s", row, col, msg)
	case strings.HasPrefix(msg, "cannot decode TOML "):
		got := strings.Fields(strings.TrimPrefix(msg, "cannot decode TOML "))[0]
		e = fmt.Errorf("line %d: %s: want %s, got a TOML %s; use e.g. %s", row, key, want(f.Type), got, example(key))
	default:
		e = fmt.Errorf("line %d: %s: %s; use e.g. %s", row, key, msg, example(key))
	}
	return &Error{File: file, Errs: []error{e}}
}

// nonStringValue finds the key behind a TextUnmarshaler error without one: go-toml hands a
// non-string TOML value to a Duration or Bytes as its raw text and returns the error bare. It
// returns an error for the first Duration holding a non-string, else the first Bytes holding
// neither a string nor an integer, else nil.
func nonStringValue(data []byte) error {
	var doc map[string]any
	if toml.Unmarshal(data, &doc) != nil {
		// Not TOML at all: there is no value to point at, and decodeError keeps go-toml's error.
		return nil //nolint:nilerr // nil means "no such value found", not success
	}
	t := reflect.TypeFor[Config]()
	for _, typ := range []reflect.Type{reflect.TypeFor[Duration](), reflect.TypeFor[Bytes]()} {
		for i := range t.NumField() {
			sec := t.Field(i)
			table, _ := doc[tomlName(sec)].(map[string]any)
			if sec.Type.Kind() != reflect.Struct || table == nil {
				continue
			}
			for j := range sec.Type.NumField() {
				f := sec.Type.Field(j)
				v, ok := table[tomlName(f)]
				if !ok || f.Type != typ {
					continue
				}
				switch v.(type) {
				case string:
					continue
				case int64:
					if typ == reflect.TypeFor[Bytes]() {
						continue
					}
				}
				key := tomlName(sec) + "." + tomlName(f)
				return fmt.Errorf("%s: want %s, got a TOML %s; use e.g. %s", key, want(f.Type), tomlKind(v), example(key))
			}
		}
	}
	return nil
}

func tomlKind(v any) string {
	switch v.(type) {
	case int64:
		return "integer"
	case float64:
		return "float"
	case bool:
		return "boolean"
	case []any:
		return "array"
	case map[string]any:
		return "table"
	}
	return "date or time"
}

func unknownKey(de *toml.DecodeError) error {
	row, _ := de.Position()
	k := de.Key()
	key := strings.Join(k, ".")
	parent := reflect.TypeFor[Config]()
	where := "the sections are"
	if len(k) > 1 {
		if f, ok := field(parent, k[:len(k)-1]); ok && f.Type.Kind() == reflect.Struct {
			parent = f.Type
			where = "the [" + strings.Join(k[:len(k)-1], ".") + "] keys are"
		}
	}
	return fmt.Errorf("line %d: unknown key %s; %s: %s", row, key, where, strings.Join(keys(parent), ", "))
}

// field finds the struct field of t for a TOML key path.
func field(t reflect.Type, key []string) (reflect.StructField, bool) {
	var f reflect.StructField
	for _, k := range key {
		if t.Kind() != reflect.Struct {
			return f, false
		}
		found := false
		for i := range t.NumField() {
			if tf := t.Field(i); tomlName(tf) == k {
				f, t, found = tf, tf.Type, true
				break
			}
		}
		if !found {
			return f, false
		}
	}
	return f, len(key) > 0
}

func keys(t reflect.Type) []string {
	var ks []string
	for i := range t.NumField() {
		if n := tomlName(t.Field(i)); n != "" && n != "-" {
			ks = append(ks, n)
		}
	}
	return ks
}

func tomlName(f reflect.StructField) string {
	n, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
	return n
}

// want describes the TOML value a field takes.
func want(t reflect.Type) string {
	switch t {
	case reflect.TypeFor[Bytes]():
		return `a size (a string like "512Mi" or "1Gi", or a whole number of bytes)`
	case reflect.TypeFor[Duration]():
		return `a duration string like "60s"`
	}
	switch t.Kind() {
	case reflect.String:
		return "a string"
	case reflect.Int:
		return "a whole number"
	case reflect.Bool:
		return "true or false"
	case reflect.Slice:
		return "an array of strings"
	case reflect.Struct:
		return "a table"
	}
	return t.String()
}
