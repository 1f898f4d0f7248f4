package qemu

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// TestDanglingTap: the tap a template's NIC gets where there is no pod NIC is a tap with a
// virtio-net header (the guest negotiates its offloads with it), in a network namespace of
// its own, and making it leaves every thread of the process in the namespace it was in.
func TestDanglingTap(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("needs root (a tap in a new network namespace)")
		}
		t.Skip("needs root (a tap in a new network namespace)")
	}
	var before unix.Stat_t
	if err := unix.Stat("/proc/self/ns/net", &before); err != nil {
		t.Fatal(err)
	}
	// Several, so that one likely runs on the main thread, which a locked goroutine that
	// ends leaves wedged rather than gone.
	for range 8 {
		tap, err := danglingTap()
		if err != nil {
			t.Fatal(err)
		}
		checkDanglingTap(t, tap, before.Ino)
		_ = tap.Close()
	}
	threads, err := filepath.Glob("/proc/self/task/*/ns/net")
	if err != nil || len(threads) == 0 {
		t.Fatalf("threads: %v %v", threads, err)
	}
	for _, p := range threads {
		var st unix.Stat_t
		if err := unix.Stat(p, &st); err == nil && st.Ino != before.Ino {
			t.Errorf("%s: left in network namespace %d, not the process's %d", p, st.Ino, before.Ino)
		}
	}
}

func checkDanglingTap(t *testing.T, tap *os.File, hostNS uint64) {
	t.Helper()
	fd := int(tap.Fd())
	ifr, err := unix.NewIfreq("")
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.IoctlIfreq(fd, unix.TUNGETIFF, ifr); err != nil {
		t.Fatalf("TUNGETIFF: %v", err)
	}
	if flags := ifr.Uint16(); flags&unix.IFF_TAP == 0 || flags&unix.IFF_VNET_HDR == 0 || flags&unix.IFF_NO_PI == 0 {
		t.Errorf("tap flags %#x, want IFF_TAP|IFF_NO_PI|IFF_VNET_HDR", flags)
	}
	nsfd, err := unix.IoctlRetInt(fd, unix.TUNGETDEVNETNS)
	if err != nil {
		t.Fatalf("TUNGETDEVNETNS: %v", err)
	}
	defer unix.Close(nsfd)
	var tapNS unix.Stat_t
	if err := unix.Fstat(nsfd, &tapNS); err != nil {
		t.Fatal(err)
	}
	if tapNS.Ino == hostNS {
		t.Error("the tap is in the process's network namespace")
	}
	// Nothing is up at the other end: a frame written to it goes nowhere (the link is down).
	if _, err := unix.Write(fd, make([]byte, 64)); err == nil {
		t.Error("a write to the tap succeeded; its link should be down")
	}
}
