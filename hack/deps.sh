#!/usr/bin/env bash
# Installs everything podvm's build, demo and tests need on a fresh Debian 12 machine, as root.
# Idempotent: each step checks what is there first. Go tools go to $PODVM_DEV (default
# /opt/podvm-dev): bin/ for containerd, runc, protoc plugins, golangci-lint; cni/ for CNI plugins;
# kernel/ for the guest kernel package (downloaded, never installed on the host). The kernel
# source (linux-source-6.1) is an apt package; `make kernel` builds it into $PODVM_DEV/kernel-build.
set -euo pipefail

PODVM_DEV=${PODVM_DEV:-/opt/podvm-dev}
CONTAINERD_VERSION=v2.4.2
RUNC_VERSION=v1.5.2
CNI_PLUGINS_VERSION=v1.9.1
PROTOC_GEN_GO_VERSION=v1.36.12
PROTOC_GEN_TTRPC_VERSION=v1.2.9
# The linter behind `make lint` (.golangci.yml is a v2 config); built with this tree's Go, so it
# understands the go.mod's language version.
GOLANGCI_LINT_VERSION=v2.15.0
# The single-node cluster of the e2e suite (docs/e2e.md): built from hack/k8s/go.mod, whose
# require and replace lines pin the same release (and etcd with it).
KUBERNETES_VERSION=v1.36.3
# The guest kernel: Debian's cloud kernel flavour, resolved from the metapackage at install time.
KERNEL_META=${KERNEL_META:-linux-image-cloud-amd64}

APT_PACKAGES=(
  qemu-system-x86 qemu-utils busybox-static iproute2 iptables protobuf-compiler
  libseccomp-dev cpio e2fsprogs kmod make gcc git ca-certificates
  # The guest kernel `make kernel` builds (kernel/build.sh): the source and its build tools.
  linux-source-6.1 xz-utils bc bison flex perl libelf-dev libssl-dev lz4 patch
)

log() { printf '[deps] %s\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
  echo "hack/deps.sh must run as root (it installs Debian packages); try: sudo make deps" >&2
  exit 1
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v go >/dev/null; then
  if [ -x /usr/local/go/bin/go ]; then export PATH=$PATH:/usr/local/go/bin; else
    echo "Go is not installed: install Go (see go.mod for the version) into /usr/local/go" >&2; exit 1
  fi
fi

mkdir -p "$PODVM_DEV/bin" "$PODVM_DEV/cni" "$PODVM_DEV/kernel"

# goinstall NAME VERSION PKG...: go install into $PODVM_DEV/bin unless that version is recorded.
goinstall() {
  local name=$1 version=$2 stamp; shift 2
  stamp="$PODVM_DEV/.stamp-$name-$version"
  [ -e "$stamp" ] && return 0
  log "go install $name@$version"
  GOBIN="$PODVM_DEV/${GOBIN_SUBDIR:-bin}" CGO_ENABLED=${CGO:-0} go install ${GOFLAGS_EXTRA:-} "$@"
  touch "$stamp"
}

goinstall containerd "$CONTAINERD_VERSION" \
  "github.com/containerd/containerd/v2/cmd/containerd@$CONTAINERD_VERSION" \
  "github.com/containerd/containerd/v2/cmd/ctr@$CONTAINERD_VERSION" \
  "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION"
CGO=1 GOFLAGS_EXTRA="-tags=seccomp" goinstall runc "$RUNC_VERSION" "github.com/opencontainers/runc@$RUNC_VERSION"
GOBIN_SUBDIR=cni goinstall cni-plugins "$CNI_PLUGINS_VERSION" \
  "github.com/containernetworking/plugins/plugins/main/bridge@$CNI_PLUGINS_VERSION" \
  "github.com/containernetworking/plugins/plugins/main/loopback@$CNI_PLUGINS_VERSION" \
  "github.com/containernetworking/plugins/plugins/main/ptp@$CNI_PLUGINS_VERSION" \
  "github.com/containernetworking/plugins/plugins/main/macvlan@$CNI_PLUGINS_VERSION" \
  "github.com/containernetworking/plugins/plugins/ipam/host-local@$CNI_PLUGINS_VERSION" \
  "github.com/containernetworking/plugins/plugins/meta/portmap@$CNI_PLUGINS_VERSION"
goinstall protoc-gen-go "$PROTOC_GEN_GO_VERSION" "google.golang.org/protobuf/cmd/protoc-gen-go@$PROTOC_GEN_GO_VERSION"
goinstall protoc-gen-go-ttrpc "$PROTOC_GEN_TTRPC_VERSION" "github.com/containerd/ttrpc/cmd/protoc-gen-go-ttrpc@$PROTOC_GEN_TTRPC_VERSION"
goinstall golangci-lint "$GOLANGCI_LINT_VERSION" "github.com/golangci/golangci-lint/v2/cmd/golangci-lint@$GOLANGCI_LINT_VERSION"

# Kubernetes: kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and etcd, built
# from hack/k8s (its go.mod pins them) into $PODVM_DEV/k8s/<version>. Cold: ~10 min on 2 cores;
# skipped when every binary of that version is there. The version goes in by -X, as Kubernetes'
# own build does, or the binaries call themselves v0.0.0.
build_kubernetes() {
  local dir="$PODVM_DEV/k8s/$KUBERNETES_VERSION" src bins b ver major minor ldflags tmp
  src=$(cd "$(dirname "${BASH_SOURCE[0]}")/k8s" && pwd)
  bins=(kube-apiserver kube-controller-manager kube-scheduler kubelet etcd)
  for b in "${bins[@]}"; do [ -x "$dir/$b" ] || break; done
  [ -x "$dir/$b" ] && return 0
  grep -qE "^\s*k8s\.io/kubernetes $KUBERNETES_VERSION( |\$)" "$src/go.mod" ||
    { echo "hack/k8s/go.mod does not require k8s.io/kubernetes $KUBERNETES_VERSION: update both" >&2; exit 1; }
  ver=${KUBERNETES_VERSION#v}; major=${ver%%.*}; minor=${ver#*.}; minor=${minor%%.*}
  ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  log "build Kubernetes $KUBERNETES_VERSION and etcd into $dir (cold: ~10 min)"
  tmp="$dir.tmp"; rm -rf "$tmp"; mkdir -p "$tmp"
  for b in kube-apiserver kube-controller-manager kube-scheduler kubelet; do
    (cd "$src" && CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$tmp/$b" "k8s.io/kubernetes/cmd/$b")
  done
  (cd "$src" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3)
  rm -rf "$dir"; mv "$tmp" "$dir"
}
build_kubernetes

# The guest kernel package, downloaded (not installed) into $PODVM_DEV/kernel.
if ! ls "$PODVM_DEV"/kernel/linux-image-*.deb >/dev/null 2>&1; then
  pkg=$(apt-cache depends "$KERNEL_META" 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
  if [ -z "$pkg" ]; then apt-get update -qq; pkg=$(apt-cache depends "$KERNEL_META" | awk '/Depends: linux-image-/ {print $2; exit}'); fi
  [ -n "$pkg" ] || { echo "cannot resolve the guest kernel package from $KERNEL_META" >&2; exit 1; }
  log "apt-get download $pkg"
  (cd "$PODVM_DEV/kernel" && apt-get download -qq "$pkg")
fi
log "ok: tools in $PODVM_DEV, Kubernetes in $PODVM_DEV/k8s/$KUBERNETES_VERSION, guest kernel $(ls "$PODVM_DEV"/kernel/linux-image-*.deb)"
