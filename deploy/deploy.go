// Package deploy holds the files a node needs besides the binaries and the guest image: the
// default node config, the containerd drop-in and the RuntimeClass manifest. They are embedded
// in the podvm CLI, whose `podvm install` writes them.
package deploy

import _ "embed"

// NodeLabel marks nodes that have podvm; the RuntimeClass's nodeSelector requires it "true".
const NodeLabel = "podvm.io/runtime"

// ConfigTOML is the default /etc/podvm/config.toml: every key with its default and a comment.
//
//go:embed config.toml
var ConfigTOML []byte

// ContainerdDropIn is /etc/containerd/conf.d/podvm.toml: the podvm runtime for containerd 2.x.
//
//go:embed containerd-podvm.toml
var ContainerdDropIn []byte

// RuntimeClass is the Kubernetes RuntimeClass manifest for handler podvm.
//
//go:embed runtimeclass.yaml
var RuntimeClass []byte

// InstallerManifest is the DaemonSet installer's manifest (namespace, service account, RBAC,
// DaemonSet), as users apply it.
//
//go:embed installer.yaml
var InstallerManifest []byte
