package rootfs

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// These tests play a guest that can write where the share lets it, and more: a goroutine
// with root on the host side of the share (stronger than any guest, which sees the share
// read-only) plants symlinks and renames directories while the shim works. The host outside
// the share must stay exactly as it was.

// victim is a host directory an attacker aims at: files and a mount of its own.
type victim struct {
	t     *testing.T
	dir   string
	mount string
	files []string
}

func newVictim(t *testing.T, root string) *victim {
	t.Helper()
	v := &victim{t: t, dir: filepath.Join(root, "victim")}
	v.mount = filepath.Join(v.dir, "mnt")
	if err := os.MkdirAll(v.mount, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{v.dir, v.mount} {
		_ = os.MkdirAll(filepath.Join(d, "sub"), 0o755)
	}
	if err := unix.Mount("tmpfs", v.mount, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(v.mount, unix.MNT_DETACH) })
	for _, f := range []string{filepath.Join(v.dir, "precious"), filepath.Join(v.mount, "precious")} {
		if err := os.WriteFile(f, []byte("keep"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	v.files = v.list()
	return v
}

func (v *victim) list() []string {
	var out []string
	_ = filepath.Walk(v.dir, func(p string, fi os.FileInfo, err error) error {
		if err == nil {
			out = append(out, p)
		}
		return nil
	})
	sort.Strings(out)
	return out
}

// intact checks the victim's files and its mount, and that nothing was mounted in it.
func (v *victim) intact(when string) {
	v.t.Helper()
	if got := v.list(); !reflect.DeepEqual(got, v.files) {
		v.t.Fatalf("%s: the host dir changed:\n got %v\nwant %v", when, got, v.files)
	}
	if got, _ := mountsUnder(v.dir); len(got) != 1 || got[0] != v.mount {
		v.t.Fatalf("%s: mounts in the host dir %v, want only %s", when, got, v.mount)
	}
}

// TestGuestSeesShareReadOnly: through the exported side (what virtiofsd serves) nothing in
// the share's own directories can be created, renamed or linked; only a container's rootfs
// and its writable volumes take writes.
func TestGuestSeesShareReadOnly(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	empty := e.dir("emptydir", nil)
	cfg := e.dir("cfg", map[string]string{"k": "v"})
	rootfs, _ := e.overlay("c1", nil)
	spec := &specs.Spec{Root: &specs.Root{Path: "rootfs"}, Mounts: []specs.Mount{bindMount(empty, "/data"), bindMount(cfg, "/cfg", "ro")}}
	if _, err := e.share.Prepare(ctx, "c1", "", spec, rootfs); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := e.share.Release(ctx, "c1"); err != nil {
			t.Error(err)
		}
	}()
	for _, dir := range []string{e.shared, filepath.Join(e.shared, "c1"), filepath.Join(e.shared, "c1", "mounts")} {
		if err := os.WriteFile(filepath.Join(dir, "fill"), []byte("x"), 0o644); !errors.Is(err, unix.EROFS) {
			t.Errorf("create in %s: %v, want EROFS", dir, err)
		}
		if err := os.Symlink("/", filepath.Join(dir, "evil")); !errors.Is(err, unix.EROFS) {
			t.Errorf("symlink in %s: %v, want EROFS", dir, err)
		}
	}
	if err := os.Rename(filepath.Join(e.shared, "c1", "mounts"), filepath.Join(e.shared, "c1", "m2")); !errors.Is(err, unix.EROFS) && !errors.Is(err, unix.EBUSY) {
		t.Errorf("rename in the share: %v, want EROFS", err)
	}
	for _, p := range []string{"c1/rootfs/new", "c1/mounts/0-data/new"} {
		if err := os.WriteFile(filepath.Join(e.shared, p), []byte("x"), 0o644); err != nil {
			t.Errorf("write %s: %v, want it writable", p, err)
		}
	}
	if err := os.WriteFile(filepath.Join(e.shared, "c1/mounts/1-cfg/new"), []byte("x"), 0o644); !errors.Is(err, unix.EROFS) {
		t.Errorf("write to a read-only volume: %v, want EROFS", err)
	}
	// nosuid,nodev on every host-side mount of the share.
	for _, p := range []string{"c1/rootfs", "c1/mounts/0-data", "c1/mounts/1-cfg"} {
		var st unix.Statfs_t
		if err := unix.Statfs(filepath.Join(e.staging, p), &st); err != nil {
			t.Fatal(err)
		}
		if st.Flags&unix.ST_NOSUID == 0 || st.Flags&unix.ST_NODEV == 0 {
			t.Errorf("%s: mount flags %#x, want nosuid and nodev", p, st.Flags)
		}
	}
	// The staging tmpfs is bounded.
	var st unix.Statfs_t
	if err := unix.Statfs(e.staging, &st); err != nil || st.Blocks*uint64(st.Bsize) > 1<<20 || st.Files > 16384 {
		t.Errorf("staging tmpfs: %d blocks of %d, %d inodes (%v), want at most 1 MiB and 16384", st.Blocks, st.Bsize, st.Files, err)
	}
}

// TestPlantedSymlinksNotFollowed: whatever names a guest managed to plant in the share,
// Release and Cleanup remove links as links and never unmount or delete through them.
func TestPlantedSymlinksNotFollowed(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	v := newVictim(t, e.root)
	// The container dir itself, its mounts dir, and a name in a real container's dir.
	if err := os.Symlink(v.dir, filepath.Join(e.staging, "evil")); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(e.staging, "c2"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"mounts", "rootfs"} {
		if err := os.Symlink(v.dir, filepath.Join(e.staging, "c2", n)); err != nil {
			t.Fatal(err)
		}
	}
	rootfs, _ := e.overlay("c3", nil)
	if _, err := e.share.Prepare(ctx, "c3", "", &specs.Spec{Root: &specs.Root{Path: "rootfs"}}, rootfs); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(v.mount, filepath.Join(e.staging, "c3", "extra")); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"evil", "c2", "c3"} {
		if err := e.share.Release(ctx, id); err != nil {
			t.Errorf("Release %s: %v", id, err)
		}
		v.intact("Release " + id)
		e.gone(id)
	}
	// The same after a crash: Cleanup from the node's mount table alone, in the dirs it
	// works in there (no guest can write them, but nothing there is followed either).
	for _, d := range []string{StagingDir, MountDir} {
		if err := os.Symlink(v.dir, filepath.Join(e.state, d, "c4")); err != nil {
			t.Fatal(err)
		}
	}
	if err := CleanupContainer(ctx, e.state, "c4"); err != nil {
		t.Errorf("CleanupContainer: %v", err)
	}
	v.intact("CleanupContainer")
	for _, d := range []string{StagingDir, ExportDir, MountDir} {
		if err := os.Symlink(v.dir, filepath.Join(e.state, d, "c5")); err != nil {
			t.Fatal(err)
		}
	}
	e.share.Close()
	if err := Cleanup(ctx, e.state); err != nil {
		t.Errorf("Cleanup: %v", err)
	}
	v.intact("Cleanup")
}

// racer plays the guest: until stop is closed it swaps name (relative to dir) for a symlink
// to target and back, as fast as it can.
func racer(dir, name, target string, stop <-chan struct{}) <-chan int {
	done := make(chan int, 1)
	go func() {
		n := 0
		for {
			select {
			case <-stop:
				done <- n
				return
			default:
			}
			p := filepath.Join(dir, name)
			if os.Rename(p, p+".moved") == nil {
				n++
			}
			_ = os.Symlink(target, p)
			_ = os.Remove(p)
			_ = os.Rename(p+".moved", p)
		}
	}()
	return done
}

// TestPrepareReleaseRaceGuest: a guest swapping the container's dirs for symlinks to a host
// dir during Prepare and Release never gets a bind or an unmount or a removal there, in
// thousands of tries; what it breaks makes the create fail, not the host.
func TestPrepareReleaseRaceGuest(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	v := newVictim(t, e.root)
	job := e.dir("job", map[string]string{"payload": "pwned"})
	tries := 700 // per target: 2100 create/release pairs against the racer
	if testing.Short() {
		tries = 100
	}
	for _, target := range []string{"c1/mounts", "c1/rootfs", "c1"} {
		t.Run(filepath.Base(target), func(t *testing.T) {
			stop := make(chan struct{})
			done := racer(e.staging, target, v.dir, stop)
			failed := 0
			for i := 0; i < tries; i++ {
				rootfs, _ := e.overlay("c1", nil)
				spec := &specs.Spec{Root: &specs.Root{Path: "rootfs"}, Mounts: []specs.Mount{bindMount(job, "/etc/cron.d")}}
				if _, err := e.share.Prepare(ctx, "c1", "", spec, rootfs); err != nil {
					failed++
				}
				if err := e.share.Release(ctx, "c1"); err != nil {
					failed++
				}
				v.intact("try")
				// What the racer left (a moved dir with mounts) is still only in the share.
				for _, leftover := range []string{target + ".moved", "c1.moved"} {
					_ = e.releaseAt(leftover)
				}
				_ = e.share.Release(ctx, "c1")
			}
			close(stop)
			swaps := <-done
			_ = e.share.Release(ctx, "c1")
			for _, leftover := range []string{target + ".moved", "c1.moved"} {
				if err := e.releaseAt(leftover); err != nil {
					t.Errorf("removing what the racer left: %v", err)
				}
			}
			v.intact("end")
			e.noMounts()
			t.Logf("%d tries against %d swaps of %s: %d calls failed safely, host dir untouched", tries, swaps, target, failed)
		})
	}
}

// releaseAt is releaseAt of name in the staging dir, in the share's namespace.
func (e *env) releaseAt(name string) error {
	return e.share.ns.run(func() error {
		return releaseAt(e.share.rootfd(), filepath.Join(e.state, StagingDir), name, e.share.dev)
	})
}
