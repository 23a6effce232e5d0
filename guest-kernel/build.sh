#!/usr/bin/env bash
# Builds the husk guest kernel (vmlinux for the built-in VMM, bzImage for
# QEMU) from Debian's linux-source-6.12 and the fragment husk-guest.config.
#
# The result is cached outside the clone, keyed by the kernel source version
# and a hash of the fragment and this script, so an unchanged configuration
# never rebuilds. With OUT_DIR set, the artifacts are also linked there.
#
# Usage: guest-kernel/build.sh [--print-dir]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
fragment="$here/husk-guest.config"
cache_root="${HUSK_CACHE_DIR:-/var/cache/husk}/guest-kernel"
source_tarball=/usr/src/linux-source-6.12.tar.xz

die() { echo "guest-kernel: $*" >&2; exit 1; }

[ -r "$source_tarball" ] || die "missing $source_tarball: install Debian's linux-source-6.12 ('make deps')"
source_version=$(dpkg-query -W -f='${Version}' linux-source-6.12 2>/dev/null) \
  || die "cannot read the version of package linux-source-6.12"
config_hash=$( (cat "$fragment" "$0"; gcc --version | head -n1) | sha256sum | cut -c1-16)
artifact_dir="$cache_root/${source_version}-${config_hash}"

link_outputs() {
  if [ -n "${OUT_DIR:-}" ]; then
    mkdir -p "$OUT_DIR"
    ln -sfn "$artifact_dir/vmlinux" "$OUT_DIR/vmlinux"
    ln -sfn "$artifact_dir/bzImage" "$OUT_DIR/bzImage"
    ln -sfn "$artifact_dir/config" "$OUT_DIR/guest-kernel.config"
  fi
}

report() {
  echo "guest-kernel: linux-source-6.12 $source_version, config $config_hash"
  echo "guest-kernel: vmlinux $(stat -c %s "$artifact_dir/vmlinux") bytes, bzImage $(stat -c %s "$artifact_dir/bzImage") bytes"
  echo "guest-kernel: artifacts in $artifact_dir"
}

if [ "${1:-}" = "--print-dir" ]; then echo "$artifact_dir"; exit 0; fi

mkdir -p "$cache_root"
# One build at a time on this machine; a second caller waits, then reuses it.
exec 9>"$cache_root/.lock"
flock 9

if [ -f "$artifact_dir/.complete" ]; then
  echo "guest-kernel: cached build reused (nothing changed)"
  link_outputs; report; exit 0
fi

build_dir=$(mktemp -d "$cache_root/build.XXXXXX")
trap 'rm -rf "$build_dir"' EXIT
started=$(date +%s)
echo "guest-kernel: extracting $source_tarball"
tar -xf "$source_tarball" -C "$build_dir"
src=$(echo "$build_dir"/linux-source-6.12)
[ -d "$src" ] || die "unexpected layout of $source_tarball"

echo "guest-kernel: configuring (allnoconfig + husk-guest.config)"
make -C "$src" -s KCONFIG_ALLCONFIG="$fragment" allnoconfig

# Kconfig silently drops options whose dependencies are unmet: fail loudly.
missing=0
while IFS= read -r line; do
  case "$line" in
    CONFIG_*=*) grep -qx -- "$line" "$src/.config" || { echo "guest-kernel: not honoured: $line" >&2; missing=1; } ;;
    "# CONFIG_"*" is not set") grep -q "^${line#\# }" "$src/.config" \
        && { echo "guest-kernel: not honoured: $line" >&2; missing=1; } ;;
  esac
done < <(grep -E '^(CONFIG_|# CONFIG_.* is not set)' "$fragment")
[ "$missing" = 0 ] || die "the fragment asks for options Kconfig rejected (see above)"

echo "guest-kernel: building vmlinux and bzImage with $(nproc) jobs"
make -C "$src" -s -j"$(nproc)" vmlinux bzImage

staging="$artifact_dir.tmp"
rm -rf "$staging"; mkdir -p "$staging"
cp "$src/vmlinux" "$staging/vmlinux"
strip --strip-debug "$staging/vmlinux" 2>/dev/null || true
cp "$src/arch/x86/boot/bzImage" "$staging/bzImage"
cp "$src/.config" "$staging/config"
echo "$(( $(date +%s) - started ))" > "$staging/build-seconds"
touch "$staging/.complete"
rm -rf "$artifact_dir"; mv "$staging" "$artifact_dir"
echo "guest-kernel: built in $(cat "$artifact_dir/build-seconds") s"
link_outputs; report
