"""Shared-memory transport (issue 15): real daemons, real sockets, real /dev/shm segments.

What is checked: shm results equal TCP results bit for bit; every malformed or foreign
descriptor / registration gets a typed error and the daemon keeps serving; segments are
per connection and gone once the connection is (also after a SIGKILLed client); shm off
means TCP only.
"""

from __future__ import annotations

import glob
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from luna_daemon import protocol, shm, transport
from luna_daemon.client import DaemonClient
from luna_daemon.daemon import Daemon

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="checks /dev/shm entries")


def _ours() -> set[str]:
    return {os.path.basename(p) for p in glob.glob("/dev/shm/luna_*")}


def _wait_until(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


class _Raw:
    """One raw connection speaking frames by hand (to send what DaemonClient never would)."""

    def __init__(self, address, token):
        self.sock = socket.create_connection(address, timeout=10)
        self.channel = transport.Channel(self.sock)
        self.token = token

    def send(self, header: dict, tensors: dict | None = None, shm_target=None) -> None:
        self.channel.send(protocol.encode_frame(protocol.Kind.REQUEST, header, tensors, shm_target), 10)

    def answer(self, segments=None):
        frame = self.channel.read_frame(protocol.Limits(), idle_timeout=10, frame_timeout=10, segments=segments)
        return protocol.parse_response(frame)

    def call(self, op, args=None, token=True):
        header, tensors = protocol.pack_request(1, op, args, self.token if token else None)
        self.send(header, tensors)
        return self.answer()

    def closed(self) -> bool:
        return _wait_until(lambda: self.channel.peer_gone(), 5)

    def close(self):
        self.channel.close()


@pytest.fixture
def seg():
    s = shm.ClientSegment(1 << 20)
    yield s
    s.destroy()


def _register(raw: _Raw, s: shm.ClientSegment):
    _, ok, payload = raw.call("shm_register", {"name": s.name, "size": s.size})
    assert ok, payload
    return payload


def _assert_serving(daemon):
    with DaemonClient(*daemon.address, token=daemon.token, timeout=10) as c:
        assert c.ping()["pong"] is True


# ----------------------------------------------------------------------------- parity
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.bool]


@st.composite
def _tensor(draw):
    """Any allowed dtype, 0-4 dims (empty ones too), random bit patterns (NaNs included),
    sometimes non-contiguous."""
    dtype = draw(st.sampled_from(_DTYPES))
    shape = draw(st.lists(st.integers(0, 40), min_size=0, max_size=4))
    n = 1
    for d in shape:
        n *= d
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    itemsize = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8, generator=g)
    t = (raw % 2 == 1) if dtype == torch.bool else raw.view(dtype)
    t = t.reshape(shape)
    if draw(st.booleans()) and t.ndim >= 2:
        t = t.transpose(0, 1)  # non-contiguous: copied into the segment in one pass
    return t


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(tensors=st.lists(_tensor(), min_size=1, max_size=5), pad=st.integers(0, 70_000))
def test_shm_round_trip_equals_tcp_bit_for_bit(daemon, tensors, pad):
    # ``pad`` (a uint8 tensor) pushes some requests over the shm threshold, others not.
    args = {f"x{i}": t for i, t in enumerate(tensors)}
    args["pad"] = torch.zeros(pad, dtype=torch.uint8)
    with DaemonClient(*daemon.address, token=daemon.token, timeout=30) as via_shm, \
            DaemonClient(*daemon.address, token=daemon.token, timeout=30, shm=False) as via_tcp:
        a = via_shm.call("echo", {**args, "back": True})["back"]
        b = via_tcp.call("echo", {**args, "back": True})["back"]
        if protocol.tensors_nbytes(args) >= shm.DEFAULT_MIN_BYTES:
            assert via_shm._pool[0].segment is not None  # this one really went through shm
        assert via_tcp._pool[0].segment is None
    for k, t in args.items():
        for got in (a[k], b[k]):
            assert got.dtype == t.dtype and got.shape == t.shape
            assert _bits(got) == _bits(t), k


def test_results_stay_valid_after_the_next_call_and_shm_is_used(daemon):
    with DaemonClient(*daemon.address, token=daemon.token, timeout=30) as c:
        first = c.call("echo", {"latent": torch.ones(1, 4, 64, 64), "reply_shape": [1, 512, 512, 3]})
        conn = c._pool[0]
        assert conn.segment is not None and daemon.service.shm.count() == 1
        frames = []
        orig = conn.channel.read_frame

        def spy(*a, **kw):
            frames.append(orig(*a, **kw))
            return frames[-1]

        conn.channel.read_frame = spy
        ones = torch.full((1, 4, 64, 64), 7.0)
        second = c.call("echo", {"a": ones, "back": True})["back"]
        # The answer's tensor came through the segment, not the body.
        assert [d.get("shm") for d in frames[-1].header["tensors"]] == [conn.segment.name]
        assert torch.equal(second["a"], ones)
        assert torch.count_nonzero(first["reply"]) == 0 and first["reply"].shape == (1, 512, 512, 3)
        del conn
    assert _wait_until(lambda: daemon.service.shm.count() == 0)


def test_big_result_owns_its_region_and_survives_later_calls(daemon):
    with DaemonClient(*daemon.address, token=daemon.token, timeout=30) as c:
        args = {"latent": torch.ones(1, 4, 64, 64), "reply_shape": [1, 1024, 1024, 3]}
        first = c.call("echo", args)["reply"]
        conn = c._pool[0]
        lent_from = conn.segment
        assert lent_from.in_use()  # 12.6 MB of a 16 MB segment: handed over, not copied
        first.fill_(3.0)  # the caller may write its result; the daemon's next answer must not
        view = first[0, :10]
        for _ in range(3):
            again = c.call("echo", args)["reply"]
            assert torch.count_nonzero(again) == 0
            del again
        assert conn.segment is not lent_from  # a new segment: the old one is still owned
        assert bool((view == 3.0).all()) and bool((first == 3.0).all())
        del first
        assert lent_from.in_use()  # ``view`` still holds it
        del view
        assert not lent_from.in_use()
        assert daemon.service.shm.count() == 1
        kept = c.call("echo", args)["reply"]
    # The client (and its connection and segment) closed; the result still owns its pages.
    assert _wait_until(lambda: daemon.service.shm.count() == 0)
    assert not _ours() & {lent_from.name, conn.segment and conn.segment.name}
    kept.fill_(2.0)
    assert float(kept.sum()) == 2.0 * kept.numel()


def test_segment_grows_when_the_daemon_asks(daemon):
    with DaemonClient(*daemon.address, token=daemon.token, timeout=60) as c:
        lat = torch.zeros(1, 4, 32, 32)  # 16 KiB + 32 MiB answer: over the first segment
        r1 = c.call("echo", {"latent": lat, "pad": torch.zeros(70_000, dtype=torch.uint8), "reply_shape": [1, 2048, 2048, 3]})
        conn = c._pool[0]
        first_size = conn.segment.size
        assert conn.wanted >= 2048 * 2048 * 3 * 4 > first_size  # came over TCP, with shm_wanted
        r2 = c.call("echo", {"latent": lat, "pad": torch.zeros(70_000, dtype=torch.uint8), "reply_shape": [1, 2048, 2048, 3]})
        assert conn.segment.size >= 2048 * 2048 * 3 * 4  # re-registered, bigger
        assert daemon.service.shm.count() == 1  # the old one was released by the daemon
        assert torch.equal(r1["reply"], r2["reply"])


def test_three_concurrent_clients_have_their_own_segments(daemon):
    errors: list[BaseException] = []
    names: list[str] = []

    def worker(seed: int) -> None:
        try:
            with DaemonClient(*daemon.address, token=daemon.token, timeout=60) as c:
                g = torch.Generator().manual_seed(seed)
                for _ in range(15):
                    x = torch.randn(1, 4, 96, 96, generator=g)
                    got = c.call("echo", {"x": x, "back": True})["back"]["x"]
                    assert torch.equal(got, x)
                names.append(c._pool[0].segment.name)
        except BaseException as exc:  # noqa: BLE001 -- reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(set(names)) == 3
    assert _wait_until(lambda: not (_ours() & set(names)))


# ----------------------------------------------------------------------------- hostile registrations
@pytest.mark.parametrize("name", ["../etc/passwd", "luna_" + "A" * 24, "luna_" + "0" * 23, "luna_" + "0" * 25, "psm_1234", 17, None, ["luna_"]])
def test_bad_segment_names_are_bad_args(daemon, name):
    raw = _Raw(daemon.address, daemon.token)
    _, ok, (code, message) = raw.call("shm_register", {"name": name, "size": 1 << 20})
    assert not ok and code == "bad_args" and "luna_" in message
    assert raw.call("ping", token=False)[1]  # the connection stays usable
    raw.close()


def test_registration_checks(daemon, seg, tmp_path):
    raw = _Raw(daemon.address, daemon.token)
    # wrong size claimed, sizes out of range
    for size in (seg.size + 64, seg.size - 64, 100, 0, -64, 2**63, "1", 1.5):
        _, ok, (code, _) = raw.call("shm_register", {"name": seg.name, "size": size})
        assert not ok and code == "bad_args", size
    # no token: unauthorized (the op needs it like every model op)
    _, ok, (code, _) = raw.call("shm_register", {"name": seg.name, "size": seg.size}, token=False)
    assert not ok and code == "unauthorized"
    # unlinked segment
    gone = shm.ClientSegment(1 << 16)
    name = gone.name
    gone.destroy()
    _, ok, (code, message) = raw.call("shm_register", {"name": name, "size": 1 << 16})
    assert not ok and code == "bad_args" and "does not exist" in message
    # not a shm object: a FIFO, a symlink, a sparse (not allocated) file named like one
    fifo, link, sparse = (shm.new_name() for _ in range(3))
    os.mkfifo(f"/dev/shm/{fifo}")
    os.symlink(f"/dev/shm/{seg.name}", f"/dev/shm/{link}")
    with open(f"/dev/shm/{sparse}", "wb") as f:
        f.truncate(1 << 20)
    try:
        for bad, why in ((fifo, "not a shared-memory object"), (link, "not a shared-memory object"), (sparse, "not fully allocated")):
            t0 = time.monotonic()
            _, ok, (code, message) = raw.call("shm_register", {"name": bad, "size": 1 << 20})
            assert not ok and code == "bad_args" and why in message, (bad, message)
            assert time.monotonic() - t0 < 5  # a FIFO never blocks the daemon
    finally:
        for n in (fifo, link, sparse):
            os.unlink(f"/dev/shm/{n}")
    assert _register(raw, seg)["size"] == seg.size
    raw.close()
    _assert_serving(daemon)


def test_segment_of_another_connection(daemon, seg):
    a, b = _Raw(daemon.address, daemon.token), _Raw(daemon.address, daemon.token)
    _register(a, seg)
    # b cannot register a's segment...
    _, ok, (code, message) = b.call("shm_register", {"name": seg.name, "size": seg.size})
    assert not ok and code == "bad_args" and "another connection" in message
    # ...nor name it in a descriptor or as its answer's segment
    header, tensors = protocol.pack_request(2, "echo", {"x": torch.ones(100_000), "back": True}, daemon.token)
    b.send(header, tensors, protocol.ShmTarget(seg.name, seg.buf))
    _, ok, (code, message) = b.answer()
    assert not ok and code == "bad_frame" and "not registered on this connection" in message
    assert b.closed()
    c = _Raw(daemon.address, daemon.token)
    header, _ = protocol.pack_request(3, "ping", None, daemon.token)
    c.send({**header, "shm_reply": seg.name})
    _, ok, (code, _) = c.answer()
    assert not ok and code == "bad_frame"
    # a still works with its own segment
    header, tensors = protocol.pack_request(4, "echo", {"x": torch.arange(100_000.0), "back": True}, daemon.token)
    a.send({**header, "shm_reply": seg.name}, tensors, protocol.ShmTarget(seg.name, seg.buf))
    _, ok, result = a.answer(segments={seg.name: seg.buf})
    assert ok and torch.equal(result["back"]["x"], torch.arange(100_000.0))
    for r in (a, b, c):
        r.close()
    _assert_serving(daemon)


def _descriptor_frame(raw: _Raw, seg: shm.ClientSegment, token: bool = True, **override) -> None:
    d = {"name": "x", "dtype": "float32", "shape": [16], "offset": 0, "nbytes": 64, "shm": seg.name, **override}
    header = {"id": 5, "op": "echo", "args": {"x": {"$tensor": "x"}, "back": True}, "tensors": [d]}
    if token:
        header["token"] = raw.token
    raw.send(header)


@pytest.mark.parametrize("override,why", [
    ({"offset": 1 << 20}, "outside shm segment"),
    ({"offset": 1 << 20, "shape": [0], "nbytes": 0}, None),  # empty tensor: no byte is read, allowed
    ({"offset": 2**63}, "outside shm segment"),
    ({"offset": 32}, "aligned"),
    ({"nbytes": 128}, "!= nbytes"),
    ({"shm": "luna_" + "f" * 24}, "not registered"),
    ({"shm": 7}, "not registered"),
    ({"shm": ["x"]}, "not registered"),
    ({"shape": [1 << 20], "nbytes": 4 << 20}, "outside shm segment"),
])
def test_malformed_shm_descriptors(daemon, seg, override, why):
    raw = _Raw(daemon.address, daemon.token)
    _register(raw, seg)
    _descriptor_frame(raw, seg, **override)
    rid, ok, payload = raw.answer()
    if why is None:
        assert ok and payload["back"]["x"].shape == (0,)
    else:
        assert not ok and payload[0] == "bad_frame" and why in payload[1], payload
        assert rid in (5, None) and raw.closed()
    raw.close()
    _assert_serving(daemon)
    assert _wait_until(lambda: daemon.service.shm.count() == 0)  # released with its connection


def test_shm_descriptor_needs_the_token(daemon, seg):
    raw = _Raw(daemon.address, daemon.token)
    _register(raw, seg)  # an authenticated connection...
    _descriptor_frame(raw, seg, token=False)  # ...but this request carries no token
    _, ok, (code, _) = raw.answer()
    assert not ok and code == "unauthorized" and raw.closed()
    raw.close()
    _assert_serving(daemon)


# ----------------------------------------------------------------------------- lifecycle
_KILLED_CLIENT = """
import sys, time, torch
from luna_daemon import protocol
from luna_daemon.client import DaemonClient
c = DaemonClient("127.0.0.1", int(sys.argv[1]), token=sys.argv[2], timeout=60)
c.call("echo", {"x": torch.ones(1, 4, 128, 128)})
conn = c._pool[0]
sys.stdout.write(conn.segment.name + "\\n"); sys.stdout.flush()
# Mid-call: the request is sent (its answer goes into the segment), the answer never read.
header, tensors = protocol.pack_request(9, "echo", {"latent": torch.ones(1, 4, 128, 128), "reply_shape": [1, 1024, 1024, 3]}, c.token)
conn.channel.send(c._encode_shm(conn, header, tensors, protocol.tensors_nbytes(tensors), 60), 60)
sys.stdout.write("sent\\n"); sys.stdout.flush()
time.sleep(60)
"""


def test_sigkilled_client_leaves_no_segment_and_the_daemon_serving():
    from luna_daemon import bench

    with bench.daemon_process([]) as (port, token, proc):
        # Its own session: the SIGKILL takes its resource_tracker down with it, so the
        # daemon's own cleanup is what is tested.
        p = subprocess.Popen([sys.executable, "-c", _KILLED_CLIENT, str(port), token], stdout=subprocess.PIPE,
                             text=True, start_new_session=True)
        try:
            name = p.stdout.readline().strip()
            assert shm.NAME_RE.fullmatch(name) and name in _ours()
            assert p.stdout.readline().strip() == "sent"
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        assert _wait_until(lambda: name not in _ours(), 15), "segment of the killed client left in /dev/shm"
        with DaemonClient("127.0.0.1", port, token=token, timeout=30) as c:
            x = torch.randn(1, 4, 128, 128)
            assert torch.equal(c.call("echo", {"x": x, "back": True})["back"]["x"], x)
        assert proc.poll() is None


def test_shm_off_means_tcp(make_settings):
    d = Daemon(make_settings(shm=False))
    d.start()
    try:
        with DaemonClient(*d.address, token=d.token, timeout=30) as c:
            assert c.hello()["shm"] is False
            x = torch.randn(1, 4, 128, 128)
            assert torch.equal(c.call("echo", {"x": x, "back": True})["back"]["x"], x)
            assert c._pool[0].segment is None and c._shm is False  # refused once, then TCP only
            assert torch.equal(c.call("echo", {"x": x, "back": True})["back"]["x"], x)
            assert d.service.shm.count() == 0
        raw = _Raw(d.address, d.token)
        s = shm.ClientSegment(1 << 16)
        try:
            _, ok, (code, message) = raw.call("shm_register", {"name": s.name, "size": s.size})
            assert not ok and code == "bad_args" and "shm" in message
        finally:
            s.destroy()
            raw.close()
    finally:
        d.stop(10)


def test_client_option_off_and_settings_off(daemon, make_settings):
    with DaemonClient(*daemon.address, token=daemon.token, shm=False) as c:
        c.call("echo", {"x": torch.ones(1 << 18)})
        assert c._pool[0].segment is None
    with DaemonClient.from_settings(make_settings(shm=False), token=daemon.token) as c:
        assert c._shm is False
    assert DaemonClient("10.1.2.3", 1, token="t")._shm is False  # not this host: never


def test_hello_offers_shm(client):
    h = client.hello()
    assert h["shm"] is True and h["shm_min_segment"] == shm.MIN_SEGMENT and h["shm_max_segment"] > 0


def test_daemon_attach_does_not_track_the_segment(daemon, seg):
    """The daemon must never make its resource_tracker own a client's segment (Python
    <= 3.12 registers every segment a process merely opens, and unlinks it at exit)."""
    script = f"""
import sys
from luna_daemon import shm
t = shm.SegmentTable(1 << 30)
a = t.attach("{seg.name}", {seg.size})
a.buf[:4] = b"ping"
# No t.release(a): the process exits holding it, as a daemon killed mid-connection would.
"""
    r = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "leaked" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert seg.name in _ours() and bytes(seg.buf[:4]) == b"ping"  # still there: the client owns it
