#!/usr/bin/env bash
# The whole test suite, from a fresh machine: system packages (when root), a venv with
# torch 2.13.0 installed FIRST (so nothing drags in a CUDA build), the project with its
# test extra, then pytest. Exit code = pytest's; "no tests collected" (5) is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/system-deps.sh

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip
"$VPY" -m pip install -q "torch==2.13.0"
"$VPY" -m pip install -q -e ".[test]"
# GTK bindings for the real-tray end-to-end test; they compile against the system
# libraries installed by system-deps.sh (PyGObject >= 3.51 needs a newer glib than Debian 12).
if pkg-config --exists gobject-introspection-1.0 2>/dev/null; then
  "$VPY" -m pip install -q "PyGObject<3.51" pycairo
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
set +e
"$VPY" -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests -- treating as failure" >&2
  exit 1
fi
exit "$rc"
