"""Protocol unit tests: round trips (property-based) and rejection of bad frames."""

from __future__ import annotations

import json
import pathlib
import re
import struct

import pytest
import torch
from hypothesis import given, settings as hsettings, strategies as st

from hostile_frames import encode as _hostile_bytes, hostile_frame
from luna_daemon import protocol
from luna_daemon.protocol import ALIGN, DTYPES, Kind, Limits, ProtocolError

PKG = pathlib.Path(__file__).resolve().parents[1] / "luna_daemon"


def _frame(header: dict, body: bytes = b"", *, magic=b"LUNA", version=1, kind=1, flags=0, header_len=None, body_len=None) -> bytes:
    hb = json.dumps(header).encode()
    return protocol.PREFIX.pack(magic, version, kind, flags, len(hb) if header_len is None else header_len,
                                len(body) if body_len is None else body_len) + hb + body


def _code(data: bytes, limits: Limits = Limits()) -> str:
    with pytest.raises(ProtocolError) as ei:
        protocol.decode_bytes(data, limits)
    return ei.value.code


# ----------------------------------------------------------------------------- round trips
tensor_dtypes = st.sampled_from(list(DTYPES.values()))
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4)


@st.composite
def tensors(draw):
    dtype = draw(tensor_dtypes)
    shape = draw(shapes)
    n = 1
    for s in shape:
        n *= s
    raw = draw(st.binary(min_size=n * torch.empty((), dtype=dtype).element_size(), max_size=n * torch.empty((), dtype=dtype).element_size()))
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)
    if dtype == torch.bool:
        t = t.view(torch.uint8) % 2 == 1
    return t.clone()


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**53, 2**53), st.text(max_size=20),
                         st.floats(allow_nan=False, allow_infinity=False))
json_values = st.recursive(json_scalars, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=8), c, max_size=4)), max_leaves=20)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        # Compare raw bytes: NaN payloads must survive the trip bit for bit too.
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and bytes(a.contiguous().reshape(-1).view(torch.uint8).numpy()) == bytes(b.contiguous().reshape(-1).view(torch.uint8).numpy()))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@hsettings(max_examples=150, deadline=None)
@given(ts=st.lists(tensors(), max_size=5), extra=json_values, req_id=st.one_of(st.integers(0, 2**40), st.text(max_size=10)))
def test_request_round_trip(ts, extra, req_id):
    args = {"extra": extra, "tensors": ts, "pair": (1, 2.5, "x")}
    buffers, _ = protocol.request(req_id, "op_x", args, token="tok")
    frame = protocol.decode_bytes(b"".join(bytes(b) for b in buffers))
    req = protocol.parse_request(frame)
    assert req.id == req_id and req.op == "op_x" and req.token == "tok"
    assert _same(req.args, args)
    for desc in frame.header.get("tensors", []):
        assert desc["offset"] % ALIGN == 0
    # The transport receives big bodies into a uint8 tensor instead of a bytearray: same result.
    data = b"".join(bytes(b) for b in buffers)
    prefix = protocol.parse_prefix(data, Limits())
    start = protocol.PREFIX_SIZE + prefix.header_len
    body = torch.frombuffer(bytearray(data[start:]), dtype=torch.uint8) if prefix.body_len else bytearray()
    via_tensor = protocol.parse_request(protocol.decode_frame(prefix, data[protocol.PREFIX_SIZE:start], body))
    assert _same(via_tensor.args, args)
    assert ("tensors" in frame.header) == bool(ts)  # control frames carry no empty list


@hsettings(max_examples=60, deadline=None)
@given(ts=st.lists(tensors(), min_size=1, max_size=3))
def test_response_round_trip(ts):
    result = {"out": ts, "nested": {"k": ts[0]}, "n": None}
    frame = protocol.decode_bytes(b"".join(bytes(b) for b in protocol.ok_response(7, result)))
    rid, ok, got = protocol.parse_response(frame)
    assert rid == 7 and ok and _same(got, result)


def test_decode_is_zero_copy():
    t = torch.arange(1024, dtype=torch.float32).reshape(4, 256)
    data = bytearray(protocol.encode_bytes(Kind.REQUEST, {"id": 1, "op": "x", "args": {}}, {"t": t}))
    prefix = protocol.parse_prefix(memoryview(data)[:protocol.PREFIX_SIZE], Limits())
    hs = protocol.PREFIX_SIZE
    body = bytearray(data[hs + prefix.header_len:])
    frame = protocol.decode_frame(prefix, data[hs:hs + prefix.header_len], body)
    got = frame.tensors["t"]
    assert torch.equal(got, t)
    # The tensor aliases the body buffer: writing the buffer changes the tensor.
    off = frame.header["tensors"][0]["offset"]
    body[off:off + 4] = struct.pack("<f", 42.0)
    assert got[0, 0].item() == 42.0


def test_error_response_zero_id_kept():
    frame = protocol.decode_bytes(b"".join(bytes(b) for b in protocol.error_response(0, "busy", "")))
    rid, ok, (code, msg) = protocol.parse_response(frame)
    assert rid == 0 and not ok and code == "busy" and msg == "busy"  # never an empty message


# ----------------------------------------------------------------------------- rejections
def test_truncated_frames_rejected():
    good = protocol.encode_bytes(Kind.REQUEST, {"id": 1, "op": "x", "args": {}}, {"t": torch.ones(10)})
    for cut in (0, 5, protocol.PREFIX_SIZE - 1, protocol.PREFIX_SIZE + 3, len(good) - 1):
        assert _code(good[:cut]) == "bad_frame"
    assert _code(good + b"\x00") == "bad_frame"


def test_wrong_magic_version_kind_flags():
    h = {"id": 1, "op": "x"}
    assert _code(_frame(h, magic=b"PKL\x80")) == "bad_frame"
    assert _code(_frame(h, version=2)) == "unsupported_version"
    assert _code(_frame(h, kind=9)) == "bad_frame"
    assert _code(_frame(h, flags=1)) == "bad_frame"


def test_oversized_header_and_body_rejected_before_allocation():
    limits = Limits(max_header_bytes=4096, max_body_bytes=1 << 20)
    # Only the 20-byte prefix exists: the claims must be refused from the prefix alone.
    huge_body = protocol.PREFIX.pack(b"LUNA", 1, 1, 0, 10, 1 << 40)
    with pytest.raises(ProtocolError) as ei:
        protocol.parse_prefix(huge_body, limits)
    assert ei.value.code == "too_large" and "max_body_bytes" in ei.value.message
    huge_header = protocol.PREFIX.pack(b"LUNA", 1, 1, 0, 1 << 31, 0)
    with pytest.raises(ProtocolError) as ei:
        protocol.parse_prefix(huge_header, limits)
    assert ei.value.code == "too_large"
    # The hard 1 MiB header cap holds even when settings ask for more.
    assert Limits(max_header_bytes=1 << 30).max_header_bytes == 1 << 20


def _tensor_frame(desc: list, body: bytes) -> bytes:
    return _frame({"id": 1, "op": "x", "args": {}, "tensors": desc}, body)


def test_bad_dtype_rejected():
    assert _code(_tensor_frame([{"name": "t", "dtype": "object", "shape": [1], "offset": 0, "nbytes": 8}], bytes(8))) == "bad_frame"
    assert _code(_tensor_frame([{"name": "t", "dtype": "float64", "shape": [1], "offset": 0, "nbytes": 8}], bytes(8))) == "bad_frame"


def test_shape_nbytes_mismatch_rejected():
    assert _code(_tensor_frame([{"name": "t", "dtype": "float32", "shape": [3], "offset": 0, "nbytes": 8}], bytes(16))) == "bad_frame"
    # A shape whose product would overflow a C int64 is still just "wrong nbytes".
    assert _code(_tensor_frame([{"name": "t", "dtype": "float32", "shape": [2**62, 2**62], "offset": 0, "nbytes": 16}], bytes(16))) == "bad_frame"
    assert _code(_tensor_frame([{"name": "t", "dtype": "float32", "shape": [-1], "offset": 0, "nbytes": 4}], bytes(64))) == "bad_frame"


def test_out_of_bounds_and_misaligned_offsets_rejected():
    assert _code(_tensor_frame([{"name": "t", "dtype": "float32", "shape": [4], "offset": 64, "nbytes": 16}], bytes(70))) == "bad_frame"
    assert _code(_tensor_frame([{"name": "t", "dtype": "float32", "shape": [1], "offset": 4, "nbytes": 4}], bytes(64))) == "bad_frame"


def test_overlapping_tensors_rejected():
    desc = [{"name": "a", "dtype": "float32", "shape": [32], "offset": 0, "nbytes": 128},
            {"name": "b", "dtype": "float32", "shape": [16], "offset": 64, "nbytes": 64}]
    with pytest.raises(ProtocolError) as ei:
        protocol.decode_bytes(_tensor_frame(desc, bytes(128)))
    assert ei.value.code == "bad_frame" and "overlap" in ei.value.message


def test_bad_json_and_references():
    data = protocol.PREFIX.pack(b"LUNA", 1, 1, 0, 5, 0) + b"{nope"
    assert _code(data) == "bad_frame"
    assert _code(_frame([1, 2])) == "bad_frame"  # type: ignore[arg-type]
    deep = {"id": 1, "op": "x", "args": {}}
    cur = deep["args"]
    for _ in range(100):
        cur["n"] = {}
        cur = cur["n"]
    assert _code(_frame(deep)) == "bad_frame"
    # References are resolved while decoding: a missing tensor is a bad frame.
    assert _code(_frame({"id": 1, "op": "x", "args": {"t": {"$tensor": "missing"}}})) == "bad_frame"
    # Deep nesting is refused whether or not the header holds markers (one walk does both).
    marked = {"id": 1, "op": "x", "args": {"t": {"$tuple": [1]}}}
    cur = marked["args"]
    for _ in range(100):
        cur["n"] = [{}]
        cur = cur["n"][0]
    assert _code(_frame(marked)) == "bad_frame"
    # A shallow header with many brackets is fine.
    wide = {"id": 1, "op": "x", "args": {"l": [[i] for i in range(200)], "t": [{"$tuple": [i, 1.0]} for i in range(100)]}}
    args = protocol.parse_request(protocol.decode_bytes(_frame(wide))).args
    assert args["l"][5] == [5] and args["t"][7] == (7, 1.0)


def test_escaped_marker_still_resolves():
    # The decoder skips the $tensor/$tuple walk for headers whose bytes cannot spell a
    # marker. A JSON encoder may write "$" as \\u0024: such a header must still resolve.
    t = torch.arange(16, dtype=torch.float32)
    buffers = protocol.encode_frame(Kind.REQUEST, {"id": 1, "op": "x", "args": {"t": {"$tensor": "t"}, "p": {"$tuple": [1, 2]}}}, {"t": t})
    raw = b"".join(bytes(b) for b in buffers)
    hlen = protocol.parse_prefix(raw, Limits()).header_len
    header = raw[protocol.PREFIX_SIZE:protocol.PREFIX_SIZE + hlen].replace(b'"$', b'"\\u0024')
    assert b"$" not in header
    data = protocol.PREFIX.pack(b"LUNA", 1, 1, 0, len(header), len(raw) - protocol.PREFIX_SIZE - hlen) + header + raw[protocol.PREFIX_SIZE + hlen:]
    req = protocol.parse_request(protocol.decode_bytes(data))
    assert torch.equal(req.args["t"], t) and req.args["p"] == (1, 2)


def test_header_is_strict_json():
    # NaN / Infinity are not JSON (RFC 8259); lone surrogates are not UTF-8.
    for bad in (b'{"id":1,"op":"x","args":{"v":NaN}}', b'{"id":1,"op":"x","args":{"v":Infinity}}',
                b'{"id":1,"op":"\xed\xa0\x80"}', b'\xef\xbb\xbf{"id":1,"op":"x"}'):
        assert _code(protocol.PREFIX.pack(b"LUNA", 1, 1, 0, len(bad), 0) + bad) == "bad_frame", bad
    # numpy scalars and float subclasses travel as plain numbers.
    import numpy as np

    frame = protocol.decode_bytes(b"".join(bytes(b) for b in protocol.request(1, "x", {"f": np.float64(1.5), "i": np.int64(3), "h": np.float16(0.5)})[0]))
    args = protocol.parse_request(frame).args
    assert args == {"f": 1.5, "i": 3, "h": 0.5} and type(args["i"]) is int
    # A value JSON cannot hold is refused when encoding, with a typed error.
    for value in (2 ** 70, object()):
        with pytest.raises(ProtocolError) as ei:
            protocol.request(1, "x", {"v": value})
        assert ei.value.code == "bad_args"


def test_request_header_validation():
    for header in ({"op": "x"}, {"id": 1.5, "op": "x"}, {"id": 1, "op": ""}, {"id": 1, "op": "x", "args": []}, {"id": 1, "op": "x", "token": 5}):
        frame = protocol.decode_bytes(_frame(header))
        with pytest.raises(ProtocolError) as ei:
            protocol.parse_request(frame)
        assert ei.value.code == "bad_frame"


@hsettings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_never_crashes_untyped(data):
    try:
        protocol.decode_bytes(b"LUNA\x01\x01\x00\x00" + data)
    except ProtocolError:
        pass


def test_no_pickle_or_torch_load_in_package():
    offenders = []
    pattern = re.compile(r"^\s*(import\s+(c?pickle|dill|marshal)|from\s+(c?pickle|dill)\s+import)|pickle\.loads?\(|torch\.load\(|(?<![\w.])(eval|exec)\(", re.M)
    for path in PKG.rglob("*.py"):
        for m in pattern.finditer(path.read_text(encoding="utf-8")):
            line = path.read_text(encoding="utf-8")[m.start():].splitlines()[0]
            if "torch.load(" in line and "weights_only=True" in line:
                continue
            offenders.append(f"{path.relative_to(PKG)}: {line.strip()}")
    assert not offenders, offenders


# ----------------------------------------------------------------------------- hostile input


def _decoded_or_typed(data: bytes):
    """decode + parse_request, as the server runs them: only LunaError may come out, its
    message stays short, and an answer to the frame can always be encoded."""
    try:
        frame = protocol.decode_bytes(data)
    except ProtocolError as exc:
        assert len(exc.message) < 1000, exc.message[:200]
        protocol.error_response(None, exc.code, exc.message)
        return None
    try:
        req = protocol.parse_request(frame)
    except ProtocolError as exc:
        assert exc.code == "bad_frame" and len(exc.message) < 1000
        rid = protocol.echo_id(frame.header.get("id"))
        assert rid is None or rid == frame.header.get("id")
        protocol.decode_bytes(b"".join(bytes(b) for b in protocol.error_response(rid, exc.code, exc.message)))
        return None
    # A request that parsed: its id can be echoed in an answer.
    protocol.decode_bytes(b"".join(bytes(b) for b in protocol.error_response(req.id, "unknown_op", "x")))
    return req


@hsettings(max_examples=400, deadline=None)
@given(hostile_frame())
def test_hostile_headers_raise_only_typed_errors(frame):
    header, body = frame
    _decoded_or_typed(_hostile_bytes(header, body))


@pytest.mark.parametrize("desc", [
    {"name": "t", "dtype": ["float32"], "shape": [1], "offset": 0, "nbytes": 4},   # unhashable dtype
    {"name": "t", "dtype": {"a": 1}, "shape": [1], "offset": 0, "nbytes": 4},
    {"name": "t", "dtype": "float32", "shape": [2**62, 2**62, 0], "offset": 0, "nbytes": 0},  # torch.empty overflows
    {"name": "t", "dtype": "float32", "shape": [0, 2**64 - 1], "offset": 0, "nbytes": 0},
    {"name": "t", "dtype": "uint8", "shape": [True, 4], "offset": 0, "nbytes": 4},
    {"name": "t", "dtype": "uint8", "shape": [4.0], "offset": 0, "nbytes": 4},
    {"name": "t", "dtype": "uint8", "shape": [4], "offset": 0.0, "nbytes": 4},
    {"name": ["t"], "dtype": "uint8", "shape": [4], "offset": 0, "nbytes": 4},
])
def test_hostile_descriptor_is_bad_frame(desc):
    assert _code(_tensor_frame([desc], bytes(64))) == "bad_frame"


def test_empty_tensor_with_large_dims_still_decodes():
    # Zero-sized tensors with big (but representable) dims are legal and decode.
    frame = protocol.decode_bytes(_tensor_frame([{"name": "t", "dtype": "float32", "shape": [0, 2**40], "offset": 0, "nbytes": 0}], b""))
    assert frame.tensors["t"].shape == (0, 2**40)


def test_tensor_reference_as_id_is_bad_frame_answered_with_null():
    t = torch.arange(4, dtype=torch.float32)
    data = protocol.encode_bytes(Kind.REQUEST, {"id": {"$tensor": "t"}, "op": "status", "args": {}}, {"t": t})
    frame = protocol.decode_bytes(data)
    with pytest.raises(ProtocolError) as ei:
        protocol.parse_request(frame)
    assert ei.value.code == "bad_frame"
    assert protocol.echo_id(frame.header["id"]) is None
    for bad in ([1], {"a": 1}, 1.5, True, 2**64, "x" * (protocol.MAX_ID_CHARS + 1), (1,)):
        assert protocol.echo_id(bad) is None
    for good in (0, -2**63, 2**64 - 1, "", "x" * protocol.MAX_ID_CHARS):
        assert protocol.echo_id(good) == good


def test_peer_values_in_messages_are_cut():
    long = "x" * 100_000
    assert len(protocol.shown(long)) < 100 and "100000 chars" in protocol.shown(long)
    assert protocol.shown([[[1]]] * 10_000) == "<list>"
    with pytest.raises(ProtocolError) as ei:
        protocol.decode_bytes(_tensor_frame([{"name": "t", "dtype": long, "shape": [1], "offset": 0, "nbytes": 4}], bytes(64)))
    assert len(ei.value.message) < 300
    with pytest.raises(ProtocolError) as ei:
        protocol.decode_bytes(_frame({"id": 1, "op": "x", "args": {"t": {"$tensor": long}}}))
    assert len(ei.value.message) < 300
    # An answer always fits: a huge message is cut, not refused with too_large.
    answer = protocol.decode_bytes(b"".join(bytes(b) for b in protocol.error_response(1, "model_error", "y" * (2 << 20))))
    assert len(protocol.parse_response(answer)[2][1]) <= protocol.MAX_MESSAGE_CHARS + 3


def test_parse_response_of_hostile_error_field():
    for err in ([1], "boom", {"code": ["x"]}, {"code": {"a": 1}, "message": 5}):
        frame = protocol.decode_bytes(protocol.encode_bytes(Kind.RESPONSE, {"id": 1, "ok": False, "error": err}))
        _, ok, (code, message) = protocol.parse_response(frame)
        assert not ok and code == "internal" and message


def test_protocol_imports_without_torch():
    # The CLI's control calls must not pay for importing torch (issue 12).
    import subprocess
    import sys

    code = ("import sys; from luna_daemon import protocol; "
            "f = protocol.decode_bytes(b''.join(bytes(b) for b in protocol.request(3, 'ping', {'a': (1, [2])})[0])); "
            "r = protocol.parse_request(f); assert r.args == {'a': (1, [2])}; "
            "protocol.ok_response(3, {'pong': True}); "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert protocol.DTYPES['bool'] is __import__('torch').bool")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


# ----------------------------------------------------------------------------- shared memory (issue 15)
def _shm_frame(tensors: dict, seg: bytearray, header: dict | None = None) -> tuple:
    target = protocol.ShmTarget("luna_" + "a" * 24, memoryview(seg))
    data = b"".join(bytes(b) for b in protocol.encode_frame(Kind.RESPONSE, header or {"id": 1, "ok": True, "result": {}}, tensors, target))
    pre = protocol.parse_prefix(data, Limits())
    return pre, data[protocol.PREFIX_SIZE:protocol.PREFIX_SIZE + pre.header_len], target.name


def test_shm_encode_decode_copies_out_and_checks_the_segment():
    seg = bytearray(1 << 16)
    t = {"a": torch.arange(10, dtype=torch.int64), "b": torch.ones(3, 3).t(), "c": torch.empty(0, 2)}
    pre, hb, name = _shm_frame(t, seg)
    assert pre.body_len == 0  # every byte went into the segment
    descs = json.loads(hb)["tensors"]
    assert [d.get("shm") for d in descs] == [name, name, None]  # an empty tensor needs no bytes
    got = protocol.decode_frame(pre, hb, bytearray(), segments={name: memoryview(seg)}).tensors
    for k, v in t.items():
        assert torch.equal(got[k], v)
    seg[:80] = bytes(80)  # copied out: rewriting the segment does not change the tensors
    assert torch.equal(got["a"], t["a"])
    with pytest.raises(ProtocolError, match="not registered"):
        protocol.decode_frame(pre, hb, bytearray())  # no segments on this connection
    with pytest.raises(ProtocolError, match="outside shm segment"):
        protocol.decode_frame(pre, hb, bytearray(), segments={name: memoryview(seg)[:64]})  # a smaller segment


def test_shm_segment_too_small_falls_back_to_the_body_with_shm_wanted():
    seg = bytearray(128)
    pre, hb, _ = _shm_frame({"a": torch.ones(100)}, seg)
    h = json.loads(hb)
    assert pre.body_len == 400 and h["shm_wanted"] == 448 and "shm" not in h["tensors"][0]


def test_shm_overlap_is_per_storage_and_resolver_sees_the_header():
    seg = memoryview(bytearray(256))
    name = "luna_" + "b" * 24
    both = [{"name": "x", "dtype": "uint8", "shape": [64], "offset": 0, "nbytes": 64},
            {"name": "y", "dtype": "uint8", "shape": [64], "offset": 0, "nbytes": 64, "shm": name}]
    seen = []

    def resolve(header):
        seen.append(header.get("token"))
        return {name: seg}

    header = {"id": 1, "ok": True, "token": "t", "tensors": both}
    hb = json.dumps(header).encode()
    pre = protocol.Prefix(1, 2, 0, len(hb), 64)
    out = protocol.decode_frame(pre, hb, bytearray(64), segments=resolve).tensors  # same offsets, different storages
    assert set(out) == {"x", "y"} and seen == ["t"]
    overlapping = [dict(both[1], name="z"), both[1]]
    hb = json.dumps({"id": 1, "ok": True, "tensors": overlapping}).encode()
    with pytest.raises(ProtocolError, match="overlap"):
        protocol.decode_frame(protocol.Prefix(1, 2, 0, len(hb), 0), hb, bytearray(), segments={name: seg})


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int64", "int32", "uint8", "bool"])
@pytest.mark.parametrize("case", ["plain", "scalar", "empty", "strided", "grad", "offset"])
def test_tensor_bytes_are_the_tensors_bytes_on_every_path(dtype, case):
    """The numpy fast path and the general one give the same bytes, in memory order, for
    every wire dtype (bfloat16 has no numpy type), empty / 0-d / non-contiguous tensors,
    autograd tensors and views at a storage offset."""
    import torch

    from luna_daemon.protocol import _tensor_bytes

    dt = getattr(torch, dtype)
    base = (torch.arange(24) % 7).to(dt).reshape(2, 3, 4)
    t = {"plain": base, "scalar": base[0, 0, 0], "empty": base[:, :0], "strided": base.transpose(0, 2),
         "grad": base.float().requires_grad_() if dt.is_floating_point else base, "offset": base[1]}[case]
    expected = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    got = _tensor_bytes(t)
    assert got.format == "B" and bytes(got) == expected and got.nbytes == t.numel() * t.element_size()
