"""Transparent huge pages for the daemon's big tensors (Linux; ``huge_pages`` setting).

Why: a VAE decode allocates and frees hundreds of MB of intermediate tensors per call.
glibc hands allocations that big to ``mmap``, so every call faults every page in again:
on the 2-vCPU benchmark VM a tiny-VAE 512x512 decode took ~230 000 minor page faults
(about a third of its time). PyTorch's CPU allocator can ask the kernel for 2 MiB pages
for tensors of 2 MiB and more (``THP_MEM_ALLOC_ENABLE=1``: 2 MiB-aligned allocation +
``madvise(MADV_HUGEPAGE)``): the same decode then takes ~23 000 faults and runs ~30-40 %
faster. Smaller tensors are untouched, so memory use does not bloat (the kernel only
backs whole, aligned 2 MiB ranges of such a tensor with huge pages).

PyTorch reads the variable once, at the first allocation of 2 MiB or more, so
:func:`configure` must run before this process makes such a tensor (the daemon calls it
before it builds its engine). Afterwards the variable no longer matters; :func:`state`
then reports what a probe allocation actually got, not what was asked for.

The kernel decides too: ``/sys/kernel/mm/transparent_hugepage/enabled`` set to
``never`` turns huge pages off for everyone (``madvise`` -- the usual default -- and
``always`` both honour the request). Other platforms have no such allocator switch:
the setting is accepted and reported as unavailable.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any

log = logging.getLogger(__name__)

ENV = "THP_MEM_ALLOC_ENABLE"
SYSFS = "/sys/kernel/mm/transparent_hugepage/enabled"
# More than glibc's DEFAULT_MMAP_THRESHOLD_MAX (32 MiB on 64-bit): freeing an mmapped
# chunk up to that size raises malloc's mmap threshold to it for the rest of the process,
# after which a model's weights come from the heap and an unload no longer returns them
# to the system (measured: +84 MB RSS left after unloading a 320 MB VAE with a 16 MiB
# probe, +11 MB without). 9216 small pages; PyTorch does not 2 MiB-align the start, so up
# to 2 MiB at the ends stay in small pages: with huge pages ~530 faults, without ~9200.
_PROBE_BYTES = 36 * 1024 * 1024
_HUGE_IF_FAULTS_BELOW = 2048

_lock = threading.Lock()
_state: dict[str, Any] | None = None


def kernel_mode(path: str = SYSFS) -> str | None:
    """The kernel's THP mode (``always``, ``madvise``, ``never``), or None where there is
    no such file (not Linux, THP not built in, or not readable)."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return None
    # The file lists every mode and brackets the current one: "always [madvise] never".
    start, end = text.find("["), text.find("]")
    if start < 0 or end < start:
        return None
    mode = text[start + 1:end].strip()
    return mode or None


def kernel_problem(mode: str | None) -> tuple[str, str] | None:
    """Why the kernel (``mode`` as :func:`kernel_mode` read it) gives no huge pages, and
    what to do -- ``(what, fix)`` -- or None when it honours the request. The one source
    of this advice for ``status`` (:func:`configure`) and ``doctor``."""
    if mode == "never":
        return (f"the kernel's THP mode is 'never' ({SYSFS})",
                f"as root: echo madvise > {SYSFS} (then restart the daemon)")
    if mode is None:
        return (f"this kernel has no transparent huge pages ({SYSFS} missing)",
                "none needed; a kernel with CONFIG_TRANSPARENT_HUGEPAGE would be faster")
    return None


def _faults_of_probe() -> int | None:
    """Minor page faults this thread took to allocate and fill a 36 MiB tensor."""
    import resource

    import torch

    who = getattr(resource, "RUSAGE_THREAD", None)  # this thread only: others may fault meanwhile
    if who is None:
        return None
    before = resource.getrusage(who).ru_minflt
    probe = torch.empty(_PROBE_BYTES, dtype=torch.uint8)
    probe.fill_(0)  # touch every page
    faults = resource.getrusage(who).ru_minflt - before
    del probe
    return faults


def configure(enabled: bool) -> dict[str, Any]:
    """Ask PyTorch for huge pages (``enabled``) or not, for the rest of this process,
    then probe what the kernel gives. Idempotent: only the first call takes effect (the
    choice is fixed at the first big allocation); later calls return the same state,
    with a ``reason`` saying so when they asked for something else. Never raises."""
    global _state
    with _lock:
        if _state is not None:
            if _state["enabled"] != enabled:
                return {**_state, "reason": _state["reason"] + "; the setting changed since this process started "
                                                              "(it takes effect on a restart)"}
            return dict(_state)
        _state = _configure(enabled)
        log.info("huge pages for tensors: %s (%s)", "on" if _state["active"] else "off", _state["reason"])
        return dict(_state)


def _configure(enabled: bool) -> dict[str, Any]:
    mode = kernel_mode()
    out: dict[str, Any] = {"enabled": enabled, "active": False, "kernel": mode, "probe_faults": None}
    if not sys.platform.startswith("linux"):
        out["reason"] = "only on Linux"
        return out
    user_value = os.environ.get(ENV)
    if user_value is not None and user_value.strip() not in ("", "0", "1"):
        # Not ours to overwrite silently; PyTorch reads it as a number (non-numbers: off).
        log.warning("%s=%r in the environment is not 0 or 1; leaving it as it is", ENV, user_value)
    else:
        os.environ[ENV] = "1" if enabled else "0"
    try:
        faults = _faults_of_probe()
    except Exception as exc:  # noqa: BLE001 - a probe must never stop a daemon from starting
        out["reason"] = f"could not probe ({type(exc).__name__}: {exc})"
        return out
    out["probe_faults"] = faults
    out["active"] = faults is not None and faults < _HUGE_IF_FAULTS_BELOW
    if out["active"]:
        out["reason"] = f"kernel THP mode {mode!r}" if mode else "granted by the kernel"
    elif not enabled:
        out["reason"] = "off in settings (huge_pages = false)"
    elif (problem := kernel_problem(mode)) is not None:
        out["reason"] = "; ".join(problem)
    else:
        out["reason"] = (f"asked for, but a 36 MiB probe still took {faults} page faults (the process made a "
                         f"big tensor before the setting could apply, or {ENV} was set otherwise)")
    return out


def state() -> dict[str, Any] | None:
    """What :func:`configure` found (``enabled``, ``active``, ``kernel``, ``reason``,
    ``probe_faults``), or None before it ran in this process."""
    with _lock:
        return None if _state is None else dict(_state)
