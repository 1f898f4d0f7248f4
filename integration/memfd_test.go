package integration

import (
	"math"
	"testing"

	"golang.org/x/sys/unix"
)

// TestUnmappedMemfd: a memfd whose pages were written through the file but only partly
// mapped (as a templated pod's guest RAM: the shim copies the template into it, QEMU maps
// what the guest touches) is memory that no process's PSS shows; unmappedMemfdMiB finds it.
func TestUnmappedMemfd(t *testing.T) {
	const size, touched = 8 << 20, 2 << 20
	fd, err := unix.MemfdCreate("podvm-test-ram", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if _, err := unix.Pwrite(fd, make([]byte, size), 0); err != nil {
		t.Fatal(err)
	}
	m, err := unix.Mmap(fd, 0, size, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = unix.Munmap(m) }()
	sum := 0
	for i := 0; i < touched; i += 4096 {
		sum += int(m[i]) // a read fault maps the page
	}
	t.Logf("read %d MiB of the mapping (sum %d)", touched>>20, sum)

	got, err := unmappedMemfdMiB([]int{unix.Getpid()})
	if err != nil {
		t.Fatal(err)
	}
	if want := float64(size-touched) / (1 << 20); math.Abs(got-want) > 0.1 {
		t.Errorf("unmappedMemfdMiB = %.2f MiB, want %.2f (8 MiB written, 2 MiB of it mapped)", got, want)
	}
}
