package k8s

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/podvm/podvm/deploy"
)

// kubeletConfig is the KubeletConfiguration for this machine: cgroupfs (no systemd), cgroup v1
// allowed, no swap check, no OOM score change (root here lacks CAP_SYS_RESOURCE), no iptables
// chains, pod logs and every cgroup under the test's dirs, eviction and image GC out of the way
// on a small disk, and the serving certificate the API server checks for exec and logs.
func (c *Cluster) kubeletConfig() string {
	p := c.pki.path
	return fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: %q
cgroupDriver: cgroupfs
cgroupRoot: %q
failCgroupV1: false
failSwapOn: false
oomScoreAdj: 0
makeIPTablesUtilChains: false
podLogsDir: %q
address: %q
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
tlsCertFile: %q
tlsPrivateKeyFile: %q
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: %q}
authorization: {mode: AlwaysAllow}
evictionHard: {memory.available: "1Mi", nodefs.available: "1%%", nodefs.inodesFree: "1%%", imagefs.available: "1%%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
syncFrequency: 10s
shutdownGracePeriod: 0s
resolvConf: /etc/resolv.conf
clusterDomain: cluster.local
`, c.env.Endpoint, c.env.CgroupParent, filepath.Join(c.Dir, "pod-logs"), c.NodeIP.String(),
		p("kubelet-serving.crt"), p("kubelet-serving.key"), p("ca.crt"))
}

// startKubelet writes the kubelet's config, makes its cgroup root (the harness's cgroup
// parent, which the kubelet requires to exist) and starts it. The node carries podvm's node
// label, as the installer sets it (the podvm RuntimeClass's nodeSelector requires it),
// unless Options.NoPodvmLabel.
func (c *Cluster) startKubelet() error {
	v, err := kubeletVerbosity()
	if err != nil {
		return err
	}
	cfg := filepath.Join(c.Dir, "kubelet.yaml")
	if err := os.WriteFile(cfg, []byte(c.kubeletConfig()), 0o644); err != nil {
		return err
	}
	if err := makeCgroupRoot(c.env.CgroupParent); err != nil {
		return err
	}
	args := []string{"--config=" + cfg, "--kubeconfig=" + c.pki.path("kubelet.kubeconfig"),
		"--root-dir=" + filepath.Join(c.Dir, "kubelet"), "--node-ip=" + c.NodeIP.String(),
		"--hostname-override=" + NodeName, "--v=" + v}
	if !c.opts.NoPodvmLabel {
		args = append(args, "--node-labels="+deploy.NodeLabel+"=true")
	}
	p, err := c.startProcess("kubelet", args...)
	c.kubelet = p
	return err
}

// KubeletVerbosityEnv sets the kubelet's --v (default 2). 10 logs every CRI call and its
// answer, which is what a timeline of a pod's start needs (docs/e2e.md).
const KubeletVerbosityEnv = "PODVM_E2E_KUBELET_V"

func kubeletVerbosity() (string, error) {
	s := os.Getenv(KubeletVerbosityEnv)
	if s == "" {
		return "2", nil
	}
	if v, err := strconv.Atoi(s); err != nil || v < 0 || v > 10 {
		return "", fmt.Errorf("%s=%q: not a kubelet verbosity; use 0 to 10 (10 logs every CRI call)", KubeletVerbosityEnv, s)
	}
	return s, nil
}

// makeCgroupRoot creates cgroup in every mounted hierarchy, and gives it its parent's CPUs and
// memory nodes in the cpuset one (cgroup v1 leaves them empty).
func makeCgroupRoot(cgroup string) error {
	hierarchies, _ := filepath.Glob("/sys/fs/cgroup/*")
	for _, h := range hierarchies {
		if st, err := os.Stat(filepath.Join(h, "cgroup.procs")); err != nil || st.IsDir() {
			continue
		}
		d := filepath.Join(h, cgroup)
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("cgroup root: %w", err)
		}
		if filepath.Base(h) != "cpuset" {
			continue
		}
		for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
			b, err := os.ReadFile(filepath.Join(h, f))
			if err != nil {
				return err
			}
			if err := os.WriteFile(filepath.Join(d, f), []byte(strings.TrimSpace(string(b))), 0o644); err != nil {
				return fmt.Errorf("cgroup root %s: %w", f, err)
			}
		}
	}
	return nil
}

// RestartKubelet stops the kubelet (SIGTERM, as a service manager would; SIGKILL with hard)
// and starts it again with the same flags, then waits until the node is Ready. Pods keep
// running meanwhile. It returns how long the node took to be Ready again from the restart.
func (c *Cluster) RestartKubelet(ctx context.Context, hard bool) (time.Duration, error) {
	if hard {
		c.kubelet.kill()
	} else {
		c.kubelet.stop(30 * time.Second)
	}
	start := time.Now()
	if err := c.run(c.kubelet); err != nil {
		return 0, err
	}
	// The node's Ready condition stays true for a while across a short restart: wait for the
	// kubelet's own health endpoint first, then for the node.
	if err := c.poll(ctx, 2*time.Minute, "kubelet healthz", c.kubeletHealthy); err != nil {
		return 0, err
	}
	if err := c.waitReady(ctx); err != nil {
		return 0, err
	}
	return time.Since(start), nil
}

// kubeletHealthy asks the kubelet's /healthz inside the network namespace.
func (c *Cluster) kubeletHealthy(ctx context.Context) error {
	cl := c.env.HTTPClient(5 * time.Second)
	req, err := newGet(ctx, "http://127.0.0.1:10248/healthz")
	if err != nil {
		return err
	}
	resp, err := cl.Do(req)
	if err != nil {
		return err
	}
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("kubelet /healthz: %s", resp.Status)
	}
	return nil
}
