package guest

import (
	"os"
	"path/filepath"
	"testing"
)

// A fake sysfs: vda on the root port at 00:05.0 (bus 1), vdb on the one at 00:06.0 (bus 2),
// and two slots both numbered 0 as QEMU's root ports number them ("0" and "0-1").
func fakeSlotSysfs(t *testing.T) (sysBlock, slots string) {
	t.Helper()
	root := t.TempDir()
	sysBlock, slots = filepath.Join(root, "block"), filepath.Join(root, "slots")
	for name, fn := range map[string]string{"vda": "0000:00:05.0/0000:01:00.0", "vdb": "0000:00:06.0/0000:02:00.0"} {
		virtio := filepath.Join(root, "devices/pci0000:00", fn, "virtio"+name)
		if err := os.MkdirAll(virtio, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(filepath.Join(sysBlock, name), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(virtio, filepath.Join(sysBlock, name, "device")); err != nil {
			t.Fatal(err)
		}
	}
	for slot, addr := range map[string]string{"0": "0000:01:00", "0-1": "0000:02:00"} {
		if err := os.MkdirAll(filepath.Join(slots, slot), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(slots, slot, "address"), []byte(addr+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return sysBlock, slots
}

func TestDiskSlot(t *testing.T) {
	sysBlock, slots := fakeSlotSysfs(t)
	for disk, want := range map[string]string{"vda": "0", "vdb": "0-1"} {
		got, err := diskSlot(sysBlock, slots, disk)
		if err != nil {
			t.Fatalf("%s: %v", disk, err)
		}
		if got != filepath.Join(slots, want) {
			t.Errorf("%s: slot %s, want %s", disk, got, want)
		}
	}
	if _, err := diskSlot(sysBlock, slots, "vdc"); err == nil {
		t.Error("a disk that is not there: no error")
	}
	if err := os.RemoveAll(filepath.Join(slots, "0-1")); err != nil {
		t.Fatal(err)
	}
	if _, err := diskSlot(sysBlock, slots, "vdb"); err == nil {
		t.Error("a disk in no hot-plug slot (cold-plugged): no error")
	}
}
