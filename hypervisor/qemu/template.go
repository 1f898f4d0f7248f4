package qemu

// VM templates on disk: <dir>/<key>/ holds the template's guest RAM (memory, sparse), its
// saved device state (state) and template.json, which is written last. <key> hashes
// everything that shapes the VM (templateKey), so a changed kernel, initrd, QEMU, size or
// podvm version finds no template and builds a new one; a template whose files do not match
// its template.json is built anew. Only root reads or writes the directory: QEMU is handed
// descriptors, never the paths.

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/agent"
	"github.com/podvm/podvm/hypervisor"
	"github.com/podvm/podvm/version"
)

// Files of a template directory.
const (
	templateMemory = "memory"
	templateState  = "state"
	templateMeta   = "template.json"
	// TemplateLockFile in the templates dir is flocked while a template is looked up, built or
	// removed.
	TemplateLockFile = ".lock"
)

// templateFormat changes when the layout or the way a template is made changes.
const templateFormat = 2

// agentSettle is how long a template VM runs after its host closed the agent connection,
// before it is saved. The guest agent sees EOF and reopens its port in milliseconds; the
// rest lets the guest go idle (deferred work after boot, the balloon's free page reporting,
// which waits 2 s), so that clones start idle and with less memory (measured: 50 instead of
// 54 MiB of template memory, ~30-70 ms quicker to agent-ready). It is paid once per template.
const agentSettle = 3 * time.Second

// templateBuildTimeout bounds booting a template VM to its agent.
const templateBuildTimeout = 2 * time.Minute

// Template is a VM template on disk; it implements hypervisor.Template.
type Template struct {
	root string // the templates dir
	key  string
	meta templateMetadata
}

var _ hypervisor.Template = (*Template)(nil)

// templateMetadata is template.json.
type templateMetadata struct {
	Key         string          `json:"key"`
	Inputs      json.RawMessage `json:"inputs"`
	MemoryBytes int64           `json:"memory_bytes"`
	StateBytes  int64           `json:"state_bytes"`
	Created     time.Time       `json:"created"`
	BuildMs     int64           `json:"build_ms"`
}

// Key implements hypervisor.Template.
func (t *Template) Key() string { return t.key }

// Dir is the template's directory.
func (t *Template) Dir() string { return filepath.Join(t.root, t.key) }

func (t *Template) path(name string) string { return filepath.Join(t.Dir(), name) }

// templateInputs is what the key hashes: everything that shapes the VM and its guest.
type templateInputs struct {
	Format  int      `json:"format"`
	Podvm   string   `json:"podvm"`
	Agent   string   `json:"agent"`
	QEMU    string   `json:"qemu"`
	Kernel  string   `json:"kernel"`
	Initrd  string   `json:"initrd"`
	Root    string   `json:"rootImage,omitempty"`
	BIOS    string   `json:"firmware"`
	Command []string `json:"command"`
}

// templateConfig is the template VM for pod VMs like cfg: no share (a clone gets it
// hot-plugged) and no pod NIC (its own comes on a tap that leads nowhere, see
// templateNICArgs), a fixed ID and state dir.
func templateConfig(cfg Config, stateDir string) Config {
	cfg.ID, cfg.StateDir = "template", stateDir
	cfg.SharedDir, cfg.SharedDirNS, cfg.NetDevices = "", nil, nil
	cfg.Templated, cfg.MemoryFile, cfg.Incoming = true, nil, nil
	cfg.VsockCID = 0
	cfg.TSCkHz = 0 // measured anew for every VM: the template's boot measures its own
	return cfg
}

// templateKey hashes cfg's template VM: its command line (less what differs between VMs: the
// state dir and uid), the file identity of the kernel, initrd or root image, QEMU and
// firmware, and the podvm and agent versions. Identity, not contents: hashing the ~15 MiB of kernel and initrd
// cost every templated start 11-16 ms under load, and a new image (written anew or renamed
// into place) has a new inode or change time, so it still finds no template.
func templateKey(cfg Config) (string, []byte, error) {
	t := templateConfig(cfg, "/template")
	// Any files: Args only numbers them. The NIC is the one Start gives the template.
	t.MemoryFile = os.Stdin
	t.NetDevices = []*hypervisor.NetDevice{{ID: "template", TapFiles: []*os.File{os.Stdin}}}
	args, err := t.Args()
	if err != nil {
		return "", nil, err
	}
	in := templateInputs{Format: templateFormat, Podvm: version.Version, Agent: agent.Version, Command: args}
	for _, f := range []struct {
		path string
		id   *string
	}{{cfg.Kernel, &in.Kernel}, {cfg.Initrd, &in.Initrd}, {cfg.RootImage, &in.Root}, {cfg.Binary, &in.QEMU}, {cfg.Firmware, &in.BIOS}} {
		if f.path == "" {
			continue
		}
		if *f.id, err = fileIdentity(f.path); err != nil {
			return "", nil, err
		}
	}
	b, err := json.Marshal(in)
	if err != nil {
		return "", nil, err
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:8]), b, nil
}

// fileIdentity names a file's current contents without reading it: its device, inode, size
// and modification and change times. Replacing the file (a new inode) or writing to it (a
// new change time, which the file's owner cannot set back) changes it.
func fileIdentity(path string) (string, error) {
	if p, err := exec.LookPath(path); err == nil {
		path = p
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return "", fmt.Errorf("%s: %w", path, err)
	}
	return fmt.Sprintf("%s dev=%d ino=%d size=%d mtime=%d.%d ctime=%d.%d", path, st.Dev, st.Ino, st.Size,
		st.Mtim.Sec, st.Mtim.Nsec, st.Ctim.Sec, st.Ctim.Nsec), nil
}

// FindTemplate is Driver().Template: the template for VMs like hc in dir, built first if
// there is none (or it is broken). Concurrent callers on a node wait for one build.
func FindTemplate(ctx context.Context, hc hypervisor.Config, dir string) (*Template, error) {
	// Resolved as the template VM it is for (templateConfig): no TSC measured for a boot that
	// is not this pod's, on the templated pod's start.
	hc.Templated = true
	cfg, err := Config(hc).Resolve(ctx)
	if err != nil {
		return nil, fmt.Errorf("invalid qemu config: %w", err)
	}
	if cfg.AgentTransport != TransportSerial {
		return nil, fmt.Errorf("VM templates need the virtio-serial agent transport (agent_transport = %q); a clone's vsock CID is not set up yet", TransportSerial)
	}
	key, inputs, err := templateKey(cfg)
	if err != nil {
		return nil, fmt.Errorf("VM template key: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("VM templates dir: %w", err)
	}
	t := &Template{root: dir, key: key}
	unlock, err := lockFile(ctx, filepath.Join(dir, TemplateLockFile))
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := t.load(int64(cfg.MemoryMiB) << 20); err == nil {
		return t, nil
	} else if !errors.Is(err, os.ErrNotExist) {
		log.G(ctx).WithError(err).WithField("template", t.Dir()).Warn("VM template is broken; building it anew")
	}
	if err := t.build(ctx, cfg, inputs); err != nil {
		return nil, fmt.Errorf("building the VM template %s: %w", t.Dir(), err)
	}
	return t, nil
}

// load reads and checks the template's files; an error wrapping os.ErrNotExist means there
// is none.
func (t *Template) load(memBytes int64) error {
	b, err := os.ReadFile(t.path(templateMeta))
	if err != nil {
		return err
	}
	var m templateMetadata
	if err := json.Unmarshal(b, &m); err != nil {
		return fmt.Errorf("%s: %w", templateMeta, err)
	}
	if m.Key != t.key || m.MemoryBytes != memBytes || m.StateBytes <= 0 {
		return fmt.Errorf("%s: key %q, %d bytes of memory, %d of state; want key %q and %d bytes of memory",
			templateMeta, m.Key, m.MemoryBytes, m.StateBytes, t.key, memBytes)
	}
	for name, size := range map[string]int64{templateMemory: memBytes, templateState: m.StateBytes} {
		st, err := os.Stat(t.path(name))
		if err != nil {
			return fmt.Errorf("%s: %v", name, err) // not ErrNotExist: the template is broken
		}
		if st.Size() != size {
			return fmt.Errorf("%s: %d bytes, template.json says %d", name, st.Size(), size)
		}
	}
	t.meta = m
	return nil
}

// build boots the template VM to agent-ready, saves it and moves it into place.
func (t *Template) build(ctx context.Context, cfg Config, inputs []byte) error {
	start := time.Now()
	if err := os.RemoveAll(t.Dir()); err != nil {
		return err
	}
	tmp := filepath.Join(t.root, t.key+".tmp")
	if err := os.RemoveAll(tmp); err != nil {
		return err
	}
	if err := os.Mkdir(tmp, 0o700); err != nil {
		return err
	}
	defer func() { _ = os.RemoveAll(tmp) }() // moved away on success
	memBytes := int64(cfg.MemoryMiB) << 20
	mem, err := os.OpenFile(filepath.Join(tmp, templateMemory), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if err := mem.Truncate(memBytes); err != nil {
		_ = mem.Close()
		return err
	}
	tc := templateConfig(cfg, filepath.Join(t.root, "b-"+t.key[:8]))
	// A build whose shim died left its QEMU running (it outlives its parent once it dropped
	// to its own uid): stop it by its pidfile.
	if err := Cleanup(ctx, tc.StateDir); err != nil {
		return err
	}
	tc.MemoryFile = mem // the VM takes it over
	stateBytes, err := saveTemplateVM(ctx, tc, filepath.Join(tmp, templateState))
	if err != nil {
		return err
	}
	m := templateMetadata{Key: t.key, Inputs: inputs, MemoryBytes: memBytes, StateBytes: stateBytes,
		Created: time.Now().UTC(), BuildMs: time.Since(start).Milliseconds()}
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(tmp, templateMeta), b, 0o600); err != nil {
		return err
	}
	if err := os.Rename(tmp, t.Dir()); err != nil {
		return err
	}
	t.meta = m
	log.G(ctx).WithFields(log.Fields{"template": t.Dir(), "build": time.Since(start).Round(time.Millisecond),
		"memory_mib": allocatedMiB(t.path(templateMemory)), "state_kib": stateBytes >> 10}).Info("VM template built")
	return nil
}

// saveTemplateVM boots tc, waits for its agent, lets the agent go back to waiting for a
// connection (the clone's host connects anew), saves the VM's state to statePath and stops
// it. It returns the state's size.
func saveTemplateVM(ctx context.Context, tc Config, statePath string) (int64, error) {
	vm, err := New(ctx, hypervisor.Config(tc))
	if err != nil {
		_ = tc.MemoryFile.Close()
		return 0, err
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), killWait+quitGrace)
		defer cancel()
		if err := vm.Stop(sctx); err != nil {
			log.G(ctx).WithError(err).Warn("stopping the template VM")
		}
		_ = os.RemoveAll(tc.StateDir) // its logs: the template works or the error said why
	}()
	bctx, cancel := context.WithTimeout(ctx, templateBuildTimeout)
	defer cancel()
	if err := vm.Start(bctx); err != nil {
		return 0, err
	}
	c, err := agent.Connect(bctx, vm.DialAgent, vm.Done())
	if err != nil {
		return 0, fmt.Errorf("template VM: %w (console: %s)", err, logTail(vm.ConsolePath()))
	}
	_ = c.Close() // the agent sees the host go and waits for the next connection
	// Saved before the guest saw the host go, the agent would take the clone's host for the
	// old connection (and ttrpc refuses its stream ids). QEMU reports the guest's port opens
	// and closes only once a second (VSERPORT_CHANGE is rate-limited), so wait instead.
	select {
	case <-time.After(agentSettle):
	case <-bctx.Done():
		return 0, bctx.Err()
	}
	f, err := os.OpenFile(statePath, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return 0, err
	}
	defer func() { _ = f.Close() }() // checked by Stat below; tmpfs or a disk, nothing buffered
	if err := vm.SaveState(bctx, f); err != nil {
		return 0, err
	}
	st, err := f.Stat()
	if err != nil {
		return 0, err
	}
	return st.Size(), nil
}

// Clone implements hypervisor.Template: cfg gets a private copy of the template's memory (a
// memfd, charged to the caller's cgroup; MemoryFill copies it while QEMU starts) and its
// saved state.
func (t *Template) Clone(ctx context.Context, cfg *hypervisor.Config) error {
	mem, err := newGuestMemory(t.meta.MemoryBytes)
	if err != nil {
		return err
	}
	state, err := os.Open(t.path(templateState))
	if err != nil {
		_ = mem.Close()
		return fmt.Errorf("VM template: %w", err)
	}
	cfg.Templated, cfg.MemoryFile, cfg.Incoming = true, mem, state
	path, size := t.path(templateMemory), t.meta.MemoryBytes
	cfg.MemoryFill = func() error {
		src, err := os.Open(path)
		if err != nil {
			return fmt.Errorf("VM template: %w", err)
		}
		defer func() { _ = src.Close() }() // read only
		return sparseCopy(mem, src, size)
	}
	return nil
}

// Discard implements hypervisor.Template.
func (t *Template) Discard(ctx context.Context) error {
	unlock, err := lockFile(ctx, filepath.Join(t.root, TemplateLockFile))
	if err != nil {
		return err
	}
	defer unlock()
	return os.RemoveAll(t.Dir())
}

// newGuestMemory is a new memfd of size bytes, all holes, for a clone's guest RAM.
func newGuestMemory(size int64) (*os.File, error) {
	fd, err := unix.MemfdCreate("podvm-guest-ram", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("memfd_create: %w", err)
	}
	mem := os.NewFile(uintptr(fd), "podvm-guest-ram")
	if err := mem.Truncate(size); err != nil {
		_ = mem.Close()
		return nil, fmt.Errorf("sizing the guest memory: %w", err)
	}
	return mem, nil
}

// allocatedMiB is how much of a (sparse) file is allocated, in MiB; 0 if unknown.
func allocatedMiB(path string) int64 {
	var st unix.Stat_t
	if unix.Stat(path, &st) != nil {
		return 0
	}
	return st.Blocks * 512 >> 20
}

// sparseCopy copies the data extents of src's first size bytes to the same offsets of dst.
func sparseCopy(dst, src *os.File, size int64) error {
	sfd, dfd := int(src.Fd()), int(dst.Fd())
	for off := int64(0); off < size; {
		data, err := unix.Seek(sfd, off, unix.SEEK_DATA)
		if errors.Is(err, syscall.ENXIO) {
			return nil // no data after off
		}
		if err != nil {
			return fmt.Errorf("SEEK_DATA: %w", err)
		}
		hole, err := unix.Seek(sfd, data, unix.SEEK_HOLE)
		if err != nil {
			return fmt.Errorf("SEEK_HOLE: %w", err)
		}
		hole = min(hole, size)
		if err := copyRange(dfd, sfd, data, data, hole-data); err != nil {
			return err
		}
		off = hole
	}
	return nil
}

// copyRange copies n bytes at roff in sfd to woff in dfd, in the kernel where it can.
func copyRange(dfd, sfd int, roff, woff, n int64) error {
	for n > 0 {
		c, err := unix.CopyFileRange(sfd, &roff, dfd, &woff, int(min(n, 1<<30)), 0)
		if err != nil {
			return copyRangeSendfile(dfd, sfd, roff, woff, n)
		}
		if c == 0 {
			return fmt.Errorf("copy_file_range: short source at %d", roff)
		}
		n -= int64(c)
	}
	return nil
}

// copyRangeSendfile is copyRange where copy_file_range cannot (between filesystems): with
// sendfile, still in the kernel, else through a buffer.
func copyRangeSendfile(dfd, sfd int, roff, woff, n int64) error {
	if _, err := unix.Seek(dfd, woff, io.SeekStart); err != nil {
		return copyRangeUser(dfd, sfd, roff, woff, n)
	}
	for n > 0 {
		c, err := unix.Sendfile(dfd, sfd, &roff, int(min(n, 1<<30)))
		if err != nil {
			return copyRangeUser(dfd, sfd, roff, woff, n)
		}
		if c == 0 {
			return fmt.Errorf("sendfile: short source at %d", roff)
		}
		woff += int64(c)
		n -= int64(c)
	}
	return nil
}

// copyRangeUser is copyRange through a buffer, where neither copy_file_range nor sendfile
// can.
func copyRangeUser(dfd, sfd int, roff, woff, n int64) error {
	buf := make([]byte, min(n, 1<<20))
	for n > 0 {
		r, err := unix.Pread(sfd, buf[:min(n, int64(len(buf)))], roff)
		if err != nil {
			return fmt.Errorf("reading at %d: %w", roff, err)
		}
		if r == 0 {
			return fmt.Errorf("reading at %d: short source", roff)
		}
		if _, err := unix.Pwrite(dfd, buf[:r], woff); err != nil {
			return fmt.Errorf("writing at %d: %w", woff, err)
		}
		roff += int64(r)
		woff += int64(r)
		n -= int64(r)
	}
	return nil
}
