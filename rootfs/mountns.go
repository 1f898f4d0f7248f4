package rootfs

import (
	"errors"
	"fmt"
	"runtime"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"
)

// The share's mounts live in a mount namespace of the shim's own, never in the node's: a
// copy of a volume's sub-mount in the node's namespace would keep the node's directory a
// mount point there, so the node could not remove it (rmdir fails with EBUSY while a
// directory is a mount point in the caller's namespace; copies in other namespaces are
// detached instead, as for runc's containers).
//
// The namespace is held by one OS thread that unshared it and serves calls until the share
// is closed. It is never returned to Go's pool: the goroutine keeps it locked, so the thread
// ends with it and no other goroutine ever runs there. (A process cannot setns(2) into a
// mount namespace once it has several threads, and Go's always has, so the thread that made
// the namespace is the only way in.) Processes started from that thread, virtiofsd, are born
// in the namespace; the namespace dies with the thread and those processes.
//
// What works where: a mount can be cloned (open_tree) only in the namespace it belongs to,
// and attached (move_mount) only into the caller's namespace. So volume sources are opened
// and cloned by the shim's ordinary threads, in the node's namespace, where kubelet made
// them (mounts made there after the pod started included: no propagation from the node is
// needed), and the detached clone is attached by the namespace's thread. Anything that
// reads the mount table or unmounts runs on that thread too and reads its own table
// (/proc/thread-self).

// mountNS is the share's mount namespace and the thread that holds it.
type mountNS struct {
	calls chan func()
	stop  chan struct{}
	done  chan struct{}
	once  sync.Once
	tid   int // the thread's id, for its /proc/<pid>/task/<tid> view (tests, messages)
}

// errNSClosed is returned by run once the namespace is gone.
var errNSClosed = errors.New("the share's mount namespace is closed")

// newMountNS starts a thread in a new mount namespace, a copy of the caller's whose mounts
// all turned slaves: nothing mounted in it propagates back to the node.
func newMountNS() (*mountNS, error) {
	n := &mountNS{calls: make(chan func()), stop: make(chan struct{}), done: make(chan struct{})}
	ready := make(chan error, 1)
	go n.serve(ready, nil)
	if err := <-ready; err != nil {
		<-n.done
		return nil, err
	}
	return n, nil
}

// serve locks its goroutine to a thread, unshares the namespace there and runs calls until
// close. The thread is never the process's main thread: that one is what /proc/self shows
// (the node's namespace must stay there), and Go never ends it. A goroutine that finds itself
// on it hands over to another goroutine, which cannot be scheduled there while it holds the
// main thread locked, and closes handedOver once it holds its own thread.
func (n *mountNS) serve(ready chan<- error, handedOver chan<- struct{}) {
	runtime.LockOSThread() // unlocked only on the main thread, untouched; else the thread ends with us
	if handedOver != nil {
		close(handedOver)
	}
	if unix.Gettid() == unix.Getpid() {
		h := make(chan struct{})
		go n.serve(ready, h)
		<-h
		runtime.UnlockOSThread() // untouched: back to the pool
		return
	}
	defer close(n.done)
	if err := unix.Unshare(unix.CLONE_NEWNS); err != nil {
		ready <- fmt.Errorf("creating the share's mount namespace: %w", err)
		return
	}
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_SLAVE, ""); err != nil {
		ready <- fmt.Errorf("making the share's mount namespace a slave of the node's: %w", err)
		return
	}
	n.tid = unix.Gettid()
	ready <- nil
	for {
		select {
		case f := <-n.calls:
			f()
		case <-n.stop:
			return
		}
	}
}

// run runs f on the namespace's thread and returns its error. f must not call run.
func (n *mountNS) run(f func() error) error {
	errc := make(chan error, 1)
	select {
	case n.calls <- func() { errc <- f() }:
		return <-errc
	case <-n.done:
		return errNSClosed
	}
}

// close ends the thread, and with it the namespace once no process started from it is
// left. It is idempotent.
func (n *mountNS) close() {
	n.once.Do(func() { close(n.stop) })
	<-n.done
}

// view is the namespace's root as a path of the node's (through the thread's /proc entry),
// for tests and people looking at a running share.
func (n *mountNS) view() string {
	return "/proc/" + strconv.Itoa(unix.Getpid()) + "/task/" + strconv.Itoa(n.tid) + "/root"
}
