#!/usr/bin/env bash
# Installs the host packages vmrig needs on Debian or Ubuntu (as root, or through sudo):
# the install part of .ci/run, which holds the one package list.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -eq 0 ]; then
    exec env VMRIG_INSTALL_ONLY=1 .ci/run
fi
exec sudo env VMRIG_INSTALL_ONLY=1 .ci/run
