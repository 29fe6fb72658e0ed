#!/usr/bin/env bash
# Installs the host packages vmrig needs on Debian or Ubuntu (as root, or through sudo).
#
# qemu-system-x86 must come with the qemu-utils of the same version: some machines carry
# a newer qemu-utils from backports that conflicts with the distribution's QEMU, so the
# versions are pinned to the candidate of qemu-system-x86.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive

$SUDO apt-get update -q
qemu_version=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ { print $2 }')
if [ -z "$qemu_version" ] || [ "$qemu_version" = "(none)" ]; then
    echo "install-deps: no qemu-system-x86 package in the apt sources" >&2
    exit 1
fi
pinned=("qemu-system-x86=$qemu_version" "qemu-utils=$qemu_version")
if dpkg-query -W -f='${Status}' qemu-block-extra 2>/dev/null | grep -q "install ok installed"; then
    pinned+=("qemu-block-extra=$qemu_version")
fi

$SUDO apt-get install -y -q --allow-downgrades --no-install-recommends \
    "${pinned[@]}" \
    qemu-system-data \
    mmdebstrap \
    e2fsprogs \
    kmod \
    cpio \
    xz-utils \
    tar \
    python3 \
    tesseract-ocr \
    tesseract-ocr-eng \
    ca-certificates
echo "install-deps: $(qemu-system-x86_64 --version | head -n1), $(mmdebstrap --version), $(python3 --version)"
