package qemu

import (
	"fmt"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// danglingTap returns a tap that leads nowhere: made in a network namespace of its own that
// nothing else uses, its link down. It backs a templated VM's first NIC where there is no pod
// NIC for it. Its open file keeps the tap and the namespace alive (the tap's socket holds the
// namespace); they go when the last copy of the file closes, so nothing is left to clean up.
// It has a virtio-net header, as a pod's taps do: the offloads the guest negotiates with the
// template's NIC must be there in every clone.
func danglingTap() (*os.File, error) {
	type result struct {
		f   *os.File
		err error
	}
	ch := make(chan result, 1)
	// On a thread of its own, which goes back to its namespace afterwards (the main thread,
	// which a locked goroutine that ends does not take down, would otherwise stay in it).
	go func() {
		runtime.LockOSThread()
		orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			ch <- result{err: fmt.Errorf("this thread's network namespace: %w", err)}
			return
		}
		defer func() { _ = unix.Close(orig) }()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			ch <- result{err: fmt.Errorf("new network namespace: %w", err)}
			return
		}
		f, err := newTap()
		// Back to where the thread was; a thread that cannot go back stays locked, and the
		// Go runtime discards it with this goroutine.
		if serr := unix.Setns(orig, unix.CLONE_NEWNET); serr != nil {
			if f != nil {
				_ = f.Close()
			}
			ch <- result{err: fmt.Errorf("return to the network namespace: %w", serr)}
			return
		}
		runtime.UnlockOSThread()
		ch <- result{f, err}
	}()
	r := <-ch
	return r.f, r.err
}

// newTap creates a tap in the calling thread's network namespace.
func newTap() (*os.File, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open /dev/net/tun: %w", err)
	}
	f := os.NewFile(uintptr(fd), "/dev/net/tun:template")
	ifr, err := unix.NewIfreq("tap0")
	if err == nil {
		ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
		err = unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr)
	}
	if err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("create tap (TUNSETIFF): %w", err)
	}
	return f, nil
}
