#!/usr/bin/env bash
# Prepares the module set podvm-agent is built with (the Makefile's agent target, the
# integration tests' own build): go.mod and go.sum as they are, plus a replace of
# google.golang.org/protobuf by a copy of the version go.mod names whose internal/detrand is
# agent/detrand (its doc comment says why). The agent is then built with
# `go build -modfile OUTDIR/go.mod`; `go version -m podvm-agent` shows the replace.
#   hack/agent-modfile.sh OUTDIR
set -euo pipefail
out=${1:?usage: hack/agent-modfile.sh OUTDIR}
root=$(cd "$(dirname "$0")/.." && pwd)
go=${GO:-go}
mod=google.golang.org/protobuf
src=$(cd "$root" && $go list -f '{{.Module.Dir}}' "$mod/internal/detrand")
if [ ! -f "$src/internal/detrand/rand.go" ]; then
	echo "agent-modfile: $src/internal/detrand/rand.go not found: $mod's detrand moved; update agent/detrand and this script" >&2
	exit 1
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
rm -rf "$out/protobuf"
cp -R "$src" "$out/protobuf"
chmod -R u+w "$out/protobuf"
cp "$root/agent/detrand/detrand.go" "$out/protobuf/internal/detrand/rand.go"
cp "$root/go.mod" "$out/go.mod"
cp "$root/go.sum" "$out/go.sum"
# Relative to the repository when the copy is in it (the Makefile's), so that the path in
# the binary's build information is the same on every machine.
dir=$out/protobuf
case "$dir" in "$root"/*) dir=./${dir#"$root"/} ;; esac
(cd "$root" && $go mod edit -replace "$mod=$dir" "$out/go.mod")
