#!/usr/bin/env bash
# Install Debian's Chromium for the browser tests (idempotent; Playwright drives it
# through executable_path=/usr/bin/chromium — Playwright's own browser download
# does not work on this network).
set -euo pipefail
if [[ -x /usr/bin/chromium ]]; then
    echo "chromium already installed ($(/usr/bin/chromium --version 2>/dev/null | head -1))"
    exit 0
fi
SUDO=""
if [[ "$(id -u)" != "0" ]]; then SUDO="sudo"; fi
echo "installing Debian chromium ..."
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
/usr/bin/chromium --version
