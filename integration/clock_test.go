package integration

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"regexp"
	"strings"
	"testing"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/podvm/podvm/integration/harness"
)

// clockTolerance is how far a pod's wall clock may be from the node's. runc's containers read
// the node's clock itself; a pod VM's guest is set to it by a round trip over the agent's
// channel, good to a few milliseconds.
const clockTolerance = 20 * time.Millisecond

// TestContainerClock: a pod reads the wall clock the node reads. A pod VM's guest kernel
// starts from the emulated RTC, which counts whole seconds, so left alone a booted guest runs
// up to a second behind the node: certificates not yet valid, timestamps out of order against
// the node's. Each pod is a fresh VM (a fresh boot, a fresh fraction of a second).
func TestContainerClock(t *testing.T) {
	for _, handler := range handlers {
		t.Run(handler, func(t *testing.T) {
			env := envFor(t, handler)
			ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
			defer cancel()
			for i := range 3 {
				pod := runPodWithBusybox(ctx, t, env, harness.PodOptions{Name: fmt.Sprintf("clock-%d", i), Handler: criHandler(handler)})
				startSleeper(ctx, t, env, pod, "clock")
				checkClock(ctx, t, env, pod)
				removePod(ctx, t, env, pod)
			}
			env.AssertNoLeaks(t)
		})
	}
}

// checkClock fails t unless pod's wall clock is within clockTolerance of the node's.
func checkClock(ctx context.Context, t *testing.T, env *harness.Env, pod *harness.Pod) {
	t.Helper()
	off, rtt := podClockOffset(ctx, t, env, pod)
	t.Logf("pod %s: its clock minus the node's %v (ICMP round trip %v)", pod.ID[:12], off, rtt)
	if off.Abs() > clockTolerance+rtt/2+time.Millisecond {
		t.Errorf("pod %s's wall clock is %v off the node's; want within %v", pod.ID[:12], off, clockTolerance)
	}
}

// podClockOffset measures pod's wall clock minus the node's with ICMP timestamp requests
// (RFC 792) from the node's side of the pod network: the pod's kernel (the guest's, for a
// pod VM) stamps each request with its clock, in milliseconds since midnight UTC. Of ten, the
// one with the shortest round trip counts, against the midpoint of its trip: good to half
// that trip and a millisecond.
func podClockOffset(ctx context.Context, t *testing.T, env *harness.Env, pod *harness.Pod) (offset, rtt time.Duration) {
	t.Helper()
	st, err := env.Runtime.PodSandboxStatus(ctx, pod.ID, false)
	if err != nil {
		t.Fatal(err)
	}
	ip := st.GetStatus().GetNetwork().GetIp()
	conn, err := env.DialContext(ctx, "ip4:icmp", ip)
	if err != nil {
		t.Fatalf("ICMP to pod %s at %s: %v", pod.ID[:12], ip, err)
	}
	defer func() { _ = conn.Close() }()
	ipc := conn.(*net.IPConn)
	const day = 24 * time.Hour
	sinceMidnight := func(at time.Time) time.Duration { return time.Duration(at.UnixNano()) % day }
	rtt = time.Hour
	buf := make([]byte, 1500)
	for seq := range 10 {
		req := make([]byte, 20)
		req[0] = 13 // timestamp request
		binary.BigEndian.PutUint16(req[6:], uint16(seq))
		sent := time.Now()
		binary.BigEndian.PutUint32(req[8:], uint32(sinceMidnight(sent).Milliseconds()))
		binary.BigEndian.PutUint16(req[2:], icmpChecksum(req))
		_ = ipc.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := ipc.Write(req); err != nil {
			t.Fatalf("ICMP timestamp request to %s: %v", ip, err)
		}
		for {
			n, _, err := ipc.ReadFrom(buf) // the IPv4 header stripped
			if err != nil {
				t.Fatalf("ICMP timestamp reply from %s: %v", ip, err)
			}
			if n >= 20 && buf[0] == 14 && binary.BigEndian.Uint16(buf[6:]) == uint16(seq) {
				break
			}
		}
		answered := time.Now()
		if d := answered.Sub(sent); d < rtt {
			received := time.Duration(binary.BigEndian.Uint32(buf[12:])) * time.Millisecond
			off := received - sinceMidnight(sent.Add(d/2))
			// Across midnight one side has wrapped.
			if off > day/2 {
				off -= day
			} else if off < -day/2 {
				off += day
			}
			rtt, offset = d, off
		}
		time.Sleep(20 * time.Millisecond)
	}
	return offset, rtt
}

// icmpChecksum is the Internet checksum of b (its checksum field zero).
func icmpChecksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// TestPodvmClockKept: the node's clock wins over the guest's own. A guest under TCG keeps time
// on the host's TSC at a measured frequency, and a container with CAP_SYS_TIME may move its
// pod VM's clock (the guest's, never the node's); the shim's pings read the guest's clock and
// correct it: a guest whose clock runs fast is slewed back a few milliseconds at a time, so
// that it never runs backwards; one set an hour ahead is stepped back.
func TestPodvmClockKept(t *testing.T) {
	env, ctx, pod := pingedPod(t, "clock")
	cfg := env.ContainerConfig(harness.ContainerOptions{Name: "clock", Command: []string{"sleep", "3600"}})
	cfg.Linux.SecurityContext.Capabilities = &runtimeapi.Capability{AddCapabilities: []string{"SYS_TIME"}}
	id := startContainer(t, ctx, env, pod, cfg)

	// 400 ppm fast: 0.4 ms more every second, which the kernel's slew (0.5 ms a second) outruns.
	sh(t, ctx, env, id, "adjtimex -f 26214400 >/dev/null")
	slewed := waitCorrection(ctx, t, env, pod.ID, "slewing", func(off time.Duration) bool { return off > 0 })
	t.Logf("a guest clock running 400 ppm fast: %s", slewed)
	sh(t, ctx, env, id, "adjtimex -f 0 >/dev/null")

	sh(t, ctx, env, id, "date -s @$(( $(date +%s) + 3600 )) >/dev/null")
	stepped := waitCorrection(ctx, t, env, pod.ID, "stepped", func(off time.Duration) bool { return off > 59*time.Minute })
	t.Logf("a guest clock set an hour ahead: %s", stepped)
	checkClock(ctx, t, env, pod)

	if log := readHostFile(t, env.ContainerdLog); strings.Contains(log, "could not be corrected") {
		t.Error("the shim could not correct the guest's clock (containerd's log)")
	}
	removePod(ctx, t, env, pod)
	env.AssertNoLeaks(t)
}

var clockCorrected = regexp.MustCompile(`msg="the guest's clock was (\S+) off the host's [^"]*; (\w+)".*sandbox=(\w+)`)

// waitCorrection waits up to a minute for the shim to log a correction ("slewing" or
// "stepped") of pod's guest clock whose offset satisfies match, and returns the log line.
func waitCorrection(ctx context.Context, t *testing.T, env *harness.Env, pod, how string, match func(time.Duration) bool) string {
	t.Helper()
	for deadline := time.Now().Add(time.Minute); ; {
		for _, m := range clockCorrected.FindAllStringSubmatch(readHostFile(t, env.ContainerdLog), -1) {
			if off, err := time.ParseDuration(m[1]); err == nil && m[2] == how && m[3] == pod && match(off) {
				return m[0]
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the shim logged no guest clock %s for such an offset in a minute", how)
		}
		select {
		case <-ctx.Done():
			t.Fatal(ctx.Err())
		case <-time.After(500 * time.Millisecond):
		}
	}
}
