package rootfs

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/internal/testutil"
)

func TestParseDiskSize(t *testing.T) {
	for _, c := range []struct {
		in   string
		want int64
		err  string
	}{
		{"1Gi", 1 << 30, ""},
		{"512Mi", 512 << 20, ""},
		{" 64Mi ", 64 << 20, ""},
		{"100M", 100 * 1000 * 1000, ""}, // 95.37 MiB rounded up to 96 MiB? no: multiple of MiB
		{"16777216", 16 << 20, ""},
		{"20000000", 20 << 20, ""}, // rounded up to whole MiB
		{"1Ti", 1 << 40, ""},
		{"", 0, "empty"},
		{"Gi", 0, "whole number"},
		{"-1Gi", 0, "whole number"},
		{"1.5Gi", 0, "unknown unit"},
		{"1GiB", 0, "unknown unit"},
		{"1Ki", 0, "minimum"},
		{"0", 0, "minimum"},
		{"65Ti", 0, "limit"},
		{"99999999999999999999999", 0, "out of range"},
		{"9223372036854775807Ti", 0, "limit"},
	} {
		got, err := ParseDiskSize(c.in)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("ParseDiskSize(%q) = %d, %v; want an error with %q", c.in, got, err, c.err)
			}
			continue
		}
		want := c.want
		if want%(1<<20) != 0 {
			want += 1<<20 - want%(1<<20)
		}
		if err != nil || got != want {
			t.Errorf("ParseDiskSize(%q) = %d, %v; want %d", c.in, got, err, want)
		}
	}
}

func FuzzParseDiskSize(f *testing.F) {
	for _, s := range []string{"1Gi", "512Mi", "100M", "1", "", "1.5Gi", "9223372036854775807", "64Ti", "\x00"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := ParseDiskSize(s)
		if err != nil {
			if n != 0 {
				t.Fatalf("ParseDiskSize(%q) = %d with error %v", s, n, err)
			}
			if len(err.Error()) > 250 {
				t.Fatalf("error for %q is too long to be a useful message: %d bytes", s, len(err.Error()))
			}
			return
		}
		if n < MinDiskSize || n > MaxDiskSize || n%(1<<20) != 0 {
			t.Fatalf("ParseDiskSize(%q) = %d: out of range or not a whole MiB", s, n)
		}
	})
}

func TestSerialFor(t *testing.T) {
	a := serialFor('b', "ctr1", "/dev/xvda")
	if len(a) > 20 {
		t.Fatalf("serial %q is longer than virtio-blk's 20 bytes", a)
	}
	if a != serialFor('b', "ctr1", "/dev/xvda") {
		t.Fatal("serial is not stable")
	}
	if a == serialFor('b', "ctr2", "/dev/xvda") || a == serialFor('b', "ctr1", "/dev/xvdb") || a == serialFor('d', "ctr1", "/dev/xvda") {
		t.Fatal("serials collide")
	}
}

func TestSubPathVolume(t *testing.T) {
	v, ok := subPathVolume("/var/lib/kubelet/pods/u/volume-subpaths/data/c/0")
	if !ok || v != "data" {
		t.Fatalf("got %q %v", v, ok)
	}
	if _, ok := subPathVolume("/var/lib/kubelet/pods/u/volumes/kubernetes.io~empty-dir/data"); ok {
		t.Fatal("a plain volume taken for a subPath")
	}
}

func ptr[T any](v T) *T { return &v }

func TestBlockVolumesRefusesCharDevices(t *testing.T) {
	spec := &specs.Spec{Linux: &specs.Linux{Devices: []specs.LinuxDevice{{Path: "/dev/fuse", Type: "c", Major: 10, Minor: 229}}}}
	_, _, err := (&Share{}).blockVolumes("c1", spec)
	if !errdefs.IsNotImplemented(err) || !strings.Contains(err.Error(), "/dev/fuse") {
		t.Fatalf("err = %v, want not implemented naming /dev/fuse", err)
	}
	// A privileged container's host devices are left for the shim to drop.
	spec.Linux.Resources = &specs.LinuxResources{Devices: []specs.LinuxDeviceCgroup{{Allow: true, Access: "rwm"}}}
	disks, nodes, err := (&Share{}).blockVolumes("c1", spec)
	if err != nil || len(disks) != 0 || len(nodes) != 0 || len(spec.Linux.Devices) != 1 {
		t.Fatalf("privileged: %v %v %v %v", disks, nodes, err, spec.Linux.Devices)
	}
}

// loopDevice attaches a sparse file to a loop device for the test.
func loopDevice(t *testing.T, size int64) (dev string, major, minor int64) {
	t.Helper()
	dev, err := testutil.LoopDevice(t, size)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal(err)
		}
		t.Skip(err)
	}
	var st unix.Stat_t
	if err := unix.Stat(dev, &st); err != nil {
		t.Fatal(err)
	}
	return dev, int64(unix.Major(st.Rdev)), int64(unix.Minor(st.Rdev))
}

func TestBlockVolumesLoop(t *testing.T) {
	dev, major, minor := loopDevice(t, 32<<20)
	spec := &specs.Spec{Linux: &specs.Linux{
		Devices: []specs.LinuxDevice{{Path: "/dev/xvda", Type: "b", Major: major, Minor: minor, FileMode: ptr(os.FileMode(0o640)), UID: ptr(uint32(7)), GID: ptr(uint32(8))}},
		Resources: &specs.LinuxResources{Devices: []specs.LinuxDeviceCgroup{
			{Allow: false, Access: "rwm"},
			{Allow: true, Type: "b", Major: &major, Minor: &minor, Access: "r"},
		}},
	}}
	s := (&Share{}).WithBlock(BlockOptions{Cache: "writeback", AIO: "threads"})
	disks, nodes, err := s.blockVolumes("c1", spec)
	if err != nil {
		t.Fatal(err)
	}
	if len(disks) != 1 || len(nodes) != 1 {
		t.Fatalf("disks %v nodes %v", disks, nodes)
	}
	d, n := disks[0], nodes[0]
	if d.Path != dev || !d.ReadOnly || d.Cache != "writeback" || d.AIO != "threads" || d.Serial != n.Serial || len(d.Serial) > 20 {
		t.Fatalf("disk %+v (want path %s, read-only, writeback/threads)", d, dev)
	}
	if n.ContainerPath != "/dev/xvda" || n.FileMode != 0o640 || n.Uid != 7 || n.Gid != 8 {
		t.Fatalf("node %+v", n)
	}
	if len(spec.Linux.Devices) != 0 || len(spec.Linux.Resources.Devices) != 1 {
		t.Fatalf("host device left in the spec: %+v %+v", spec.Linux.Devices, spec.Linux.Resources.Devices)
	}

	// Privileged: the host's own node of the device is not taken, a CRI device path is.
	spec = &specs.Spec{Linux: &specs.Linux{
		Devices: []specs.LinuxDevice{
			{Path: dev, Type: "b", Major: major, Minor: minor},
			{Path: "/dev/xvdb", Type: "b", Major: major, Minor: minor},
		},
		Resources: &specs.LinuxResources{Devices: []specs.LinuxDeviceCgroup{{Allow: true, Access: "rwm"}}},
	}}
	disks, _, err = s.blockVolumes("c1", spec)
	if err != nil || len(disks) != 1 || disks[0].ReadOnly || len(spec.Linux.Devices) != 1 || spec.Linux.Devices[0].Path != dev {
		t.Fatalf("privileged: %v %v %+v", disks, err, spec.Linux.Devices)
	}

	// A device the host does not have.
	spec = &specs.Spec{Linux: &specs.Linux{Devices: []specs.LinuxDevice{{Path: "/dev/xvda", Type: "b", Major: 4000, Minor: 4000}}}}
	if _, _, err := s.blockVolumes("c1", spec); !errdefs.IsNotFound(err) {
		t.Fatalf("missing device: %v", err)
	}
}

const testPodUID = "0b6c3f4e-pod"

func diskSpec(src string, ann map[string]string, ro bool) *specs.Spec {
	opts := []string{"rbind", "rw"}
	if ro {
		opts = []string{"rbind", "ro"}
	}
	a := map[string]string{PodUIDAnnotation: testPodUID}
	for k, v := range ann {
		a[k] = v
	}
	return &specs.Spec{
		Annotations: a,
		Linux:       &specs.Linux{},
		Mounts: []specs.Mount{
			{Destination: "/etc/hosts", Type: "bind", Source: "/etc/hosts", Options: []string{"rbind"}},
			{Destination: "/data", Type: "bind", Source: src, Options: opts},
		},
	}
}

// podVolumeDir makes kubelet's directory of a volume of pod uid.
func podVolumeDir(t *testing.T, root, uid, plugin, name string) string {
	t.Helper()
	d := filepath.Join(root, "pods", uid, "volumes", "kubernetes.io~"+plugin, name)
	if err := os.MkdirAll(d, 0o755); err != nil {
		t.Fatal(err)
	}
	return d
}

func closeAll(ds []*diskImage) {
	for _, d := range ds {
		d.file.Close()
	}
}

// diskAllowed is the node's annotations.allowed for disk images.
func diskAllowed(k string) bool { return strings.HasPrefix(k, "podvm.io/disk.") }

// diskVolume skips the test without mkfs.ext4 and makes a volume "data" of plugin's kind for
// this pod under a new kubelet root.
func diskVolume(t *testing.T, plugin string) (root, vol string) {
	t.Helper()
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		t.Skip("no mkfs.ext4")
	}
	root = t.TempDir()
	return root, podVolumeDir(t, root, testPodUID, plugin, "data")
}

// dataDisk is a spec that mounts vol at /data and asks for a 64Mi disk image for it.
func dataDisk(vol string, ro bool) *specs.Spec {
	return diskSpec(vol, map[string]string{"podvm.io/disk.data": "64Mi"}, ro)
}

// TestDiskImagesRefused: what diskImages refuses before it makes an image, and what it ignores.
func TestDiskImagesRefused(t *testing.T) {
	ctx := context.Background()
	_, vol := diskVolume(t, "empty-dir")
	s := (&Share{}).WithBlock(BlockOptions{Cache: "none", AIO: "threads", Allowed: diskAllowed})

	// Not allowed: ignored, the volume stays a shared directory.
	if ds, err := (&Share{}).diskImages(ctx, "c1", dataDisk(vol, false)); err != nil || len(ds) != 0 {
		t.Fatalf("not allowed: %v %v", ds, err)
	}

	// A size that does not parse names the annotation and the volume.
	spec := diskSpec(vol, map[string]string{"podvm.io/disk.data": "lots"}, false)
	if _, err := s.diskImages(ctx, "c1", spec); !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "podvm.io/disk.data") || !strings.Contains(err.Error(), "volume data") {
		t.Fatalf("bad size: %v", err)
	}
	if _, err := os.Stat(filepath.Join(vol, DiskImageName)); err == nil {
		t.Fatal("an image was made for a bad annotation")
	}
	// Above the node's cap: refused before anything is made.
	capped := (&Share{}).WithBlock(BlockOptions{Allowed: diskAllowed, MaxDiskSize: 32 << 20})
	if _, err := capped.diskImages(ctx, "c1", dataDisk(vol, false)); !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "max_disk_size") {
		t.Fatalf("above the cap: %v", err)
	}
	// Read-only everywhere and no image yet: nothing is made.
	if _, err := s.diskImages(ctx, "c1", dataDisk(vol, true)); !errdefs.IsNotFound(err) || !strings.Contains(err.Error(), "read-only") {
		t.Fatalf("read-only without an image: %v", err)
	}
	if ents, _ := os.ReadDir(vol); len(ents) != 0 {
		t.Fatalf("made for a read-only volume: %v", ents)
	}
}

// TestDiskImagesMade: an image is made sparse and formatted and attached as an open file;
// read-only mounts get it read-only; a subPath of it is refused.
func TestDiskImagesMade(t *testing.T) {
	ctx := context.Background()
	root, vol := diskVolume(t, "empty-dir")
	s := (&Share{}).WithBlock(BlockOptions{Cache: "none", AIO: "threads", Allowed: diskAllowed})

	// Created sparse, formatted, attached as an open file.
	spec := diskSpec(vol, map[string]string{"podvm.io/disk.data": "64Mi", "podvm.io/disk.other": "1Gi"}, false)
	ds, err := s.diskImages(ctx, "c1", spec)
	if err != nil || len(ds) != 1 {
		t.Fatalf("%v %v", ds, err)
	}
	img := filepath.Join(vol, DiskImageName)
	fi, err := os.Stat(img)
	if err != nil || fi.Size() != 64<<20 {
		t.Fatalf("image: %v %v", fi, err)
	}
	if st := fi.Sys().(*syscall.Stat_t); st.Blocks*512 > 16<<20 {
		t.Errorf("image is not sparse: %d bytes allocated", st.Blocks*512)
	}
	if out, err := exec.Command("e2fsck", "-n", "-f", img).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck: %v: %s", err, out)
	}
	att := &Attachment{Spec: spec}
	s.attachDisks(att, ds)
	bd := att.BlockDevices[0]
	if len(att.BlockDevices) != 1 || bd.Path != img || bd.ReadOnly || bd.Cache != "none" || bd.File == nil {
		t.Fatalf("block devices %+v", bd)
	}
	if ffi, err := bd.File.Stat(); err != nil || !os.SameFile(ffi, fi) {
		t.Fatalf("the attached file is not the image: %v", err)
	}
	if len(att.BlockMounts) != 1 || att.BlockMounts[0].FsType != "ext4" || spec.Mounts[1].Source != att.BlockMounts[0].MountPoint || spec.Mounts[0].Source != "/etc/hosts" {
		t.Fatalf("mounts %+v spec %+v", att.BlockMounts, spec.Mounts)
	}
	att.Close()

	// Read-only mounts give a read-only disk, opened read-only.
	ds, err = s.diskImages(ctx, "c1", dataDisk(vol, true))
	if err != nil || len(ds) != 1 || !ds[0].allRO {
		t.Fatalf("ro: %v %v", ds, err)
	}
	if _, err := ds[0].file.Write([]byte("x")); err == nil {
		t.Error("a read-only disk's file is writable")
	}
	closeAll(ds)

	// A subPath of a disk-image volume is refused.
	if _, err := s.diskImages(ctx, "c1", dataDisk(filepath.Join(root, "pods", testPodUID, "volume-subpaths/data/c/1"), false)); !errdefs.IsNotImplemented(err) {
		t.Fatalf("subPath: %v", err)
	}
}

// TestDiskImagesBroken: a corrupt or truncated image is refused with what to do, and mkfs
// failing leaves nothing behind.
func TestDiskImagesBroken(t *testing.T) {
	ctx := context.Background()
	_, vol := diskVolume(t, "empty-dir")
	s := (&Share{}).WithBlock(BlockOptions{Cache: "none", AIO: "threads", Allowed: diskAllowed})
	img := filepath.Join(vol, DiskImageName)
	spec := dataDisk(vol, false)

	if err := os.WriteFile(img, make([]byte, 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := s.diskImages(ctx, "c1", spec); !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "no ext4") {
		t.Fatalf("corrupt: %v", err)
	}
	if err := os.WriteFile(img, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := s.diskImages(ctx, "c1", spec); !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "too short") {
		t.Fatalf("truncated: %v", err)
	}
	os.Remove(img)
	bad := (&Share{}).WithBlock(BlockOptions{Allowed: diskAllowed, Mkfs: "/bin/false"})
	if _, err := bad.diskImages(ctx, "c1", spec); err == nil || !strings.Contains(err.Error(), "formatting") {
		t.Fatalf("mkfs failure: %v", err)
	}
	if ents, _ := os.ReadDir(vol); len(ents) != 0 {
		t.Fatalf("left in the volume: %v", ents)
	}
}

// TestDiskImagesOnlyThisPodsVolumes: the annotation turns only this pod's own emptyDir or
// persistent volumes into disks, never a hostPath, another pod's volume or a volume kubelet
// fills, whatever their base name.
func TestDiskImagesOnlyThisPodsVolumes(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	s := (&Share{}).WithBlock(BlockOptions{Allowed: diskAllowed})
	ann := map[string]string{"podvm.io/disk.data": "64Mi"}
	hostPath := filepath.Join(root, "host", "data")
	if err := os.MkdirAll(hostPath, 0o755); err != nil {
		t.Fatal(err)
	}
	notDisks := map[string]string{
		"hostPath":         hostPath,
		"another pod's":    podVolumeDir(t, root, "other-pod", "empty-dir", "data"),
		"a sub dir":        filepath.Join(podVolumeDir(t, root, testPodUID, "empty-dir", "x"), "data"),
		"containerd files": "/etc/hosts",
	}
	for name, src := range notDisks {
		ds, err := s.diskImages(ctx, "c1", diskSpec(src, ann, false))
		if err != nil || len(ds) != 0 {
			t.Errorf("%s volume %s: %v %v, want no disk", name, src, ds, err)
		}
	}
	for _, plugin := range []string{"configmap", "secret", "projected", "downward-api"} {
		src := podVolumeDir(t, root, testPodUID, plugin, "data")
		if _, err := s.diskImages(ctx, "c1", diskSpec(src, ann, false)); !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "kubelet fills") {
			t.Errorf("%s volume: %v, want refused", plugin, err)
		}
		if ents, _ := os.ReadDir(src); len(ents) != 0 {
			t.Errorf("made in a %s volume: %v", plugin, ents)
		}
	}
	if _, err := s.diskImages(ctx, "c1", &specs.Spec{Annotations: ann, Mounts: diskSpec(hostPath, nil, false).Mounts}); !errdefs.IsInvalidArgument(err) {
		t.Errorf("no pod UID: %v, want refused", err)
	}
	// CSI publishes at <name>/mount.
	csi := filepath.Join(podVolumeDir(t, root, testPodUID, "csi", "data"), "mount")
	if name, plugin, ok := podVolume(csi, testPodUID); !ok || name != "data" || plugin != "kubernetes.io~csi" {
		t.Errorf("podVolume(%s) = %q %q %v", csi, name, plugin, ok)
	}
}

// plantFixture is a share that makes disk images, a CSI volume and a host disk outside it
// for a pod to link to.
func plantFixture(t *testing.T) (s *Share, vol, victim string, victimInfo os.FileInfo) {
	t.Helper()
	root, vol := diskVolume(t, "csi")
	victim, victimInfo = hostDisk(t, root)
	return (&Share{}).WithBlock(BlockOptions{Allowed: diskAllowed}), vol, victim, victimInfo
}

// hostDisk makes a "host disk": a valid ext4 image under root, outside any volume.
func hostDisk(t *testing.T, root string) (string, os.FileInfo) {
	t.Helper()
	victim := filepath.Join(root, "host-disk.img")
	if err := os.WriteFile(victim, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(victim, 32<<20); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", victim).CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	fi, err := os.Stat(victim)
	if err != nil {
		t.Fatal(err)
	}
	return victim, fi
}

// TestDiskImagePlantedLinks: an image name that a pod sharing the volume turned into a
// symlink or a hard link to a host file is refused.
func TestDiskImagePlantedLinks(t *testing.T) {
	ctx := context.Background()
	s, vol, victim, _ := plantFixture(t)
	img := filepath.Join(vol, DiskImageName)

	if err := os.Symlink(victim, img); err != nil {
		t.Fatal(err)
	}
	if _, err := s.diskImages(ctx, "c1", dataDisk(vol, false)); !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "symbolic link") {
		t.Errorf("symlinked image: %v, want refused", err)
	}
	os.Remove(img)
	if err := os.Link(victim, img); err != nil {
		t.Fatal(err)
	}
	if _, err := s.diskImages(ctx, "c1", dataDisk(vol, false)); !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "hard links") {
		t.Errorf("hard-linked image: %v, want refused", err)
	}
}

// TestDiskImageSwapRace: the pod keeps swapping the image's name between a real image and a
// symlink to a host disk while the shim opens it; the host disk is never opened for the VM.
func TestDiskImageSwapRace(t *testing.T) {
	ctx := context.Background()
	s, vol, victim, vfi := plantFixture(t)
	img := filepath.Join(vol, DiskImageName)

	if ds, err := s.diskImages(ctx, "c1", dataDisk(vol, false)); err != nil {
		t.Fatal(err)
	} else {
		closeAll(ds)
	}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		link := filepath.Join(vol, "link")
		realImg := filepath.Join(vol, "realImg")
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			_ = os.Symlink(victim, link)
			_ = os.Rename(img, realImg)
			_ = os.Rename(link, img)
			_ = os.Rename(img, link)
			_ = os.Rename(realImg, img)
		}
	}()
	opened, refused := 0, 0
	for i := 0; i < 2000; i++ {
		ds, err := s.diskImages(ctx, "c1", dataDisk(vol, false))
		if err != nil {
			refused++
			continue
		}
		opened++
		if fi, err := ds[0].file.Stat(); err != nil || os.SameFile(fi, vfi) {
			t.Fatalf("try %d: the VM would get the host disk (%v)", i, err)
		}
		closeAll(ds)
	}
	close(stop)
	<-done
	t.Logf("2000 tries against a racing pod: %d opened the real image, %d refused, 0 reached the host disk", opened, refused)
}

// A pod volume path whose last element is a symlink (to a hostPath dir, say) is not the
// volume kubelet made: no image is made or opened through it.
func TestDiskImageVolumeDirIsNoSymlink(t *testing.T) {
	root := t.TempDir()
	host := filepath.Join(root, "host")
	if err := os.MkdirAll(host, 0o755); err != nil {
		t.Fatal(err)
	}
	vol := filepath.Join(root, "pods", testPodUID, "volumes", "kubernetes.io~empty-dir", "data")
	if err := os.MkdirAll(filepath.Dir(vol), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(host, vol); err != nil {
		t.Fatal(err)
	}
	s := (&Share{}).WithBlock(BlockOptions{Allowed: diskAllowed})
	spec := diskSpec(vol, map[string]string{"podvm.io/disk.data": "64Mi"}, false)
	if _, err := s.diskImages(context.Background(), "c1", spec); err == nil {
		t.Error("a symlinked volume dir was used")
	}
	if ents, _ := os.ReadDir(host); len(ents) != 0 {
		t.Errorf("made in the symlink's target: %v", ents)
	}
}
