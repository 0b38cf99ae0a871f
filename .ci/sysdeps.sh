#!/usr/bin/env bash
# System packages: open3d needs libusb-1.0, and Debian's python3 needs
# python3-venv for `python3 -m venv`.  Installed through apt when missing and
# we are root; otherwise a warning says what to install.
set -euo pipefail
PYTHON="${PYTHON:-python3}"
missing=()
ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so.0' || missing+=(libusb-1.0-0)
"$PYTHON" -c "import ensurepip, venv" 2>/dev/null || missing+=(python3-venv)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
    echo "warning: missing system packages: ${missing[*]} (sudo apt-get install ${missing[*]})" >&2
fi
