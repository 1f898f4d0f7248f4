package rootfs

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	"github.com/moby/sys/mountinfo"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// needRoot skips a test that mounts unless it runs as root; under CI a missing root is a
// broken setup and fails the test.
func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("this test mounts filesystems and must run as root under CI")
	}
	t.Skip("needs root to mount")
}

// env is one test's host: a sandbox state dir with its share, and a place for volume sources.
type env struct {
	t     *testing.T
	root  string // the temp dir everything lives in
	state string // the sandbox's state dir
	// staging and shared are the share's writable side (the shim's) and its exported,
	// read-only side (the guest's), as the test reaches them: mounted in the share's own
	// namespace, they are seen through its thread's /proc root.
	staging, shared string
	vols            string // volume sources
	share           *Share
}

const guestDir = "/run/podvm/shared"

func newEnv(t *testing.T) *env {
	t.Helper()
	needRoot(t)
	root := t.TempDir()
	state := filepath.Join(root, "state")
	e := &env{t: t, root: root, state: state, vols: filepath.Join(root, "vols")}
	for _, d := range []string{e.state, e.vols} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// Registered after TempDir, so it runs before TempDir's removal: a failing test must not
	// leave mounts behind (nor make RemoveAll walk into a volume).
	t.Cleanup(func() {
		if err := Cleanup(context.Background(), state); err != nil {
			t.Errorf("Cleanup: %v", err)
		}
		if left, _ := mountsUnder(root); len(left) > 0 {
			t.Errorf("mounts left under the test dir: %v", left)
			_ = mount.UnmountRecursive(root, unix.MNT_DETACH)
		}
	})
	share, err := CreateShare(context.Background(), state, guestDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { share.Close() })
	e.share = share
	e.staging = e.view(filepath.Join(state, StagingDir))
	e.shared = e.view(filepath.Join(state, ExportDir))
	return e
}

// view is path p of the share's mount namespace as a path of the test's.
func (e *env) view(p string) string { return e.share.ns.view() + p }

// mountsUnder lists the mount points at or below dir (a view path) in the share's namespace,
// as view paths.
func (e *env) mountsUnder(dir string) ([]string, error) {
	view := e.share.ns.view()
	f, err := os.Open(filepath.Join(filepath.Dir(view), "mountinfo"))
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }()
	infos, err := mountinfo.GetMountsFromReader(f, mountinfo.PrefixFilter(filepath.Clean(strings.TrimPrefix(dir, view))))
	if err != nil {
		return nil, fmt.Errorf("reading the mount table: %w", err)
	}
	points := make([]string, 0, len(infos))
	for _, m := range infos {
		points = append(points, view+m.Mountpoint)
	}
	return points, nil
}

func (e *env) dir(name string, files map[string]string) string {
	e.t.Helper()
	d := filepath.Join(e.vols, name)
	if err := os.MkdirAll(d, 0o755); err != nil {
		e.t.Fatal(err)
	}
	for n, c := range files {
		if err := os.WriteFile(filepath.Join(d, n), []byte(c), 0o644); err != nil {
			e.t.Fatal(err)
		}
	}
	return d
}

func (e *env) file(name, content string) string {
	e.t.Helper()
	p := filepath.Join(e.vols, name)
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		e.t.Fatal(err)
	}
	return p
}

// overlay makes lower/upper/work dirs with the given files in the lower one and returns
// containerd's mount for them and the upper dir.
func (e *env) overlay(name string, files map[string]string) ([]mount.Mount, string) {
	e.t.Helper()
	base := filepath.Join(e.root, "snap-"+name)
	lower := filepath.Join(base, "lower")
	upper := filepath.Join(base, "upper")
	work := filepath.Join(base, "work")
	for _, d := range []string{lower, upper, work} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			e.t.Fatal(err)
		}
	}
	for n, c := range files {
		if err := os.WriteFile(filepath.Join(lower, n), []byte(c), 0o644); err != nil {
			e.t.Fatal(err)
		}
	}
	return []mount.Mount{{Type: "overlay", Source: "overlay",
		Options: []string{"lowerdir=" + lower, "upperdir=" + upper, "workdir=" + work}}}, upper
}

// noMounts checks that nothing but the share's own two mounts is left in the state dir.
func (e *env) noMounts() {
	e.t.Helper()
	left, err := e.mountsUnder(e.view(e.state))
	if err != nil {
		e.t.Fatal(err)
	}
	if !reflect.DeepEqual(left, []string{e.staging, e.shared}) && !reflect.DeepEqual(left, []string{e.shared, e.staging}) {
		e.t.Errorf("mounts in the state dir: %v, want only the share's %s and %s", left, e.staging, e.shared)
	}
}

// release releases container id and checks that it left nothing behind.
func (e *env) release(id string) {
	e.t.Helper()
	if err := e.share.Release(context.Background(), id); err != nil {
		e.t.Fatal(err)
	}
	e.noMounts()
	e.gone(id)
}

func (e *env) gone(id string) {
	e.t.Helper()
	if _, err := os.Lstat(filepath.Join(e.staging, id)); !errors.Is(err, fs.ErrNotExist) {
		e.t.Errorf("%s of the share still there (err %v)", id, err)
	}
}

func readFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func bindMount(src, dst string, opts ...string) specs.Mount {
	return specs.Mount{Destination: dst, Type: "bind", Source: src, Options: append([]string{"rbind"}, opts...)}
}

// baseMounts are the non-bind mounts containerd's default spec has; they must pass unchanged.
func baseMounts() []specs.Mount {
	return []specs.Mount{
		{Destination: "/proc", Type: "proc", Source: "proc", Options: []string{"nosuid", "noexec", "nodev"}},
		{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
		{Destination: "/dev/pts", Type: "devpts", Source: "devpts", Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"}},
		{Destination: "/dev/mqueue", Type: "mqueue", Source: "mqueue", Options: []string{"nosuid", "noexec", "nodev"}},
		{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}},
		{Destination: "/sys/fs/cgroup", Type: "cgroup", Source: "cgroup", Options: []string{"nosuid", "noexec", "nodev", "relatime", "ro"}},
	}
}

func TestPrepareOverlayRootfs(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	rootfs, upper := e.overlay("c1", map[string]string{"hello": "from lower"})
	spec := &specs.Spec{Root: &specs.Root{Path: "rootfs", Readonly: true}, Mounts: baseMounts()}
	att, err := e.share.Prepare(ctx, "c1", "/nonexistent-bundle", spec, rootfs)
	if err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(e.shared, "c1", "rootfs")
	if got := readFile(t, filepath.Join(root, "hello")); got != "from lower" {
		t.Errorf("rootfs/hello = %q, want the lower dir's file", got)
	}
	if err := os.WriteFile(filepath.Join(root, "new"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got := readFile(t, filepath.Join(upper, "new")); got != "x" {
		t.Errorf("a write to the rootfs did not land in the upper dir: %q", got)
	}
	if att.Spec.Root.Path != guestDir+"/c1/rootfs" || !att.Spec.Root.Readonly {
		t.Errorf("guest root = %+v, want path %s/c1/rootfs and readonly kept", att.Spec.Root, guestDir)
	}
	if !reflect.DeepEqual(att.Spec.Mounts, baseMounts()) {
		t.Errorf("non-bind mounts changed:\n got %+v\nwant %+v", att.Spec.Mounts, baseMounts())
	}
	if spec.Root.Path != "rootfs" {
		t.Errorf("the caller's spec was modified: root %q", spec.Root.Path)
	}
	if len(att.BlockDevices)+len(att.BlockMounts)+len(att.Devices) != 0 {
		t.Errorf("unexpected block devices: %+v", att)
	}
	e.release("c1")
	if got := readFile(t, filepath.Join(upper, "new")); got != "x" {
		t.Errorf("Release lost the upper dir's data: %q", got)
	}
}

func TestPrepareBundleRootfs(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	bundle := filepath.Join(e.root, "bundle")
	if err := os.MkdirAll(filepath.Join(bundle, "rootfs", "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(bundle, "rootfs", "etc", "os-release"), []byte("busybox"), 0o644); err != nil {
		t.Fatal(err)
	}
	spec := &specs.Spec{Root: &specs.Root{Path: "rootfs"}}
	att, err := e.share.Prepare(ctx, "c1", bundle, spec, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := readFile(t, filepath.Join(e.shared, "c1/rootfs/etc/os-release")); got != "busybox" {
		t.Errorf("bundle rootfs not visible in the share: %q", got)
	}
	if att.Spec.Root.Path != guestDir+"/c1/rootfs" {
		t.Errorf("guest root %q", att.Spec.Root.Path)
	}
	e.release("c1")
	if _, err := os.Stat(filepath.Join(bundle, "rootfs", "etc", "os-release")); err != nil {
		t.Errorf("Release touched the bundle: %v", err)
	}
}

// bindSources are the volume sources TestPrepareBinds shares, as kubelet makes them.
type bindSources struct {
	cfg, empty, secret string
}

// bindFixture makes the sources and the spec's mounts: every kind of bind the share handles.
func bindFixture(e *env) (bindSources, []specs.Mount) {
	t := e.t
	t.Helper()
	src := bindSources{cfg: e.dir("configmap", map[string]string{"key": "value"}), empty: e.dir("emptydir", nil)}
	hosts := e.file("hosts", "127.0.0.1 localhost\n")
	hostname := e.file("hostname", "pod-a\n")
	// A symlinked source, as kubelet's configMap ..data links are: resolved on the host.
	link := filepath.Join(e.vols, "cfg-link")
	if err := os.Symlink(src.cfg, link); err != nil {
		t.Fatal(err)
	}
	// A source with a mount below it: shared recursively.
	src.secret = e.dir("secret", nil)
	if err := unix.Mount("tmpfs", src.secret, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(src.secret, unix.MNT_DETACH) })
	if err := os.WriteFile(filepath.Join(src.secret, "token"), []byte("s3cr3t"), 0o600); err != nil {
		t.Fatal(err)
	}
	secretParent := filepath.Dir(src.secret)

	shm := "/run/containerd/io.containerd.grpc.v1.cri/sandboxes/abc/shm"
	return src, append(baseMounts(),
		bindMount(src.cfg, "/cfg", "ro", "rprivate"),
		bindMount(src.empty, "/data", "rw", "rslave"),
		bindMount(hosts, "/etc/hosts", "rw"),
		bindMount(hostname, "/etc/hostname", "ro"),
		bindMount(link, "/linked"),
		bindMount(secretParent, "/vols", "ro"),
		bindMount(secretParent, "/rvols", "rro"),
		bindMount(shm, "/dev/shm", "rw"),
		specs.Mount{Destination: "/opt", Source: src.empty, Options: []string{"bind"}}, // no type: a bind by its options
	)
}

func TestPrepareBinds(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	src, in := bindFixture(e)
	spec := &specs.Spec{Root: &specs.Root{Path: "rootfs"}, Mounts: in}
	rootfs, _ := e.overlay("c1", nil)
	att, err := e.share.Prepare(ctx, "c1", "", spec, rootfs)
	if err != nil {
		t.Fatal(err)
	}
	checkBindsKeepOptions(t, att.Spec.Mounts, in)
	checkBindAccess(t, e, att.Spec.Mounts)
	if got := readFile(t, filepath.Join(src.empty, "written-data")); got != "w" {
		t.Errorf("write through the emptyDir share did not reach its source: %q", got)
	}

	e.release("c1")
	if got := readFile(t, filepath.Join(src.secret, "token")); got != "s3cr3t" {
		t.Errorf("Release disturbed a volume below a shared source: %q", got)
	}
	if got := readFile(t, filepath.Join(src.cfg, "key")); got != "value" {
		t.Errorf("configMap source changed: %q", got)
	}
	if err := e.share.Release(ctx, "c1"); err != nil {
		t.Errorf("second Release: %v", err)
	}
	if err := e.share.Release(ctx, "never-prepared"); err != nil {
		t.Errorf("Release of an unknown container: %v", err)
	}
}

// checkBindsKeepOptions: Prepare changes only the sources of binds (and /dev/shm's to the
// guest's own); the other mounts, and every mount's type and options, stay as they were, but
// for a plain read-only bind with sub-mounts, which is read-write in the guest.
func checkBindsKeepOptions(t *testing.T, got, in []specs.Mount) {
	t.Helper()
	base := baseMounts()
	if !reflect.DeepEqual(got[:len(base)], base) {
		t.Errorf("non-bind mounts changed: %+v", got[:len(base)])
	}
	for i, m := range got {
		want := in[i].Options
		if m.Destination == "/vols" {
			// ro with host sub-mounts: rw in the guest, whose view has no sub-mounts; the host
			// side keeps the volume itself read-only (checkBindAccess).
			want = []string{"rbind", "rw"}
		}
		if !reflect.DeepEqual(m.Options, want) || m.Type != in[i].Type || m.Destination != in[i].Destination {
			t.Errorf("mount %s: type/options changed: %q %v, want %q %v", m.Destination, m.Type, m.Options, in[i].Type, want)
		}
	}
	shm := ""
	for _, m := range got {
		if m.Destination == "/dev/shm" {
			shm = m.Source
		}
	}
	if shm != GuestShmDir {
		t.Errorf("/dev/shm source %q, want the guest's %s", shm, GuestShmDir)
	}
}

// checkBindAccess reads and writes through the share what bindFixture's binds expose, as the
// guest would: readable, and writable exactly where the bind is.
func checkBindAccess(t *testing.T, e *env, mounts []specs.Mount) {
	t.Helper()
	byDest := map[string]specs.Mount{}
	for _, m := range mounts {
		byDest[m.Destination] = m
	}
	hostPath := func(t *testing.T, m specs.Mount) string {
		t.Helper()
		rel, ok := strings.CutPrefix(m.Source, guestDir+"/")
		if !ok {
			t.Fatalf("mount %s: source %s is not under the guest share %s", m.Destination, m.Source, guestDir)
		}
		return filepath.Join(e.shared, rel)
	}
	tests := []struct {
		dest, file, want string
		writable         bool
		writeIn          string // a subdir to write in (a submount of the source)
	}{
		{"/cfg", "key", "value", false, ""},
		{"/data", "", "", true, ""},
		{"/etc/hosts", "", "127.0.0.1 localhost\n", true, ""},
		{"/etc/hostname", "", "pod-a\n", false, ""},
		{"/linked", "key", "value", true, ""},
		{"/vols", "", "", false, ""},                          // ro: the bind's top mount read-only...
		{"/vols", "secret/token", "s3cr3t", true, "secret"},   // ...its sub-mounts as they are (runc's "ro")
		{"/rvols", "secret/token", "s3cr3t", false, "secret"}, // rro: read-only recursively
		{"/opt", "", "", true, ""},
	}
	for _, tc := range tests {
		t.Run(strings.TrimPrefix(tc.dest+"/"+tc.writeIn, "/"), func(t *testing.T) {
			p := hostPath(t, byDest[tc.dest])
			fi, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			if tc.want != "" {
				if got := readFile(t, filepath.Join(p, tc.file)); got != tc.want {
					t.Errorf("read %q through the share, want %q", got, tc.want)
				}
			}
			target := p
			if fi.IsDir() {
				target = filepath.Join(p, tc.writeIn, "written-"+strings.TrimPrefix(tc.dest, "/"))
			}
			err = os.WriteFile(target, []byte("w"), 0o644)
			switch {
			case tc.writable && err != nil:
				t.Errorf("write through the share: %v", err)
			case !tc.writable && !errors.Is(err, unix.EROFS):
				t.Errorf("write through a read-only share: err %v, want EROFS", err)
			}
		})
	}
}

func TestSameSourceInTwoContainers(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	empty := e.dir("emptydir", nil)
	for _, id := range []string{"a", "b"} {
		rootfs, _ := e.overlay(id, nil)
		spec := &specs.Spec{Root: &specs.Root{Path: "rootfs"}, Mounts: []specs.Mount{bindMount(empty, "/data")}}
		if _, err := e.share.Prepare(ctx, id, "", spec, rootfs); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(e.shared, "a/mounts/0-data/f"), []byte("from a"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := e.share.Release(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if got := readFile(t, filepath.Join(e.shared, "b/mounts/0-data/f")); got != "from a" {
		t.Errorf("b reads %q, want a's write, also after a was released", got)
	}
	e.release("b")
	if got := readFile(t, filepath.Join(empty, "f")); got != "from a" {
		t.Errorf("emptyDir lost its data: %q", got)
	}
}

func TestPrepareFailsCleanly(t *testing.T) {
	needRoot(t)
	tests := []struct {
		name string
		// mounts returns the spec's mounts; e is set up, with dirs "ok1", "ok2" and file "f".
		mounts   func(e *env) []specs.Mount
		wantIs   error
		wantText []string
	}{
		{
			name: "third bind source missing",
			mounts: func(e *env) []specs.Mount {
				return []specs.Mount{bindMount(e.dir("ok1", nil), "/a"), bindMount(e.file("f", "x"), "/b", "ro"),
					bindMount(filepath.Join(e.vols, "missing"), "/c")}
			},
			wantIs:   errdefs.ErrNotFound,
			wantText: []string{"missing", "/c", "container c1", "does not exist"},
		},
		{
			name: "char device",
			mounts: func(e *env) []specs.Mount {
				return []specs.Mount{bindMount(e.dir("ok1", nil), "/a"), bindMount("/dev/null", "/dev/mine")}
			},
			wantIs:   errdefs.ErrNotImplemented,
			wantText: []string{"/dev/null", "device", "not supported"},
		},
		{
			name: "unix socket",
			mounts: func(e *env) []specs.Mount {
				sock := filepath.Join(e.vols, "docker.sock")
				l, err := net.Listen("unix", sock)
				if err != nil {
					e.t.Fatal(err)
				}
				e.t.Cleanup(func() { l.Close() })
				return []specs.Mount{bindMount(e.dir("ok1", nil), "/a"), bindMount(sock, "/var/run/docker.sock")}
			},
			wantIs:   errdefs.ErrNotImplemented,
			wantText: []string{"docker.sock", "socket"},
		},
		{
			name: "source containing the share",
			mounts: func(e *env) []specs.Mount {
				return []specs.Mount{bindMount(e.dir("ok1", nil), "/a"), bindMount(e.root, "/host")}
			},
			wantIs:   errdefs.ErrNotImplemented,
			wantText: []string{"state dir", "/host"},
		},
		{
			name: "bind without source",
			mounts: func(e *env) []specs.Mount {
				return []specs.Mount{bindMount(e.dir("ok1", nil), "/a"), bindMount("", "/b")}
			},
			wantIs:   errdefs.ErrInvalidArgument,
			wantText: []string{"/b", "no source"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			rootfs, _ := e.overlay("c1", map[string]string{"f": "x"})
			spec := &specs.Spec{Root: &specs.Root{Path: "rootfs"}, Mounts: tc.mounts(e)}
			_, err := e.share.Prepare(context.Background(), "c1", "", spec, rootfs)
			if err == nil {
				t.Fatal("Prepare succeeded")
			}
			if !errors.Is(err, tc.wantIs) {
				t.Errorf("error %v is not %v", err, tc.wantIs)
			}
			for _, w := range tc.wantText {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
			e.noMounts()
			e.gone("c1")
		})
	}
}

func TestPrepareRefusals(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	spec := &specs.Spec{Root: &specs.Root{Path: "rootfs"}}
	rootfs, _ := e.overlay("c1", nil)
	for _, id := range []string{"", ".", "..", "a/b", "../x"} {
		if _, err := e.share.Prepare(ctx, id, "", spec, rootfs); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("container id %q: err %v, want invalid argument", id, err)
		}
	}
	if _, err := e.share.Prepare(ctx, "c1", "", &specs.Spec{}, nil); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("no rootfs at all: err %v, want invalid argument", err)
	}
	if _, err := e.share.Prepare(ctx, "c1", "", spec, rootfs); err != nil {
		t.Fatal(err)
	}
	if _, err := e.share.Prepare(ctx, "c1", "", spec, rootfs); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Errorf("second Prepare of c1: err %v, want already exists", err)
	}
	// The failed second Prepare must not have undone the first.
	if left, _ := e.mountsUnder(filepath.Join(e.shared, "c1")); len(left) != 1 {
		t.Errorf("mounts of c1 after a refused second Prepare: %v, want its rootfs", left)
	}
	e.release("c1")
}

func TestCleanupAfterCrash(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	cfg := e.dir("cfg", map[string]string{"key": "value"})
	for _, id := range []string{"a", "b", "c"} {
		rootfs, _ := e.overlay(id, map[string]string{"f": id})
		spec := &specs.Spec{Root: &specs.Root{Path: "rootfs"}, Mounts: []specs.Mount{
			bindMount(cfg, "/cfg", "ro"), bindMount(e.file("hosts-"+id, id), "/etc/hosts")}}
		if _, err := e.share.Prepare(ctx, id, "", spec, rootfs); err != nil {
			t.Fatal(err)
		}
	}
	// A shim that died in Prepare may have left containerd's rootfs mounts of a container
	// in the node's namespace (mnt/<id>).
	rootfs, _ := e.overlay("d", map[string]string{"f": "d"})
	left := filepath.Join(e.state, MountDir, "d")
	if err := os.Mkdir(left, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := mount.All(rootfs, left); err != nil {
		t.Fatal(err)
	}
	// The shim died: its thread, and with it the share's namespace and mounts, are gone. A
	// new process cleans up from the node's mount table alone: first one container (its own
	// shim's delete), then the whole sandbox.
	e.share.ns.close()
	if err := CleanupContainer(ctx, e.state, "d"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(left); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("%s still there after CleanupContainer: %v", left, err)
	}
	if err := Cleanup(ctx, e.state); err != nil {
		t.Fatal(err)
	}
	if left, err := mountsUnder(e.state); err != nil || len(left) != 0 {
		t.Errorf("mounts after Cleanup: %v (%v)", left, err)
	}
	for _, d := range []string{StagingDir, ExportDir, MountDir} {
		if _, err := os.Lstat(filepath.Join(e.state, d)); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s still there: %v", d, err)
		}
	}
	if got := readFile(t, filepath.Join(cfg, "key")); got != "value" {
		t.Errorf("Cleanup disturbed a volume: %q", got)
	}
	if err := Cleanup(ctx, e.state); err != nil {
		t.Errorf("second Cleanup: %v", err)
	}
	if err := CleanupContainer(ctx, e.state, "a"); err != nil {
		t.Errorf("CleanupContainer after Cleanup: %v", err)
	}
}

func TestMountName(t *testing.T) {
	tests := []struct {
		i    int
		dest string
		want string
	}{
		{0, "/etc/hosts", "0-hosts"},
		{3, "/var/run/secrets/kubernetes.io/serviceaccount", "3-serviceaccount"},
		{4, "/", "4-root"},
		{5, "/data dir/with space", "5-with_space"},
		{6, "/" + strings.Repeat("x", 100), "6-" + strings.Repeat("x", 64)},
	}
	for _, tc := range tests {
		if got := mountName(tc.i, tc.dest); got != tc.want {
			t.Errorf("mountName(%d, %q) = %q, want %q", tc.i, tc.dest, got, tc.want)
		}
	}
}

func TestIsPodShmAndIsBind(t *testing.T) {
	tests := []struct {
		m         specs.Mount
		bind, shm bool
	}{
		{specs.Mount{Destination: "/dev/shm", Type: "bind", Source: "/run/containerd/io.containerd.grpc.v1.cri/sandboxes/x/shm"}, true, true},
		{specs.Mount{Destination: "/dev/shm", Type: "bind", Source: "/dev/shm"}, true, true},
		{specs.Mount{Destination: "/dev/shm", Type: "bind", Source: "/var/lib/kubelet/pods/u/volumes/kubernetes.io~empty-dir/shm"}, true, false},
		{specs.Mount{Destination: "/dev/shm", Type: "tmpfs", Source: "shm"}, false, false},
		{specs.Mount{Destination: "/x", Source: "/y", Options: []string{"rbind", "ro"}}, true, false},
		{specs.Mount{Destination: "/x", Type: "none", Source: "/y", Options: []string{"bind"}}, true, false},
		{specs.Mount{Destination: "/proc", Type: "proc", Source: "proc"}, false, false},
	}
	for _, tc := range tests {
		if got := isBind(&tc.m); got != tc.bind {
			t.Errorf("isBind(%+v) = %v", tc.m, got)
		}
		if got := isPodShm(&tc.m); got != tc.shm {
			t.Errorf("isPodShm(%+v) = %v", tc.m, got)
		}
	}
}

func TestFake(t *testing.T) {
	ctx := context.Background()
	f := &Fake{}
	spec := &specs.Spec{Root: &specs.Root{Path: "rootfs"}}
	att, err := f.Prepare(ctx, "c1", "/b", spec, nil)
	if err != nil {
		t.Fatal(err)
	}
	if att.Spec.Root.Path != "/run/podvm/shared/c1/rootfs" || spec.Root.Path != "rootfs" {
		t.Errorf("guest root %q (caller's %q)", att.Spec.Root.Path, spec.Root.Path)
	}
	if _, err := f.Prepare(ctx, "c1", "/b", spec, nil); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Errorf("second Prepare: %v", err)
	}
	if got := f.Prepared(); !reflect.DeepEqual(got, []string{"c1"}) {
		t.Errorf("Prepared() = %v", got)
	}
	if err := f.Release(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
	if len(f.Prepared()) != 0 || !reflect.DeepEqual(f.Released(), []string{"c1"}) {
		t.Errorf("after Release: prepared %v released %v", f.Prepared(), f.Released())
	}
	f.PrepareErr = errdefs.ErrUnavailable
	if _, err := f.Prepare(ctx, "c2", "/b", spec, nil); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Errorf("injected error: %v", err)
	}
}

// mountsUnder lists the mount points at or below dir.
func mountsUnder(dir string) ([]string, error) {
	infos, err := mountinfo.GetMounts(mountinfo.PrefixFilter(filepath.Clean(dir)))
	if err != nil {
		return nil, fmt.Errorf("reading the mount table: %w", err)
	}
	points := make([]string, 0, len(infos))
	for _, m := range infos {
		points = append(points, m.Mountpoint)
	}
	return points, nil
}

// TestHostSubMountRemovable: the share's copies of a volume live in its own mount namespace,
// so the node can take a sub-mount of the volume away while it is shared (umount -l, then
// rmdir of its mount point), as with runc; the share then no longer has it. The sub-mount is
// made after the share, as kubelet mounts volumes after the pod started.
func TestHostSubMountRemovable(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	vol := e.dir("vol", map[string]string{"top": "top"})
	sub := filepath.Join(vol, "sub")
	if err := os.Mkdir(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", sub, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(sub, unix.MNT_DETACH) })
	if err := os.WriteFile(filepath.Join(sub, "file"), []byte("sub"), 0o644); err != nil {
		t.Fatal(err)
	}
	spec := &specs.Spec{Root: &specs.Root{Path: "rootfs"}, Mounts: []specs.Mount{bindMount(vol, "/data")}}
	rootfs, _ := e.overlay("c1", nil)
	if _, err := e.share.Prepare(ctx, "c1", "", spec, rootfs); err != nil {
		t.Fatal(err)
	}
	shared := filepath.Join(e.shared, "c1", "mounts", "0-data")
	if got := readFile(t, filepath.Join(shared, "sub", "file")); got != "sub" {
		t.Fatalf("shared sub-mount reads %q", got)
	}
	if left, err := mountsUnder(e.state); err != nil || len(left) != 0 {
		t.Errorf("the share has mounts in the node's namespace: %v (%v)", left, err)
	}
	if err := unix.Unmount(sub, unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(sub); err != nil {
		t.Fatalf("rmdir of the volume's sub-mount point while it is shared: %v", err)
	}
	if _, err := os.Lstat(filepath.Join(shared, "sub")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the share still has sub/ (%v)", err)
	}
	if got := readFile(t, filepath.Join(shared, "top")); got != "top" {
		t.Errorf("the volume reads %q after the removal", got)
	}
	e.release("c1")
}

// TestPrepareMakesMountPoints: the mount points the guest's runc needs and the image lacks are
// in the rootfs before the guest sees it, made as runc makes them (directories 0755, an empty
// 0644 file for a file's bind), so that runc's init does not make each through virtio-fs. The
// image's symlinks are not followed, whether they point out of the rootfs or not.
func TestPrepareMakesMountPoints(t *testing.T) {
	e := newEnv(t)
	outside := filepath.Join(e.root, "outside")
	if err := os.Mkdir(outside, 0o755); err != nil {
		t.Fatal(err)
	}
	rootfs, upper := e.overlay("c1", nil)
	lower := filepath.Join(filepath.Dir(upper), "lower")
	if err := os.Mkdir(filepath.Join(lower, "etc"), 0o700); err != nil {
		t.Fatal(err)
	}
	for link, target := range map[string]string{"sys": outside, "var": outside, "mnt": "etc"} {
		if err := os.Symlink(target, filepath.Join(lower, link)); err != nil {
			t.Fatal(err)
		}
	}
	file := e.file("hostname", "pod\n")
	dir := e.dir("token", nil)
	binds := []specs.Mount{
		{Destination: "/etc/hostname", Type: "bind", Source: file, Options: []string{"rbind", "rprivate", "rw"}},
		{Destination: "/dev/termination-log", Type: "bind", Source: file, Options: []string{"rbind"}},
		{Destination: "/run/secrets/token", Type: "bind", Source: dir, Options: []string{"rbind", "ro"}},
		{Destination: "/var/run/secrets/token", Type: "bind", Source: dir, Options: []string{"rbind", "ro"}},
		{Destination: "/mnt/data", Type: "bind", Source: dir, Options: []string{"rbind"}},
		{Destination: "/tmp", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid"}},
		// A bind by its option alone, which the share does not serve: runc's to make.
		{Destination: "/srv/file", Type: "tmpfs", Source: file, Options: []string{"bind", "mode=755"}},
	}
	spec := &specs.Spec{Root: &specs.Root{Path: "rootfs"}, Mounts: append(baseMounts(), binds...)}
	if _, err := e.share.Prepare(context.Background(), "c1", "", spec, rootfs); err != nil {
		t.Fatal(err)
	}
	defer e.release("c1")
	want := map[string]os.FileMode{
		"proc": os.ModeDir | 0o755, "dev": os.ModeDir | 0o755, "etc": os.ModeDir | 0o700,
		"etc/hostname": 0o644, "run": os.ModeDir | 0o755, "run/secrets": os.ModeDir | 0o755,
		"run/secrets/token": os.ModeDir | 0o755, "sys": os.ModeSymlink | 0o777,
		"var": os.ModeSymlink | 0o777, "mnt": os.ModeSymlink | 0o777,
	}
	root := filepath.Join(e.shared, "c1", "rootfs")
	for p, mode := range want {
		fi, err := os.Lstat(filepath.Join(root, p))
		if err != nil {
			t.Errorf("%s: %v", p, err)
			continue
		}
		if fi.Mode() != mode {
			t.Errorf("%s is %v, want %v", p, fi.Mode(), mode)
		}
	}
	// Left to runc: what goes on an earlier mount (/dev's tmpfs, sysfs), what a symlink
	// would lead to, a tmpfs without a mode (runc copies the mount point's).
	for _, p := range []string{"dev/pts", "dev/mqueue", "dev/termination-log", "etc/data", "tmp", "srv"} {
		if _, err := os.Lstat(filepath.Join(root, p)); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s made in the rootfs (%v)", p, err)
		}
	}
	if entries, err := os.ReadDir(outside); err != nil || len(entries) != 0 {
		t.Errorf("made outside the rootfs through the image's symlinks: %v %v", entries, err)
	}
	if fi, err := os.Stat(filepath.Join(upper, "etc", "hostname")); err != nil || !fi.Mode().IsRegular() || fi.Size() != 0 {
		t.Errorf("the mount point of /etc/hostname is not an empty file of the rootfs's own: %v %v", fi, err)
	}
}
