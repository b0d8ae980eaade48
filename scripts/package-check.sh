#!/usr/bin/env bash
# Install like a user, with no clone: build the sdist and wheel (`python -m build`), install
# the wheel into a FRESH venv (torch==2.13.0 first, so nothing drags in a CUDA build), then
# run its `luna-daemon --version`, `luna-daemon demo` and `service install/status/uninstall`
# from outside the source tree, with LUNA_HOME and the config dirs in a temp dir.
# Exit code non-zero on any failure. Downloads come from pip's cache after the first run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
BUILD_PY=.venv/bin/python
[ -x "$BUILD_PY" ] || BUILD_PY=$PY

WORK=$(mktemp -d "${TMPDIR:-/tmp}/luna-package.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

step() { echo "package-check: $*"; }

step "building sdist + wheel"
"$BUILD_PY" -m pip install -q "build>=1.2"
"$BUILD_PY" -m build --outdir "$WORK/dist" "$ROOT" >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
WHEEL=$(ls "$WORK"/dist/*.whl)
ls "$WORK"/dist/*.tar.gz >/dev/null
step "built $(basename "$WHEEL")"

step "installing into a fresh venv"
"$PY" -m venv "$WORK/venv"
VPY=$WORK/venv/bin/python
"$VPY" -m pip install -q --upgrade pip
"$VPY" -m pip install -q "torch==2.13.0"
"$VPY" -m pip install -q "$WHEEL"

# Out of the checkout: `import luna_daemon` must find the installed copy, not ./luna_daemon.
cd "$WORK"
export LUNA_HOME=$WORK/home HOME=$WORK/userhome XDG_CONFIG_HOME=$WORK/userhome/.config
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$HOME"
where=$("$VPY" -c 'import luna_daemon; print(luna_daemon.__file__)')
case "$where" in
  "$WORK/venv/"*) ;;
  *) echo "package-check: luna_daemon imported from $where, not the fresh venv" >&2; exit 1 ;;
esac

want=$("$VPY" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$ROOT/pyproject.toml")
got=$("$WORK/venv/bin/luna-daemon" --version)
[ "$got" = "luna-daemon $want" ] || { echo "package-check: --version printed '$got', want 'luna-daemon $want'" >&2; exit 1; }
step "$got"
[ -x "$WORK/venv/bin/luna-daemon-tray" ] || { echo "package-check: no luna-daemon-tray gui-script" >&2; exit 1; }

step "luna-daemon demo"
"$WORK/venv/bin/luna-daemon" demo

step "luna-daemon service install / status / uninstall"
"$WORK/venv/bin/luna-daemon" service install
unit=$XDG_CONFIG_HOME/systemd/user/luna-daemon.service
grep -q "^ExecStart=$VPY -m luna_daemon serve$" "$unit" || { cat "$unit"; echo "package-check: unit does not run the venv's python" >&2; exit 1; }
"$WORK/venv/bin/luna-daemon" service status
"$WORK/venv/bin/luna-daemon" service uninstall
[ ! -e "$unit" ]
step "ok"
