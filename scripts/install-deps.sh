#!/bin/sh
# Install the Debian (bookworm) packages podvisor needs to build and test.
#
# Idempotent: asks dpkg which packages are missing first; on a machine that
# already has everything it does nothing (no apt-get update) and stays quiet.
# Runs as root, or through sudo when started by another user.
set -eu

PACKAGES="
containerd
runc
linux-source-6.1
flex
bison
libelf-dev
bc
busybox-static
cpio
lz4
e2fsprogs
socat
containernetworking-plugins
iproute2
libseccomp-dev
protobuf-compiler
ccache
libssl-dev
xz-utils
make
gcc
fonts-dejavu-core
"

missing=""
for pkg in $PACKAGES; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    if [ "$status" != "installed" ]; then
        missing="$missing $pkg"
    fi
done

if [ -z "$missing" ]; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "install-deps.sh: missing packages:$missing" >&2
    echo "install-deps.sh: not root and no sudo; install them as root" >&2
    exit 1
fi

echo "install-deps.sh: installing:$missing" >&2
# shellcheck disable=SC2086  # word splitting of $SUDO and $missing is intended
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
# shellcheck disable=SC2086
$SUDO env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends $missing >&2
