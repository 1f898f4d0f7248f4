package integration

import (
	"context"
	"fmt"
	"io"
	"net"
	"regexp"
	"sort"
	"strconv"
	"testing"
	"time"

	"github.com/podvm/podvm/integration/harness"
)

// benchNetScript: a TCP echo service on 9000, a sink on 9001 and a source of
// portForwardBytes on 9002 (one nc -e child per connection), then nothing else to do.
const benchNetScript = `nc -ll -p 9000 -e cat &
nc -ll -p 9001 -e dd of=/dev/null bs=65536 &
nc -ll -p 9002 -e head -c 8388608 /dev/zero &
exec sleep 3600`

// portForwardBytes is what one port-forward iteration fetches from the pod.
const portForwardBytes = 8 << 20

// BenchmarkPodNetwork measures the pod network of a runc pod and of a podvm pod on the same CNI
// bridge, in the same run, from the node (the harness netns) and from the pod:
//
//   - throughput: a Go sender on the node writes to a sink in the pod for 1 s per iteration
//     and handler (10 s each with -benchtime 10x), counted until the sink closes the connection;
//   - tcp-echo-rtt: the median time for 64 bytes to go to the pod's echo service and back on
//     an established connection;
//   - ping-rtt: ICMP echo average, node -> pod IP and pod -> gateway;
//   - port-forward: CRI PortForward (kubectl port-forward) of 8 MiB from a source in the pod,
//     the client reading all of it before it half-closes (as an HTTP client reads a response).
//
// Each reports both handlers' values and podvm/runc.
func BenchmarkPodNetwork(b *testing.B) {
	env := harness.Start(b, netOptions(b))
	ctx, cancel := context.WithTimeout(b.Context(), 20*time.Minute)
	defer cancel()
	var all []*netPod
	pods := map[string]*benchNetPod{}
	for _, h := range []string{"runc", "podvm"} {
		pods[h] = startBenchNetPod(ctx, b, env, h)
		all = append(all, &netPod{name: "netbench-" + h, handler: h, pod: pods[h].pod})
	}
	gw := env.Gateway().String()

	b.Run("throughput", func(b *testing.B) {
		c := newNetComparison(b)
		for range b.N {
			for _, h := range []string{"runc", "podvm"} {
				n, d := sendBulk(ctx, b, env, net.JoinHostPort(pods[h].ip, "9001"), time.Second)
				c.add(h, float64(n)/1e6, d.Seconds())
			}
		}
		c.report("MB/s", func(sum, secs float64) float64 { return sum / secs })
	})

	b.Run("tcp-echo-rtt", func(b *testing.B) {
		c := newNetComparison(b)
		for range b.N {
			for _, h := range []string{"runc", "podvm"} {
				c.add(h, echoRTTms(ctx, b, env, net.JoinHostPort(pods[h].ip, "9000"), 21), 1)
			}
		}
		c.report("ms", func(sum, n float64) float64 { return sum / n })
	})

	b.Run("ping-rtt", func(b *testing.B) {
		in, out := newNetComparison(b), newNetComparison(b)
		for range b.N {
			for _, h := range []string{"runc", "podvm"} {
				o, err := env.RunInNetNS(ctx, "/bin/busybox", "ping", "-c", "3", "-i", "0.2", "-W", "5", pods[h].ip)
				if err != nil {
					b.Fatal(err)
				}
				in.add(h, pingAvgMs(b, string(o)), 1)
				eo, _, err := env.Runtime.ExecSync(ctx, pods[h].ctr, []string{"ping", "-c", "3", "-i", "0.2", "-W", "5", gw}, 30*time.Second)
				if err != nil {
					b.Fatalf("ping %s from the %s pod: %v", gw, h, err)
				}
				out.add(h, pingAvgMs(b, string(eo)), 1)
			}
		}
		avg := func(sum, n float64) float64 { return sum / n }
		in.reportAs("node->pod-ms", avg)
		out.reportAs("pod->node-ms", avg)
	})

	b.Run("port-forward", func(b *testing.B) {
		c := newNetComparison(b)
		for range b.N {
			for _, h := range []string{"runc", "podvm"} {
				pctx, cancel := context.WithTimeout(ctx, time.Minute)
				start := time.Now()
				res, err := env.PortForwardReply(pctx, pods[h].pod.ID, 9002, nil, portForwardBytes)
				cancel()
				if err != nil || len(res.Data) != portForwardBytes || res.RemoteError != "" {
					b.Fatalf("port-forward from the %s pod: %v; %d bytes, error stream %q", h, err, len(res.Data), res.RemoteError)
				}
				c.add(h, float64(portForwardBytes)/1e6, time.Since(start).Seconds())
			}
		}
		c.reportAs("down-MB/s", func(sum, secs float64) float64 { return sum / secs })
	})

	assertNoNetLeaks(b, env, all)
}

type benchNetPod struct {
	pod     *harness.Pod
	ip, ctr string
}

func startBenchNetPod(ctx context.Context, b *testing.B, env *harness.Env, handler string) *benchNetPod {
	b.Helper()
	pod, err := env.RunPod(ctx, harness.PodOptions{Name: "netbench-" + handler, Namespace: "bench", Handler: handler})
	if err != nil {
		b.Fatal(err)
	}
	st, err := env.Runtime.PodSandboxStatus(ctx, pod.ID, false)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := env.PullImage(ctx, env.BusyboxImage, pod.Config); err != nil {
		b.Fatal(err)
	}
	ctr, _, err := env.CreateContainer(ctx, pod, harness.ContainerOptions{Name: "net", Command: []string{"sh", "-c", benchNetScript}})
	if err != nil {
		b.Fatal(err)
	}
	if err := env.Runtime.StartContainer(ctx, ctr); err != nil {
		b.Fatal(err)
	}
	p := &benchNetPod{pod: pod, ip: st.GetStatus().GetNetwork().GetIp(), ctr: ctr}
	// Ready when the echo service answers from the node.
	deadline := time.Now().Add(time.Minute)
	for {
		dctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		c, err := env.DialContext(dctx, "tcp", net.JoinHostPort(p.ip, "9000"))
		cancel()
		if err == nil {
			c.Close()
			return p
		}
		if time.Now().After(deadline) {
			b.Fatalf("%s pod: echo service not reachable: %v", handler, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// sendBulk writes to addr for d, half-closes and waits for the peer to close; it returns the
// bytes sent and the time until the close.
func sendBulk(ctx context.Context, b *testing.B, env *harness.Env, addr string, d time.Duration) (int64, time.Duration) {
	b.Helper()
	c, err := env.DialContext(ctx, "tcp", addr)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(d + time.Minute))
	buf := make([]byte, 64<<10)
	var n int64
	start := time.Now()
	for time.Since(start) < d {
		m, err := c.Write(buf)
		n += int64(m)
		if err != nil {
			b.Fatalf("send to %s: %v", addr, err)
		}
	}
	_ = c.(*net.TCPConn).CloseWrite()
	if _, err := io.Copy(io.Discard, c); err != nil {
		b.Fatalf("waiting for %s to close: %v", addr, err)
	}
	return n, time.Since(start)
}

// echoRTTms returns the median round trip, in ms, of 64-byte messages to an echo service.
func echoRTTms(ctx context.Context, b *testing.B, env *harness.Env, addr string, rounds int) float64 {
	b.Helper()
	c, err := env.DialContext(ctx, "tcp", addr)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(time.Minute))
	msg, back := make([]byte, 64), make([]byte, 64)
	var rtts []float64
	for range rounds {
		start := time.Now()
		if _, err := c.Write(msg); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, back); err != nil {
			b.Fatal(err)
		}
		rtts = append(rtts, float64(time.Since(start).Microseconds())/1000)
	}
	sort.Float64s(rtts)
	return rtts[len(rtts)/2]
}

var pingAvg = regexp.MustCompile(`round-trip min/avg/max = [0-9.]+/([0-9.]+)/[0-9.]+ ms`)

func pingAvgMs(b *testing.B, out string) float64 {
	b.Helper()
	m := pingAvg.FindStringSubmatch(out)
	if m == nil {
		b.Fatalf("no ping summary in:\n%s", out)
	}
	v, _ := strconv.ParseFloat(m[1], 64)
	return v
}

// netComparison accumulates one metric per handler (a sum and a divisor) and reports both
// and their ratio.
type netComparison struct {
	b        *testing.B
	sum, div map[string]float64
}

func newNetComparison(b *testing.B) *netComparison {
	return &netComparison{b: b, sum: map[string]float64{}, div: map[string]float64{}}
}

func (c *netComparison) add(handler string, v, div float64) {
	c.sum[handler] += v
	c.div[handler] += div
}

func (c *netComparison) report(unit string, f func(sum, div float64) float64) { c.reportAs(unit, f) }

func (c *netComparison) reportAs(unit string, f func(sum, div float64) float64) {
	v := map[string]float64{}
	for _, h := range []string{"runc", "podvm"} {
		if c.div[h] == 0 {
			return
		}
		v[h] = f(c.sum[h], c.div[h])
		c.b.ReportMetric(v[h], h+"-"+unit)
	}
	if v["runc"] > 0 {
		c.b.ReportMetric(v["podvm"]/v["runc"], "podvm/runc-"+unit)
	}
	c.b.Logf("%s: runc %s, podvm %s, podvm/runc %.2f", unit, fmt.Sprintf("%.3f", v["runc"]), fmt.Sprintf("%.3f", v["podvm"]), v["podvm"]/v["runc"])
}
