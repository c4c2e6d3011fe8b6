#!/usr/bin/env bash
# Build a test initramfs: OUT_DIR/NAME.cpio
#
# Usage: rootfs/build-initramfs.sh OUT_DIR [NAME]
#   NAME = boot-test (default): init marks the boot timer, reports, reboots.
#   NAME = devices-test: init also runs /bin/pvtest (rootfs/guest-test, a static Rust
#          binary built here) against virtio-blk, virtio-fs, virtio-vsock and
#          virtio-net.
#   NAME = agent-test: /init is the guest agent (rootfs/agent, static, size-optimised
#          build), nothing else: no busybox, no shell (tests/guest_agent.rs).
# Prints ONLY the path of the archive on stdout; messages go to stderr.
#
# The archive is an UNCOMPRESSED newc cpio (the guest kernel has no RD_*
# decompressors, and on nested-KVM hosts gunzip in the emulated guest kernel
# costs ~50 s). Contents:
#   /init                rootfs/NAME/init (busybox sh script); agent-test: the agent
#                        (then only /init, /etc, /run, /tmp and the mount points below)
#   /bin/pvtest          devices-test only
#   /bin/busybox         Debian's busybox-static (statically linked)
#   /bin/{sh,mount,devmem,reboot} -> busybox   (only the applets init uses)
#   /etc/fstab           proc, sysfs, devtmpfs (init runs one `mount -a`)
#   /dev /proc /sys      mount points
#   /dev/console         char 5:1, so that PID 1 gets stdin/stdout/stderr
# The archive is reproducible: sorted entries, mtime 0, owner 0:0, renumbered
# inodes (cpio --reproducible). It needs no root: /dev/console comes from a
# second, fixed newc archive appended to cpio's output (the kernel unpacks
# concatenated cpio archives in order).
set -euo pipefail
exec 3>&1 1>&2

[ $# -ge 1 ] && [ $# -le 2 ] || { echo "usage: $0 OUT_DIR [boot-test|devices-test|agent-test]"; exit 2; }
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
out_dir=$1
name=${2:-boot-test}
[ "$name" = agent-test ] || [ -f "$here/$name/init" ] || { echo "build-initramfs: error: no init for image '$name' ($here/$name/init)"; exit 2; }
busybox=/bin/busybox
applets=(sh mount devmem reboot)

die() { echo "build-initramfs: error: $*"; exit 1; }

if ! command -v cpio >/dev/null 2>&1 ||
   [ "$(dpkg-query -W -f='${db:Status-Status}' busybox-static 2>/dev/null)" != installed ] ||
   { [ "$name" = agent-test ] &&
     [ "$(dpkg-query -W -f='${db:Status-Status}' libseccomp-dev 2>/dev/null)" != installed ]; }; then
    "$repo/scripts/install-deps.sh"
fi
[ -x "$busybox" ] || die "$busybox missing (package busybox-static)"
if readelf -l "$busybox" | grep 'Requesting program interpreter' >/dev/null; then
    die "$busybox is dynamically linked; install busybox-static instead of busybox"
fi
available=$("$busybox" --list)   # (not piped into grep -q: pipefail + SIGPIPE)
for a in "${applets[@]}"; do
    grep -qx "$a" <<<"$available" || die "$busybox has no '$a' applet"
done

extra_bins=()
if [ "$name" = devices-test ]; then
    # A static binary: the guest has no libc. Built on the gnu target with crt-static
    # (no musl toolchain is installable here).
    RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release \
        -p podvisor-guest-test --target x86_64-unknown-linux-gnu --manifest-path "$repo/Cargo.toml"
    pvtest="${CARGO_TARGET_DIR:-$repo/target}/x86_64-unknown-linux-gnu/release/pvtest"
    if readelf -l "$pvtest" | grep 'Requesting program interpreter' >/dev/null; then
        die "$pvtest is dynamically linked"
    fi
    extra_bins+=("$pvtest")
fi
if [ "$name" = agent-test ]; then
    # PID 1 itself: static (crt-static, gnu target) and built for size, in a target dir of
    # its own so that the workspace's release builds keep their profile. Seccomp links
    # Debian's libseccomp.a (libseccomp-dev) statically; the same variables are in the
    # repo's .cargo/config.toml, which cargo reads only when started inside the repo.
    seccomp_lib=/usr/lib/x86_64-linux-gnu
    [ -f "$seccomp_lib/libseccomp.a" ] || die "$seccomp_lib/libseccomp.a missing (package libseccomp-dev)"
    agent_target="${CARGO_TARGET_DIR:-$repo/target}/agent-size"
    LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH="$seccomp_lib" \
    CARGO_PROFILE_RELEASE_OPT_LEVEL=z CARGO_PROFILE_RELEASE_LTO=true \
    CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --quiet --release -p podvisor-agent --target x86_64-unknown-linux-gnu \
        --manifest-path "$repo/Cargo.toml" --target-dir "$agent_target"
    agent="$agent_target/x86_64-unknown-linux-gnu/release/podvisor-agent"
    if readelf -l "$agent" | grep 'Requesting program interpreter' >/dev/null; then
        die "$agent is dynamically linked"
    fi
fi

mkdir -p "$out_dir"
out_dir=$(cd "$out_dir" && pwd)
out="$out_dir/$name.cpio"
tmp=$(mktemp "$out_dir/.$name.cpio.XXXXXX")
stage=$(mktemp -d)
trap 'rm -rf "$stage" "$tmp"' EXIT

mkdir -m 0755 "$stage/dev" "$stage/etc" "$stage/proc" "$stage/sys"
if [ "$name" = agent-test ]; then
    # The agent mounts the rest (sys/fs/cgroup, dev/pts, dev/shm) itself.
    mkdir -m 0755 "$stage/run" "$stage/tmp"
    install -m 0755 "$agent" "$stage/init"
    strip "$stage/init"
else    # the busybox images
mkdir -m 0755 "$stage/bin"
install -m 0755 "$busybox" "$stage/bin/busybox"
for a in "${applets[@]}"; do
    ln -s busybox "$stage/bin/$a"
done
for bin in ${extra_bins[@]+"${extra_bins[@]}"}; do
    install -m 0755 "$bin" "$stage/bin/$(basename "$bin")"
    strip "$stage/bin/$(basename "$bin")"
done
install -m 0755 "$here/$name/init" "$stage/init"
cat > "$stage/etc/fstab" <<'EOF'
proc     /proc proc     defaults 0 0
sysfs    /sys  sysfs    defaults 0 0
devtmpfs /dev  devtmpfs defaults 0 0
EOF
chmod 0644 "$stage/etc/fstab"
fi  # agent-test / busybox images
find "$stage" -exec touch -h -d @0 {} +

(
    cd "$stage"
    find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
        cpio --quiet -o -H newc --reproducible -R 0:0
) > "$tmp"

# Second archive: /dev/console (crw------- 0:0, 5:1) and the trailer, written
# by hand in newc format: "070701", 13 fields of 8 hex digits (ino, mode, uid,
# gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor,
# namesize, check), the NUL-terminated name, padding to 4 bytes.
newc() {    # newc INO MODE NLINK RDEVMAJOR RDEVMINOR NAME
    local name=$6 namesize=$((${#6} + 1))
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        "$1" "$2" 0 0 "$3" 0 0 0 0 "$4" "$5" "$namesize" 0
    printf '%s\0' "$name"
    printf '%*s' $(((4 - (110 + namesize) % 4) % 4)) '' | tr ' ' '\0'
}
{
    newc 1 $((8#020600)) 1 5 1 dev/console
    newc 0 0 1 0 0 'TRAILER!!!'
} >> "$tmp"

chmod 0644 "$tmp"
mv -f "$tmp" "$out"
trap 'rm -rf "$stage"' EXIT
echo "build-initramfs: $out ($(stat -c %s "$out") bytes)"
echo "$out" >&3
