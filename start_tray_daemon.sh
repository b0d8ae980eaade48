#!/usr/bin/env bash
# Luna Daemon launcher for Linux and macOS.
#
#   ./start_tray_daemon.sh [luna-daemon options, e.g. --config FILE]
#
# 1. Creates ./.venv next to this script if it is missing (python3 -m venv).
# 2. Installs the dependencies only when needed: torch first (so pip never pulls a
#    second, CUDA-sized torch), then this project (pip install -e .). A stamp file in
#    the venv holds a hash of pyproject.toml; a changed pyproject.toml reinstalls.
# 3. With a display (DISPLAY / WAYLAND_DISPLAY, or macOS) starts the tray app detached
#    from this terminal; without one runs `luna-daemon serve` in the foreground.
#
# Environment knobs (all optional):
#   LUNA_PYTHON           interpreter used to create the venv (default: python3)
#   LUNA_VENV             venv directory (default: .venv next to this script)
#   LUNA_TORCH_SPEC       torch requirement installed first (default: torch==2.13.0)
#   LUNA_TORCH_INDEX_URL  extra index for torch, e.g. https://download.pytorch.org/whl/cu128
#   LUNA_FOREGROUND=1     never detach; run the tray (or serve) in this terminal
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
VENV="${LUNA_VENV:-$HERE/.venv}"
TORCH_SPEC="${LUNA_TORCH_SPEC:-torch==2.13.0}"
STAMP="$VENV/.luna-install-stamp"

say() { printf 'luna: %s\n' "$*"; }
die() { printf 'luna: error: %s\n' "$*" >&2; exit 1; }

find_python() {
    local cand
    for cand in "${LUNA_PYTHON:-}" python3 python; do
        [ -n "$cand" ] || continue
        command -v "$cand" >/dev/null 2>&1 || continue
        if "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
            command -v "$cand"
            return 0
        fi
    done
    return 1
}

fetch() {  # fetch URL FILE with whatever exists on a fresh system (python's urllib always does)
    "$1" - "$2" "$3" <<'PY'
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=120) as r, open(sys.argv[2], "wb") as f:
    f.write(r.read())
PY
}

create_venv() {
    local py
    py="$(find_python)" || die "Python 3.10 or newer is required (Debian/Ubuntu: apt-get install python3)"
    say "creating $VENV with $py"
    if "$py" -m venv "$VENV" 2>/dev/null; then
        return 0
    fi
    rm -rf "$VENV"
    # Debian/Ubuntu ship venv's pip bootstrap (ensurepip) separately, in python3-venv.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing python3-venv (apt-get)"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null \
            || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python3.$("$py" -c 'import sys; print(sys.version_info[1])')-venv" >/dev/null
        "$py" -m venv "$VENV" && return 0
        rm -rf "$VENV"
    fi
    # Not root (or no apt): a venv without pip, then pip from the official bootstrap.
    say "ensurepip is not available; bootstrapping pip into the venv"
    "$py" -m venv --without-pip "$VENV" || die "could not create $VENV"
    fetch "$VENV/bin/python" "https://bootstrap.pypa.io/get-pip.py" "$VENV/get-pip.py" \
        || die "could not download get-pip.py; install python3-venv (sudo apt-get install python3-venv) and retry"
    "$VENV/bin/python" "$VENV/get-pip.py" --quiet || die "pip bootstrap failed"
    rm -f "$VENV/get-pip.py"
}

wanted_stamp() {
    # Reinstall when pyproject.toml, the torch spec or the checkout location changes.
    # (The same one-liner is used by start_tray_daemon.ps1 / .bat.)
    "$VPY" -c "import hashlib,sys;h=hashlib.sha256(open(sys.argv[1],'rb').read());h.update(('\\0'+sys.argv[2]+'\\0'+sys.argv[3]).encode());print(h.hexdigest())" \
        "$HERE/pyproject.toml" "$TORCH_SPEC" "$HERE"
}

install_deps() {
    local pip=("$VPY" -m pip install --disable-pip-version-check)
    if ! "$VPY" -c 'import torch' >/dev/null 2>&1; then
        say "installing $TORCH_SPEC (first, so the project's torch>=2.1 is already satisfied)"
        if [ -n "${LUNA_TORCH_INDEX_URL:-}" ]; then
            "${pip[@]}" --extra-index-url "$LUNA_TORCH_INDEX_URL" "$TORCH_SPEC"
        else
            "${pip[@]}" "$TORCH_SPEC"
        fi
    fi
    say "installing Luna Daemon (pip install -e .)"
    "${pip[@]}" -e "$HERE"
}

# ------------------------------------------------------------------------------ main
[ -x "$VENV/bin/python" ] || create_venv
VPY="$VENV/bin/python"
WANT="$(wanted_stamp)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ] || ! "$VPY" -c 'import luna_daemon, torch' >/dev/null 2>&1; then
    install_deps
    printf '%s\n' "$WANT" > "$STAMP"
fi

# `logs --path` prints only the path on stdout, even with a broken config.toml (its
# warning goes to stderr). Anything else (an old version printing an error there) is not
# a path: never show an error text as "logs: ...".
LOG_FILE="$("$VPY" -m luna_daemon logs --path "$@" 2>/dev/null || true)"
case "$LOG_FILE" in
    /*) [ "$(printf '%s\n' "$LOG_FILE" | wc -l)" -eq 1 ] || LOG_FILE="" ;;
    *) LOG_FILE="" ;;
esac

has_display=0
if [ "$(uname -s)" = Darwin ] || [ -n "${DISPLAY:-}" ] || [ -n "${WAYLAND_DISPLAY:-}" ]; then
    has_display=1
fi

if [ "$has_display" = 0 ]; then
    say "no display: running the daemon in the foreground (luna-daemon serve); Ctrl-C stops it"
    say "logs: ${LOG_FILE:-see 'luna-daemon logs --path'}"
    exec "$VPY" -m luna_daemon serve "$@"
fi

# Linux: pystray needs PyGObject (GTK / AppIndicator) for a menu and notifications; its
# fallback (plain X11) shows only the coloured dot. Tried once per venv (delete
# $VENV/.luna-gtk-attempted to retry); never fatal.
ensure_gtk_bindings() {
    local marker="$VENV/.luna-gtk-attempted" gi_pkgs=("PyGObject<3.51" pycairo)
    "$VPY" -c 'import gi' >/dev/null 2>&1 && return 0
    [ -f "$marker" ] && return 0
    : > "$marker"
    say "installing the GTK bindings for the tray menu (PyGObject; builds from source)"
    "$VPY" -m pip install --disable-pip-version-check --quiet "${gi_pkgs[@]}" >/dev/null 2>&1 && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing build dependencies for PyGObject (apt-get)"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc pkg-config python3-dev \
            libgirepository1.0-dev libcairo2-dev gir1.2-gtk-3.0 gir1.2-ayatanaappindicator3-0.1 >/dev/null || true
        "$VPY" -m pip install --disable-pip-version-check --quiet "${gi_pkgs[@]}" >/dev/null 2>&1 && return 0
    fi
    say "warning: no PyGObject: the tray icon will have no menu. Install the build dependencies"
    say "  (Debian/Ubuntu: sudo apt-get install gcc pkg-config python3-dev libgirepository1.0-dev libcairo2-dev gir1.2-gtk-3.0)"
    say "  then: rm $marker && $0"
    return 0
}
if [ "$(uname -s)" = Linux ]; then
    ensure_gtk_bindings
fi

if [ "${LUNA_FOREGROUND:-0}" = 1 ]; then
    say "logs: ${LOG_FILE:-see 'luna-daemon logs --path'}"
    exec "$VPY" -m luna_daemon tray "$@"
fi

# Detached: survives closing this terminal. Only the refusal message or a crash before
# logging starts lands in $OUT; the app's own log is the rotating log file.
OUT="$VENV/tray-launch.out"
before=0
[ -n "$LOG_FILE" ] && [ -f "$LOG_FILE" ] && before="$(wc -c < "$LOG_FILE")"
if command -v setsid >/dev/null 2>&1; then
    setsid "$VPY" -m luna_daemon tray "$@" >"$OUT" 2>&1 </dev/null &
else
    nohup "$VPY" -m luna_daemon tray "$@" >"$OUT" 2>&1 </dev/null &
fi
pid=$!
# A refused second launch exits within seconds: report that instead of claiming success.
for _ in $(seq 1 50); do
    if ! kill -0 "$pid" 2>/dev/null; then
        rc=0
        wait "$pid" || rc=$?
        cat "$OUT"
        [ "$rc" = 0 ] || say "the tray exited with code $rc; logs: ${LOG_FILE:-see 'luna-daemon logs --path'}"
        exit "$rc"
    fi
    if [ -n "$LOG_FILE" ] && [ -f "$LOG_FILE" ] \
        && tail -c +"$((before + 1))" "$LOG_FILE" 2>/dev/null | grep -q -e 'tray icon shown' -e 'running the daemon headless'; then
        break
    fi
    sleep 0.2
done
say "Luna Daemon started in the system tray (pid $pid)"
say "logs: ${LOG_FILE:-see 'luna-daemon logs --path'}  (or: $VPY -m luna_daemon logs)"
