#!/usr/bin/env bash
# Packages podvm for node image bakers (docs/install.md, "Packages"):
#   package.sh version   the package version: 0.0.0~git<commit date>.<commit>[+dirty] (no tags yet)
#   package.sh dist      _output/podvm-<v>-linux-amd64.tar.gz: the install tree of
#                        'podvm install --root', paths from / (tar -xzf ... -C / installs it)
#   package.sh deb       _output/podvm_<v>_amd64.deb from that tree, with dpkg-deb
# Run from the repository root after 'make build image' (the Makefile's dist and deb do).
set -euo pipefail

OUT=${OUT:-$PWD/_output}
BIN=${BIN:-$PWD/bin}
IMAGE_DIR=${IMAGE_DIR:-$OUT/image}
DIST_PREFIX=${DIST_PREFIX:-/usr}
MAINTAINER=${DEB_MAINTAINER:-podvm maintainers <podvm@localhost>}

version() {
	if [ -n "${PKG_VERSION:-}" ]; then echo "$PKG_VERSION"; return; fi
	local v
	v="0.0.0~git$(TZ=UTC git log -1 --format=%cd --date=format-local:%Y%m%d%H%M).$(git rev-parse --short=7 HEAD)"
	if [ -n "$(git status --porcelain --untracked-files=no)" ]; then v+="+dirty"; fi
	echo "$v"
}

# stage installs the tree into $OUT/dist/root, from scratch.
stage() {
	local root=$OUT/dist/root
	rm -rf "$OUT/dist" && mkdir -p "$root"
	"$BIN/podvm" install --root "$root" --prefix "$DIST_PREFIX" --image "$IMAGE_DIR" >/dev/null
	echo "$root"
}

# epoch is the commit time: the archives' mtimes, so the same commit packs the same bytes.
epoch() { git log -1 --format=%ct; }

dist() {
	local v root tarball
	v=$(version)
	root=$(stage)
	tarball=$OUT/podvm-${v//\~/-}-linux-amd64.tar.gz
	tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$(epoch)" \
		-C "$root" -czf "$tarball" .
	echo "$tarball"
}

deb() {
	local v root pkg size
	v=$(version)
	root=$(stage)
	pkg=$OUT/deb/podvm_${v}_amd64
	rm -rf "$OUT/deb" && mkdir -p "$pkg"
	cp -a "$root/." "$pkg/"
	mkdir -m 755 "$pkg/DEBIAN"
	size=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
	sed -e "s|@VERSION@|$v|" -e "s|@MAINTAINER@|$MAINTAINER|" -e "s|@SIZE@|$size|" \
		deploy/deb/control.in >"$pkg/DEBIAN/control"
	# Only the node config is a conffile: apt remove leaves it (purge removes it). The
	# containerd drop-in goes with the package, so containerd never names a missing shim.
	echo /etc/podvm/config.toml >"$pkg/DEBIAN/conffiles"
	install -m 755 deploy/deb/postinst deploy/deb/postrm "$pkg/DEBIAN/"
	find "$pkg" -exec touch -h -d "@$(epoch)" {} +
	SOURCE_DATE_EPOCH=$(epoch) dpkg-deb --root-owner-group -Zgzip --build "$pkg" "$OUT/podvm_${v}_amd64.deb" >/dev/null
	echo "$OUT/podvm_${v}_amd64.deb"
}

case "${1:-}" in
version | dist | deb) "$1" ;;
*) echo "usage: $0 version|dist|deb" >&2; exit 2 ;;
esac
