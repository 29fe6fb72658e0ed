#!/usr/bin/env bash
# Installs the host packages vmrig needs on Debian or Ubuntu (as root, or through sudo):
# the install part of .ci/run, which holds the one package list. Only the package install
# needs root: vmrig itself runs as a normal user (with `uidmap` for mmdebstrap's unshare
# mode, subordinate ids in /etc/subuid and /etc/subgid, and user namespaces allowed; see
# `vmrig doctor`).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -eq 0 ]; then
    exec env VMRIG_INSTALL_ONLY=1 .ci/run
fi
exec sudo env VMRIG_INSTALL_ONLY=1 .ci/run
