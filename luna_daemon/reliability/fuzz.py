"""Scenario 1: fuzzed frames over many connections.

Every connection gets one or a few frames, then a half-close: the daemon sees EOF after
our last byte, so it never has a reason to wait, and each frame must end *typed* (an
error answer with a known code), *ok* (a mutation that stayed valid), or *closed* (the
daemon closed after an earlier fatal error or a truncated frame). No answer and no close
within the deadline is *hung*; ``internal`` and unhandled thread exceptions are bugs.
"""

from __future__ import annotations

import json
import random
import threading
import time
from typing import Any, Callable

from luna_daemon.reliability.harness import (
    FREEZE_S, LOG_LINES_PER_1000_FRAMES, RSS_GROWTH_MB, STATS_GROWTH_BYTES, TOKENLESS_RSS_MB, DaemonProc, Pinger,
    RssSampler, Suite, good_client_failure, mb, traceback_failure,
)
from luna_daemon.reliability.wire import (
    MAGIC, PREFIX, Closed, Garbled, Hung, Wire, answer_header, error_code, http_get, request_bytes,
)


def prefix(hlen: int, blen: int, *, magic: bytes = MAGIC, version: int = 1, kind: int = 1, flags: int = 0) -> bytes:
    return PREFIX.pack(magic, version, kind, flags, hlen, blen)


def frame(header: bytes, body: bytes = b"", **kw: Any) -> bytes:
    return prefix(len(header), len(body), **kw) + header + body


def desc(name: Any = "a0", dtype: Any = "uint8", shape: Any = (64,), offset: Any = 0, nbytes: Any = 64) -> dict:
    return {"name": name, "dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
            "offset": offset, "nbytes": nbytes}


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class FrameMaker:
    """Deterministic (seeded) hostile frames; ``case()`` -> (category, [frames])."""

    def __init__(self, rng: random.Random, token: str, vae_id: str):
        import torch

        self.rng, self.token = rng, token
        latent = torch.zeros(1, 4, 8, 8)
        # Valid frames the mutations start from (none of them changes the daemon's state).
        self.valid = [
            request_bytes("ping", None, None, 0), request_bytes("ping", None, None, "abc"),
            request_bytes("hello"), request_bytes("status", None, token), request_bytes("ps", None, token),
            request_bytes("status"), request_bytes("lora_has", {"sha256": "0" * 64}, token),
            request_bytes("echo", {"x": torch.arange(16, dtype=torch.int32), "y": torch.ones(3, 5)}, token),
            request_bytes("vae_decode", {"model": vae_id, "latent": latent}, token),
            request_bytes("vae_decode", {"model": vae_id, "latent": latent}),  # token-less, with a body
            request_bytes("clip_tokenize", {"model": "clip-none", "text": "x"}, token),
        ]
        self.generators: list[tuple[float, str, Callable[[], list[bytes]]]] = [
            (0.14, "random_bytes", self._random_bytes),
            (0.22, "bit_flips", self._bit_flips),
            (0.09, "truncated", self._truncated),
            (0.09, "wrong_lengths", self._wrong_lengths),
            (0.06, "bad_prefix_fields", self._bad_prefix_fields),
            (0.07, "deep_nesting", self._deep_nesting),
            (0.06, "hostile_ids", self._hostile_ids),
            (0.08, "hostile_descriptors", self._hostile_descriptors),
            (0.05, "long_unknown_ops", self._long_ops),
            (0.04, "tokenless_bodies", self._tokenless_bodies),
            (0.05, "invalid_json", self._invalid_json),
            (0.05, "pipelined", self._pipelined),
        ]
        self._weights = [g[0] for g in self.generators]

    def case(self) -> tuple[str, list[bytes]]:
        _, name, fn = self.rng.choices(self.generators, weights=self._weights)[0]
        return name, fn()

    def _t(self) -> str | None:
        """The token in 40% of the frames: most attackers lack it, but some frames must
        get past the authentication check to reach the deeper parsing."""
        return self.token if self.rng.random() < 0.4 else None

    def _random_bytes(self) -> list[bytes]:
        r = self.rng
        data = r.randbytes(r.choice([0, 1, 7, 19, 20, 21, 64, 300, r.randrange(2000), r.randrange(70_000)]))
        pick = r.random()
        if pick < 0.25:
            data = MAGIC + data
        elif pick < 0.5:
            data = prefix(r.randrange(2, 4096), r.choice([0, r.randrange(1 << 20)])) + data
        return [data]

    def _bit_flips(self) -> list[bytes]:
        r = self.rng
        base = bytearray(r.choice(self.valid))
        hot = PREFIX.size + PREFIX.unpack_from(base)[4]  # prefix + header: where parsing happens
        for _ in range(r.randint(1, 8)):
            pos = r.randrange(hot) if r.random() < 0.8 or len(base) == hot else r.randrange(len(base))
            base[pos] ^= 1 << r.randrange(8)
        data = bytes(base)
        if b'"shutdown"' in data or b'"unload"' in data:  # never let a mutation change the daemon's state
            data = r.choice(self.valid)
        return [data]

    def _truncated(self) -> list[bytes]:
        base = self.rng.choice(self.valid)
        return [base[:self.rng.randrange(len(base))]]

    def _wrong_lengths(self) -> list[bytes]:
        r = self.rng
        base = bytearray(r.choice(self.valid))
        magic, version, kind, flags, hlen, blen = PREFIX.unpack_from(base)
        if r.random() < 0.5:
            hlen = r.choice([0, 1, 2, hlen - 1, hlen + 1, hlen + 64, (1 << 20) + 1, (1 << 32) - 1])
        else:
            blen = r.choice([0, 1, max(blen - 1, 3), blen + 1, blen + 4096, 1 << 31, (1 << 31) + 1, 1 << 40, (1 << 64) - 1])
        PREFIX.pack_into(base, 0, magic, version, kind, flags, hlen, blen)
        return [bytes(base)]

    def _bad_prefix_fields(self) -> list[bytes]:
        kw = self.rng.choice([{"version": 0}, {"version": 2}, {"version": 255}, {"kind": 0}, {"kind": 2}, {"kind": 3},
                              {"kind": 255}, {"flags": 1}, {"flags": 0xFFFF}, {"magic": b"LUNB"}, {"magic": b"\0\0\0\0"}])
        return [frame(b'{"id":1,"op":"ping"}', **kw)]

    def _deep_nesting(self) -> list[bytes]:
        r = self.rng
        n = r.choice([65, 100, 1000, 10_000, 100_000, 250_000])
        style = r.choice(["list", "dict", "tuple", "tensor_ref"])
        if style == "list":
            nest = b"[" * n + b"]" * n
        elif style == "dict":
            n = min(n, 150_000)  # stays under the 1 MiB header limit
            nest = b'{"a":' * n + b"1" + b"}" * n
        elif style == "tuple":
            n = min(n, 70_000)
            nest = b'{"$tuple":[' * n + b"]}" * n
        else:
            n = min(n, 70_000)
            nest = b'{"$tensor":' * n + b'"a0"' + b"}" * n
        token = _json(self._t())
        header = r.choice([
            b'{"id":1,"op":"ping","args":{"x":' + nest + b'},"token":' + token + b"}",
            b'{"id":' + nest + b',"op":"status"}',
            b'{"id":1,"op":"status","token":' + nest + b"}",
            b'{"id":1,"op":"echo","tensors":' + nest + b"}",
            b'{"id":1,"op":"ping","x":' + nest + b"}",
        ])
        return [frame(header)]

    def _hostile_ids(self) -> list[bytes]:
        r = self.rng
        if r.random() < 0.35:
            # An id that is a tensor reference: resolved, it is a tensor and cannot be echoed.
            return [frame(b'{"id":{"$tensor":"a0"},"op":"ping","tensors":' + _json([desc()]) + b"}", bytes(64))]
        ids = [b"18446744073709551616", b"-9223372036854775809", b"9223372036854775807", b"1" * 400, b"1e400",
               b"1.5", b"-0", b"null", b"true", b"[1]", b"{}", b'{"$tuple":[1,2]}',
               # Echoed back, an id near the header limit makes the answer itself too large.
               b'"' + b"i" * r.choice([1000, 500_000, 1_040_000]) + b'"']
        return [frame(b'{"id":' + r.choice(ids) + b',"op":"ping"}')]

    def _hostile_descriptors(self) -> list[bytes]:
        r = self.rng
        variants = [
            [desc(dtype=["float32"])], [desc(dtype={"a": 1})], [desc(dtype=7)], [desc(dtype=None)],
            [desc(dtype="float64")], [desc(dtype="torch.float32")], [desc(dtype="x" * 5000)],
            [desc(shape=[2**62, 2**62, 0], nbytes=0)], [desc(shape=[0, 2**64 - 1], nbytes=0)],
            [desc(shape=[2**63 - 1], nbytes=2**63 - 1)], [desc(shape=[-1], nbytes=-1)], [desc(shape=[1.5])],
            [desc(shape=[True] * 64)], [desc(shape=[[64]])], [desc(shape=[1] * 9)], [desc(shape="64")],
            [desc(shape=[2**32, 2**32], nbytes=0)], [desc(shape=[0] * 8, nbytes=0)],
            [desc(offset=-64)], [desc(offset=1)], [desc(offset=2**63)], [desc(offset=192, nbytes=128, shape=[128])],
            [desc(nbytes=63)], [desc(nbytes="64")], [desc(), desc()], [desc("a0"), desc("a1", offset=32)],
            [desc(name="")], [desc(name=5)], [desc(name="n" * 200)], [{"name": "a0"}], ["a0"], [None],
            [desc(f"t{i}", shape=[0], nbytes=0) for i in range(300)], {"a0": desc()}, "tensors",
        ]
        header = {"id": r.randrange(1 << 30), "op": r.choice(["echo", "ping", "lora_put", "vae_decode"]),
                  "args": r.choice([{"x": {"$tensor": "a0"}}, {"x": {"$tensor": "missing"}}, {"x": {"$tensor": 5}}, {}]),
                  "tensors": r.choice(variants)}
        token = self._t()
        if token:
            header["token"] = token
        return [frame(_json(header), bytes(256))]

    def _long_ops(self) -> list[bytes]:
        r = self.rng
        # Unique names: a daemon that keys its statistics by op name grows with each one.
        name = f"{r.getrandbits(64):016x}" + "x" * r.choice([200, 5000, 100_000, 900_000])
        op = name if r.random() < 0.6 else r.choice(
            ["", "__class__", "ping\u0000", "Ping", " ping", "status/../shutdown", 5, None, ["ping"]])
        header: dict[str, Any] = {"id": 1, "op": op}
        token = self._t()
        if token:
            header["token"] = token
        return [frame(_json(header))]

    def _tokenless_bodies(self) -> list[bytes]:
        r = self.rng
        n = r.choice([1 << 16, 1 << 20, 4 << 20])
        header: dict[str, Any] = {"id": 1, "op": r.choice(["vae_decode", "echo", "lora_put", "ping", "hello", "status"]),
                                  "args": {"data": {"$tensor": "a0"}}, "tensors": [desc(shape=[n], nbytes=n)]}
        if r.random() < 0.3:
            header["token"] = "0" * 64  # a wrong one
        return [frame(_json(header), bytes(n))]

    def _invalid_json(self) -> list[bytes]:
        headers = [b'{"id":1,"op":"ping","x":NaN}', b'{"id":Infinity,"op":"ping"}', b'{"id":1,"op":"ping",}',
                   b'\xef\xbb\xbf{"id":1,"op":"ping"}', b'{"id":1,"op":"\xff\xfe"}', b'{"id":1,"op":"\\ud800"}',
                   b'{"id":1,"op":"ping","op":"status"}', b'{"id":1,/*c*/"op":"ping"}', b"[]", b'"ping"', b"1",
                   b"null", b"{", b"{}", b'{"id":1}', b'{"op":"ping"}', b'{"id":1,"op":"ping","args":[]}',
                   b'{"id":1,"op":"ping","args":"x"}', b'{"id":1,"op":"ping","token":5}', b"  ", b"\x00" * 16]
        return [frame(self.rng.choice(headers))]

    def _pipelined(self) -> list[bytes]:
        """Valid frames back to back with a hostile one somewhere among them."""
        r = self.rng
        frames = [r.choice(self.valid) for _ in range(r.randint(1, 4))]
        bad = self.case()[1] if r.random() < 0.7 else []
        pos = r.randrange(len(frames) + 1)
        return frames[:pos] + bad + frames[pos:]


def fuzz_connection(port: int, frames: list[bytes], deadline_s: float) -> dict[str, Any]:
    """Send ``frames`` on one connection, half-close, read answers until EOF / deadline.
    ``end``: answered (every frame), closed, hung, garbled or connect_failed."""
    out: dict[str, Any] = {"frames": len(frames), "answers": [], "end": "closed", "max_message": 0}
    try:
        w = Wire(port, connect_timeout=deadline_s)
    except OSError as exc:
        out.update(end="connect_failed", error=str(exc))
        return out
    try:
        try:
            w.send(b"".join(frames), timeout=deadline_s)
        except Hung:
            out["end"] = "hung"
            return out
        w.half_close()
        deadline = time.monotonic() + deadline_s
        while len(out["answers"]) < len(frames):
            try:
                header = answer_header(w.read_frame(deadline))
            except Closed:
                out["end"] = "closed"
                break
            except Hung:
                out["end"] = "hung"
                break
            except Garbled as exc:
                out.update(end="garbled", error=str(exc))
                break
            code = error_code(header)
            out["answers"].append(code or "ok")
            if code:
                out["max_message"] = max(out["max_message"], len(str((header.get("error") or {}).get("message", ""))))
        else:
            out["end"] = "answered"
    finally:
        w.close()
    return out


def tokenless_hold(suite: Suite) -> dict[str, Any]:
    """Several connections each push a big body without a token and keep the connection
    open: the daemon must refuse it from the header (peak RSS growth stays small)."""
    d, n, size = suite.main, suite.p.tokenless_holds, suite.p.tokenless_mib << 20
    header = json.dumps({"id": 1, "op": "echo", "args": {"x": {"$tensor": "a0"}},
                         "tensors": [desc(shape=[2 * size], nbytes=2 * size)]}).encode()
    start = prefix(len(header), 2 * size) + header  # announces twice what is sent
    chunk = bytes(1 << 20)
    wires: list[Wire] = []
    refused = 0
    with RssSampler(d) as rss:
        try:
            for _ in range(n):
                try:
                    w = Wire(d.port)
                except OSError:
                    continue
                wires.append(w)
                ok = w.send(start, 5)
                for _ in range(size // len(chunk)):
                    if not ok:
                        break
                    try:
                        ok = w.send(chunk, 5)
                    except Hung:  # the daemon stopped reading: refused (or full buffers)
                        ok = False
                refused += not ok
            time.sleep(0.5)
        finally:
            for w in wires:
                w.close()
    return {"connections": n, "mib_each": suite.p.tokenless_mib, "refused_early": refused,
            "rss_peak_growth_mb": rss.growth_mb}


def metrics_size(d: DaemonProc) -> int:
    # A bloated /metrics (megabytes of per-op-name series) must be measured, not cut off.
    status, body = http_get(d.monitor_port, "/metrics", deadline_s=30, cap=256 << 20) if d.monitor_port else (None, b"")
    return len(body) if status == 200 else 0


class _Tally:
    """Outcome counts over all connections (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts = {"frames": 0, "connections": 0, "ok": 0, "typed": 0, "internal": 0, "closed": 0, "hung": 0,
                       "garbled": 0, "connect_failed": 0}
        self.by_code: dict[str, int] = {}
        self.by_category: dict[str, dict[str, int]] = {}
        self.max_message = 0

    def add(self, category: str, r: dict[str, Any]) -> None:
        with self.lock:
            c = self.by_category.setdefault(category, {"frames": 0, "ok": 0, "typed": 0, "closed": 0, "hung": 0, "internal": 0})
            self.counts["frames"] += r["frames"]
            self.counts["connections"] += 1
            c["frames"] += r["frames"]
            self.max_message = max(self.max_message, r["max_message"])
            for a in r["answers"]:
                kind = "ok" if a == "ok" else "internal" if a == "internal" else "typed"
                self.counts[kind] += 1
                c[kind] += 1
                self.by_code[a] = self.by_code.get(a, 0) + 1
            unanswered = r["frames"] - len(r["answers"])
            end = r["end"]
            if end in ("garbled", "connect_failed"):
                self.counts[end] += max(1, unanswered)
            elif unanswered:
                kind = "hung" if end == "hung" else "closed"
                self.counts[kind] += unanswered
                c[kind] += unanswered


def scenario_fuzz(suite: Suite) -> dict[str, Any]:
    p, d = suite.p, suite.main
    maker = FrameMaker(random.Random(suite.seed), d.token, suite.vae_id)
    cases: list[tuple[str, list[bytes]]] = []
    total = 0
    while total < p.frames:
        case = maker.case()
        cases.append(case)
        total += len(case[1])
    _, status_bytes_before = d.status()
    metrics_before = metrics_size(d)
    rss_before = d.rss()
    log_before = d.log_lines()
    tb = d.stderr_offset()
    tally = _Tally()
    stop = threading.Event()
    t_end = time.monotonic() + p.fuzz_budget_s

    def worker(mine: list[tuple[str, list[bytes]]]) -> None:
        for category, frames in mine:
            if stop.is_set() or time.monotonic() > t_end:
                return
            tally.add(category, fuzz_connection(d.port, frames, p.call_deadline))
            c = tally.counts
            if c["hung"] >= 50 or c["connect_failed"] >= 20 or not d.alive:
                stop.set()  # frozen or gone: do not wait out every remaining deadline

    t0 = time.monotonic()
    with Pinger(d.port) as pinger:
        threads = [threading.Thread(target=worker, args=(cases[i::p.fuzz_workers],), daemon=True, name=f"fuzz-{i}")
                   for i in range(p.fuzz_workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, t_end - time.monotonic()) + p.call_deadline * 3 + 10)
        stop.set()
        hold = tokenless_hold(suite) if d.alive else {}
    crashed = not d.alive
    c = tally.counts
    out: dict[str, Any] = {**c, "frames_target": p.frames, "fuzz_seconds": round(time.monotonic() - t0, 1),
                           "crashes": int(crashed), "by_code": dict(sorted(tally.by_code.items())),
                           "by_category": tally.by_category, "max_error_message_chars": tally.max_message,
                           "good_client_during": pinger.figures(), "tokenless_bodies": hold}
    out.update(d.tracebacks_since(tb))
    out["log_lines_added"] = d.log_lines() - log_before
    if crashed:
        out["exit_code"] = d.proc.returncode
        suite.restart_main()  # the crash is counted in this scenario's figures
    out["good_client_after"] = suite.good_client_check()
    status_after, status_bytes_after = d.status()
    out["status_bytes"] = [status_bytes_before, status_bytes_after]
    out["metrics_bytes"] = [metrics_before, metrics_size(d)]
    out["rss_mb"] = [mb(rss_before), mb(d.rss())]

    fails = []
    if crashed:
        fails.append(f"the daemon crashed during the fuzz (exit code {out['exit_code']})")
    for key, what in (("hung", "hung"), ("internal", "were answered internal"), ("garbled", "got an answer that is not a Luna frame"),
                      ("connect_failed", "could not connect")):
        if c[key]:
            fails.append(f"{c[key]} fuzz frames {what}")
    fails += traceback_failure(out)
    if c["frames"] < p.frames:
        fails.append(f"only {c['frames']} of {p.frames} frames were sent within the {p.fuzz_budget_s:.0f}s budget")
    if pinger.frozen():
        fails.append(f"{pinger.frozen()} pings of a good client failed or took over {FREEZE_S}s during the fuzz")
    fails += good_client_failure(out["good_client_after"], "after the fuzz")
    if status_after is None:
        fails.append("status no longer answers after the fuzz")
    elif status_bytes_before and status_bytes_after - status_bytes_before > STATS_GROWTH_BYTES:
        fails.append(f"status grew by {status_bytes_after - status_bytes_before} bytes")
    if metrics_before and not out["metrics_bytes"][1]:
        fails.append("/metrics no longer answers after the fuzz")
    elif metrics_before and out["metrics_bytes"][1] - metrics_before > STATS_GROWTH_BYTES:
        fails.append(f"/metrics grew by {out['metrics_bytes'][1] - metrics_before} bytes")
    if None not in out["rss_mb"] and out["rss_mb"][1] - out["rss_mb"][0] > RSS_GROWTH_MB:
        fails.append(f"the daemon's RSS grew by {out['rss_mb'][1] - out['rss_mb'][0]:.0f} MB")
    if tally.max_message > 16 * 1024:
        fails.append(f"an error message echoed {tally.max_message} characters back")
    if out["log_lines_added"] > LOG_LINES_PER_1000_FRAMES * max(1, c["frames"] // 1000):
        fails.append(f"the fuzz added {out['log_lines_added']} lines to the log")
    if (hold.get("rss_peak_growth_mb") or 0) > TOKENLESS_RSS_MB:
        fails.append(f"token-less bodies grew the daemon's RSS by {hold['rss_peak_growth_mb']:.0f} MB")
    out["failures"] = fails
    return out
