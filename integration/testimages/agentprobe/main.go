// Command agentprobe is what a process in a pod's container can try against the guest's
// agent: it dials the agent's vsock port through the guest's vsock loopback (CID 1) and asks
// for the agent's version. It prints "answered ..." when the agent served it, "refused ..."
// when not.
//
// First it checks that vsock loopback works from where it runs at all (a listener of its
// own on another port), so a refusal is the agent's doing, not a sandbox's. It uses the
// socket calls directly: a container has no /dev/vsock. Run by the integration tests in a
// pod's container (TestPodvmContainerCannotReachAgent).
package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"github.com/containerd/ttrpc"
	"golang.org/x/sys/unix"

	"github.com/podvm/podvm/agent/api"
	"github.com/podvm/podvm/hypervisor"
)

const controlPort = 5555

func main() {
	if err := control(); err != nil {
		fmt.Printf("control: vsock loopback does not work here: %v\n", err)
		os.Exit(2)
	}
	fmt.Println("control: vsock loopback works")
	if v, err := version(unix.VMADDR_CID_LOCAL); err != nil {
		fmt.Printf("refused cid %d: %v\n", unix.VMADDR_CID_LOCAL, err)
	} else {
		fmt.Printf("answered cid %d: agent %s\n", unix.VMADDR_CID_LOCAL, v)
	}
}

// control listens on controlPort and talks to itself through vsock loopback.
func control() error {
	lfd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	defer func() { _ = unix.Close(lfd) }()
	if err := unix.Bind(lfd, &unix.SockaddrVM{CID: unix.VMADDR_CID_ANY, Port: controlPort}); err != nil {
		return fmt.Errorf("bind: %w", err)
	}
	if err := unix.Listen(lfd, 1); err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	go func() {
		if nfd, _, err := unix.Accept(lfd); err == nil {
			_, _ = unix.Write(nfd, []byte("ok"))
			_ = unix.Close(nfd)
		}
	}()
	c, err := dial(unix.VMADDR_CID_LOCAL, controlPort)
	if err != nil {
		return err
	}
	defer func() { _ = c.Close() }()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c)
	if err != nil || string(b) != "ok" {
		return fmt.Errorf("read %q: %v", b, err)
	}
	return nil
}

// version asks the agent on cid for its version.
func version(cid uint32) (string, error) {
	c, err := dial(cid, hypervisor.AgentVsockPort)
	if err != nil {
		return "", err
	}
	tc := ttrpc.NewClient(c)
	defer func() { _ = tc.Close() }()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	v, err := api.NewAgentClient(tc).Version(ctx, &api.VersionRequest{})
	if err != nil {
		return "", err
	}
	return v.AgentVersion, nil
}

// dial connects a vsock stream socket to cid:port.
func dial(cid, port uint32) (net.Conn, error) {
	fd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socket: %w", err)
	}
	if err := unix.Connect(fd, &unix.SockaddrVM{CID: cid, Port: port}); err != nil {
		_ = unix.Close(fd)
		return nil, fmt.Errorf("connect %d:%d: %w", cid, port, err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		_ = unix.Close(fd)
		return nil, err
	}
	return conn{os.NewFile(uintptr(fd), "vsock")}, nil
}

// conn is a vsock stream as a net.Conn (the net package knows no AF_VSOCK).
type conn struct{ *os.File }

type vsockAddr struct{}

func (vsockAddr) Network() string { return "vsock" }
func (vsockAddr) String() string  { return "vsock" }

func (conn) LocalAddr() net.Addr  { return vsockAddr{} }
func (conn) RemoteAddr() net.Addr { return vsockAddr{} }
