package rootfs

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/agent"
)

// A memory-backed emptyDir (a tmpfs kubelet mounted at the volume's dir) becomes a tmpfs of
// the pod in the guest, of the host's size; a disk-backed one, or a dir inside a tmpfs, stays
// a virtio-fs bind.
func TestPrepareMemoryEmptyDir(t *testing.T) {
	e := newEnv(t)
	plugin := filepath.Join(e.vols, "pods", "uid1", "volumes", emptyDirPlugin)
	mem, disk := filepath.Join(plugin, "cache"), filepath.Join(plugin, "scratch")
	for _, d := range []string{mem, disk} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := unix.Mount("tmpfs", mem, "tmpfs", 0, "size=8m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(mem, unix.MNT_DETACH) })
	inner := filepath.Join(mem, "inner")
	if err := os.Mkdir(inner, 0o755); err != nil {
		t.Fatal(err)
	}
	spec := &specs.Spec{Root: &specs.Root{Path: "rootfs"}, Mounts: []specs.Mount{
		{Destination: "/cache", Type: "bind", Source: mem, Options: []string{"rbind", "rw"}},
		{Destination: "/cache-ro", Type: "bind", Source: mem, Options: []string{"rbind", "ro"}},
		{Destination: "/scratch", Type: "bind", Source: disk, Options: []string{"rbind", "rw"}},
		{Destination: "/inner", Type: "bind", Source: inner, Options: []string{"rbind", "rw"}},
	}}
	rootfs, _ := e.overlay("c1", nil)
	att, err := e.share.Prepare(context.Background(), "c1", "", spec, rootfs)
	if err != nil {
		t.Fatal(err)
	}
	want := filepath.Join(agent.GuestPodTmpfsDir, "cache")
	got := att.Spec.Mounts
	if got[0].Source != want || got[1].Source != want {
		t.Errorf("memory emptyDir sources %q %q, want %q", got[0].Source, got[1].Source, want)
	}
	if got[1].Options[1] != "ro" {
		t.Errorf("read-only mount of the emptyDir lost ro: %v", got[1].Options)
	}
	for _, m := range got[2:] {
		if filepath.Dir(m.Source) != filepath.Join(guestDir, "c1", mountsDir) {
			t.Errorf("%s: source %s, want a bind in the share", m.Destination, m.Source)
		}
	}
	if len(att.PodTmpfs) != 2 || att.PodTmpfs[0].MountPoint != want || att.PodTmpfs[0].SizeBytes != 8<<20 {
		t.Errorf("pod tmpfs %v, want two of %s with 8 MiB", att.PodTmpfs, want)
	}
	e.release("c1")
}
