package harness

import (
	"encoding/json"
	"fmt"
	"strings"
	"text/template"
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
	NoPodvmRuntime    bool     // the podvm runtime comes from a drop-in
	Imports           []string // config files containerd imports
	LogLevel          string
}

// configTemplate is containerd 2.4's config format version 3; q quotes a string as TOML (and
// Go) do.
var configTemplate = template.Must(template.New("config.toml").Funcs(template.FuncMap{
	"q": func(s string) string { return fmt.Sprintf("%q", s) },
}).Parse(`version = 3
{{- if .Imports}}
imports = [{{range $i, $f := .Imports}}{{if $i}}, {{end}}{{q $f}}{{end}}]
{{- end}}
root = {{q .Root}}
state = {{q .State}}
temp = {{q .Temp}}
# NRI's socket is a host-global path; the harness does not need NRI.
disabled_plugins = ["io.containerd.nri.v1.nri"]

[grpc]
  address = {{q .GRPCAddress}}
[ttrpc]
  address = {{q .TTRPCAddress}}
[debug]
  level = {{q .LogLevel}}

[plugins]
  [plugins.'io.containerd.internal.v1.opt']
    path = {{q .Opt}}
  [plugins.'io.containerd.shim.v1.manager']
    socket_dir = {{q .SocketDir}}
  [plugins.'io.containerd.grpc.v1.cri']
    disable_tcp_service = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "{{.StreamPort}}"
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = "overlayfs"
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = {{q .SandboxImage}}
    [plugins.'io.containerd.cri.v1.images'.registry]
      config_path = {{q .RegistryConfig}}
  [plugins.'io.containerd.cri.v1.runtime']
    enable_selinux = false
    restrict_oom_score_adj = true
    netns_mounts_under_state_dir = true
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = [{{q .CNIBinDir}}]
      conf_dir = {{q .CNIConfDir}}
      max_conf_num = 1
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = "runc"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          BinaryName = {{q .RuncBinary}}
          Root = {{q .RuncRoot}}
          SystemdCgroup = false
{{- if not .NoPodvmRuntime}}
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.podvm]
        runtime_type = "io.containerd.podvm.v2"
        pod_annotations = ["podvm.io/*"]
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.podvm.options]
          ConfigPath = {{q .PodvmConfigPath}}
{{- end}}
`))

// render writes containerd 2.4's config format version 3.
func (c containerdConfig) render() (string, error) {
	var b strings.Builder
	err := configTemplate.Execute(&b, struct {
		containerdConfig
		StreamPort int
	}{c, streamPort})
	return b.String(), err
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
