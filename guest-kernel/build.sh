#!/usr/bin/env bash
# Build podvisor's guest kernel (an ELF vmlinux with a PVH entry point) from
# Debian's linux-source-6.1, config.fragment and patches/*.patch.
#
# Usage: guest-kernel/build.sh
# Prints ONLY the path of the built vmlinux on stdout; progress goes to stderr.
#
# Results are cached outside the repository, keyed by the sha256 of
# (config.fragment, patches, this script, linux-source-6.1 package version):
#   ${PODVISOR_CACHE:-$HOME/.cache/podvisor}/guest-kernel/<key>/
#       vmlinux      the kernel (load it through its PVH note: no decompressor)
#       .config      the final kernel config
#       System.map   symbols (map a RIP of an emulation failure to code)
#       build.log    configuration + compiler output and stage timings
# A cache hit prints the path and exits at once. A miss extracts the source
# into <cache>/guest-kernel/build-<key>/ (about 1.4 GB while building; removed
# after a successful build, kept for inspection after a failure), builds
# there and renames the result into place, so a <key>/ directory is always
# complete. Compiler output is cached by ccache in <cache>/guest-kernel/ccache
# (limit 1 GB): a rebuild after a small fragment/patch change takes about a
# minute instead of 4-7.
#
# Environment: PODVISOR_CACHE (cache root), PODVISOR_JOBS (make -j, default
# nproc), PODVISOR_NO_CCACHE=1 (build without ccache).
set -euo pipefail

# Everything this script prints goes to stderr; fd 3 is the real stdout.
exec 3>&1 1>&2

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
fragment="$here/config.fragment"
tarball=/usr/src/linux-source-6.1.tar.xz
srcname=linux-source-6.1
arch=x86_64
# Fixed build identity (uname -v, /proc/version) for reproducible output.
build_env=(
    KBUILD_BUILD_USER=podvisor
    KBUILD_BUILD_HOST=podvisor
    KBUILD_BUILD_VERSION=1
    "KBUILD_BUILD_TIMESTAMP=Thu Jan  1 00:00:00 UTC 2026"
)

log() { echo "guest-kernel: $*"; }
die() { echo "guest-kernel: error: $*"; exit 1; }

# --- dependencies: install when anything the build needs is missing --------
deps_ok() {
    [ -r "$tarball" ] || return 1
    local cmd
    for cmd in make gcc flex bison bc xz perl readelf patch flock sha256sum; do
        command -v "$cmd" >/dev/null 2>&1 || return 1
    done
    [ -e /usr/include/libelf.h ] && [ -e /usr/include/gelf.h ] || return 1
    [ -e /usr/include/openssl/opensslv.h ] || return 1
}
src_version() { dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null; }

version=$(src_version || true)
if [ -z "$version" ] || [ ! -r "$tarball" ]; then
    log "linux-source-6.1 missing: running scripts/install-deps.sh"
    "$repo/scripts/install-deps.sh"
    version=$(src_version) || die "linux-source-6.1 still not installed"
fi

# --- cache key ---------------------------------------------------------------
shopt -s nullglob
patches=("$here"/patches/*.patch)   # glob order is sorted (C/UTF-8 collation)
shopt -u nullglob
key=$(
    cd "$here"
    printf 'linux-source-6.1 %s\n' "$version"
    for f in build.sh config.fragment "${patches[@]#"$here"/}"; do
        printf '%s %s\n' "$f" "$(sha256sum < "$f" | cut -d' ' -f1)"
    done | LC_ALL=C sort -k1,1
)
key=$(printf '%s\n' "$key" | sha256sum | cut -d' ' -f1)

cache_root="${PODVISOR_CACHE:-${HOME:?set HOME or PODVISOR_CACHE}/.cache/podvisor}/guest-kernel"
out="$cache_root/$key"
if [ -f "$out/vmlinux" ]; then
    echo "$out/vmlinux" >&3
    exit 0
fi

# --- cache miss: build (one builder per key at a time) -----------------------
mkdir -p "$cache_root"
exec 9>"$cache_root/.lock-$key"
flock 9
if [ -f "$out/vmlinux" ]; then          # built by a concurrent run meanwhile
    echo "$out/vmlinux" >&3
    exit 0
fi

deps_ok || "$repo/scripts/install-deps.sh"
deps_ok || die "build dependencies still missing after scripts/install-deps.sh"

# Work dirs of failed builds are kept for inspection until the next build:
# remove ours and those of other keys that no build is using (lock is free).
for d in "$cache_root"/build-*; do
    [ -d "$d" ] || continue
    k=${d##*/build-}
    [ "$k" = "$key" ] && continue
    { flock -n 8 && rm -rf "$d"; } 8>"$cache_root/.lock-$k" || true
done
work="$cache_root/build-$key"
rm -rf "$work"
mkdir -p "$work/out"
src="$work/$srcname"
blog="$work/out/build.log"
: > "$blog"
t_start=$(date +%s)
stage_t=$t_start
stage() {       # stage NAME: log the time the previous stage took
    local now; now=$(date +%s)
    echo "=== $(date -u '+%F %T') +$((now - stage_t))s: $*" >> "$blog"
    stage_t=$now
    log "$*"
}
fail() {
    echo "----- last lines of $blog -----"
    tail -n 40 "$blog" || true
    echo "-----"
    die "$* (work dir kept: $work)"
}

{
    echo "podvisor guest kernel build"
    echo "key:            $key"
    echo "linux-source:   $version"
    echo "gcc:            $(gcc -dumpfullversion)"
    echo "patches:        ${patches[*]##*/}"
} >> "$blog"

stage "extracting $tarball (key ${key:0:16})"
tar -xJf "$tarball" -C "$work" || fail "extracting $tarball"
[ -f "$src/Makefile" ] || fail "$tarball has no $srcname/Makefile"

stage "applying ${#patches[@]} patch(es)"
for p in "${patches[@]}"; do
    echo "--- patch -p1 < ${p##*/}" >> "$blog"
    patch -d "$src" -p1 --forward --batch < "$p" >> "$blog" 2>&1 \
        || fail "patch ${p##*/} does not apply"
done

make_vars=(ARCH="$arch" "${build_env[@]}")
export ARCH="$arch"                        # merge_config.sh runs make itself
if [ "${PODVISOR_NO_CCACHE:-0}" != 1 ] && [ -x /usr/lib/ccache/gcc ]; then
    # Debian's masquerade directory: gcc (CC and HOSTCC) goes through ccache
    # for every make call, including the ones merge_config.sh makes.
    export PATH="/usr/lib/ccache:$PATH"
    export CCACHE_DIR="$cache_root/ccache"
    export CCACHE_BASEDIR="$src" CCACHE_NOHASHDIR=1 CCACHE_MAXSIZE=1G
    echo "ccache:         $CCACHE_DIR" >> "$blog"
fi

# merge_config.sh -n runs `make allnoconfig` with the fragment as
# KCONFIG_ALLCONFIG, i.e. allnoconfig + fragment. (A separate `make
# allnoconfig` first would be redundant, and passing that .config as a base
# would make merge_config report every base symbol the fragment changes.)
stage "configuring: allnoconfig + config.fragment"
(cd "$src" && scripts/kconfig/merge_config.sh -n "$fragment") \
    > "$work/merge.log" 2>&1 || { cat "$work/merge.log" >> "$blog"; fail "merge_config.sh failed"; }
cat "$work/merge.log" >> "$blog"
make -C "$src" "${make_vars[@]}" olddefconfig >> "$blog" 2>&1 || fail "make olddefconfig failed"

# Fail on anything of the fragment that did not survive: merge_config's own
# report, then our check of every line against the final .config.
bad=$(grep -A2 '^Value requested for' "$work/merge.log" || true)
while IFS= read -r line; do
    case "$line" in
    CONFIG_*=*)
        sym=${line%%=*}
        got=$(grep -E "^(# )?$sym[= ]" "$src/.config" || true)
        [ "$got" = "$line" ] || bad+=$'\n'"$sym: wanted '$line', got '${got:-<absent>}'"
        ;;
    "# CONFIG_"*" is not set")
        sym=${line#\# }; sym=${sym%% *}
        if grep -qE "^$sym=" "$src/.config"; then
            bad+=$'\n'"$sym: wanted off, got '$(grep -E "^$sym=" "$src/.config")'"
        fi
        ;;
    esac
done < "$fragment"
if [ -n "$bad" ]; then
    echo "config.fragment options missing from the final .config:"
    echo "${bad#$'\n'}"
    echo "$bad" >> "$blog"
    die "config check failed (a dependency is off? see $blog)"
fi

jobs=${PODVISOR_JOBS:-$(nproc)}
stage "building vmlinux with make -j$jobs (about 4-7 min cold on 2 cores; log: $blog)"
make -C "$src" "${make_vars[@]}" -j"$jobs" vmlinux >> "$blog" 2>&1 || fail "make vmlinux failed"

stage "checking the PVH entry note"
# XEN_ELFNOTE_PHYS32_ENTRY (type 18) in a "Xen" note: the PVH entry point.
readelf -n --wide "$src/vmlinux" >> "$blog" 2>&1 || fail "readelf failed"
readelf -n --wide "$src/vmlinux" | grep -Eq '^[[:space:]]*Xen[[:space:]].*\(0x0*12\)' \
    || fail "vmlinux lacks the PVH note (XEN_ELFNOTE_PHYS32_ENTRY); is CONFIG_PVH set?"

cp "$src/vmlinux" "$work/out/vmlinux"
cp "$src/.config" "$work/out/.config"
cp "$src/System.map" "$work/out/System.map"
t_end=$(date +%s)
stage "done: vmlinux $(stat -c %s "$work/out/vmlinux") bytes, build time $((t_end - t_start))s"
echo "build time: $((t_end - t_start)) s" >> "$blog"

rm -rf "$out"                              # a leftover without vmlinux
mv -T "$work/out" "$out"                   # atomic: <key>/ appears complete
rm -rf "$work"
echo "$out/vmlinux" >&3
