"""Integration: real daemon, real sockets, real client, tiny real models."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch

from luna_daemon import protocol
from luna_daemon.client import DaemonClient, DaemonError, DaemonUnavailable
from luna_daemon.daemon import Daemon, DaemonStartError
from luna_daemon.models.engines.standalone import StandaloneEngine

CPU = torch.device("cpu")


def _raw_call(sock: socket.socket, op: str, args=None, token=None):
    buffers, _ = protocol.request(1, op, args, token)
    sock.sendall(b"".join(bytes(b) for b in buffers))
    from luna_daemon import transport

    frame = transport.Channel(sock).read_frame(protocol.Limits(), idle_timeout=10, frame_timeout=10)
    return protocol.parse_response(frame)


def _read_error(sock: socket.socket) -> tuple[str, str]:
    from luna_daemon import transport

    frame = transport.Channel(sock).read_frame(protocol.Limits(), idle_timeout=10, frame_timeout=10)
    _, ok, payload = protocol.parse_response(frame)
    assert not ok
    return payload


# ----------------------------------------------------------------------------- parity
def test_vae_roundtrip_equals_in_process(client, model_dir):
    torch.manual_seed(0)
    pixels = torch.rand(2, 68, 100, 3)
    info = client.vae_load(str(model_dir / "vae_folder"))
    latent = client.vae_encode(info["model"], pixels)
    image = client.vae_decode(info["model"], latent)
    local = StandaloneEngine().load_vae([str(model_dir / "vae_folder")], CPU, None)
    with torch.inference_mode():
        ref_latent = local.encode(pixels)
        ref_image = local.decode(ref_latent)
    assert latent.shape == (2, 4, 8, 12) and latent.dtype == torch.float32
    assert torch.equal(latent, ref_latent)
    assert image.shape == (2, 64, 96, 3)
    assert torch.equal(image, ref_image)
    tiled = client.vae_decode(info["model"], latent, tiled={"tile_x": 4, "tile_y": 4, "overlap": 1})
    with torch.inference_mode():
        from luna_daemon.models.engines.base import TiledArgs

        assert torch.equal(tiled, local.decode(ref_latent, TiledArgs(4, 4, 1)))


def test_clip_encode_equals_in_process(client, model_dir):
    info = client.clip_load([str(model_dir / "clip_l")], "sd1")
    tokens = client.clip_tokenize(info["model"], "a photo of a cat")
    assert set(tokens) == {"l"} and len(tokens["l"][0]) == 77 and isinstance(tokens["l"][0][0], tuple)
    out = client.clip_encode(info["model"], tokens=tokens)
    out2 = client.clip_encode(info["model"], text="a photo of a cat", layer=-2)
    local = StandaloneEngine().load_clip([str(model_dir / "clip_l")], "sd1", CPU, None)
    with torch.inference_mode():
        ref = local.encode(local.tokenize("a photo of a cat"))
        ref2 = local.encode(local.tokenize("a photo of a cat"), layer=-2)
    assert torch.equal(out["cond"], ref["cond"]) and torch.equal(out["pooled_output"], ref["pooled_output"])
    assert torch.equal(out2["cond"], ref2["cond"])
    assert not torch.equal(out["cond"], out2["cond"])


def test_three_concurrent_clients(daemon, model_dir):
    host, port = daemon.address
    setup = DaemonClient(host, port, token=daemon.token)
    vae = setup.vae_load(str(model_dir / "vae_file" / "tiny_vae.safetensors"))["model"]
    clip = setup.clip_load([str(model_dir / "clip_l")])["model"]
    local_vae = StandaloneEngine().load_vae([str(model_dir / "vae_file" / "tiny_vae.safetensors")], CPU, None)
    local_clip = StandaloneEngine().load_clip([str(model_dir / "clip_l")], "sd1", CPU, None)
    errors: list[str] = []

    def worker(seed: int) -> None:
        c = DaemonClient(host, port, token=daemon.token)
        g = torch.Generator().manual_seed(seed)
        for i in range(5):
            px = torch.rand(1, 32, 32, 3, generator=g)
            lat = c.vae_encode(vae, px)
            with torch.inference_mode():
                if not torch.equal(lat, local_vae.encode(px)):
                    errors.append(f"vae mismatch seed {seed} it {i}")
            text = f"prompt {seed} {i}"
            cond = c.clip_encode(clip, text=text)["cond"]
            with torch.inference_mode():
                if not torch.equal(cond, local_clip.encode(local_clip.tokenize(text))["cond"]):
                    errors.append(f"clip mismatch seed {seed} it {i}")
        c.close()

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    # One shared copy: three clients, one VAE and one CLIP loaded.
    assert len(setup.ps()) == 2
    setup.close()


def test_same_model_shared_and_unload(client, model_dir):
    a = client.vae_load(str(model_dir / "vae_folder"))
    b = client.vae_load(str(model_dir / "vae_folder"))
    assert a["model"] == b["model"]
    ps = client.ps()
    assert [m["kind"] for m in ps] == ["vae"] and ps[0]["bytes"] > 0 and ps[0]["expires_at"] is None
    done = client.unload(a["model"])
    assert done[0]["id"] == a["model"] and client.ps() == []
    with pytest.raises(DaemonError) as ei:
        client.vae_decode(a["model"], torch.zeros(1, 4, 8, 8))
    assert ei.value.code == "not_found"


def test_keep_alive_zero_unloads_after_use(client, model_dir):
    m = client.vae_load(str(model_dir / "vae_file" / "tiny_vae.safetensors"), keep_alive=0)["model"]
    client.vae_decode(m, torch.zeros(1, 4, 4, 4))
    deadline = time.time() + 5
    while client.ps() and time.time() < deadline:
        time.sleep(0.05)
    assert client.ps() == []


# ----------------------------------------------------------------------------- safety
def test_forbidden_path_and_unauthorized(daemon, client, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(b"x")
    with pytest.raises(DaemonError) as ei:
        client.vae_load(str(outside))
    assert ei.value.code == "forbidden_path"
    with pytest.raises(DaemonError) as ei:
        client.vae_load("../../etc/passwd")
    assert ei.value.code == "forbidden_path"
    anon = DaemonClient(*daemon.address, token="wrong-token")
    assert anon.ping()["pong"] is True  # ping and hello need no token
    assert anon.hello()["protocol"] == protocol.VERSION
    for op in ("status", "ps", "vae_load"):
        with pytest.raises(DaemonError) as ei:
            anon.call(op, {})
        assert ei.value.code == "unauthorized"
    anon.close()


def test_bad_args_keep_connection_and_daemon(client, model_dir):
    m = client.vae_load(str(model_dir / "vae_file" / "tiny_vae.safetensors"))["model"]
    for args, code in (
        ({"model": m, "latent": torch.zeros(4, 8, 8)}, "bad_args"),
        ({"model": m, "latent": torch.zeros(1, 4, 8, 8, dtype=torch.int64)}, "bad_args"),
        ({"model": m}, "bad_args"),
        ({"model": "vae-nope", "latent": torch.zeros(1, 4, 8, 8)}, "not_found"),
        ({"model": m, "latent": torch.zeros(1, 7, 8, 8)}, "bad_args"),  # wrong channel count
    ):
        with pytest.raises(DaemonError) as ei:
            client.call("vae_decode", args)
        assert ei.value.code == code, args
    with pytest.raises(DaemonError) as ei:
        client.call("no_such_op")
    assert ei.value.code == "unknown_op"
    assert client.vae_decode(m, torch.zeros(1, 4, 4, 4)).shape == (1, 32, 32, 3)


def test_one_terabyte_claim_refused_without_rss_growth(daemon):
    proc = psutil.Process()
    before = proc.memory_info().rss
    with socket.create_connection(daemon.address) as s:
        hdr = b'{"id":1,"op":"ping"}'
        s.sendall(protocol.PREFIX.pack(b"LUNA", 1, 1, 0, len(hdr), 1 << 40) + hdr)
        code, msg = _read_error(s)
        assert code == "too_large"
        assert s.recv(1) == b""  # connection closed after the error
    assert proc.memory_info().rss - before < 50 * 1024 * 1024
    with DaemonClient(*daemon.address) as c:
        assert c.ping()["pong"]


def test_garbage_gets_typed_error_and_close(daemon):
    with socket.create_connection(daemon.address) as s:
        s.sendall(b"\x80\x04\x95" + b"pickle!" * 10)  # a pickle stream is not a frame
        code, _ = _read_error(s)
        assert code == "bad_frame"
        assert s.recv(1) == b""


def test_idle_and_frame_timeouts(make_settings):
    d = Daemon(make_settings(idle_timeout=0.5, frame_timeout=0.5))
    d.start()
    try:
        with socket.create_connection(d.address) as s:
            s.settimeout(5)
            t0 = time.time()
            assert s.recv(1) == b""  # idle connection closed by the server
            assert time.time() - t0 < 4
        with socket.create_connection(d.address) as s:
            s.sendall(b"LUNA\x01")  # a frame that never completes
            code, _ = _read_error(s)
            assert code == "timeout"
        with DaemonClient(*d.address) as c:
            assert c.ping()["pong"]
            time.sleep(0.8)  # pooled connection is closed by the idle timeout...
            assert c.ping()["pong"]  # ...and the client reconnects transparently
    finally:
        d.stop(5)


def test_client_killed_mid_request_leaves_server_serving(daemon, model_dir):
    m = DaemonClient(*daemon.address, token=daemon.token).vae_load(str(model_dir / "vae_file" / "tiny_vae.safetensors"))["model"]
    script = f"""
import socket, sys, json, struct, time
from luna_daemon import protocol
import torch
buffers, _ = protocol.request(1, "vae_decode", {{"model": "{m}", "latent": torch.zeros(1, 4, 64, 64)}}, "{daemon.token}")
data = b"".join(bytes(b) for b in buffers)
s = socket.create_connection(("{daemon.address[0]}", {daemon.address[1]}))
s.sendall(data[: len(data) // 2])
sys.stdout.write("sent\\n"); sys.stdout.flush()
time.sleep(60)
"""
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "sent"
    p.kill()
    p.wait(10)
    # And one that sends a whole request and dies before the answer.
    script2 = script.replace("data[: len(data) // 2]", "data")
    p = subprocess.Popen([sys.executable, "-c", script2], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "sent"
    p.kill()
    p.wait(10)
    with DaemonClient(*daemon.address, token=daemon.token) as c:
        assert c.vae_decode(m, torch.zeros(1, 4, 4, 4)).shape == (1, 32, 32, 3)
        deadline = time.time() + 10
        while c.status()["clients"] > 1 and time.time() < deadline:
            time.sleep(0.05)
        assert c.status()["clients"] == 1  # the dead clients' connections are gone


def test_busy_when_queue_full(make_settings, model_dir):
    d = Daemon(make_settings(queue_size=1))
    d.start()
    try:
        c0 = DaemonClient(*d.address, token=d.token)
        m = c0.vae_load(str(model_dir / "vae_file" / "tiny_vae.safetensors"))["model"]
        codes: list[str] = []
        lock = threading.Lock()

        def hit() -> None:
            with DaemonClient(*d.address, token=d.token) as c:
                try:
                    c.vae_decode(m, torch.zeros(1, 4, 48, 48))
                    r = "ok"
                except DaemonError as exc:
                    r = exc.code
            with lock:
                codes.append(r)

        threads = [threading.Thread(target=hit) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(codes) == 8 and set(codes) <= {"ok", "busy"} and "busy" in codes and "ok" in codes
        c0.close()
    finally:
        d.stop(10)


def test_max_connections(make_settings):
    d = Daemon(make_settings(max_connections=2))
    d.start()
    try:
        # start() verified itself with a real ping; that connection's server side goes
        # away asynchronously, and until it does it holds one of the two slots.
        deadline = time.time() + 10
        while d.server.connection_count and time.time() < deadline:
            time.sleep(0.01)
        a, b = socket.create_connection(d.address), socket.create_connection(d.address)
        assert _raw_call(a, "ping")[1] is True
        assert _raw_call(b, "ping")[1] is True
        # Full of idle connections: a third one is admitted by evicting the longest idle
        # (a); `busy` is only for a server whose every slot has a request in flight
        # (tests/test_hardening_fairness.py).
        with socket.create_connection(d.address) as c:
            assert _raw_call(c, "ping")[1] is True
            a.settimeout(10)
            assert a.recv(1) == b""
            assert _raw_call(b, "ping")[1] is True
            assert d.server.connection_count == 2
        a.close()
        b.close()
    finally:
        d.stop(5)


# ----------------------------------------------------------------------------- lifecycle
def test_states_and_events(make_settings):
    d = Daemon(make_settings())
    seen: list[str] = []
    d.events.subscribe(lambda e: seen.append(e.data["state"]) if e.type == "state" else None)
    assert d.state == "stopped"
    d.start()
    assert d.state == "running"
    with DaemonClient(*d.address) as c:
        assert c.ping()["pong"]
    port = d.address[1]
    assert d.stop(5) is True and d.state == "stopped"
    assert d.stop(5) is True  # idempotent
    assert seen == ["starting", "running", "stopping", "stopped"]
    with pytest.raises(DaemonUnavailable):
        DaemonClient("127.0.0.1", port, timeout=2).ping()
    d.start()  # restartable in the same process
    assert d.state == "running"
    d.stop(5)


def test_stop_from_many_threads_at_once(daemon):
    results = []
    threads = [threading.Thread(target=lambda: results.append(daemon.stop(10))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [True] * 4 and daemon.state == "stopped"


def test_port_in_use_is_a_clear_error(make_settings):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    try:
        d = Daemon(make_settings(port=port))
        with pytest.raises(DaemonStartError) as ei:
            d.start()
        assert str(port) in str(ei.value) and "in use" in str(ei.value)
        assert d.state == "error" and str(port) in d.detail
    finally:
        blocker.close()


def test_second_daemon_on_taken_port(daemon, make_settings):
    d2 = Daemon(make_settings(port=daemon.address[1]))
    with pytest.raises(DaemonStartError):
        d2.start()
    assert d2.state == "error"
    with DaemonClient(*daemon.address) as c:
        assert c.ping()["pong"]  # the first one is untouched


def test_stop_with_requests_in_flight(make_settings, model_dir):
    d = Daemon(make_settings(queue_size=64))
    d.start()
    c0 = DaemonClient(*d.address, token=d.token)
    m = c0.vae_load(str(model_dir / "vae_file" / "tiny_vae.safetensors"))["model"]
    outcomes: list[str] = []
    lock = threading.Lock()
    go = threading.Event()

    def hammer() -> None:
        c = DaemonClient(*d.address, token=d.token, timeout=60)
        go.wait()
        for _ in range(50):
            try:
                img = c.vae_decode(m, torch.zeros(1, 4, 32, 32))
                r = "ok" if img.shape == (1, 256, 256, 3) else "wrong"
            except DaemonError as exc:
                r = exc.code
            except DaemonUnavailable:
                r = "unavailable"
            with lock:
                outcomes.append(r)
            if r == "unavailable":
                break
        c.close()

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    go.set()
    time.sleep(0.5)
    assert d.stop(30) is True
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a request hung across stop"
    assert "ok" in outcomes
    # Every request either completed or was told the daemon is stopping / gone.
    assert set(outcomes) <= {"ok", "stopping", "unavailable", "not_found"}, set(outcomes)
    c0.close()


def test_shutdown_op_stops_daemon(daemon):
    with DaemonClient(*daemon.address, token=daemon.token) as c:
        assert c.shutdown()["stopping"] is True
    assert daemon.wait_stopped(15)
    deadline = time.time() + 10
    while daemon.state != "stopped" and time.time() < deadline:
        time.sleep(0.05)
    assert daemon.state == "stopped"


def test_token_file_mode(daemon):
    import os
    import stat

    mode = stat.S_IMODE(os.stat(daemon.settings.token_path).st_mode)
    if os.name == "posix":
        assert mode == 0o600
    assert len(daemon.token) >= 32


def _busy_vae(daemon, model_dir) -> tuple[DaemonClient, str, threading.Thread]:
    """A loaded VAE whose executor is busy with a long decode (running when this returns)."""
    c = DaemonClient(*daemon.address, token=daemon.token)
    m = c.vae_load(str(model_dir / "vae_file" / "tiny_vae.safetensors"))["model"]
    busy = threading.Thread(target=lambda: DaemonClient(*daemon.address, token=daemon.token).vae_decode(m, torch.zeros(1, 4, 96, 96)))
    busy.start()
    deadline = time.time() + 10
    while c.ps()[0]["users"] == 0 and time.time() < deadline:
        time.sleep(0.005)
    return c, m, busy


def test_disconnect_cancels_queued_work(daemon, model_dir):
    c, m, busy = _busy_vae(daemon, model_dir)
    deadline = time.time() + 10
    # Queue a request behind the busy one, then vanish without reading the answer.
    s = socket.create_connection(daemon.address)
    buffers, _ = protocol.request(5, "vae_decode", {"model": m, "latent": torch.zeros(1, 4, 8, 8)}, daemon.token)
    s.sendall(b"".join(bytes(b) for b in buffers))
    while c.ps()[0]["users"] < 2 and time.time() < deadline:
        time.sleep(0.005)
    assert c.ps()[0]["users"] == 2
    s.close()
    busy.join(120)
    deadline = time.time() + 10
    while c.ps()[0]["cancelled"] == 0 and time.time() < deadline:
        time.sleep(0.02)
    entry = c.ps()[0]
    assert entry["cancelled"] == 1 and entry["calls"] == 1 and entry["users"] == 0  # the queued call never ran
    assert c.status()["requests"]["by_op"]["vae_decode"].get("cancelled") == 1
    c.close()


class _Stop(ConnectionError):
    """What a caller's check raises; an OSError on purpose: it must not be taken for a
    lost connection (no retry, no DaemonUnavailable)."""


def test_check_is_polled_while_waiting_and_abandons_the_request():
    # A real server that reads the request and never answers.
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(4)
    seen_eof = threading.Event()

    def serve():
        conn, _ = ls.accept()
        while conn.recv(65536):
            pass
        seen_eof.set()  # the client closed the connection it abandoned
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    client = DaemonClient(*ls.getsockname(), token="t", timeout=30)
    polls: list[float] = []

    def check():
        polls.append(time.monotonic())
        if len(polls) == 3:
            raise _Stop("cancelled by the user")

    with pytest.raises(_Stop):
        client.call("status", check=check)
    assert len(polls) == 3 and polls[2] - polls[0] >= 0.15  # polled about every 0.1 s, not spun
    assert seen_eof.wait(5)
    # Without an answer and a check that never raises, the client's timeout still applies.
    threading.Thread(target=serve, daemon=True).start()
    with pytest.raises(DaemonError) as ei:
        client.call("status", timeout=0.3, check=lambda: None)
    assert ei.value.code == "timeout"
    client.close()
    ls.close()


def test_abandoned_call_is_dropped_from_the_queue(daemon, model_dir):
    c, m, busy = _busy_vae(daemon, model_dir)
    waiter = DaemonClient(*daemon.address, token=daemon.token)

    def check():  # "cancel" once the request is queued behind the busy one
        if c.ps()[0]["users"] == 2:
            raise _Stop("cancelled")

    with pytest.raises(_Stop):
        waiter.call("vae_decode", {"model": m, "latent": torch.zeros(1, 4, 8, 8)}, check=check)
    busy.join(120)
    deadline = time.time() + 10
    while c.ps()[0]["cancelled"] == 0 and time.time() < deadline:
        time.sleep(0.02)
    entry = c.ps()[0]
    assert entry["cancelled"] == 1 and entry["calls"] == 1  # the abandoned call never ran
    # The waiting client stays usable; an answer that comes while check() is polled is returned.
    assert waiter.call("ping", check=lambda: None)["pong"] is True
    out = waiter.call("vae_decode", {"model": m, "latent": torch.zeros(1, 4, 8, 8)}, check=lambda: None)
    assert out["image"].shape == (1, 64, 64, 3)
    waiter.close()
    c.close()


@pytest.mark.skipif(not hasattr(__import__("resource"), "RLIMIT_NOFILE"), reason="POSIX descriptor limits")
def test_waiting_works_with_descriptor_numbers_over_1024():
    # select() fails for descriptors >= FD_SETSIZE (1024); a client inside a busy ComfyUI
    # process can hold that many files.
    import resource

    from luna_daemon import transport

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip("descriptor limit too low to test")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200) if hard == resource.RLIM_INFINITY else min(max(soft, 1200), hard), hard))
    fillers = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        ls = socket.create_server(("127.0.0.1", 0))
        a = socket.create_connection(ls.getsockname())
        b, _ = ls.accept()
        ls.close()
        assert b.fileno() > 1024
        ch = transport.Channel(b)
        assert ch.peer_gone() is False
        calls = []
        with pytest.raises(transport.IdleTimeout):
            ch.wait_readable(lambda: calls.append(1), time.monotonic() + 0.25)
        assert len(calls) >= 2
        a.sendall(b"x")
        ch.wait_readable(lambda: None, time.monotonic() + 5)  # returns: data is there
        a.close()
        b.recv(1)
        assert ch.peer_gone() is True
        b.close()
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_model_loading_reports_progress(daemon, model_dir):
    events: list[tuple[str, dict]] = []
    unsubscribe = daemon.events.subscribe(
        lambda e: events.append((e.type, e.data)) if e.type in ("model_loading", "model_loaded") else None)
    try:
        with DaemonClient(*daemon.address, token=daemon.token) as c:
            model = c.vae_load(str(model_dir / "vae_folder"))["model"]
    finally:
        unsubscribe()
    mine = [(t, d) for t, d in events if d["model"] == model]
    progress = [d["progress"] for t, d in mine if t == "model_loading"]
    assert mine[-1][0] == "model_loaded"
    assert progress[0] == 0.0 and len(progress) >= 5, progress  # steps of 5 % of the weights read
    assert progress == sorted(progress) and progress[-1] < 1.0
    assert progress[-1] >= 0.5  # the folder's weights, read tensor by tensor
