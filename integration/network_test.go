package integration

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/podvm/podvm/integration/harness"
	"github.com/podvm/podvm/network"
)

// netTestMTU is the CNI bridge's MTU in the network tests: not the 1500 every NIC defaults to,
// so a guest that ignored the veth's MTU would show.
const netTestMTU = 1400

// webScript is the main container of the network tests' pods: an HTTP server on 8080 serving a
// greeting and 1 MiB of random bytes, and a TCP echo service on 9000 (nc -e cat per connection).
const webScript = `mkdir -p /www
echo "hello from $(hostname)" > /www/index.html
head -c 1048576 /dev/urandom > /www/big
nc -ll -p 9000 -e cat &
exec httpd -f -p 8080 -h /www`

// netPod is one pod of the network tests.
type netPod struct {
	name     string
	handler  string
	hostPort int32 // 0: none
	pod      *harness.Pod
	ctr      string // the main container
	ip       string
}

func (p *netPod) hostname() string { return "h-" + p.name }

// TestPodNetwork proves through the CRI alone that a podvm pod's network looks like a runc pod's
// on the same CNI bridge: the VM owns the pod IP (the node, other pods and hostPorts reach it),
// it reaches the gateway and other pods, DNS, hostname and MTU are the pod's, payloads arrive
// intact. hostNetwork is refused for podvm, and port-forward reaches the guest.
func TestPodNetwork(t *testing.T) {
	env := harness.Start(t, netOptions(t))
	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Minute)
	defer cancel()
	n := &netTest{ctx: ctx, env: env, gw: env.Gateway().String(), dns: &runtimeapi.DNSConfig{
		Servers:  []string{"10.96.0.10", "10.96.0.11"},
		Searches: []string{"it.svc.cluster.local", "svc.cluster.local"},
		Options:  []string{"ndots:5", "timeout:2"},
	}}

	t.Run("hostNetwork", func(t *testing.T) { testHostNetwork(ctx, t, env) })

	pods := []*netPod{
		{name: "web-runc", handler: "runc", hostPort: 18081},
		{name: "web-vm", handler: "podvm", hostPort: 18080},
		{name: "web-vm2", handler: "podvm"},
	}
	n.byName = map[string]*netPod{}
	for _, p := range pods {
		startNetPod(ctx, t, env, p, n.dns)
		n.byName[p.name] = p
	}

	// A listener of the node's on the gateway address: it tells each client the source address
	// it saw, which must be the pod IP (no NAT between pod and node).
	ln, err := env.Listen(n.gw + ":7070")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go serveSourceAddr(ln)

	for _, p := range pods {
		t.Run(p.name, func(t *testing.T) { n.testPod(t, p) })
	}
	t.Run("pod to pod", n.testPodToPod)
	t.Run("port-forward", n.testPortForward)

	assertNoNetLeaks(t, env, pods)
}

// netTest is what TestPodNetwork's subtests share: its pods (by name), the bridge's gateway
// and the DNS config every pod got.
type netTest struct {
	ctx    context.Context
	env    *harness.Env
	gw     string
	dns    *runtimeapi.DNSConfig
	byName map[string]*netPod
}

// serveSourceAddr answers every connection to ln with "from=<client address>" and closes it,
// until ln is closed.
func serveSourceAddr(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		host, _, _ := net.SplitHostPort(c.RemoteAddr().String())
		fmt.Fprintf(c, "from=%s\n", host)
		c.Close()
	}
}

// testPod checks one pod's network from the node and from inside the pod; the same for every
// handler.
func (n *netTest) testPod(t *testing.T, p *netPod) {
	t.Run("pod IP is the container's", func(t *testing.T) { n.testPodIP(t, p) })
	t.Run("node reaches the pod IP", func(t *testing.T) {
		body := httpGet(n.ctx, t, n.env, net.JoinHostPort(p.ip, "8080"), "/")
		if want := "hello from " + p.hostname() + "\n"; body != want {
			t.Errorf("GET http://%s:8080/ = %q, want %q", p.ip, body, want)
		}
	})
	t.Run("1 MiB both ways byte-exact", func(t *testing.T) { n.testPayloads(t, p) })
	t.Run("reaches the gateway", func(t *testing.T) {
		out := execOK(n.ctx, t, n.env, p.ctr, "ping -c 2 -W 5 "+n.gw)
		if !strings.Contains(out, "2 packets received") {
			t.Errorf("ping %s:\n%s", n.gw, out)
		}
		if out := execOK(n.ctx, t, n.env, p.ctr, "nc -w 10 "+n.gw+" 7070 </dev/null"); out != "from="+p.ip+"\n" {
			t.Errorf("the node's listener on %s:7070 says %q, want from=%s", n.gw, out, p.ip)
		}
	})
	t.Run("DNS config is the CRI's", func(t *testing.T) {
		got := nonEmptyLines(execOK(n.ctx, t, n.env, p.ctr, "cat /etc/resolv.conf"))
		want := []string{
			"nameserver " + n.dns.Servers[0], "nameserver " + n.dns.Servers[1],
			"search " + strings.Join(n.dns.Searches, " "), "options " + strings.Join(n.dns.Options, " "),
		}
		sort.Strings(want)
		if strings.Join(got, "\n") != strings.Join(want, "\n") {
			t.Errorf("/etc/resolv.conf has %q, want %q", got, want)
		}
	})
	t.Run("hostname is the pod's", func(t *testing.T) {
		if got := strings.TrimSpace(execOK(n.ctx, t, n.env, p.ctr, "hostname")); got != p.hostname() {
			t.Errorf("hostname %q, want %q", got, p.hostname())
		}
	})
	t.Run("MTU is the veth's", func(t *testing.T) { n.testMTU(t, p) })
	if p.handler == "podvm" {
		// The guest's network namespace is the pod's: a device its kernel makes by itself
		// (dummy0, which CONFIG_DUMMY creates at boot unless told not to) would be there too,
		// where a runc pod on a bridge CNI has lo and eth0.
		t.Run("no interfaces but lo and eth0", func(t *testing.T) {
			if got := strings.Join(strings.Fields(execOK(n.ctx, t, n.env, p.ctr, "ls /sys/class/net")), " "); got != "eth0 lo" {
				t.Errorf("/sys/class/net in the container has %q, want \"eth0 lo\"", got)
			}
		})
	}
	if p.hostPort != 0 {
		t.Run("hostPort", func(t *testing.T) {
			addr := net.JoinHostPort(n.gw, strconv.Itoa(int(p.hostPort)))
			body := httpGet(n.ctx, t, n.env, addr, "/")
			if want := "hello from " + p.hostname() + "\n"; body != want {
				t.Errorf("GET http://%s/ (hostPort %d -> 8080) = %q, want %q", addr, p.hostPort, body, want)
			}
		})
	}
}

// testPodIP: the IP PodSandboxStatus reports is eth0's in the container; for podvm, eth0 is the
// guest's NIC (another kernel) with the MAC of the pod netns's eth0.
func (n *netTest) testPodIP(t *testing.T, p *netPod) {
	out := execOK(n.ctx, t, n.env, p.ctr, "ip -4 -o addr show dev eth0")
	if !strings.Contains(out, " inet "+p.ip+"/") {
		t.Errorf("PodSandboxStatus says %s; eth0 in the container has:\n%s", p.ip, out)
	}
	if p.handler != "podvm" {
		return
	}
	if kr := strings.TrimSpace(execOK(n.ctx, t, n.env, p.ctr, "uname -r")); kr == hostKernel(t) {
		t.Errorf("the container runs on the host kernel %s, not in a VM", kr)
	}
	veth := podLink(n.ctx, t, n.env, p, "eth0")
	if mac := strings.TrimSpace(execOK(n.ctx, t, n.env, p.ctr, "cat /sys/class/net/eth0/address")); mac != veth.Attrs().HardwareAddr.String() {
		t.Errorf("guest eth0 MAC %s, pod netns eth0 MAC %s; want the same", mac, veth.Attrs().HardwareAddr)
	}
}

// testPayloads sends 1 MiB node -> pod -> node through the echo service and fetches the 1 MiB
// file the pod made, comparing it with what the pod sees.
func (n *netTest) testPayloads(t *testing.T, p *netPod) {
	payload := make([]byte, 1<<20)
	_, _ = rand.Read(payload)
	got := echoRoundTrip(n.ctx, t, n.env, net.JoinHostPort(p.ip, "9000"), payload)
	if !bytes.Equal(got, payload) {
		t.Errorf("echo of 1 MiB: got %d bytes back, equal %v", len(got), bytes.Equal(got, payload))
	}
	body := httpGet(n.ctx, t, n.env, net.JoinHostPort(p.ip, "8080"), "/big")
	sum := sha256.Sum256([]byte(body))
	inPod := strings.Fields(execOK(n.ctx, t, n.env, p.ctr, "sha256sum /www/big"))
	if len(body) != 1<<20 || len(inPod) == 0 || inPod[0] != hex.EncodeToString(sum[:]) {
		t.Errorf("GET /big: %d bytes sha256 %x; in the pod: %v", len(body), sum, inPod)
	}
}

// testMTU: eth0 in the container has the pod veth's MTU, which is the bridge config's; podvm's
// tap has it too.
func (n *netTest) testMTU(t *testing.T, p *netPod) {
	veth := podLink(n.ctx, t, n.env, p, "eth0")
	got := strings.TrimSpace(execOK(n.ctx, t, n.env, p.ctr, "cat /sys/class/net/eth0/mtu"))
	if got != strconv.Itoa(veth.Attrs().MTU) || veth.Attrs().MTU != netTestMTU {
		t.Errorf("eth0 MTU in the container %s, pod veth %d, bridge config %d; want all equal", got, veth.Attrs().MTU, netTestMTU)
	}
	if p.handler == "podvm" {
		tap := podLink(n.ctx, t, n.env, p, "tap0_podvm")
		if tap.Attrs().MTU != veth.Attrs().MTU {
			t.Errorf("tap MTU %d, veth MTU %d", tap.Attrs().MTU, veth.Attrs().MTU)
		}
	}
}

// testPodToPod: each pod's web server answers the others, across handlers.
func (n *netTest) testPodToPod(t *testing.T) {
	for _, tc := range []struct{ from, to string }{
		{"web-vm", "web-runc"},
		{"web-vm", "web-vm2"},
		{"web-vm2", "web-vm"},
		{"web-runc", "web-vm"},
	} {
		t.Run(tc.from+" to "+tc.to, func(t *testing.T) {
			from, to := n.byName[tc.from], n.byName[tc.to]
			out := execOK(n.ctx, t, n.env, from.ctr, `printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 10 `+to.ip+" 8080")
			if !strings.Contains(out, "\r\n\r\nhello from "+to.hostname()+"\n") {
				t.Errorf("GET http://%s:8080/ from %s:\n%s", to.ip, tc.from, out)
			}
		})
	}
}

// portForwardCase is one CRI PortForward of testPortForward.
type portForwardCase struct {
	name     string
	pod      string
	port     int32
	send     []byte
	wantData string // in the reply
	wantEcho bool   // the reply is send
	wantErr  string // in the error stream
}

// testPortForward: CRI PortForward. containerd dials localhost:<port> inside the pod's netns on
// the node. A runc pod listens there; for a podvm pod the shim's forwarder does (an iptables
// REDIRECT of loopback TCP to its listener) and carries the connection to the same port in the
// guest (docs/networking.md, "port-forward").
func (n *netTest) testPortForward(t *testing.T) {
	big := make([]byte, 1<<20)
	_, _ = rand.Read(big)
	for _, tc := range []portForwardCase{
		{name: "runc", pod: "web-runc", port: 8080, wantData: "hello from h-web-runc\n"},
		{name: "podvm", pod: "web-vm", port: 8080, wantData: "hello from h-web-vm\n"},
		{name: "podvm second pod", pod: "web-vm2", port: 8080, wantData: "hello from h-web-vm2\n"},
		{name: "podvm 1MiB echo", pod: "web-vm", port: 9000, send: big, wantEcho: true},
		// Nothing listens on 8081 in the guest: the forwarder resets the connection it
		// accepted, and containerd reports that on the error stream.
		{name: "podvm closed port", pod: "web-vm", port: 8081, wantErr: "reset"},
	} {
		t.Run(tc.name, func(t *testing.T) { n.portForward(t, tc) })
	}
	t.Run("rule removed at stop", func(t *testing.T) { n.testPortForwardRuleRemoved(t, n.byName["web-vm2"]) })
}

func (n *netTest) portForward(t *testing.T, tc portForwardCase) {
	p := n.byName[tc.pod]
	pctx, pcancel := context.WithTimeout(n.ctx, time.Minute)
	defer pcancel()
	send := tc.send
	if send == nil {
		send = []byte("GET / HTTP/1.0\r\n\r\n")
	}
	res, err := n.env.PortForward(pctx, p.pod.ID, tc.port, send)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("port-forward to %s:%d: %d bytes back, error stream %q", tc.pod, tc.port, len(res.Data), res.RemoteError)
	if tc.wantData != "" && !strings.Contains(string(res.Data), tc.wantData) {
		t.Errorf("reply %q lacks %q", res.Data, tc.wantData)
	}
	if tc.wantEcho && !bytes.Equal(res.Data, send) {
		t.Errorf("echo: %d bytes back, want the %d sent, identical", len(res.Data), len(send))
	}
	if tc.wantErr == "" && res.RemoteError != "" {
		t.Errorf("error stream: %s", res.RemoteError)
	}
	if tc.wantErr != "" {
		if !strings.Contains(res.RemoteError, tc.wantErr) {
			t.Errorf("error stream %q, want it to contain %q", res.RemoteError, tc.wantErr)
		}
		if len(res.Data) != 0 {
			t.Errorf("got data %q although nothing listens", res.Data)
		}
	}
}

// testPortForwardRuleRemoved: the shim's rule is in the pod netns while the pod runs and gone
// once it stopped. The test holds the netns open, so it outlives StopPodSandbox for the check.
func (n *netTest) testPortForwardRuleRemoved(t *testing.T, p *netPod) {
	path, err := n.env.PodNetNSPath(n.ctx, p.pod.ID)
	if err != nil || path == "" {
		t.Fatalf("pod netns: %q %v", path, err)
	}
	ns, err := netns.GetFromPath(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	held := fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), int(ns))
	if rules, err := network.PortForwardRules(held); err != nil || len(rules) != 1 {
		t.Fatalf("podvm rules in the running pod's netns: %q, %v; want one", rules, err)
	}
	sctx, scancel := context.WithTimeout(n.ctx, 2*time.Minute)
	defer scancel()
	if err := n.env.Runtime.StopPodSandbox(sctx, p.pod.ID); err != nil {
		t.Fatal(err)
	}
	if rules, err := network.PortForwardRules(held); err != nil || len(rules) != 0 {
		t.Errorf("podvm rules in the pod netns after StopPodSandbox: %q, %v; want none", rules, err)
	}
}

// netOptions are podvmEnv's options with the bridge at netTestMTU, and without its
// machine-wide leak checks (any QEMU, anything in /run/podvm): other tests' VMs on the same
// machine are not this test's leaks. assertNoNetLeaks checks this test's own.
func netOptions(t testing.TB) harness.Options {
	opts := podvmOptions(t)
	opts.BridgeMTU = netTestMTU
	opts.LeakProcessNames, opts.LeakDirs = nil, nil
	return opts
}

// assertNoNetLeaks tears env down and checks that nothing of it is left (env.AssertNoLeaks:
// processes, mounts, dirs, cgroups, the netns and with it every pod netns, tap and qdisc), and
// that no shim, QEMU or virtiofsd of these pods runs and no state dir of theirs is left.
func assertNoNetLeaks(t testing.TB, env *harness.Env, pods []*netPod) {
	t.Helper()
	if env != nil {
		env.AssertNoLeaks(t)
		if shims := podvmShims(env); len(shims) > 0 {
			t.Errorf("leak: podvm shims of this containerd still running: %v", shims)
		}
	}
	for _, p := range pods {
		if p.pod == nil || p.handler != "podvm" {
			continue
		}
		dir := filepath.Join(podvmStateDir, p.pod.ID)
		if _, err := os.Stat(dir); err == nil {
			t.Errorf("leak: %s still exists", dir)
		}
		procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
		for _, f := range procs {
			if b, err := os.ReadFile(f); err == nil && strings.Contains(string(b), p.pod.ID) {
				t.Errorf("leak: %s of pod %s still running: %s", filepath.Dir(f), p.name, strings.ReplaceAll(string(b), "\x00", " "))
			}
		}
	}
}

// testHostNetwork runs a hostNetwork pod with each handler: runc runs it, podvm refuses it with
// an error that names hostNetwork, and leaves no sandbox, shim or state behind.
func testHostNetwork(ctx context.Context, t *testing.T, env *harness.Env) {
	for _, tc := range []struct {
		handler string
		wantErr string // "" = must succeed
	}{
		{handler: "runc"},
		{handler: "podvm", wantErr: "hostNetwork"},
	} {
		t.Run(tc.handler, func(t *testing.T) {
			cfg := env.PodSandboxConfig(harness.PodOptions{Name: "hostnet-" + tc.handler, Namespace: "it"})
			cfg.Linux.SecurityContext.NamespaceOptions.Network = runtimeapi.NamespaceMode_NODE
			cfg.Hostname = "" // as kubelet: a hostNetwork pod has the node's UTS namespace
			if err := os.MkdirAll(cfg.LogDirectory, 0o755); err != nil {
				t.Fatal(err)
			}
			rctx, rcancel := context.WithTimeout(ctx, 2*time.Minute)
			id, runErr := env.Runtime.RunPodSandbox(rctx, cfg, tc.handler)
			rcancel()
			err := runErr
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("RunPodSandbox hostNetwork with %s: %v", tc.handler, err)
				}
				sctx, scancel := context.WithTimeout(ctx, time.Minute)
				defer scancel()
				if err := env.Runtime.StopPodSandbox(sctx, id); err != nil {
					t.Fatal(err)
				}
				if err := env.Runtime.RemovePodSandbox(sctx, id); err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil {
				t.Fatalf("RunPodSandbox hostNetwork with %s succeeded (sandbox %s), want an error naming %s", tc.handler, id, tc.wantErr)
			}
			t.Logf("RunPodSandbox hostNetwork with %s: %v", tc.handler, err)
			if !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("error %q does not name %s", err, tc.wantErr)
			}
			lctx, lcancel := context.WithTimeout(ctx, 30*time.Second)
			defer lcancel()
			left, err := env.Runtime.ListPodSandbox(lctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			for _, s := range left {
				t.Errorf("sandbox left after the failed RunPodSandbox: %s (%s, %s)", s.Id, s.GetMetadata().GetName(), s.State)
			}
			// The shim and its VM are gone, and so is the sandbox's state.
			deadline := time.Now().Add(10 * time.Second)
			for {
				shims := podvmShims(env)
				if len(shims) == 0 {
					break
				}
				if time.Now().After(deadline) {
					t.Errorf("podvm shims of this containerd still running: %v", shims)
					break
				}
				time.Sleep(200 * time.Millisecond)
			}
			// containerd names the sandbox it gave up on; nothing of it may be left.
			m := regexp.MustCompile(`failed to start sandbox \\?"([0-9a-f]{64})`).FindStringSubmatch(runErr.Error())
			if m == nil {
				t.Fatalf("no sandbox ID in %q", runErr)
			}
			assertNoNetLeaks(t, nil, []*netPod{{name: cfg.Metadata.Name, handler: tc.handler, pod: &harness.Pod{ID: m[1]}}})
		})
	}
}

// startNetPod runs p's sandbox and its web container and waits until the server answers.
func startNetPod(ctx context.Context, t *testing.T, env *harness.Env, p *netPod, dns *runtimeapi.DNSConfig) {
	t.Helper()
	o := harness.PodOptions{Name: p.name, Namespace: "it", Handler: p.handler, Hostname: p.hostname(), DNS: dns}
	if p.hostPort != 0 {
		o.PortMappings = []*runtimeapi.PortMapping{{Protocol: runtimeapi.Protocol_TCP, ContainerPort: 8080, HostPort: p.hostPort}}
	}
	start := time.Now()
	pod, err := env.RunPod(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	p.pod = pod
	sctx, scancel := context.WithTimeout(ctx, time.Minute)
	defer scancel()
	st, err := env.Runtime.PodSandboxStatus(sctx, pod.ID, false)
	if err != nil {
		t.Fatal(err)
	}
	p.ip = st.GetStatus().GetNetwork().GetIp()
	if ip := net.ParseIP(p.ip); ip == nil || !env.Subnet.Contains(ip) {
		t.Fatalf("pod %s: IP %q not in %s", p.name, p.ip, env.Subnet)
	}
	if _, err := env.PullImage(ctx, env.BusyboxImage, pod.Config); err != nil {
		t.Fatal(err)
	}
	p.ctr, _, err = env.CreateContainer(ctx, pod, harness.ContainerOptions{Name: "web", Command: []string{"sh", "-c", webScript}})
	if err != nil {
		t.Fatal(err)
	}
	if err := env.Runtime.StartContainer(sctx, p.ctr); err != nil {
		t.Fatalf("StartContainer %s: %v", p.name, err)
	}
	for {
		out, _, err := env.Runtime.ExecSync(sctx, p.ctr, []string{"sh", "-c", `printf 'GET / HTTP/1.0\r\n\r\n' | nc 127.0.0.1 8080`}, 10*time.Second)
		if err == nil && strings.Contains(string(out), "hello from") {
			break
		}
		if sctx.Err() != nil {
			t.Fatalf("pod %s: the web server did not come up: %v (%q)", p.name, err, out)
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("pod %s (%s) at %s serving after %v", p.name, p.handler, p.ip, time.Since(start).Round(time.Millisecond))
}

// execOK runs a shell command in a container with ExecSync and returns its stdout.
func execOK(ctx context.Context, t *testing.T, env *harness.Env, ctr, script string) string {
	t.Helper()
	ectx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	stdout, stderr, err := env.Runtime.ExecSync(ectx, ctr, []string{"sh", "-c", script}, 45*time.Second)
	if err != nil {
		t.Fatalf("exec %q: %v (stdout %q, stderr %q)", script, err, stdout, stderr)
	}
	return string(stdout)
}

// httpGet fetches http://addr/path from inside the harness netns.
func httpGet(ctx context.Context, t *testing.T, env *harness.Env, addr, path string) string {
	t.Helper()
	gctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(gctx, http.MethodGet, "http://"+addr+path, nil)
	resp, err := env.HTTPClient(30 * time.Second).Do(req)
	if err != nil {
		t.Fatalf("GET http://%s%s from the node: %v", addr, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET http://%s%s from the node: %s, %v", addr, path, resp.Status, err)
	}
	return string(b)
}

// echoRoundTrip sends payload to an echo service from the harness netns and returns what came
// back once the service closed the connection.
func echoRoundTrip(ctx context.Context, t *testing.T, env *harness.Env, addr string, payload []byte) []byte {
	t.Helper()
	dctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	c, err := env.DialContext(dctx, "tcp", addr)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	defer c.Close()
	deadline, _ := dctx.Deadline()
	_ = c.SetDeadline(deadline)
	var wg sync.WaitGroup
	var werr error
	wg.Go(func() {
		_, werr = c.Write(payload)
		_ = c.(*net.TCPConn).CloseWrite()
	})
	got, rerr := io.ReadAll(c)
	wg.Wait()
	if werr != nil || rerr != nil {
		t.Fatalf("echo via %s: write %v, read %v (%d bytes back)", addr, werr, rerr, len(got))
	}
	return got
}

// podLink returns an interface of p's network namespace on the node.
func podLink(ctx context.Context, t *testing.T, env *harness.Env, p *netPod, name string) netlink.Link {
	t.Helper()
	path, err := env.PodNetNSPath(ctx, p.pod.ID)
	if err != nil || path == "" {
		t.Fatalf("pod %s netns: %q %v", p.name, path, err)
	}
	ns, err := netns.GetFromPath(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	l, err := h.LinkByName(name)
	if err != nil {
		t.Fatalf("pod %s netns %s: %s: %v", p.name, path, name, err)
	}
	if network.IsTap(name) {
		// The redirect that carries the guest's traffic out of the pod netns.
		filters, err := h.FilterList(l, netlink.HANDLE_MIN_INGRESS)
		if err != nil || len(filters) == 0 || filters[0].Attrs().Priority != network.FilterPriority {
			t.Errorf("pod %s: tc filters on %s: %v %v, want podvm's redirect (prio %d)", p.name, name, filters, err, network.FilterPriority)
		}
	}
	return l
}

func nonEmptyLines(s string) []string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if l = strings.TrimSpace(l); l != "" {
			out = append(out, l)
		}
	}
	sort.Strings(out)
	return out
}

// podvmShims lists the pids of podvm shims serving env's containerd.
func podvmShims(env *harness.Env) []int {
	addr := strings.TrimPrefix(env.Endpoint, "unix://")
	var pids []int
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, f := range procs {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		args := strings.Split(string(b), "\x00")
		if filepath.Base(args[0]) != "containerd-shim-podvm-v2" {
			continue
		}
		for i, a := range args {
			if a == "-address" && i+1 < len(args) && args[i+1] == addr {
				pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(f)))
				pids = append(pids, pid)
			}
		}
	}
	return pids
}
