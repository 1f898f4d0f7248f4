package harness

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os/exec"
	"strings"
	"time"
)

// This file gives tests the node's side of the pod network: dialling and listening inside the
// harness's network namespace (where the CNI bridge lives, so that is where "the node" is),
// running tools there, and finding a pod's own network namespace.

// DialContext connects to addr from inside the harness's network namespace, as a process on
// the node would. Use it for pod IPs, the bridge gateway and host ports.
func (e *Env) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	return e.ns.dialContext(ctx, network, addr)
}

// Listen opens a TCP listener inside the harness's network namespace (e.g. on the gateway IP,
// for pods to connect to the node).
func (e *Env) Listen(addr string) (net.Listener, error) {
	return e.ns.listen(addr)
}

// HTTPClient is an HTTP client whose connections start inside the harness's network namespace.
func (e *Env) HTTPClient(timeout time.Duration) *http.Client {
	return &http.Client{
		Timeout:   timeout,
		Transport: &http.Transport{DialContext: e.ns.dialContext, DisableKeepAlives: true},
	}
}

// Gateway is the CNI bridge's address: the first address of Subnet (the bridge plugin's
// isGateway default), which is also the pods' default gateway and an address of the node.
func (e *Env) Gateway() net.IP {
	ip := e.Subnet.IP.To4()
	gw := make(net.IP, len(ip))
	copy(gw, ip)
	gw[len(gw)-1]++
	return gw
}

// NetNSPath is the path of the harness's network namespace (/run/netns/<name>).
func (e *Env) NetNSPath() string { return e.ns.path }

// RunInNetNS runs a host command inside the harness's network namespace (ip netns exec) and
// returns its combined output.
func (e *Env) RunInNetNS(ctx context.Context, name string, args ...string) ([]byte, error) {
	out, err := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", e.NetNS, name}, args...)...).CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("in netns %s: %s %s: %w: %s", e.NetNS, name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return out, nil
}

// PodNetNSPath returns the path of a pod's network namespace, from the runtime spec containerd
// reports in the verbose PodSandboxStatus. It is "" for a pod on the host's network.
func (e *Env) PodNetNSPath(ctx context.Context, podID string) (string, error) {
	resp, err := e.Runtime.PodSandboxStatus(ctx, podID, true)
	if err != nil {
		return "", fmt.Errorf("PodSandboxStatus %s (verbose): %w", podID, err)
	}
	var info struct {
		RuntimeSpec struct {
			Linux struct {
				Namespaces []struct {
					Type string `json:"type"`
					Path string `json:"path"`
				} `json:"namespaces"`
			} `json:"linux"`
		} `json:"runtimeSpec"`
	}
	raw, ok := resp.GetInfo()["info"]
	if !ok {
		return "", fmt.Errorf("PodSandboxStatus %s: no verbose info", podID)
	}
	if err := json.Unmarshal([]byte(raw), &info); err != nil {
		return "", fmt.Errorf("PodSandboxStatus %s: verbose info: %w", podID, err)
	}
	for _, ns := range info.RuntimeSpec.Linux.Namespaces {
		if ns.Type == "network" {
			return ns.Path, nil
		}
	}
	return "", nil
}
