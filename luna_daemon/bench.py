"""Benchmarks shipped with the project (``luna-daemon bench``; ``benchmarks/*.py``).

Everything is measured side by side in one run, as ratios, because the machine is noisy:

* ``transport_benchmark``: (a) raw loopback TCP limit (persistent socket, ``recv_into``),
  (a2) the same with the receive tuned as the daemon's transport tunes it (wake-up
  threshold ``SO_RCVLOWAT`` 1 MiB while more is due; Linux),
  (b) the daemon protocol doing the same decode-sized exchange (send a 1x4x128x128 f32
  latent, receive a 1x1024x1024x3 f32 image), (c) ``ping`` p50 vs raw 1-byte RTT,
  (d) a tiny real VAE decode via the daemon (default client: shared memory on) vs the
  same decode in-process, (e) the decode-sized exchange of (b) through shared memory, vs
  (a) and vs a plain memcpy of the same bytes, (f) a video-sized exchange (388 MB result)
  over TCP and over shared memory, vs memcpy (unpinned only).
* ``memory_benchmark``: one daemon holding a >= 300 MB model, N client processes
  encoding through it; RSS growth of the daemon and of each client vs N in-process copies.

The daemon and the raw server run as separate processes, as in real use. Every temp
folder and child process is removed / ended on the way out, also on failure or Ctrl-C.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from luna_daemon.netutil import free_port

log = logging.getLogger(__name__)

LATENT_SHAPE = (1, 4, 128, 128)
IMAGE_SHAPE = (1, 1024, 1024, 3)
VIDEO_SHAPE = (81, 480, 832, 3)  # a video VAE's decode: 81 frames, 388 MB of float32


class _Memcpy:
    """A plain memcpy of ``n`` bytes between two buffers allocated (and touched) once: the
    least any transport through memory pays for the bytes. ``fresh`` copies into a new
    buffer each time instead (allocation + page faults + copy: what producing a *new*
    result tensor from bytes already in memory costs, as torch's ``clone`` does)."""

    def __init__(self, n: int):
        self.src = torch.ones(n, dtype=torch.uint8)
        self.dst = torch.zeros(n, dtype=torch.uint8)
        self.src_mv, self.dst_mv = memoryview(self.src.numpy()), memoryview(self.dst.numpy())

    def warm(self) -> None:
        self.dst_mv[:] = self.src_mv  # one single-threaded memcpy, as the shm path does

    def fresh(self) -> None:
        memoryview(torch.empty(len(self.src_mv), dtype=torch.uint8).numpy())[:] = self.src_mv


def _interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2,
                 seed: int = 0) -> dict[str, list[float]]:
    """Run the candidates round-robin so that machine noise hits all of them alike.

    Each round runs them in a new (seeded) random order: a candidate that follows a
    12 MB memcpy finds the caches flushed and the allocator's state changed, so a fixed
    order would hand one candidate the same predecessor every time (on this kind of VM
    that alone moved a ratio by ~0.1)."""
    import random

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns.items())
    rng = random.Random(seed)
    for _ in range(repeats):
        rng.shuffle(order)
        for k, fn in order:
            t0 = time.perf_counter()
            fn()
            out[k].append(time.perf_counter() - t0)
    return out


_RAW_SERVER = textwrap.dedent(
    """
    import socket, sys
    req_n, rep_n = int(sys.argv[1]), int(sys.argv[2])
    ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1)
    sys.stdout.write(str(ls.getsockname()[1]) + "\\n"); sys.stdout.flush()
    c, _ = ls.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(max(req_n, 1)); rep = bytearray(rep_n); view = memoryview(buf)
    while True:
        got = 0
        while got < req_n:
            k = c.recv_into(view[got:req_n])
            if not k:
                sys.exit(0)
            got += k
        c.sendall(rep)
    """
)


def _pin(cpus: set[int] | None) -> Callable[[], None] | None:
    """preexec_fn pinning a child (and every thread it starts) to ``cpus``."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def placements() -> dict[str, tuple[set[int] | None, set[int] | None]]:
    """(client cpus, server cpus) per placement.

    On a VM a cross-CPU wake-up costs several times a same-CPU switch, and where the
    scheduler puts two processes changes run to run; pinning makes the raw and the
    daemon numbers comparable. Cross-core is the usual case (ComfyUI and the daemon
    busy on different cores); same-core is the worst case for per-call overhead.
    """
    if not hasattr(os, "sched_getaffinity"):
        return {"unpinned": (None, None)}
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return {"unpinned": (None, None)}
    return {"cross-core": ({cpus[0]}, {cpus[1]}), "same-core": ({cpus[0]}, {cpus[0]})}


def _stat_fields(path: Path) -> list[str]:
    """The fields of a Linux ``/proc/.../stat`` file after the command name (fields[0] is
    stat field 3). The name is cut at its *last* ")": it may itself hold spaces and ")".
    Raises OSError when the process / thread is gone."""
    return path.read_text().rsplit(")", 1)[1].split()


def _thread_stats(pid: int) -> dict[str, tuple[int, int]]:
    """{tid: (cpu ticks used, CPU it last ran on)} for every thread of ``pid`` (Linux /proc)."""
    out = {}
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                fields = _stat_fields(task / "stat")
            except OSError:
                continue  # the thread ended
            # utime/stime are stat fields 14/15, processor 39.
            out[task.name] = (int(fields[11]) + int(fields[12]), int(fields[36]))
    except (OSError, ValueError, IndexError):
        return {}
    return out


class _WhereRan:
    """Which CPU each process's busiest thread *during a measurement* ran on.

    Unpinned, the scheduler places the raw peer and the daemon independently, and on a
    VM a same-CPU round trip is several times faster than a cross-CPU one, so a ratio is
    only meaningful when both peers ended up in the same relation to the client. For the
    daemon the busiest thread during a measurement is its connection thread."""

    def __init__(self, **pids: int):
        self.pids = pids
        self.before = {name: _thread_stats(pid) for name, pid in pids.items()}

    def cpus(self) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for name, pid in self.pids.items():
            before, after = self.before[name], _thread_stats(pid)
            busiest = max(after.items(), key=lambda kv: kv[1][0] - before.get(kv[0], (0, 0))[0], default=None)
            out[name] = None if busiest is None else busiest[1][1]
        return out


def _faults_during(pid: int, fn: Callable[[], Any]) -> int | None:
    """Minor page faults process ``pid`` took while ``fn()`` ran (Linux /proc), or None."""
    def minflt() -> int | None:
        try:
            return int(_stat_fields(Path(f"/proc/{pid}/stat"))[7])  # minflt: stat field 10
        except (OSError, ValueError, IndexError):
            return None

    before = minflt()
    fn()
    after = minflt()
    return None if before is None or after is None else after - before


def _comparable(cpus: dict[str, int | None], raw: str) -> bool | None:
    """Did the raw peer and the daemon share (or not share) the client's CPU alike?"""
    c, r, d = cpus.get("client"), cpus.get(raw), cpus.get("daemon")
    if None in (c, r, d):
        return None
    return (r == c) == (d == c)


def _end_process(proc: subprocess.Popen, wait: float = 10.0) -> None:
    """Make sure a child has ended: give it ``wait`` seconds to exit by itself (it was
    asked to), then terminate, then kill; close its pipes."""
    for action in (None, proc.terminate, proc.kill):
        if proc.poll() is not None:
            break
        if action is not None:
            action()
        try:
            proc.wait(wait if action is None else 10.0)
        except subprocess.TimeoutExpired:
            pass
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


class _RawPeer:
    """Client side of the raw loopback exchange (request of req_n bytes, reply rep_n).

    ``lowat``: receive with the kernel's wake-up threshold raised to that many bytes while
    more than twice as many are still due (what ``transport.Channel`` does), else plain."""

    def __init__(self, req_n: int, rep_n: int, cpus: set[int] | None = None, lowat: int = 0):
        self.proc = subprocess.Popen([sys.executable, "-c", _RAW_SERVER, str(req_n), str(rep_n)], stdout=subprocess.PIPE,
                                     text=True, preexec_fn=_pin(cpus))
        try:
            port = int(self.proc.stdout.readline())
            self.sock = socket.create_connection(("127.0.0.1", port))
        except BaseException:
            _end_process(self.proc, 0.0)
            raise
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.req = bytearray(req_n)
        self.rep = bytearray(rep_n)
        self.view = memoryview(self.rep)
        self.lowat = lowat

    def exchange(self) -> None:
        self.sock.sendall(self.req)
        got, n = 0, len(self.rep)
        if self.lowat and n >= 2 * self.lowat:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, self.lowat)
            while got < n - self.lowat:
                got += self.sock.recv_into(self.view[got:n - self.lowat])
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        while got < n:
            got += self.sock.recv_into(self.view[got:])

    def close(self) -> None:
        self.sock.close()  # the peer exits when its client goes away
        _end_process(self.proc)


@contextmanager
def daemon_process(model_roots: list[str], extra_env: dict[str, str] | None = None,
                   cpus: set[int] | None = None, home: str | None = None) -> Iterator[tuple[int, str, subprocess.Popen]]:
    """Start ``luna-daemon serve`` in a subprocess on free ports; yield (port, token, proc).

    ``extra_env`` adds or replaces ``LUNA_*`` settings (the default engine is standalone);
    ``home`` is its LUNA_HOME (default: a new temporary folder, removed afterwards). On the
    way out -- also on an error or Ctrl-C -- the daemon is stopped (``shutdown``, then
    terminate / kill)."""
    with contextlib.ExitStack() as stack:
        if home is None:
            # ignore_cleanup_errors: a file a killed daemon held open (Windows) must not
            # turn the benchmark's result into an error.
            home = stack.enter_context(tempfile.TemporaryDirectory(prefix="luna-bench-", ignore_cleanup_errors=True))
        yield stack.enter_context(_serve(home, model_roots, extra_env, cpus))


@contextmanager
def _serve(home: str, model_roots: list[str], extra_env: dict[str, str] | None,
           cpus: set[int] | None) -> Iterator[tuple[int, str, subprocess.Popen]]:
    from luna_daemon.client import DaemonClient, DaemonUnavailable, wait_for_daemon

    port = free_port()
    env = dict(os.environ, LUNA_HOME=home, LUNA_PORT=str(port), LUNA_MONITOR_PORT=str(free_port()),
               LUNA_LOCK_PORT=str(free_port()), LUNA_MODEL_ROOTS=json.dumps(model_roots), LUNA_ENGINE="standalone",
               LUNA_LOG_LEVEL="WARNING", HF_HUB_OFFLINE="1")
    env.update(extra_env or {})  # may replace the defaults above (LUNA_ENGINE=comfy)
    proc = subprocess.Popen([sys.executable, "-m", "luna_daemon", "serve", "--no-monitor"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_pin(cpus))
    token: str | None = None
    try:
        try:
            wait_for_daemon("127.0.0.1", port, 60, proc=proc)
        except DaemonUnavailable as exc:
            raise RuntimeError(f"benchmark daemon did not start: {exc}") from None
        token = (Path(home) / "config" / "token").read_text().strip()
        yield port, token, proc
    finally:
        if token is not None and proc.poll() is None:
            try:
                with DaemonClient("127.0.0.1", port, token=token, timeout=30) as c:
                    c.shutdown()
            except Exception as exc:  # any failure: it is ended below either way
                log.debug("benchmark daemon did not take shutdown: %s", exc)
        _end_process(proc, 60.0 if token is not None else 0.0)


def _transport_once(cl: set[int] | None, sv: set[int] | None, repeats: int, work: str, vae_path: Path,
                    with_decode: bool) -> dict[str, list[float]]:
    from luna_daemon import transport
    from luna_daemon.client import DaemonClient
    from luna_daemon.models.engines.standalone import StandaloneEngine

    latent = torch.randn(LATENT_SHAPE)
    req_n, rep_n = latent.numel() * 4, 4 * IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2] * IMAGE_SHAPE[3]
    small_latent = torch.randn(1, 4, 64, 64)  # -> 512x512 image
    old_affinity = os.sched_getaffinity(0) if cl and hasattr(os, "sched_getaffinity") else None
    with contextlib.ExitStack() as stack:
        if old_affinity is not None:
            stack.callback(os.sched_setaffinity, 0, old_affinity)
        raw = _RawPeer(req_n, rep_n, sv)
        stack.callback(raw.close)
        tuned = None
        if transport._LOWAT:
            tuned = _RawPeer(req_n, rep_n, sv, lowat=transport._LOWAT)
            stack.callback(tuned.close)
        ping_raw = _RawPeer(1, 1, sv)
        stack.callback(ping_raw.close)
        with daemon_process([work], cpus=sv) as (port, token, _proc):
            if old_affinity is not None:
                os.sched_setaffinity(0, cl)
            # (b) is TCP (shm off); (e) the same exchange with shared memory.
            client = DaemonClient("127.0.0.1", port, token=token, timeout=120, shm=False)
            shm_client = DaemonClient("127.0.0.1", port, token=token, timeout=120, shm=True)
            copy = _Memcpy(req_n + rep_n)
            where = _WhereRan(client=os.getpid(), raw=raw.proc.pid, ping_raw=ping_raw.proc.pid, daemon=_proc.pid)
            t = _interleaved({
                "raw": raw.exchange, **({"raw_tuned": tuned.exchange} if tuned else {}),
                "proto": lambda: client.call("echo", {"latent": latent, "reply_shape": list(IMAGE_SHAPE)}),
                "shm": lambda: shm_client.call("echo", {"latent": latent, "reply_shape": list(IMAGE_SHAPE)}),
                "memcpy": copy.warm, "memcpy_fresh": copy.fresh,
            }, repeats)
            del copy
            bulk_cpus = where.cpus()
            where = _WhereRan(client=os.getpid(), ping_raw=ping_raw.proc.pid, daemon=_proc.pid)
            p = _interleaved({"raw_rtt": ping_raw.exchange, "ping": client.ping}, repeats * 10)
            ping_cpus = where.cpus()
            d: dict[str, list[float]] = {}
            if with_decode:
                vae = shm_client.vae_load(str(vae_path))["model"]
                local = StandaloneEngine().load_vae([str(vae_path)], torch.device("cpu"), None)
                # ComfyUI runs prompts on a worker thread, and on glibc big tensor work on
                # the main thread is measurably slower (main-arena allocation); so the
                # in-process baseline runs on a worker thread too, like the daemon's executor.
                pool = concurrent.futures.ThreadPoolExecutor(1)

                def _decode_local() -> None:
                    with torch.inference_mode():
                        local.decode(small_latent)

                d = _interleaved({
                    "local": lambda: pool.submit(_decode_local).result(),
                    "daemon": lambda: shm_client.vae_decode(vae, small_latent),
                    "transfer": lambda: shm_client.call("echo", {"latent": small_latent, "reply_shape": [1, 512, 512, 3]}),
                }, max(4, repeats // 10))  # ~0.5 s per decode on 2 CPUs
                # Minor page faults of one decode where it runs (this process / the daemon):
                # what the daemon's huge_pages setting changes (luna_daemon/hugepages.py).
                d["local_faults"] = [_faults_during(os.getpid(), lambda: pool.submit(_decode_local).result())]
                d["daemon_faults"] = [_faults_during(_proc.pid, lambda: shm_client.vae_decode(vae, small_latent))]
                pool.shutdown()
                # (f) video-sized: once (unpinned), few repeats (each moves 388 MB).
                video = _Memcpy(4 * VIDEO_SHAPE[0] * VIDEO_SHAPE[1] * VIDEO_SHAPE[2] * VIDEO_SHAPE[3])
                d.update({f"video_{k}": v for k, v in _interleaved({
                    "tcp": lambda: client.call("echo", {"latent": latent, "reply_shape": list(VIDEO_SHAPE)}),
                    "shm": lambda: shm_client.call("echo", {"latent": latent, "reply_shape": list(VIDEO_SHAPE)}),
                    "memcpy": video.warm, "memcpy_fresh": video.fresh,
                }, max(3, repeats // 20)).items()})
                del video
                client.call("echo", {"reply_shape": [1]})  # the daemon drops its cached 388 MB reply
            client.close()
            shm_client.close()
    return {**t, **p, **d, "cpus": {"bulk": bulk_cpus, "ping": ping_cpus}}


def transport_benchmark(repeats: int = 100) -> dict[str, Any]:
    """See the module docstring. Returns medians, ratios and human-readable lines."""
    with tempfile.TemporaryDirectory(prefix="luna-bench-models-", ignore_cleanup_errors=True) as work:
        return _transport_report(repeats, work)


def _transport_report(repeats: int, work: str) -> dict[str, Any]:
    from luna_daemon.models import tiny

    req_n = 4 * 1 * 4 * 128 * 128
    rep_n = 4 * IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2] * IMAGE_SHAPE[3]
    mb = (req_n + rep_n) / 1e6
    vae_path = tiny.make_tiny_vae(Path(work) / "vae", layout="file", seed=0)
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": sys.version.split()[0]},
        "exchange_bytes": req_n + rep_n, "repeats": repeats, "placements": {},
    }
    lines = [f"transport benchmark: {mb:.1f} MB decode-sized exchange, medians of interleaved runs"]
    # (d) runs unpinned (torch uses every core on both sides, as in real use) and first,
    # before this process has ever changed its own CPU affinity.
    runs = [("unpinned", None, None, True)] + [(n, cl, sv, False) for n, (cl, sv) in placements().items() if n != "unpinned"]
    if len(runs) == 1:
        runs = [("unpinned", None, None, True)]
    for name, cl, sv, with_decode in runs:
        samples = _transport_once(cl, sv, repeats, work, vae_path, with_decode=with_decode)
        cpus = samples.pop("cpus")
        med = {k: statistics.median(v) for k, v in samples.items()}
        r: dict[str, Any] = {
            "a_raw_s": med["raw"], "a_raw_GBps": mb / 1e3 / med["raw"],
            "b_protocol_s": med["proto"], "b_protocol_GBps": mb / 1e3 / med["proto"],
            "ratio_b_over_a": med["proto"] / med["raw"],
            # None where the daemon's transport does not tune the receive (not Linux).
            "a2_raw_tuned_s": med.get("raw_tuned"),
            "ratio_a2_over_a": med["raw_tuned"] / med["raw"] if "raw_tuned" in med else None,
            "ratio_b_over_a2": med["proto"] / med["raw_tuned"] if "raw_tuned" in med else None,
            "c_raw_rtt_us": med["raw_rtt"] * 1e6, "c_ping_p50_us": med["ping"] * 1e6,
            "ratio_ping_over_rtt": med["ping"] / med["raw_rtt"],
            "e_shm_s": med["shm"], "e_memcpy_s": med["memcpy"], "e_memcpy_fresh_s": med["memcpy_fresh"],
            "ratio_e_over_a": med["shm"] / med["raw"], "ratio_e_over_memcpy": med["shm"] / med["memcpy"],
            "ratio_e_over_memcpy_fresh": med["shm"] / med["memcpy_fresh"],
            "cpus": cpus,
            # Pinned placements are comparable by construction; unpinned only when the
            # scheduler put the raw peer and the daemon alike (None: unknown, not Linux).
            "bulk_comparable": True if name != "unpinned" else _comparable(cpus["bulk"], "raw"),
            "ping_comparable": True if name != "unpinned" else _comparable(cpus["ping"], "ping_raw"),
        }
        notes = {}
        for what, raw_name in (("bulk", "raw"), ("ping", "ping_raw")):
            seen = cpus[what]
            notes[what] = "" if r[f"{what}_comparable"] is not False else (
                f"  [not comparable: the scheduler ran the client on CPU {seen['client']}, the raw peer on CPU "
                f"{seen[raw_name]}, the daemon on CPU {seen['daemon']}; see the pinned placements]")
        tuned_line = [] if "raw_tuned" not in med else [
            f"[{name}] (a2) raw loopback, receive tuned like the daemon's (SO_RCVLOWAT): {med['raw_tuned'] * 1e3:.2f} ms  "
            f"a2/a = {r['ratio_a2_over_a']:.2f}, b/a2 = {r['ratio_b_over_a2']:.2f}{notes['bulk']}"]
        lines += [
            f"[{name}] (a) raw loopback: {med['raw'] * 1e3:.2f} ms ({r['a_raw_GBps']:.2f} GB/s)",
            *tuned_line,
            f"[{name}] (b) daemon protocol: {med['proto'] * 1e3:.2f} ms ({r['b_protocol_GBps']:.2f} GB/s)  b/a = {r['ratio_b_over_a']:.2f} (target <= 1.15 pinned){notes['bulk']}",
            f"[{name}] (c) ping p50 {r['c_ping_p50_us']:.0f} us vs raw RTT {r['c_raw_rtt_us']:.0f} us  ratio = {r['ratio_ping_over_rtt']:.2f} (target <= 2.0){notes['ping']}",
            f"[{name}] (e) shared memory: {med['shm'] * 1e3:.2f} ms  e/a = {r['ratio_e_over_a']:.2f} (target <= 0.5); "
            f"memcpy {med['memcpy'] * 1e3:.2f} ms (e/memcpy = {r['ratio_e_over_memcpy']:.1f}), into a new buffer "
            f"{med['memcpy_fresh'] * 1e3:.2f} ms (e/that = {r['ratio_e_over_memcpy_fresh']:.1f})",
        ]
        if "video_tcp" in med:
            r.update({"f_tcp_s": med["video_tcp"], "f_shm_s": med["video_shm"], "f_memcpy_s": med["video_memcpy"],
                      "f_memcpy_fresh_s": med["video_memcpy_fresh"],
                      "ratio_f_shm_over_memcpy": med["video_shm"] / med["video_memcpy"],
                      "ratio_f_shm_over_memcpy_fresh": med["video_shm"] / med["video_memcpy_fresh"],
                      "ratio_f_tcp_over_shm": med["video_tcp"] / med["video_shm"]})
            lines.append(
                f"[{name}] (f) video-sized 388 MB result: TCP {med['video_tcp'] * 1e3:.0f} ms, shm {med['video_shm'] * 1e3:.0f} ms, "
                f"memcpy {med['video_memcpy'] * 1e3:.0f} ms (shm/memcpy = {r['ratio_f_shm_over_memcpy']:.2f}, target <= 1.5), "
                f"into a new buffer {med['video_memcpy_fresh'] * 1e3:.0f} ms (shm/that = {r['ratio_f_shm_over_memcpy_fresh']:.2f})")
        if "local" in med:
            share = med["transfer"] / med["local"]
            r.update({"d_local_decode_s": med["local"], "d_daemon_decode_s": med["daemon"], "d_transfer_s": med["transfer"],
                      "ratio_d": med["daemon"] / med["local"], "transfer_share": share, "target_d": 1.15 + share,
                      "d_local_faults": samples["local_faults"][0], "d_daemon_faults": samples["daemon_faults"][0]})
            lines.append(
                f"[{name}] (d) tiny VAE decode 64x64 latent -> 512x512: in-process {med['local'] * 1e3:.1f} ms, via daemon "
                f"{med['daemon'] * 1e3:.1f} ms  ratio = {r['ratio_d']:.2f} (target <= 1.15 + transfer share {share:.2f} = {1.15 + share:.2f}); "
                f"page faults per decode: in-process {r['d_local_faults']}, daemon {r['d_daemon_faults']}")
        report["placements"][name] = r
    report["lines"] = lines
    return report


# ----------------------------------------------------------------------------- memory
_CLIENT_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time, psutil, torch
    from luna_daemon.client import DaemonClient
    port, token, model, n = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    proc = psutil.Process()
    c = DaemonClient("127.0.0.1", port, token=token, timeout=300)
    c.ping()
    px = torch.rand(1, 256, 256, 3)
    base = proc.memory_info().rss
    peak = base
    for _ in range(n):
        lat = c.vae_encode(model, px)
        img = c.vae_decode(model, lat)
        peak = max(peak, proc.memory_info().rss)
    sys.stdout.write(json.dumps({"base": base, "after": proc.memory_info().rss, "peak": peak, "latent": list(lat.shape)}) + "\\n")
    """
)


def warm_up(client: Any, small_vae: Path) -> None:
    """Load, use and unload a tiny VAE, so that a daemon's memory baseline includes the
    libraries the first load imports (diffusers/transformers: ~100+ MB that stays, as in
    any ComfyUI process) and a later RSS difference is model memory only."""
    warm = client.vae_load(str(small_vae))["model"]
    client.vae_decode(warm, torch.zeros(1, 4, 8, 8))
    client.unload(warm)


def memory_benchmark(model_mb: int = 320, clients: int = 3, encodes: int = 3) -> dict[str, Any]:
    """See the module docstring. The model file (``model_mb``) lives in a temp folder that
    is removed afterwards, as is every client process, also on failure or Ctrl-C."""
    with tempfile.TemporaryDirectory(prefix="luna-bench-mem-", ignore_cleanup_errors=True) as work:
        return _memory_report(model_mb, clients, encodes, work)


def _memory_report(model_mb: int, clients: int, encodes: int, work: str) -> dict[str, Any]:
    import psutil

    from luna_daemon.client import DaemonClient
    from luna_daemon.models import tiny

    path = tiny.make_big_vae(Path(work), target_bytes=model_mb * 1024 * 1024)
    small = tiny.make_tiny_vae(Path(work) / "warmup", layout="file")
    model_bytes = path.stat().st_size
    with daemon_process([work]) as (port, token, proc):
        dproc = psutil.Process(proc.pid)
        with DaemonClient("127.0.0.1", port, token=token, timeout=300) as c:
            warm_up(c, small)
            before = dproc.memory_info().rss
            info = c.vae_load(str(path))
            model_id = info["model"]
            measured = info["bytes"]
            # Encoder and decoder once each, so every weight page is resident.
            c.vae_decode(model_id, c.vae_encode(model_id, torch.zeros(1, 64, 64, 3)))
        after_load = dproc.memory_info().rss
        procs: list[subprocess.Popen] = []
        try:
            for _ in range(clients):
                procs.append(subprocess.Popen([sys.executable, "-c", _CLIENT_SCRIPT, str(port), token, model_id, str(encodes)],
                                              stdout=subprocess.PIPE, text=True))
            results = [json.loads(p.communicate(timeout=900)[0].strip().splitlines()[-1]) for p in procs]
        finally:
            for p in procs:
                _end_process(p, 0.0)
        after_clients = dproc.memory_info().rss
    client_growth = [r["peak"] - r["base"] for r in results]
    report = {
        "model_file_bytes": model_bytes, "model_loaded_bytes": measured, "clients": clients,
        "daemon_rss_growth_load": after_load - before, "daemon_rss_growth_total": after_clients - before,
        "client_rss_growth": client_growth,
        "client_growth_pct_of_model": [100.0 * g / measured for g in client_growth],
        "target_client_pct": 5.0,
        "in_process_copies_bytes": clients * measured,
        "saved_bytes": clients * measured - (after_clients - before),
    }
    mb = 1e6
    report["lines"] = [
        f"model: {measured / mb:.0f} MB of weights (file {model_bytes / mb:.0f} MB), {clients} client processes x {encodes} encode+decode at 256x256",
        f"daemon RSS growth: {report['daemon_rss_growth_load'] / mb:.0f} MB after load (one copy), {report['daemon_rss_growth_total'] / mb:.0f} MB after all clients "
        f"(the rest is decode activations kept by the allocator for reuse)",
        *[f"client {i + 1} RSS growth: {g / mb:.1f} MB ({pct:.2f}% of the model; target <= 5%)" for i, (g, pct) in enumerate(zip(client_growth, report["client_growth_pct_of_model"]))],
        f"{clients} in-process copies would cost {clients * measured / mb:.0f} MB; the daemon saves {report['saved_bytes'] / mb:.0f} MB",
    ]
    return report
