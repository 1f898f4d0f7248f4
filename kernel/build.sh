#!/usr/bin/env bash
# Builds podvm's guest kernel: Debian's linux-source-6.1 with kernel/patches/*.patch applied,
# `make tinyconfig` plus the fragments in kernel/config/*.config, everything built in (no
# modules), LZ4-compressed bzImage, and the uncompressed kernel QEMU boots through its PVH entry.
#
# The result is a kernel tree `podvm image build --kernel` accepts:
#   $PODVM_DEV/kernel-build/<key>/boot/vmlinuz-<release>   (bzImage)
#   $PODVM_DEV/kernel-build/<key>/boot/vmlinux-<release>   (ELF with a PVH entry, stripped; the
#                                                           image's kernel, docs/kernel.md)
#   $PODVM_DEV/kernel-build/<key>/boot/config-<release>
#   $PODVM_DEV/kernel-build/<key>/lib/modules/<release>/modules.builtin (and an empty modules.dep)
# where <key> hashes the source package version, the patches, the fragments and this script: a tree with that
# key is reused as is, so a machine builds each kernel once (~6-10 min with 2 cores).
#
# and $PODVM_DEV/kernel/podvm links to the tree last built (`podvm image build`'s default kernel
# when present, see guestimage.FindKernel).
#
#   kernel/build.sh          build unless cached; prints the tree's path on the last line
#   kernel/build.sh --dir    print the tree's path only (no build)
#
# Environment: PODVM_DEV (default /opt/podvm-dev), KERNEL_SOURCE_PKG (default linux-source-6.1),
# JOBS (default nproc).
set -euo pipefail
# Run from make (make kernel, make test), this script would inherit the outer make's flags,
# among them -w: the kernel's makes would then print "Entering directory" lines into what
# this script reads from them (the kernel release). Its makes are its own.
unset MAKEFLAGS MFLAGS MAKELEVEL

PODVM_DEV=${PODVM_DEV:-/opt/podvm-dev}
KERNEL_SOURCE_PKG=${KERNEL_SOURCE_PKG:-linux-source-6.1}
JOBS=${JOBS:-$(nproc)}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=$PODVM_DEV/kernel-build

log() { printf '[kernel] %s\n' "$*" >&2; }
die() { printf 'kernel/build.sh: %s\n' "$*" >&2; exit 1; }

srcver=$(dpkg-query -W -f='${Version}' "$KERNEL_SOURCE_PKG" 2>/dev/null) ||
  die "$KERNEL_SOURCE_PKG is not installed: run 'make deps' (it installs it with apt)"
tarball=$(dpkg -L "$KERNEL_SOURCE_PKG" | grep -E '/usr/src/linux-source-[0-9.]+\.tar\.(xz|bz2|gz)$' | head -n1)
[ -n "$tarball" ] && [ -f "$tarball" ] || die "$KERNEL_SOURCE_PKG $srcver ships no source tarball in /usr/src"

fragments=("$here"/config/*.config)
shopt -s nullglob
patches=("$here"/patches/*.patch)
shopt -u nullglob
patchkey=$(cat /dev/null "${patches[@]}" | sha256sum | cut -c1-16)
key=$( { echo "$KERNEL_SOURCE_PKG $srcver"; cat "${patches[@]}" "${fragments[@]}" "$here/build.sh"; } | sha256sum | cut -c1-16)
out=$cache/$key

if [ "${1:-}" = --dir ]; then
  echo "$out"
  exit 0
fi

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9 # one build at a time per machine; a second caller waits and then finds the cache

# link points $PODVM_DEV/kernel/podvm at the tree.
link() {
  mkdir -p "$PODVM_DEV/kernel"
  ln -sfn "$out" "$PODVM_DEV/kernel/podvm"
}

if [ -f "$out/.done" ]; then
  log "cached: $out"
  link
  echo "$out"
  exit 0
fi

for tool in make gcc bc bison flex lz4 perl patch strip; do
  command -v "$tool" >/dev/null || die "$tool is missing: run 'make deps'"
done
[ -e /usr/include/libelf.h ] || die "libelf-dev is missing: run 'make deps'"
[ -e /usr/include/openssl/ssl.h ] || die "libssl-dev is missing: run 'make deps'"

# The source, extracted once per package version (and not modified: objects go to $obj).
src=$cache/src-$srcver
if [ ! -f "$src/.done" ]; then
  log "extracting $tarball"
  rm -rf "$src"
  mkdir -p "$src"
  tar -C "$src" -xf "$tarball"
  touch "$src/.done"
fi
# The patched source: a hard-linked copy of the extracted one per set of patches (patch replaces
# the files it changes, so the extracted tree stays as it is), made once.
if [ "${#patches[@]}" -gt 0 ]; then
  psrc=$cache/src-$srcver-$patchkey
  if [ ! -f "$psrc/.done" ]; then
    log "applying ${patches[*]##*/}"
    rm -rf "$psrc"
    cp -al "$src" "$psrc"
    rm -f "$psrc/.done"
    ptree=$(find "$psrc" -mindepth 1 -maxdepth 1 -type d -name 'linux-source-*' | head -n1)
    for p in "${patches[@]}"; do
      patch -s -p1 -N --no-backup-if-mismatch -d "$ptree" <"$p" || die "$p does not apply to $KERNEL_SOURCE_PKG $srcver"
    done
    touch "$psrc/.done"
  fi
  src=$psrc
fi
tree=$(find "$src" -mindepth 1 -maxdepth 1 -type d -name 'linux-source-*' | head -n1)
[ -n "$tree" ] || die "no linux-source-* directory in $src"

# One object directory per source tree, reused: a changed fragment rebuilds incrementally.
obj=$cache/obj
[ "${#patches[@]}" -eq 0 ] || obj=$cache/obj-$patchkey
mkdir -p "$obj"
# Reproducible: the build date is the source tarball's.
export KBUILD_BUILD_USER=podvm KBUILD_BUILD_HOST=podvm KBUILD_BUILD_TIMESTAMP="@$(stat -c %Y "$tarball")"
kmake() { make -s --no-print-directory -C "$tree" O="$obj" ARCH=x86_64 LOCALVERSION=-podvm "$@"; }

log "configuring: tinyconfig + ${fragments[*]##*/}"
kmake tinyconfig >/dev/null
# -m: merge only; olddefconfig then resolves dependencies.
KCONFIG_CONFIG="$obj/.config" "$tree/scripts/kconfig/merge_config.sh" -m -O "$obj" \
  "$obj/.config" "${fragments[@]}" >/dev/null
kmake olddefconfig >/dev/null

# Every line of every fragment must have survived olddefconfig: a feature a pod expects must not
# vanish silently because a dependency is missing.
bad=0
while IFS= read -r line; do
  case "$line" in
    CONFIG_*=*)
      grep -qxF "$line" "$obj/.config" || {
        log "not in the final .config: $line (got: $(grep -E "^(# )?${line%%=*}[= ]" "$obj/.config" || echo unset))"
        bad=1
      } ;;
    "# CONFIG_"*" is not set")
      opt=${line#\# }; opt=${opt%% *}
      if grep -qE "^$opt=" "$obj/.config"; then log "should be off but is on: $(grep -E "^$opt=" "$obj/.config")"; bad=1; fi ;;
  esac
done < <(cat "${fragments[@]}")
[ "$bad" = 0 ] || die "the fragments in $here/config do not hold (see above); fix their dependencies"

release=$(kmake kernelrelease)
[[ $release =~ ^[0-9][^[:space:]/]*$ ]] || die "the kernel's 'make kernelrelease' printed '$release', not a release"
log "building $release with $JOBS jobs (several minutes)"
start=$SECONDS
kmake -j"$JOBS" bzImage
log "built in $((SECONDS - start)) s"

tmp=$out.tmp
rm -rf "$tmp"
mkdir -p "$tmp/boot" "$tmp/lib/modules/$release"
cp "$obj/arch/x86/boot/bzImage" "$tmp/boot/vmlinuz-$release"
# Symbols and debug sections off; the loaded segments and the PVH note (.notes) stay.
strip -o "$tmp/boot/vmlinux-$release" "$obj/vmlinux"
cp "$obj/.config" "$tmp/boot/config-$release"
cp "$obj/modules.builtin" "$tmp/lib/modules/$release/modules.builtin"
: >"$tmp/lib/modules/$release/modules.dep" # no loadable modules
printf 'source=%s %s\nrelease=%s\n' "$KERNEL_SOURCE_PKG" "$srcver" "$release" >"$tmp/podvm-kernel.txt"
touch "$tmp/.done"
rm -rf "$out"
mv "$tmp" "$out"
link
log "kernel $release: $out ($(du -k "$out/boot/vmlinuz-$release" | cut -f1) KiB)"
echo "$out"
