// Package nettest makes throw-away network namespaces and veth pairs for tests of podvm's
// networking. Everything it creates is removed by the test's cleanup.
package nettest

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// NetnsDir is where named netns live (what `ip netns` uses).
const NetnsDir = "/run/netns"

// Require skips the test unless it runs as root with /dev/net/tun, or fails it when CI=true,
// where a missing prerequisite is a broken setup.
func Require(t testing.TB) {
	t.Helper()
	var missing []string
	if os.Geteuid() != 0 {
		missing = append(missing, "root")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		missing = append(missing, "/dev/net/tun")
	}
	if len(missing) == 0 {
		return
	}
	msg := fmt.Sprintf("missing prerequisites %v", missing)
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// Netns creates a named network namespace with lo up and returns its path; the test's cleanup
// deletes it.
func Netns(t testing.TB) string {
	t.Helper()
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	name := fmt.Sprintf("podvm-t%d-%s", os.Getpid(), hex.EncodeToString(b))
	err := Do("", func() error {
		ns, err := netns.NewNamed(name) // unshares this (locked) thread into the new netns
		if err != nil {
			return err
		}
		return ns.Close()
	})
	if err != nil {
		t.Fatalf("create netns %s: %v", name, err)
	}
	path := filepath.Join(NetnsDir, name)
	t.Cleanup(func() {
		if err := netns.DeleteNamed(name); err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Errorf("delete netns %s: %v", name, err)
		}
	})
	h := Handle(t, path)
	lo, err := h.LinkByName("lo")
	if err == nil {
		err = h.LinkSetUp(lo)
	}
	if err != nil {
		t.Fatalf("netns %s: lo up: %v", path, err)
	}
	return path
}

// Do runs fn on a locked OS thread inside the netns at path ("" for a thread whose netns fn
// may change), then puts the thread back into its netns, or discards it when it cannot.
func Do(path string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- err
			return
		}
		defer func() { _ = orig.Close() }()
		if path != "" {
			target, err := netns.GetFromPath(path)
			if err != nil {
				errc <- err
				return
			}
			err = netns.Set(target)
			_ = target.Close()
			if err != nil {
				errc <- err
				return
			}
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			errc <- errors.Join(ferr, err)
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// Handle returns a netlink handle bound to the netns at path, closed by the test's cleanup.
func Handle(t testing.TB, path string) *netlink.Handle {
	t.Helper()
	ns, err := netns.GetFromPath(path)
	if err != nil {
		t.Fatalf("open netns %s: %v", path, err)
	}
	defer func() { _ = ns.Close() }()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatalf("netlink handle in %s: %v", path, err)
	}
	t.Cleanup(h.Close)
	return h
}

// End is one end of a veth pair.
type End struct {
	Netns string // netns path
	Name  string
	Addr  string // CIDR, optional
	MTU   int    // 0: the kernel's default
}

// Veth creates a veth pair from a to b (each in its own netns), gives each end its address and
// MTU, brings both up and returns the two links. Deleting a netns deletes the pair.
func Veth(t testing.TB, a, b End) (netlink.Link, netlink.Link) {
	t.Helper()
	ha, hb := Handle(t, a.Netns), Handle(t, b.Netns)
	nsb, err := netns.GetFromPath(b.Netns)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = nsb.Close() }()
	v := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: a.Name, MTU: a.MTU}, PeerName: b.Name, PeerNamespace: netlink.NsFd(nsb)}
	if err := ha.LinkAdd(v); err != nil {
		t.Fatalf("add veth %s (%s) — %s (%s): %v", a.Name, a.Netns, b.Name, b.Netns, err)
	}
	var links []netlink.Link
	for _, e := range []struct {
		h *netlink.Handle
		End
	}{{ha, a}, {hb, b}} {
		l, err := e.h.LinkByName(e.Name)
		if err != nil {
			t.Fatalf("%s in %s: %v", e.Name, e.Netns, err)
		}
		if e.MTU != 0 {
			if err := e.h.LinkSetMTU(l, e.MTU); err != nil {
				t.Fatalf("%s: mtu: %v", e.Name, err)
			}
		}
		if e.Addr != "" {
			addr, err := netlink.ParseAddr(e.Addr)
			if err != nil {
				t.Fatal(err)
			}
			addr.Flags |= 0x02 // IFA_F_NODAD: usable at once
			if err := e.h.AddrAdd(l, addr); err != nil {
				t.Fatalf("%s: add %s: %v", e.Name, e.Addr, err)
			}
		}
		if err := e.h.LinkSetUp(l); err != nil {
			t.Fatalf("%s: up: %v", e.Name, err)
		}
		if l, err = e.h.LinkByName(e.Name); err != nil {
			t.Fatal(err)
		}
		links = append(links, l)
	}
	return links[0], links[1]
}

// Listen opens a TCP listener inside the netns at path (the socket stays in that netns).
func Listen(t testing.TB, path, addr string) net.Listener {
	t.Helper()
	var l net.Listener
	err := Do(path, func() error {
		var err error
		l, err = net.Listen("tcp", addr)
		return err
	})
	if err != nil {
		t.Fatalf("listen on %s in %s: %v", addr, path, err)
	}
	t.Cleanup(func() { _ = l.Close() })
	return l
}

// Leftovers lists the named netns this process created that still exist.
func Leftovers() []string {
	m, _ := filepath.Glob(filepath.Join(NetnsDir, fmt.Sprintf("podvm-t%d-*", os.Getpid())))
	return m
}
