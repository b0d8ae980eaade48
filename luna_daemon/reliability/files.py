"""Scenario 5: hostile and odd files under a model root, and invalid uploads.

Each case must be answered with a typed code other than ``internal`` within the deadline
(some with one specific code), a good client's ping must keep answering meanwhile (a
FIFO once froze the whole daemon), the daemon's RSS must not jump (a LoRA bigger than
the cache must be refused unread), and an invalid upload must not stay on disk.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from typing import Any

from luna_daemon.reliability.harness import (
    FILE_RSS_MB, FREEZE_S, LORA_CACHE, Pinger, RssSampler, Suite, good_client_failure, mb, traceback_failure,
)
from luna_daemon.reliability.wire import call

FORBIDDEN = {"forbidden_path"}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def unblock_fifo(path: Any) -> None:
    """Open a FIFO for writing and close it at once: a reader blocked in open() or read()
    then sees EOF, so a daemon stuck on it recovers and the suite can clean up."""
    for _ in range(20):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            time.sleep(0.05)  # ENXIO: nobody has it open for reading (yet, or any more)
            continue
        os.close(fd)
        return


def _sparse_safetensors(path: Any, nbytes: int) -> None:
    """A valid kohya LoRA (one down/up pair) of ``nbytes`` of weights that are holes: it
    costs no disk, but a daemon that reads it before checking its size pays in RAM."""
    import json

    k = nbytes // (2 * 8 * 4)  # rank 8, float32, two tensors
    half = 8 * k * 4
    stem = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    header = json.dumps({f"{stem}.lora_down.weight": {"dtype": "F32", "shape": [8, k], "data_offsets": [0, half]},
                         f"{stem}.lora_up.weight": {"dtype": "F32", "shape": [k, 8], "data_offsets": [half, 2 * half]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 2 * half)


def _cases(suite: Suite) -> tuple[list[tuple[str, str, dict, set[str] | None]], Any, bytes]:
    import torch

    m, p = suite.models, suite.p
    root = m.root / "hostile"
    root.mkdir()
    fifo = root / "fifo.safetensors"
    if hasattr(os, "mkfifo"):
        os.mkfifo(fifo)
    (root / "loop_a.safetensors").symlink_to(root / "loop_b.safetensors")
    (root / "loop_b.safetensors").symlink_to(root / "loop_a.safetensors")
    (root / "escape.safetensors").symlink_to(m.outside)
    (root / "escape_dir").symlink_to(m.outside.parent, target_is_directory=True)
    (root / "zero.safetensors").symlink_to("/dev/zero")
    (root / "lora_dir.safetensors").mkdir()
    sparse = root / "huge_lora.safetensors"
    _sparse_safetensors(sparse, p.sparse_lora_mib << 20)
    (root / "bad_header.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{")
    (root / "pickle.ckpt").write_bytes(b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00N.")  # pickle of None
    long_name = str(root / ("n" * 5000 + ".safetensors"))
    junk = b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00N." + bytes(1000)  # a pickle, not a safetensors blob
    junk_t = torch.frombuffer(bytearray(junk), dtype=torch.uint8)
    cases: list[tuple[str, str, dict, set[str] | None]] = [
        ("FIFO as VAE", "vae_load", {"path": str(fifo)}, None),
        ("FIFO as LoRA", "lora_load", {"path": str(fifo)}, None),
        ("FIFO as CLIP", "clip_load", {"paths": [str(fifo)], "clip_type": "sd1"}, None),
        ("symlink loop", "vae_load", {"path": str(root / "loop_a.safetensors")}, None),
        ("symlink escaping the root", "vae_load", {"path": str(root / "escape.safetensors")}, FORBIDDEN),
        ("folder symlink escaping the root", "vae_load", {"path": str(root / "escape_dir" / m.outside.name)}, FORBIDDEN),
        ("symlink to /dev/zero", "lora_load", {"path": str(root / "zero.safetensors")}, FORBIDDEN),
        ("path outside every root", "vae_load", {"path": str(m.outside)}, FORBIDDEN),
        ("5,000-character name (VAE)", "vae_load", {"path": long_name}, None),
        ("5,000-character name (LoRA)", "lora_load", {"path": long_name}, None),
        ("directory as LoRA", "lora_load", {"path": str(root / "lora_dir.safetensors")}, None),
        (f"sparse {p.sparse_lora_mib} MiB LoRA > lora_cache_bytes {LORA_CACHE}", "lora_load", {"path": str(sparse)},
         {"too_large"}),
        ("truncated safetensors header", "vae_load", {"path": str(root / "bad_header.safetensors")}, None),
        ("pickle checkpoint", "vae_load", {"path": str(root / "pickle.ckpt")}, None),
        ("non-safetensors VAE upload", "vae_load_sd", {"sha256": _sha(junk), "data": junk_t}, {"bad_args"}),
        ("non-safetensors CLIP upload", "clip_load_sd", {"sha256": _sha(junk), "data": junk_t}, {"bad_args"}),
        ("non-safetensors LoRA upload", "lora_put", {"data": junk_t}, {"bad_args"}),
    ]
    if not hasattr(os, "mkfifo"):
        cases = [c for c in cases if not c[0].startswith("FIFO")]
    return cases, fifo, junk


def scenario_hostile_files(suite: Suite) -> dict[str, Any]:
    d, p = suite.main, suite.p
    cases, fifo, junk = _cases(suite)
    tb = d.stderr_offset()
    rss_before = d.rss()
    rows: list[dict[str, Any]] = []
    fails: list[str] = []
    with Pinger(d.port, interval=0.1, deadline=p.call_deadline + 2) as pinger:
        for name, op, args, expect in cases:
            t_case = time.monotonic()
            with RssSampler(d) as rss:
                o = call(d.port, op, args, d.token, p.call_deadline)
            if "FIFO" in name and o.kind in ("hung", "closed"):
                unblock_fifo(fifo)  # leave no reader blocked on it behind
            row = {"case": name, "op": op, "outcome": o.kind, "code": o.code, "seconds": round(o.seconds, 2),
                   "rss_peak_growth_mb": rss.growth_mb, "frozen_pings": pinger.frozen(t_case, time.monotonic())}
            if o.message:
                row["message"] = o.message[:200]
            rows.append(row)
            if o.kind == "hung":
                fails.append(f"{name}: no answer within {p.call_deadline:.0f}s")
            elif o.kind == "closed":
                fails.append(f"{name}: connection closed without an answer")
            elif o.kind == "ok":
                fails.append(f"{name}: accepted ({op} succeeded)")
            elif o.code == "internal":
                fails.append(f"{name}: answered internal")
            elif expect and o.code not in expect:
                fails.append(f"{name}: answered {o.code}, expected {'/'.join(sorted(expect))}")
            if row["frozen_pings"]:
                fails.append(f"{name}: {row['frozen_pings']} pings of a good client failed or took over "
                             f"{FREEZE_S}s meanwhile (the daemon froze)")
            if rss.growth_mb > FILE_RSS_MB:
                fails.append(f"{name}: the daemon's RSS grew {rss.growth_mb:.0f} MB")
            if not d.alive:
                fails.append(f"{name}: the daemon died")
                suite.restart_main()
    uploads = d.home / "state" / "uploads"
    kept = sorted(f.name for f in uploads.glob(f"*{_sha(junk)}*")) if uploads.is_dir() else []
    if kept:
        fails.append(f"invalid uploads kept on disk: {', '.join(kept)}")
    out: dict[str, Any] = {"cases": rows, "kept_invalid_uploads": kept, "good_client_during": pinger.figures(),
                           "rss_mb": [mb(rss_before), mb(d.rss())], "hung": sum(r["outcome"] == "hung" for r in rows),
                           "internal": sum(r["code"] == "internal" for r in rows)}
    out["good_client_after"] = suite.good_client_check()
    out.update(d.tracebacks_since(tb))
    fails += good_client_failure(out["good_client_after"], "after the hostile files")
    fails += traceback_failure(out)
    out["failures"] = fails
    return out
