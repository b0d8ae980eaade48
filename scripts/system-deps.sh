#!/usr/bin/env bash
# Debian/Ubuntu system packages for the end-to-end tests (real tray under Xvfb, real
# browser). Needs root; safe to run repeatedly (apt skips what is installed).
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
  echo "system-deps: not root; skipping apt (end-to-end tests will skip with a reason unless CI=true)" >&2
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "system-deps: no apt-get on this system; skipping" >&2
  exit 0
fi
PKGS=(xvfb xdotool imagemagick trayer x11-utils dbus dbus-x11 dunst libnotify-bin
      libgirepository1.0-dev libcairo2-dev pkg-config gir1.2-gtk-3.0 gir1.2-ayatanaappindicator3-0.1
      chromium)
missing=()
for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "system-deps: ok"
