"""Issue 15 items 2-3: the lean paths of the transport keep every guarantee.

Real loopback TCP sockets and threads. What is checked here is behaviour (bounds,
timeouts, bytes, typed errors), never speed: the benchmark (``luna-daemon bench``)
measures that.
"""

from __future__ import annotations

import socket
import threading
import time

import orjson
import pytest
import torch
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from luna_daemon import protocol, transport
from luna_daemon.protocol import Kind, Limits, LunaError

MiB = 1024 * 1024


@pytest.fixture
def pair():
    """(a, b): two ends of a real loopback TCP connection."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    b = socket.create_connection(ls.getsockname())
    a, _ = ls.accept()
    ls.close()
    yield a, b
    a.close()
    b.close()


# ----------------------------------------------------------------------------- decoding
def _reference(header_bytes: bytes):
    """What decode_frame must give: the header always walked (no skipping)."""
    try:
        header = orjson.loads(header_bytes)
        if type(header) is not dict:
            raise LunaError("bad_frame", "not an object")
        return ("ok", protocol.unpack_value(header, {}, 0))
    except LunaError as exc:
        return ("err", exc.code)
    except ValueError:
        return ("err", "bad_frame")


def _decoded(header_bytes: bytes):
    pre = protocol.Prefix(1, 1, 0, len(header_bytes), 0)
    try:
        return ("ok", protocol.decode_frame(pre, bytearray(header_bytes), bytearray()).header)
    except LunaError as exc:
        return ("err", exc.code)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.sampled_from(["", "$tensor", "$tuple", "x", "\\", "$"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["$tensor", "$tuple", "a", "b"]), inner, max_size=2),
    max_leaves=12,
)


@hsettings(max_examples=300, deadline=None)
@given(_json, st.booleans())
def test_the_marker_walk_is_skipped_only_where_it_cannot_matter(args, escape):
    """decode_frame skips the $tensor / $tuple walk for short headers without "$" or a
    backslash; whatever the header, the outcome equals a decode that always walks
    (markers spelled with \\u0024 escapes included)."""
    raw = orjson.dumps({"id": 1, "op": "x", "args": args})
    if escape:
        raw = raw.replace(b"$", b"\\u0024")
    assert _decoded(raw) == _reference(raw)


@pytest.mark.parametrize("depth", [60, 63, 64, 65, 66, 70])
def test_nesting_limit_holds_around_the_short_header_bound(depth):
    """Headers of nested lists near MAX_JSON_DEPTH and near the 2 * MAX_JSON_DEPTH bytes
    below which the bracket count is not taken: the limit is the same either way."""
    for body in (b"[" * depth + b"]" * depth, b"{\"a\":" * depth + b"1" + b"}" * depth):
        raw = b'{"id":1,"op":"x","args":{"n":' + body + b"}}"
        assert _decoded(raw) == _reference(raw), (depth, len(raw))
    bare = b"[" * depth + b"]" * depth  # a non-object header: bad_frame either way
    assert _decoded(bare) == ("err", "bad_frame")


# ----------------------------------------------------------------------------- sending
def test_a_big_send_to_a_peer_that_stops_reading_times_out(pair):
    """The blocking scatter-gather send is bounded by its timeout (kernel SO_SNDTIMEO):
    a peer that never reads gets socket.timeout, not a thread stuck forever."""
    a, _b = pair
    ch = transport.Channel(a)
    big = torch.zeros(64 * MiB, dtype=torch.uint8)
    t0 = time.monotonic()
    with pytest.raises(socket.timeout):
        ch.send([b"header", memoryview(big.numpy())], 0.5)
    assert time.monotonic() - t0 < 10


def test_scatter_gather_send_delivers_every_buffer_in_order(pair):
    """Header + several tensor views (with padding) arrive byte for byte, also when the
    reader is slower than the writer (the send blocks and resumes in the kernel)."""
    a, b = pair
    ch = transport.Channel(a)
    tensors = {"x": torch.arange(3 * MiB, dtype=torch.int32), "y": torch.randn(1000), "z": torch.empty(0)}
    buffers = protocol.encode_frame(Kind.REQUEST, {"id": 1, "op": "x", "args": {}}, tensors)
    expected = b"".join(bytes(v) for v in buffers)
    got = bytearray()

    def read() -> None:
        while len(got) < len(expected):
            chunk = b.recv(256 * 1024)
            if not chunk:
                return
            got.extend(chunk)
            time.sleep(0.001)

    reader = threading.Thread(target=read)
    reader.start()
    ch.send(buffers, 30)
    reader.join(30)
    assert bytes(got) == expected


def test_small_answers_after_a_bulk_send_stay_non_blocking(pair):
    """The send timeout a bulk send leaves on the socket never applies to small frames:
    they go out with MSG_DONTWAIT and, when the socket buffer is full, fall back to the
    bounded send (socket.timeout), so a small answer cannot block past its timeout."""
    a, b = pair
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    ch = transport.Channel(a)
    # Fill the peer's buffers with small frames until one cannot leave at once.
    t0 = time.monotonic()
    with pytest.raises(socket.timeout):
        for _ in range(1_000_000):
            ch.send([bytes(1000)], 0.3)
    assert time.monotonic() - t0 < 30


# ----------------------------------------------------------------------------- receiving
def _frame_parts(body_len: int) -> tuple[bytes, bytes]:
    body = bytes(range(256)) * (body_len // 256)
    header = orjson.dumps({"id": 1, "op": "x", "args": {"t": {"$tensor": "t"}},
                           "tensors": [{"name": "t", "dtype": "uint8", "shape": [len(body)], "offset": 0, "nbytes": len(body)}]})
    return protocol.PREFIX.pack(b"LUNA", 1, 1, 0, len(header), len(body)) + header, body


def test_a_big_body_arriving_in_pieces_is_received_whole(pair):
    """One MSG_WAITALL receive into the final buffer returns early on a kernel timeout or
    a signal; the loop around it still assembles every byte, in order."""
    a, b = pair
    head, body = _frame_parts(3 * MiB)

    def dribble() -> None:
        b.sendall(head)
        for i in range(0, len(body), 64 * 1024):
            b.sendall(body[i:i + 64 * 1024])
            time.sleep(0.002)

    sender = threading.Thread(target=dribble)
    sender.start()
    frame = transport.Channel(a).read_frame(Limits(), idle_timeout=10, frame_timeout=30)
    sender.join(30)
    assert bytes(frame.header["args"]["t"].numpy()) == body


def test_a_big_body_that_stalls_is_a_frame_timeout(pair):
    """A peer that stops mid-body (slow loris on a big frame): the waiting receive is cut
    at frame_timeout by the kernel, and read_frame raises FrameTimeout."""
    a, b = pair
    head, body = _frame_parts(8 * MiB)
    b.sendall(head + body[:MiB])
    t0 = time.monotonic()
    with pytest.raises(transport.FrameTimeout):
        transport.Channel(a).read_frame(Limits(), idle_timeout=10, frame_timeout=1.0)
    assert 0.5 < time.monotonic() - t0 < 10


def test_a_big_body_cut_off_is_a_connection_error(pair):
    a, b = pair
    head, body = _frame_parts(4 * MiB)
    b.sendall(head + body[:MiB])
    b.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionError):
        transport.Channel(a).read_frame(Limits(), idle_timeout=10, frame_timeout=10)


needs_lowat = pytest.mark.skipif(not transport._LOWAT, reason="the raised SO_RCVLOWAT is used on Linux only")


def _lowat(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)


@needs_lowat
@pytest.mark.parametrize("tail", [1, 100 * 1024, transport._LOWAT or 1, (transport._LOWAT or 1) + 1])
def test_a_big_body_whose_last_bytes_come_late_is_received_at_once(pair, tail):
    """The raised wake-up threshold never covers bytes that are not on their way: all but
    the last ``tail`` bytes are sent, then nothing for 2 s, then the rest. Whatever
    ``tail`` is (below, at, above the threshold), the receive finishes as the last bytes
    arrive, not at frame_timeout (a receive waiting for a full threshold would hang)."""
    a, b = pair
    head, body = _frame_parts(6 * MiB)
    ch = transport.Channel(a)

    def late() -> None:
        b.sendall(head + body[:-tail])
        time.sleep(2.0)
        b.sendall(body[-tail:])

    sender = threading.Thread(target=late)
    sender.start()
    t0 = time.monotonic()
    frame = ch.read_frame(Limits(), idle_timeout=10, frame_timeout=20)
    took = time.monotonic() - t0
    sender.join(30)
    assert bytes(frame.header["args"]["t"].numpy()) == body
    assert 1.5 < took < 10  # the late bytes were waited for, and no longer than that
    assert _lowat(a) == 1


@needs_lowat
def test_a_big_frame_is_decoded_while_its_last_bytes_are_on_their_way(pair, monkeypatch):
    """The frame is decoded (descriptors checked, views made) before the body's last MiB
    has arrived, and its tensors still hold every byte once read_frame returns."""
    a, b = pair
    head, body = _frame_parts(6 * MiB)
    events: list[str] = []
    real = protocol.decode_frame

    def spy(*args, **kwargs):
        events.append("decoded")
        return real(*args, **kwargs)

    monkeypatch.setattr(protocol, "decode_frame", spy)

    def late() -> None:
        b.sendall(head + body[:-100 * 1024])
        time.sleep(1.0)
        events.append("tail sent")
        b.sendall(body[-100 * 1024:])

    sender = threading.Thread(target=late)
    sender.start()
    frame = transport.Channel(a).read_frame(Limits(), idle_timeout=10, frame_timeout=20)
    sender.join(30)
    assert events == ["decoded", "tail sent"]
    assert bytes(frame.header["args"]["t"].numpy()) == body


@needs_lowat
def test_the_wake_up_threshold_is_back_at_one_after_every_big_body(pair):
    """Between frames SO_RCVLOWAT is 1: a small frame after a big one (a ping) must wake
    the reader at once, also when the big one failed midway."""
    a, b = pair
    ch = transport.Channel(a)
    head, body = _frame_parts(4 * MiB)
    sender = threading.Thread(target=b.sendall, args=(head + body,))  # more than the socket buffers hold
    sender.start()
    ch.read_frame(Limits(), idle_timeout=10, frame_timeout=20)
    sender.join(30)
    assert _lowat(a) == 1
    ping = protocol.encode_bytes(Kind.REQUEST, {"id": 2, "op": "ping"})
    threading.Timer(0.3, b.sendall, (ping,)).start()
    t0 = time.monotonic()
    assert ch.read_frame(Limits(), idle_timeout=10, frame_timeout=10).header["op"] == "ping"
    assert time.monotonic() - t0 < 3
    # A big body that stalls: FrameTimeout, and the threshold is reset on the way out.
    sender = threading.Thread(target=b.sendall, args=(head + body[:2 * MiB],))
    sender.start()
    with pytest.raises(transport.FrameTimeout):
        ch.read_frame(Limits(), idle_timeout=10, frame_timeout=1.0)
    sender.join(30)
    assert _lowat(a) == 1


def test_an_invalid_frame_with_a_body_is_refused_after_its_body(pair):
    """An invalid frame with a body (a descriptor that does not match its nbytes) is
    refused only once its whole body is in: the stream stays in step, so the server can
    answer the error and the client reads it (a reset would lose the answer)."""
    a, b = pair
    ch = transport.Channel(a)
    body = bytes(3 * MiB)
    header = orjson.dumps({"id": 1, "op": "x", "tensors": [
        {"name": "t", "dtype": "float32", "shape": [7], "offset": 0, "nbytes": len(body)}]})  # shape != nbytes
    ping = protocol.encode_bytes(Kind.REQUEST, {"id": 2, "op": "ping"})
    sender = threading.Thread(target=b.sendall, args=(protocol.PREFIX.pack(b"LUNA", 1, 1, 0, len(header), len(body)) + header + body + ping,))
    sender.start()
    with pytest.raises(LunaError) as err:
        ch.read_frame(Limits(), idle_timeout=10, frame_timeout=20)
    assert err.value.code == "bad_frame"
    sender.join(30)
    assert ch.read_frame(Limits(), idle_timeout=10, frame_timeout=10).header == {"id": 2, "op": "ping"}


# ----------------------------------------------------------------------------- peer_gone
def test_peer_gone_with_a_live_peer_buffered_data_and_a_close(pair):
    a, b = pair
    ch = transport.Channel(a)
    assert ch.peer_gone() is False  # live and idle (poll(0) says nothing to read)
    b.sendall(b"x")
    time.sleep(0.1)
    assert ch.peer_gone() is False  # data waiting: the peer is there
    a.recv(1)
    b.close()
    deadline = time.monotonic() + 5
    while not ch.peer_gone():
        assert time.monotonic() < deadline, "the peer's close was never seen"
        time.sleep(0.01)
    ch.close()
    assert ch.peer_gone() is True  # our own socket closed: gone, not an exception


def test_peer_gone_on_a_channel_closed_before_its_first_check(pair):
    a, _b = pair
    ch = transport.Channel(a)
    ch.close()
    assert ch.peer_gone() is True


def test_frame_and_request_keep_their_field_names():
    """Frame and Request are NamedTuples now (built without a Python __init__); callers
    use them by field name."""
    raw = b"".join(bytes(v) for v in protocol.request(7, "ping", None, "tok")[0])
    frame = protocol.decode_bytes(raw)
    assert frame.kind == 1 and frame.header["op"] == "ping" and frame.tensors == {}
    req = protocol.parse_request(frame)
    assert (req.id, req.op, req.args, req.token) == (7, "ping", {}, "tok")


# ----------------------------------------------------------------------------- body reuse
def test_reused_body_buffers_never_overwrite_a_result_still_held(pair):
    """The client's channel receives a big body into the previous one's buffer only when
    no tensor, slice or numpy array aliases it any more: every result a caller holds
    keeps its bytes through later receives (issue 15: "valid after the next call")."""
    a, b = pair
    ch = transport.Channel(a, reuse_bodies=True)

    def receive(value: float):
        t = torch.full((1 << 20,), value, dtype=torch.float32)
        data = b"".join(bytes(x) for x in protocol.encode_frame(
            Kind.RESPONSE, {"id": 1, "ok": True, "result": {"$tensor": "t"}}, {"t": t}))
        sender = threading.Thread(target=b.sendall, args=(data,))
        sender.start()
        out = ch.read_frame(Limits(), idle_timeout=10, frame_timeout=10).header["result"]
        sender.join(10)
        return out

    r1 = receive(1.0)
    r2 = receive(2.0)
    assert r1.data_ptr() != r2.data_ptr()
    del r1
    r3 = receive(3.0)  # r2 held: a new buffer
    piece, arr, p3 = r3[5:10], r3.numpy()[:4], r3.data_ptr()
    del r3
    r4 = receive(4.0)  # only a slice and a numpy view of r3 are held: still not reused
    assert r4.data_ptr() != p3
    p4 = r4.data_ptr()
    del r4
    r5 = receive(5.0)  # nothing aliases r4's buffer: reused
    assert r5.data_ptr() == p4
    assert torch.all(r2 == 2.0) and torch.all(piece == 3.0) and (arr == 3.0).all() and torch.all(r5 == 5.0)


def test_without_reuse_every_body_gets_a_fresh_buffer(pair):
    a, b = pair
    ch = transport.Channel(a)  # the server's channels: request bodies may be kept (uploads)
    head, body = _frame_parts(MiB)
    ptrs = []
    for _ in range(2):
        b.sendall(head + body)
        t = ch.read_frame(Limits(), idle_timeout=10, frame_timeout=10).header["args"]["t"]
        ptrs.append(t.data_ptr())
        del t
    assert ch._rx is None
