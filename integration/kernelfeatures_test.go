package integration

import (
	"context"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/podvm/podvm/integration/harness"
)

// TestKernelFeatures checks, in a privileged container as an istio-init or a CNI-in-pod
// container runs, the kernel features a pod finds on a typical node: iptables with both the
// nft and the legacy backend, a bridge, and a user namespace made by an unprivileged user.
// With runc they are the node's kernel's; with podvm the guest kernel's.
func TestKernelFeatures(t *testing.T) {
	for _, handler := range handlers {
		t.Run(handler, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
			defer cancel()
			opts := harness.Options{}
			if handler == "podvm" {
				opts = podvmOptions(t)
			}
			img, err := harness.BuildToolsImage(ctx, "/bin/busybox")
			if err != nil {
				t.Fatal(err)
			}
			opts.ExtraImages = map[string]v1.Image{harness.ToolsImage: img}
			env := harness.Start(t, opts)
			podCfg := env.PodSandboxConfig(harness.PodOptions{Name: "kernel", Namespace: "it", Handler: handler})
			podCfg.Linux.SecurityContext.Privileged = true
			pod := runPodConfig(t, ctx, env, podCfg, handler)
			if _, err := env.PullImage(ctx, harness.ToolsImage, podCfg); err != nil {
				t.Fatal(err)
			}
			cfg := env.ContainerConfig(harness.ContainerOptions{Name: "netadmin", Image: harness.ToolsImage, Command: []string{"sleep", "3600"}})
			cfg.Linux.SecurityContext.Privileged = true
			id := startContainer(t, ctx, env, pod, cfg)

			type feature struct{ what, script, want string }
			cases := []feature{
				{"iptables-nft", "iptables-nft -t nat -A POSTROUTING -s 10.99.0.0/24 -j MASQUERADE && iptables-nft -t nat -S POSTROUTING", "-j MASQUERADE"},
				{"iptables-legacy", "iptables-legacy -A INPUT -p tcp --dport 9999 -j REJECT && iptables-legacy -S INPUT", "--dport 9999 -j REJECT"},
				{"a bridge", "ip link add br-it type bridge && ip link set br-it up && cat /sys/class/net/br-it/bridge/stp_state", "0"},
				{"an unprivileged user namespace", "su -s /bin/sh nobody -c 'id -u; unshare -U -r id -u'", "65534\n0"},
			}
			if handler == "podvm" {
				// The guest kernel makes no dummy0 at boot (dummy.numdummies=0); a pod that wants
				// one still gets it. (The test node's kernel may lack the driver: runc is not asked.)
				cases = append(cases, feature{"a dummy device",
					"ip link add d-it type dummy && ip link set d-it up && cat /sys/class/net/d-it/operstate", "unknown"})
			}
			for _, c := range cases {
				code, out, errOut := volSh(ctx, t, env, id, c.script)
				if code != 0 || !strings.Contains(out, c.want) {
					t.Errorf("%s: %q: exit %d, stdout %q, stderr %q; want %q in stdout", c.what, c.script, code, out, errOut, c.want)
				}
			}
			env.AssertNoLeaks(t)
		})
	}
}
