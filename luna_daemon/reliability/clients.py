"""Scenarios 2 and 4: a connection flood from another process, and client processes
SIGKILLed in the middle of a request. Both end by checking that the daemon released
every connection (the kernel's socket count, not the daemon's own figure)."""

from __future__ import annotations

import json
import signal
import subprocess
import textwrap
import time
from typing import Any

from luna_daemon.reliability.harness import (
    ADMIT_DEADLINE, PING_TARGET_MS, Suite, good_client_failure, kill, percentile, read_line, rounded,
    traceback_failure, wait_released,
)
from luna_daemon.reliability.wire import request_bytes

# The flooder: stdlib only (starts in milliseconds), one thread, non-blocking sockets.
FLOOD = textwrap.dedent(r'''
    import json, selectors, signal, socket, struct, sys, time
    port, n, max_s = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    # Half idle (connect, then nothing), half slow-loris (a frame that never ends: one
    # byte every 0.5 s). A connection the daemon closes is reopened: the flood renews.
    start = struct.pack(">4sBBHIQ", b"LUNA", 1, 1, 0, 4096, 0)
    sel = selectors.DefaultSelector()
    socks, reopen = {}, []
    stats = {"opened": 0, "closed_by_daemon": 0, "answer_bytes": 0, "connect_errors": 0}
    def open_one(role):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=1.0)
        except OSError:
            stats["connect_errors"] += 1
            reopen.append((time.monotonic() + 0.25, role))
            return
        s.setblocking(False)
        socks[s] = [role, 0, time.monotonic()]
        sel.register(s, selectors.EVENT_READ)
        stats["opened"] += 1
    def drop(s):
        role = socks.pop(s)[0]
        sel.unregister(s)
        s.close()
        stats["closed_by_daemon"] += 1
        reopen.append((time.monotonic() + 0.25, role))
    def bye(*_):
        sys.stdout.write(json.dumps(stats) + "\n"); sys.stdout.flush()
        sys.exit(0)
    signal.signal(signal.SIGTERM, bye)
    for i in range(n):
        open_one("loris" if i % 2 else "idle")
    sys.stdout.write("ready\n"); sys.stdout.flush()  # the parent reads replies line by line
    end = time.monotonic() + max_s
    while time.monotonic() < end:
        for key, _ in sel.select(0.05):
            s = key.fileobj
            try:
                data = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                stats["answer_bytes"] += len(data)
            else:
                drop(s)
        now = time.monotonic()
        for s, st in list(socks.items()):
            if st[0] == "loris" and now >= st[2]:
                st[2] = now + 0.5
                try:
                    s.send(start[st[1]:st[1] + 1] if st[1] < len(start) else b" ")
                    st[1] += 1
                except OSError:
                    drop(s)
        due = [r for r in reopen if r[0] <= now]
        reopen[:] = [r for r in reopen if r[0] > now]
        for _, role in due:
            open_one(role)
    bye()
''')


def scenario_flood(suite: Suite) -> dict[str, Any]:
    import torch

    from luna_daemon.client import DaemonError, DaemonUnavailable

    p, d = suite.p, suite.main
    time.sleep(0.3)  # connections of earlier checks have gone
    baseline = d.sockets() or 0
    flood = suite.work.python(FLOOD, str(d.port), str(p.flood), "300", stdout=subprocess.PIPE, text=True)
    out: dict[str, Any] = {"connections": p.flood, "mix": "half idle, half slow-loris (1 byte / 0.5 s), renewed when closed"}
    fails: list[str] = []
    try:
        if read_line(flood, 30) != "ready":
            raise RuntimeError("the flood process did not start")
        time.sleep(1.0)  # the daemon has accepted (or refused) the whole flood
        out["daemon_sockets_during"] = d.sockets()
        admits: list[float | None] = []
        for _ in range(p.admissions):
            t0 = time.monotonic()
            admitted = None
            while time.monotonic() - t0 < ADMIT_DEADLINE:
                try:
                    with d.client(timeout=5) as c:  # a newly started client: fresh connections
                        c.ping()
                    admitted = time.monotonic() - t0
                    break
                except (DaemonUnavailable, DaemonError):
                    time.sleep(0.05)
            admits.append(admitted)
            if admitted is None:
                break  # locked out: another try would only wait out the same deadline
            time.sleep(0.3)
        out["time_to_admit_s"] = [rounded(a, 3) for a in admits]
        out["hung"] = locked = sum(a is None for a in admits)
        if locked:
            fails.append(f"a new client was locked out for more than {ADMIT_DEADLINE:.0f}s during the flood")
        lat: list[float] = []
        errors = right = 0
        if not locked:
            with d.client(timeout=5) as c:
                for _ in range(p.pings):
                    t0 = time.perf_counter()
                    try:
                        c.ping()
                        lat.append((time.perf_counter() - t0) * 1000)
                    except (DaemonUnavailable, DaemonError):
                        errors += 1
                    time.sleep(0.005)
                for _ in range(3):
                    try:
                        right += bool(torch.equal(c.vae_decode(suite.vae_id, suite.latent), suite.reference))
                    except (DaemonUnavailable, DaemonError):
                        errors += 1
            if errors:
                fails.append(f"{errors} calls of an admitted client failed during the flood")
            if right != 3:
                fails.append(f"only {right} of 3 decodes during the flood were right")
        p99 = percentile(lat, 99)
        out.update({"pings": len(lat), "call_errors": errors, "decodes_right": right,
                    "ping_p50_ms": rounded(percentile(lat, 50)), "ping_p99_ms": rounded(p99),
                    "ping_max_ms": rounded(max(lat) if lat else None), "ping_p99_target_ms": PING_TARGET_MS,
                    "ping_p99_within_target": p99 is not None and p99 <= PING_TARGET_MS})
    finally:
        if flood.poll() is None:
            flood.terminate()
        line = read_line(flood, 5)
        kill(flood)
    try:
        out["flood_process"] = json.loads(line) if line else None
    except ValueError:
        out["flood_process"] = None
    n, secs = wait_released(d, baseline, 15)
    out.update(sockets_after=n, sockets_baseline=baseline, released_within_s=round(secs, 1))
    if n is None or n > baseline:
        fails.append(f"the daemon still holds {n} connections 15 s after the flood ended (before: {baseline})")
    out["failures"] = fails
    return out


# A client killed mid-request: stdlib only; the frame comes prebuilt from a file.
KILLED = textwrap.dedent(r'''
    import socket, sys, time
    port, mode, path, copies = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    data = open(path, "rb").read()
    socks = []
    for _ in range(copies):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(data[: len(data) // 2] if mode == "mid_body" else data)
        socks.append(s)
    sys.stdout.write("sent\n"); sys.stdout.flush()
    time.sleep(120)  # SIGKILLed long before
''')
CONNECTIONS_PER_KILLED = 2


def scenario_killed_clients(suite: Suite) -> dict[str, Any]:
    import torch

    d, p = suite.main, suite.p
    time.sleep(0.3)
    baseline = d.sockets() or 0
    tb = d.stderr_offset()
    frames = {
        # Big enough to be running or queued when its client dies.
        "mid_decode": request_bytes("vae_decode", {"model": suite.vae_id, "latent": torch.randn(1, 4, 48, 48)}, d.token),
        # 64 MiB announced, half of it sent: killed while sending the body.
        "mid_body": request_bytes("echo", {"x": torch.zeros(64 << 20, dtype=torch.uint8)}, d.token),
        # A 32 MiB answer the client never reads: killed while the daemon sends it.
        "mid_answer": request_bytes("echo", {"reply_shape": [8, 1024, 1024]}, d.token),
    }
    paths = {}
    for name, data in frames.items():
        paths[name] = suite.work.root / f"killed-{name}.bin"
        paths[name].write_bytes(data)
    del frames
    fails: list[str] = []
    procs = [(name, suite.work.python(KILLED, str(d.port), name, str(path), str(CONNECTIONS_PER_KILLED),
                                      stdout=subprocess.PIPE, text=True))
             for name, path in paths.items() for _ in range(p.killed_copies)]
    for name, proc in procs:
        if read_line(proc, 30) != "sent":
            fails.append(f"a {name} client did not get its request out")
    time.sleep(0.3)
    killed = 0
    for _, proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed += 1
        kill(proc)
    # Every dead peer must be noticed: its connection closed, its queued work dropped.
    sockets, secs = wait_released(d, baseline, 30, idle=True)
    st, _ = d.status()
    in_flight = None if st is None else max(0, st.get("in_flight", 1) - 1)  # minus the status call itself
    out: dict[str, Any] = {"killed": killed, "modes": list(paths), "connections_per_client": CONNECTIONS_PER_KILLED,
                           "sockets_baseline": baseline, "sockets_after": sockets, "released_within_s": round(secs, 1),
                           "leaked_connections": None if sockets is None else max(0, sockets - baseline),
                           "in_flight_after": in_flight, "crashes": int(not d.alive)}
    if not d.alive:
        fails.append(f"the daemon died when its clients were killed (exit code {d.proc.returncode})")
        suite.restart_main()
    out["good_client_after"] = suite.good_client_check()
    out.update(d.tracebacks_since(tb))
    if out["leaked_connections"] is None or out["leaked_connections"]:
        fails.append(f"{out['leaked_connections']} connections still held 30 s after the kills")
    if in_flight is None:
        fails.append("status did not answer after the kills")
    elif in_flight:
        fails.append(f"{in_flight} requests still in flight 30 s after the kills")
    fails += good_client_failure(out["good_client_after"], "after the kills")
    fails += traceback_failure(out)
    out["failures"] = fails
    return out
