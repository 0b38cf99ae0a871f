#!/usr/bin/env bash
# System packages: open3d needs libusb-1.0.  Installed through apt when
# missing and we are root; otherwise a warning says what to install.
set -euo pipefail
if ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so.0'; then
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libusb-1.0-0 >/dev/null
else
    echo "warning: libusb-1.0-0 is missing (open3d needs it): sudo apt-get install libusb-1.0-0" >&2
fi
