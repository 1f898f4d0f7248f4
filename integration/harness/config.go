package harness

import (
	"encoding/json"
	"fmt"
	"strings"
)

// streamPort is the CRI streaming server's port. It lives inside the harness's own network
// namespace, so a fixed port never collides with anything (containerd cannot report a port 0
// choice back in the exec/attach URLs).
const streamPort = 10010

// containerdConfig holds every path and name that goes into containerd's config.toml.
type containerdConfig struct {
	Root, State, Temp string
	Opt               string // the opt plugin's dir, instead of the global /opt/containerd
	GRPCAddress       string
	TTRPCAddress      string
	SocketDir         string // shim sockets; at most 42 characters on Linux
	RuncRoot          string // runc state, instead of the global /run/containerd/runc
	RuncBinary        string
	CNIBinDir         string
	CNIConfDir        string
	RegistryConfig    string // config_path: <dir>/<registry>/hosts.toml
	SandboxImage      string
	PodvmConfigPath   string
	LogLevel          string
}

// render writes containerd 2.4's config format version 3.
func (c containerdConfig) render() string {
	q := func(s string) string { return fmt.Sprintf("%q", s) }
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	w("version = 3")
	w("root = %s", q(c.Root))
	w("state = %s", q(c.State))
	w("temp = %s", q(c.Temp))
	w("# NRI's socket is a host-global path; the harness does not need NRI.")
	w(`disabled_plugins = ["io.containerd.nri.v1.nri"]`)
	w("")
	w("[grpc]")
	w("  address = %s", q(c.GRPCAddress))
	w("[ttrpc]")
	w("  address = %s", q(c.TTRPCAddress))
	w("[debug]")
	w("  level = %s", q(c.LogLevel))
	w("")
	w("[plugins]")
	w("  [plugins.'io.containerd.internal.v1.opt']")
	w("    path = %s", q(c.Opt))
	w("  [plugins.'io.containerd.shim.v1.manager']")
	w("    socket_dir = %s", q(c.SocketDir))
	w("  [plugins.'io.containerd.grpc.v1.cri']")
	w("    disable_tcp_service = true")
	w("    stream_server_address = \"127.0.0.1\"")
	w("    stream_server_port = \"%d\"", streamPort)
	w("  [plugins.'io.containerd.cri.v1.images']")
	w("    snapshotter = \"overlayfs\"")
	w("    [plugins.'io.containerd.cri.v1.images'.pinned_images]")
	w("      sandbox = %s", q(c.SandboxImage))
	w("    [plugins.'io.containerd.cri.v1.images'.registry]")
	w("      config_path = %s", q(c.RegistryConfig))
	w("  [plugins.'io.containerd.cri.v1.runtime']")
	w("    enable_selinux = false")
	w("    restrict_oom_score_adj = true")
	w("    netns_mounts_under_state_dir = true")
	w("    [plugins.'io.containerd.cri.v1.runtime'.cni]")
	w("      bin_dirs = [%s]", q(c.CNIBinDir))
	w("      conf_dir = %s", q(c.CNIConfDir))
	w("      max_conf_num = 1")
	w("    [plugins.'io.containerd.cri.v1.runtime'.containerd]")
	w("      default_runtime_name = \"runc\"")
	w("      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]")
	w("        runtime_type = \"io.containerd.runc.v2\"")
	w("        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]")
	w("          BinaryName = %s", q(c.RuncBinary))
	w("          Root = %s", q(c.RuncRoot))
	w("          SystemdCgroup = false")
	w("      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.podvm]")
	w("        runtime_type = \"io.containerd.podvm.v2\"")
	w("        pod_annotations = [\"podvm.io/*\"]")
	w("        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.podvm.options]")
	w("          ConfigPath = %s", q(c.PodvmConfigPath))
	return b.String()
}

// cniConflist is the pod network: a bridge with host-local IPAM on subnet, portmap and loopback
// (which passes the bridge's result through). It exists only inside the harness's network
// namespace. IPAM state goes to ipamDir instead of the host-global /var/lib/cni/networks. A
// non-zero mtu is set on the bridge and the pod veths.
func cniConflist(name, bridge, subnet, ipamDir string, mtu int) ([]byte, error) {
	bridgeConf := map[string]any{
		"type":        "bridge",
		"bridge":      bridge,
		"isGateway":   true,
		"ipMasq":      false,
		"hairpinMode": true,
		"ipam": map[string]any{
			"type":    "host-local",
			"dataDir": ipamDir,
			"ranges":  [][]map[string]string{{{"subnet": subnet}}},
			"routes":  []map[string]string{{"dst": "0.0.0.0/0"}},
		},
	}
	if mtu > 0 {
		bridgeConf["mtu"] = mtu
	}
	conf := map[string]any{
		"cniVersion": "1.0.0",
		"name":       name,
		"plugins": []any{
			bridgeConf,
			map[string]any{
				"type":         "portmap",
				"capabilities": map[string]bool{"portMappings": true},
			},
			map[string]any{"type": "loopback"},
		},
	}
	return json.MarshalIndent(conf, "", "  ")
}
