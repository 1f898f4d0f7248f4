package e2e

import (
	"context"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
)

func netAdmin() *corev1.SecurityContext {
	return &corev1.SecurityContext{Capabilities: &corev1.Capabilities{Add: []corev1.Capability{"NET_ADMIN", "NET_RAW"}}}
}

// testIptablesInit: an istio-init style init container (NET_ADMIN) installs a nat REDIRECT in
// the pod's network namespace; the app's outbound connection to port 80 of an address nobody
// has lands on its own port 15001, so the rules are in force, not only accepted.
func testIptablesInit(ctx context.Context, t *testing.T, k *kube) {
	pod := k.pod("iptables", "")
	pod.Spec.Containers[0].Command = []string{"sh", "-c",
		"mkdir -p /www && echo -n redirected > /www/index.html && exec httpd -f -p 15001 -h /www"}
	pod.Spec.InitContainers = []corev1.Container{{
		Name: "init", Image: netToolsImage, ImagePullPolicy: corev1.PullIfNotPresent, SecurityContext: netAdmin(),
		Command: []string{"sh", "-c", strings.Join([]string{
			"iptables -t nat -N PROXY_REDIRECT",
			"iptables -t nat -A PROXY_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
			"iptables -t nat -A OUTPUT -p tcp --dport 80 -j PROXY_REDIRECT",
			"iptables -t nat -S",
		}, " && ")},
	}}
	// Running is not listening yet: wait until the server takes connections, as a user would.
	pod.Spec.Containers[0].ReadinessProbe = &corev1.Probe{
		ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr(15001)}}, PeriodSeconds: 1}
	k.run(ctx, t, pod)
	k.wait(ctx, t, "iptables", 3*time.Minute, ready)
	logs, err := k.logs(ctx, "iptables", "init", false)
	if err != nil || !strings.Contains(logs, "-A OUTPUT -p tcp -m tcp --dport 80 -j PROXY_REDIRECT") {
		t.Fatalf("iptables -t nat -S in the init container: %v\n%s", err, logs)
	}
	out := k.mustExec(ctx, t, "iptables", "c", "wget", "-q", "-O-", "http://192.0.2.1/index.html")
	if out != "redirected" {
		t.Fatalf("wget to 192.0.2.1:80 got %q, want the REDIRECT to the pod's port 15001", out)
	}
}

// testBridge: a container with NET_ADMIN makes a bridge and a veth pair on it in the pod's
// network namespace and addresses it, as CNI-in-pod and VPN workloads do.
func testBridge(ctx context.Context, t *testing.T, k *kube) {
	pod := k.pod("bridge", sleeper)
	pod.Spec.Containers[0].Image = netToolsImage
	pod.Spec.Containers[0].SecurityContext = netAdmin()
	k.run(ctx, t, pod)
	// iproute2's ip (busybox's cannot make a veth pair).
	k.mustExec(ctx, t, "bridge", "c", "sh", "-c", strings.ReplaceAll(strings.Join([]string{
		"$ip link add br-e2e type bridge", "$ip link add ve0 type veth peer name ve1",
		"$ip link set ve0 master br-e2e", "$ip addr add 10.99.0.1/24 dev br-e2e",
		"$ip link set br-e2e up", "$ip link set ve0 up", "$ip link set ve1 up",
	}, " && "), "$ip", "/usr/bin/ip"))
	out := k.mustExec(ctx, t, "bridge", "c", "sh", "-c", "/usr/bin/ip -o addr show br-e2e; ls /sys/class/net/br-e2e/brif")
	if !strings.Contains(out, "10.99.0.1/24") || !strings.Contains(out, "ve0") {
		t.Fatalf("bridge in the pod: %q, want br-e2e with 10.99.0.1/24 and port ve0", out)
	}
}
