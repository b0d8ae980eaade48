"""Luna wire protocol v1 -- pure framing, no sockets (sans-I/O).

A frame is::

    offset size  field
    0      4     magic  b"LUNA"
    4      1     version (1)
    5      1     kind    (1 = request, 2 = response)
    6      2     flags   (reserved, must be 0)
    8      4     header_len  (u32, big-endian)
    12     8     body_len    (u64, big-endian)
    20     H     header: UTF-8 JSON object
    20+H   B     body: raw tensor bytes, each tensor starting at a 64-byte aligned offset

The I/O layers read the fixed 20-byte prefix, call :func:`parse_prefix` (which checks
every length against the limits *before* anything is allocated), then read exactly
``header_len`` and ``body_len`` bytes and call :func:`decode_frame`. The body is a
``bytearray`` (tensors are ``torch.frombuffer`` views of it) or, for big bodies, a uint8
``torch.empty`` tensor received in place (tensors are views of it; unlike a bytearray it is
not zero-filled first). Either way decoding is zero-copy, after validating dtype
(allowlist), shape x itemsize == nbytes, alignment, bounds and non-overlap. Nothing here
unpickles or evaluates anything.

Tensors inside ``args`` / ``result`` are referenced as ``{"$tensor": "<name>"}``; tuples
(ComfyUI token chunks are lists of tuples) as ``{"$tuple": [...]}``. See docs/protocol.md.

torch is imported lazily, the first time a frame carries tensors or a tensor is packed:
the CLI's tensor-less calls (ping, status, ps, stop...) never import it. Every value a
peer sent that ends up in an error message is shown cut short (:func:`shown`).
"""

from __future__ import annotations

import enum
import math
import struct
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

if TYPE_CHECKING:
    import torch

MAGIC = b"LUNA"
VERSION = 1
PREFIX = struct.Struct(">4sBBHIQ")
PREFIX_SIZE = PREFIX.size  # 20
ALIGN = 64
HARD_MAX_HEADER = 1024 * 1024
MAX_TENSORS = 256
MAX_NDIM = 8
MAX_JSON_DEPTH = 64
MAX_ID_CHARS = 256  # a string request id longer than this is bad_frame (it is echoed in every answer)
MAX_MESSAGE_CHARS = 4096  # error messages are cut to this: an answer must always fit its header
_SHOWN_CHARS = 64  # how much of a peer's string an error message or log line repeats
# torch computes a zero-sized tensor's storage size over *all* dims in 64 bits, so
# [2**62, 2**62, 0] overflows inside torch.empty although it holds no byte.
_MAX_EXTENT = 2**62


class Kind(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2


class ErrorCode(str, enum.Enum):
    """Every error a daemon can answer with. Values are the strings on the wire."""

    BAD_FRAME = "bad_frame"                  # framing / JSON / tensor descriptor invalid
    UNSUPPORTED_VERSION = "unsupported_version"
    TOO_LARGE = "too_large"                  # header or body over the configured limit
    UNKNOWN_OP = "unknown_op"
    WRONG_INSTANCE = "wrong_instance"        # op of a role (vae / clip) this instance's service does not serve
    BAD_ARGS = "bad_args"
    UNAUTHORIZED = "unauthorized"            # missing / wrong token
    NOT_FOUND = "not_found"                  # model id / file / LoRA unknown
    FORBIDDEN_PATH = "forbidden_path"        # path outside model_roots
    BUSY = "busy"                            # queue or connection limit reached
    STOPPING = "stopping"                    # daemon is shutting down
    TIMEOUT = "timeout"
    OOM = "oom"
    MODEL_ERROR = "model_error"
    INTERNAL = "internal"


# Errors after which the stream position is unknown or the peer is hostile: the
# connection is closed after the error frame is sent.
FATAL_CODES = frozenset({ErrorCode.BAD_FRAME, ErrorCode.UNSUPPORTED_VERSION, ErrorCode.TOO_LARGE})


class LunaError(Exception):
    """A typed failure with a protocol error code -- the one error type of the project.

    ``code`` is an :class:`ErrorCode` value (a string such as ``"not_found"``);
    ``message`` is meant for the user. Raised by the protocol, the service and the
    engines; the server turns it into an error response, the client re-raises it.
    """

    def __init__(self, code: ErrorCode | str, message: str):
        code = ErrorCode(code)
        super().__init__(f"{code.value}: {message}")
        self.code = code.value
        self.message = message


ProtocolError = LunaError  # name used where the failure is about framing


# The dtype allowlist by wire name, with item sizes: descriptors are validated without torch.
DTYPE_ITEMSIZE: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "uint8": 1, "bool": 1}
_dtype_maps_cache: tuple[dict, dict] | None = None


def _dtype_maps() -> tuple[dict[str, torch.dtype], dict[torch.dtype, str]]:
    """(wire name -> torch dtype, torch dtype -> wire name); imports torch on first use."""
    global _dtype_maps_cache
    if _dtype_maps_cache is None:
        import torch

        by_name = {name: getattr(torch, name) for name in DTYPE_ITEMSIZE}
        _dtype_maps_cache = (by_name, {v: k for k, v in by_name.items()})
    return _dtype_maps_cache


def __getattr__(name: str) -> Any:
    # ``protocol.DTYPES`` / ``DTYPE_NAMES`` (PEP 562): built, and torch imported, on first use.
    if name == "DTYPES":
        return _dtype_maps()[0]
    if name == "DTYPE_NAMES":
        return _dtype_maps()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def shown(value: Any, limit: int = _SHOWN_CHARS) -> str:
    """A peer-sent value for an error message or a log line, never longer than about
    ``limit`` characters: strings are cut, containers are named by type only (their repr
    could be a megabyte, or too deep for repr)."""
    if isinstance(value, str):
        return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value)} chars)"
    if value is None or isinstance(value, (bool, float)) or (isinstance(value, int) and value.bit_length() <= 64):
        return repr(value)
    return f"<{type(value).__name__}>"


def echo_id(value: Any) -> int | str | None:
    """The id to put in an answer to a request whose header had ``id`` = ``value``: the
    value itself when it is a valid request id (an int that JSON can carry, or a string
    of at most ``MAX_ID_CHARS``), else None -- an id that cannot be echoed is answered
    with ``null``."""
    if type(value) is int:
        return value if -2**63 <= value < 2**64 else None
    if type(value) is str and len(value) <= MAX_ID_CHARS:
        return value
    return None


@dataclass(frozen=True)
class Limits:
    """Per-connection limits; the server takes them from Settings."""

    max_header_bytes: int = HARD_MAX_HEADER
    max_body_bytes: int = 2 * 1024**3

    def __post_init__(self) -> None:
        if self.max_header_bytes > HARD_MAX_HEADER:
            object.__setattr__(self, "max_header_bytes", HARD_MAX_HEADER)


class Prefix(NamedTuple):
    # A NamedTuple, not a dataclass: built once per frame on the latency-critical path.
    version: int
    kind: int  # a Kind value
    flags: int
    header_len: int
    body_len: int


_new_tuple = tuple.__new__
_pack_prefix = PREFIX.pack


class Frame(NamedTuple):
    """A decoded frame. ``tensors`` alias the received body buffer (zero copy); in
    ``header`` every ``$tensor`` / ``$tuple`` marker is already resolved. (A NamedTuple
    built with ``tuple.__new__``: a dataclass's ``__init__`` is Python code, and every
    frame builds one.)"""

    kind: int  # a Kind value
    header: dict[str, Any]
    tensors: dict[str, torch.Tensor]


# --------------------------------------------------------------------------- decoding
def parse_prefix(data: bytes | bytearray | memoryview, limits: Limits, offset: int = 0) -> Prefix:
    """Validate the fixed 20-byte prefix at ``data[offset:]`` (bytes after it are ignored).

    Raises ProtocolError before anything is allocated from the lengths it carries."""
    if len(data) - offset < PREFIX_SIZE:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"prefix must be {PREFIX_SIZE} bytes, got {max(len(data) - offset, 0)}")
    magic, version, kind, flags, header_len, body_len = PREFIX.unpack_from(data, offset)
    # One combined test for the valid case (every frame pays it); the detailed checks
    # below only run to name what is wrong.
    if (magic == MAGIC and version == VERSION and (kind == 1 or kind == 2) and not flags
            and 2 <= header_len <= limits.max_header_bytes and body_len <= limits.max_body_bytes):
        # tuple.__new__: a NamedTuple's own __new__ is a Python function (~0.2 us a frame).
        return _new_tuple(Prefix, (version, kind, flags, header_len, body_len))
    if magic != MAGIC:
        raise ProtocolError(ErrorCode.BAD_FRAME, "bad magic (not a Luna frame)")
    if version != VERSION:
        raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION, f"protocol version {version} not supported (this daemon speaks {VERSION})")
    if kind != 1 and kind != 2:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"unknown frame kind {kind}")
    if flags != 0:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"unknown flags 0x{flags:04x}")
    if header_len < 2:
        raise ProtocolError(ErrorCode.BAD_FRAME, "header too short")
    if header_len > limits.max_header_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"header of {header_len} bytes exceeds the limit of {limits.max_header_bytes}")
    raise ProtocolError(ErrorCode.TOO_LARGE, f"body of {body_len} bytes exceeds max_body_bytes={limits.max_body_bytes}")


def decode_header(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    # orjson: strict RFC 8259 JSON in UTF-8 (no NaN/Infinity, no lone surrogates, no
    # BOM), about 8x faster than the json module on the small headers of control ops.
    try:
        header = orjson.loads(data)
    except (ValueError, RecursionError) as exc:  # orjson.JSONDecodeError is a ValueError
        raise ProtocolError(ErrorCode.BAD_FRAME, f"header is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(ErrorCode.BAD_FRAME, "header must be a JSON object")
    return header


# Resolves the shared-memory segments a frame may name: a mapping of segment name -> a
# memoryview of the whole segment, or a callable that gets the frame's header (the server
# checks the request's token there) and returns that mapping.
Segments = Any


def _descriptor(d: Any, body_len: int, segments: Any = None) -> tuple[str, str, tuple[int, ...], int, int, Any]:
    """Validate one descriptor -> (name, dtype name, shape, offset, nbytes, (segment
    name, segment) or None); ``segments``: a mapping (or None). Raises only bad_frame,
    whatever JSON ``d`` is (messages show peer values cut short)."""
    if type(d) is not dict:
        raise ProtocolError(ErrorCode.BAD_FRAME, "tensor descriptor must be an object")
    seg = None
    limit, where = body_len, "the body"
    seg_name = d.get("shm")
    if seg_name is not None:
        # A tensor in a shared-memory segment: the segment must be one registered on this
        # connection (by name, exactly), and the bytes inside it -- checked below against
        # that segment's size, like body offsets against body_len.
        seg = segments.get(seg_name) if (segments and type(seg_name) is str and not callable(segments)) else None
        if seg is None:
            raise ProtocolError(ErrorCode.BAD_FRAME, f"shm segment {shown(seg_name)} is not registered on this connection "
                                "(register it with shm_register first)")
        limit, where = len(seg), f"shm segment {seg_name}"
    name, dtype_name, shape, offset, nbytes = (d.get(k) for k in ("name", "dtype", "shape", "offset", "nbytes"))
    if type(name) is not str or not name or len(name) > 128:
        raise ProtocolError(ErrorCode.BAD_FRAME, "tensor name must be a non-empty string (<= 128 chars)")
    # type() first: a list or object dtype is not hashable, and the lookup would raise TypeError.
    itemsize = DTYPE_ITEMSIZE.get(dtype_name) if type(dtype_name) is str else None
    if itemsize is None:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"tensor {name!r}: dtype {shown(dtype_name)} not allowed (allowed: {', '.join(DTYPE_ITEMSIZE)})")
    if type(shape) is not list or len(shape) > MAX_NDIM or not all(type(s) is int and s >= 0 for s in shape):
        raise ProtocolError(ErrorCode.BAD_FRAME, f"tensor {name!r}: shape must be a list of <= {MAX_NDIM} non-negative ints")
    if type(offset) is not int or type(nbytes) is not int or offset < 0 or nbytes < 0:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"tensor {name!r}: offset/nbytes must be non-negative ints")
    # Python ints do not overflow: a hostile shape cannot wrap this product around.
    expected = math.prod(shape) * itemsize
    if expected != nbytes:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"tensor {name!r}: shape {shape} x {itemsize} B = {expected} != nbytes {nbytes}")
    if not expected and math.prod(s for s in shape if s) * itemsize > _MAX_EXTENT:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"tensor {name!r}: empty tensor of shape {shape} is too large to describe")
    if offset % ALIGN:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"tensor {name!r}: offset {offset} not {ALIGN}-byte aligned")
    if offset + nbytes > limit:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"tensor {name!r}: bytes {offset}..{offset + nbytes} outside {where} ({limit} B)")
    return name, dtype_name, tuple(shape), offset, nbytes, (seg_name, seg) if seg is not None else None


def decode_tensors(descriptors: Any, body: bytearray | torch.Tensor, segments: Segments = None,
                   header: Any = None) -> dict[str, torch.Tensor]:
    """Validate descriptors against ``body`` and return tensors that alias it.

    ``body`` is a ``bytearray`` or a 1-D uint8 tensor (the transport receives big bodies
    into ``torch.empty``: unlike a bytearray it is not zero-filled first, which on a
    12 MB image costs as much again as receiving it).

    A descriptor with ``"shm": <segment name>`` refers to bytes of that segment (see
    :data:`Segments`; ``header`` is passed to a callable). Such tensors are *copied out*
    into private memory (the daemon's case: the segment's owner can rewrite it at any
    time, and a daemon must not hash or validate bytes that change afterwards), unless
    the segment object offers ``lend(offset, nbytes)`` (a client's own segment): then a
    big tensor owns its region, and the client does not reuse the segment while it lives
    (either way a client's result stays valid after its next call)."""
    if not descriptors:
        if descriptors is None or descriptors == []:
            return {}
    if not isinstance(descriptors, list):
        raise ProtocolError(ErrorCode.BAD_FRAME, "'tensors' must be a list")
    if len(descriptors) > MAX_TENSORS:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"more than {MAX_TENSORS} tensors")
    if callable(segments) and any(type(d) is dict and d.get("shm") is not None for d in descriptors):
        segments = segments(header)  # once per frame (the server checks the token there)
    parsed = [_descriptor(d, len(body), segments) for d in descriptors]
    names = [p[0] for p in parsed]
    if len(set(names)) != len(names):
        raise ProtocolError(ErrorCode.BAD_FRAME, "duplicate tensor names")
    # Non-overlap within each storage (the body, each segment).
    spans = sorted((p[5][0] if p[5] else "", p[3], p[3] + p[4], p[0]) for p in parsed if p[4] > 0)
    for (where_a, _, end_a, name_a), (where_b, start_b, _, name_b) in zip(spans, spans[1:]):
        if where_a == where_b and start_b < end_a:
            raise ProtocolError(ErrorCode.BAD_FRAME, f"tensors {name_a!r} and {name_b!r} overlap")
    import torch  # the first frame with tensors imports it (a no-op afterwards)

    by_name = _dtype_maps()[0]
    out: dict[str, torch.Tensor] = {}
    for name, dtype_name, shape, offset, nbytes, seg in parsed:
        dtype = by_name[dtype_name]
        if nbytes == 0:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        if seg is not None:
            lend = getattr(seg[1], "lend", None)  # a client's own segment (shm.ClientSegment)
            region = lend(offset, nbytes) if lend is not None else None
            if region is not None:
                # The tensor owns this region of the segment now (a numpy array the
                # segment watches, which keeps the mapping mapped while it lives).
                flat = torch.from_numpy(region)
            else:
                flat = torch.empty(nbytes, dtype=torch.uint8)
                memoryview(flat.numpy())[:] = seg[1][offset:offset + nbytes]  # one memcpy (see shm.py)
            flat = flat.view(dtype)
        elif isinstance(body, torch.Tensor):
            # A view of the received tensor (offsets are 64-byte aligned, so any dtype fits).
            flat = body[offset:offset + nbytes].view(dtype)
        else:
            # frombuffer shares memory with ``body`` (a writable bytearray, so no warning
            # and no copy); the tensor keeps the buffer alive.
            flat = torch.frombuffer(body, dtype=dtype, count=nbytes // DTYPE_ITEMSIZE[dtype_name], offset=offset)
        out[name] = flat.view(shape)
    return out


def decode_frame(prefix: Prefix, header_bytes: bytes | bytearray, body: bytearray | torch.Tensor,
                 header: dict[str, Any] | None = None, segments: Segments = None) -> Frame:
    """Decode a complete frame whose prefix was already validated. ``header``: the result
    of ``decode_header(header_bytes)`` when the caller already has it (the server looks
    at the header before it receives the body). ``segments``: the shared-memory segments
    this connection registered (see :func:`decode_tensors`); without them a descriptor
    naming a segment is bad_frame. Raises only LunaError (bad_frame, or what a
    ``segments`` callable raises)."""
    if len(header_bytes) != prefix.header_len or len(body) != prefix.body_len:
        raise ProtocolError(ErrorCode.BAD_FRAME, "frame truncated")
    if header is None:
        # decode_header, inlined (every frame pays a call): orjson, then the object test.
        try:
            header = orjson.loads(header_bytes)
        except (ValueError, RecursionError):
            header = decode_header(header_bytes)  # raises bad_frame with orjson's reason
        if type(header) is not dict:
            raise ProtocolError(ErrorCode.BAD_FRAME, "header must be a JSON object")
    descriptors = header.get("tensors")
    tensors = decode_tensors(descriptors, body, segments, header) if descriptors is not None else {}
    # One walk resolves the markers and bounds the nesting (our walkers recurse). It is
    # skipped when neither can matter: no "$" and no "\\u" escape that could spell one
    # means no marker, and fewer brackets than MAX_JSON_DEPTH means no deep nesting:
    # the common case of small control ops such as ping. The first test is a cheaper
    # superset for short headers (``int in bytearray`` is a memchr; ``b"$" in`` costs 4x):
    # valid JSON of <= 2 * MAX_JSON_DEPTH bytes cannot open more than MAX_JSON_DEPTH brackets.
    if ((len(header_bytes) > 2 * MAX_JSON_DEPTH or 36 in header_bytes or 92 in header_bytes)  # "$", "\\"
            and (b"$" in header_bytes or b"\\u" in header_bytes
                 or header_bytes.count(b"{") + header_bytes.count(b"[") > MAX_JSON_DEPTH)):
        header = unpack_value(header, tensors, 0)
    return _new_tuple(Frame, (prefix.kind, header, tensors))


def decode_bytes(data: bytes | bytearray, limits: Limits = Limits()) -> Frame:
    """Decode one whole frame held in memory (tests, fuzzing). Extra bytes are an error."""
    if len(data) < PREFIX_SIZE:
        raise ProtocolError(ErrorCode.BAD_FRAME, "frame truncated (shorter than the prefix)")
    prefix = parse_prefix(memoryview(data)[:PREFIX_SIZE], limits)
    end_h = PREFIX_SIZE + prefix.header_len
    end_b = end_h + prefix.body_len
    if len(data) != end_b:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"frame truncated or has trailing bytes ({len(data)} != {end_b})")
    return decode_frame(prefix, bytes(data[PREFIX_SIZE:end_h]), bytearray(data[end_h:end_b]))


# --------------------------------------------------------------------------- encoding
def _json_default(obj: Any) -> Any:
    """What orjson does not take natively but the json module did: float subclasses
    (``numpy.float64`` is one). orjson calls this only for such values."""
    if isinstance(obj, float):
        return float(obj)
    raise TypeError(f"Type is not JSON serializable: {type(obj).__name__}")


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """A byte view of a CPU tensor's memory (copies only if not contiguous / not CPU)."""
    # The usual big tensor (contiguous, on the CPU, no autograd): one numpy view. It runs
    # on every tensor sent, often on caches a big copy has just flushed, where the general
    # path below (detach, reshape, view, numpy: four new tensors) took ~30 us more.
    try:
        if not t.requires_grad and t.is_contiguous() and t.device.type == "cpu":
            return memoryview(t.numpy()).cast("B")
    except (TypeError, RuntimeError):  # bfloat16 (not a numpy type), a zero in the shape, conj/neg bits
        pass
    import torch  # already imported: ``t`` is a tensor

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    # Viewing as uint8 works for every allowed dtype (bf16 and bool included, which
    # numpy alone cannot represent) and shares storage with ``t``.
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


class ShmTarget(NamedTuple):
    """Where :func:`encode_frame` may put a frame's tensors instead of the body: the
    segment ``name`` (as the peer registered it), a writable memoryview of all its bytes,
    and the least total of tensor bytes worth the trip (smaller sets go in the body)."""

    name: str
    buffer: memoryview
    min_bytes: int = 0


def tensors_nbytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes ``tensors`` take laid out 64-byte aligned (a body, or a segment)."""
    total = 0
    for t in tensors.values():
        total += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    return total


def _encode_into_segment(target: ShmTarget, tensors: dict[str, torch.Tensor], names: dict) -> list[dict]:
    """Copy ``tensors`` into the segment at aligned offsets; -> their descriptors."""
    descriptors, offset = [], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        d = {"name": name, "dtype": names[t.dtype], "shape": list(t.shape), "offset": 0, "nbytes": nbytes}
        if nbytes:
            target.buffer[offset:offset + nbytes] = _tensor_bytes(t)  # one memcpy (see shm.py)
            d["shm"], d["offset"] = target.name, offset
            offset += -(-nbytes // ALIGN) * ALIGN
        descriptors.append(d)
    return descriptors


def encode_frame(kind: Kind, header: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None,
                 shm: ShmTarget | None = None) -> list[memoryview | bytes]:
    """Encode a frame as a list of buffers for ``sendall`` / ``sendmsg`` (no big copies).

    Adds the ``tensors`` descriptor list to ``header`` (a new dict; the caller's is kept)
    when there are tensors; a frame without tensors has no ``tensors`` key.
    Raises ProtocolError(bad_args) for a tensor of a dtype outside the allowlist.

    ``shm``: the tensors are copied into that segment instead of the body when they total
    at least ``shm.min_bytes`` and fit; when they do not fit, they go in the body and the
    header carries ``shm_wanted`` (the segment size that would have held them).
    """
    if tensors:
        header, chunks, body_len = _encode_tensors(header, tensors, shm)
    else:
        # Control ops and every answer without tensors (ping, status...): the header
        # alone, without the tensor bookkeeping (measured: ~3x the cost of a ping answer).
        chunks, body_len = (), 0
    try:
        header_bytes = orjson.dumps(header, default=_json_default)  # compact UTF-8; a non-finite float is written as null
    except TypeError as exc:  # orjson.JSONEncodeError: a type JSON cannot hold, an int over 64 bits
        raise ProtocolError(ErrorCode.BAD_ARGS, f"header cannot be encoded as JSON: {exc}") from None
    if len(header_bytes) > HARD_MAX_HEADER:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"header of {len(header_bytes)} bytes exceeds {HARD_MAX_HEADER}")
    return [_pack_prefix(MAGIC, VERSION, kind, 0, len(header_bytes), body_len) + header_bytes, *chunks]


def _encode_tensors(header: dict[str, Any], tensors: dict[str, torch.Tensor],
                    shm: ShmTarget | None) -> tuple[dict[str, Any], list[memoryview | bytes], int]:
    """encode_frame's tensor part -> (header with their descriptors, body chunks, body length)."""
    descriptors = []
    chunks: list[memoryview | bytes] = []
    offset = 0
    names = _dtype_maps()[1]
    for name, t in tensors.items():
        if t.dtype not in names:
            raise ProtocolError(ErrorCode.BAD_ARGS, f"tensor {name!r}: dtype {t.dtype} cannot be sent")
    if shm is not None:
        total = tensors_nbytes(tensors)
        if total >= shm.min_bytes:
            header = dict(header)
            if total <= len(shm.buffer):
                header["tensors"] = _encode_into_segment(shm, tensors, names)
                return header, chunks, 0
            header["shm_wanted"] = total
    for name, t in tensors.items():
        pad = (-offset) % ALIGN
        if pad:
            chunks.append(bytes(pad))
            offset += pad
        data = _tensor_bytes(t)
        descriptors.append({"name": name, "dtype": names[t.dtype], "shape": list(t.shape), "offset": offset, "nbytes": data.nbytes})
        if data.nbytes:
            chunks.append(data)
        offset += data.nbytes
    header = dict(header)
    header["tensors"] = descriptors
    return header, chunks, offset


def encode_bytes(kind: Kind, header: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    return b"".join(bytes(c) for c in encode_frame(kind, header, tensors))


# --------------------------------------------------------------------------- values
_SCALARS = frozenset({type(None), bool, int, float, str})


def pack_value(value: Any, tensors: dict[str, torch.Tensor], prefix: str = "t") -> Any:
    """Turn a nested value with tensors/tuples into JSON-safe data.

    Tensors are moved into ``tensors`` under generated names and replaced by
    ``{"$tensor": name}``; tuples become ``{"$tuple": [...]}``. Dicts and lists that hold
    nothing to replace are returned as they are (no copy): most results are plain JSON.
    Never imports torch: if no one imported it, no value can be a tensor.
    """
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind is tuple:  # ComfyUI token lists hold one per token: the hottest case
        return {"$tuple": [v if type(v) in _SCALARS else pack_value(v, tensors, prefix) for v in value]}
    if kind is dict or isinstance(value, dict):
        out = value
        for k, v in value.items():
            if type(k) is not str and not isinstance(k, str):
                raise ProtocolError(ErrorCode.BAD_ARGS, f"dict keys must be strings, got {type(k).__name__}")
            if type(v) in _SCALARS:
                continue
            packed = pack_value(v, tensors, prefix)
            if packed is not v:
                if out is value:
                    out = dict(value)
                out[k] = packed
        return out
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        name = f"{prefix}{len(tensors)}"
        while name in tensors:
            name += "_"
        tensors[name] = value
        return {"$tensor": name}
    if isinstance(value, tuple):  # tuple subclasses (NamedTuple)
        return {"$tuple": [v if type(v) in _SCALARS else pack_value(v, tensors, prefix) for v in value]}
    if isinstance(value, list):
        packed_list = [v if type(v) in _SCALARS else pack_value(v, tensors, prefix) for v in value]
        return value if all(p is v for p, v in zip(packed_list, value)) else packed_list
    if isinstance(value, (bool, int, float, str)):  # subclasses: str enums, IntEnum
        return value
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return value.item()  # a numpy scalar: the Python number
    if torch is not None and isinstance(value, torch.dtype):
        return _dtype_maps()[1].get(value, str(value))
    raise ProtocolError(ErrorCode.BAD_ARGS, f"cannot send a value of type {type(value).__name__}")


def unpack_value(value: Any, tensors: dict[str, torch.Tensor], depth: int = 0) -> Any:
    """Inverse of :func:`pack_value` (``decode_frame`` runs it). An unknown tensor
    reference or nesting deeper than ``MAX_JSON_DEPTH`` is a bad_frame error."""
    if depth > MAX_JSON_DEPTH:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"header nested deeper than {MAX_JSON_DEPTH}")
    if type(value) is dict:
        if len(value) == 1:
            if "$tensor" in value:
                name = value["$tensor"]
                if not isinstance(name, str) or name not in tensors:
                    raise ProtocolError(ErrorCode.BAD_FRAME, f"reference to unknown tensor {shown(name)}")
                return tensors[name]
            items = value.get("$tuple")
            if type(items) is list:
                return tuple([v if type(v) in _SCALARS else unpack_value(v, tensors, depth + 2) for v in items])
        depth += 1
        return {k: v if type(v) in _SCALARS else unpack_value(v, tensors, depth) for k, v in value.items()}
    if type(value) is list:
        depth += 1
        return [v if type(v) in _SCALARS else unpack_value(v, tensors, depth) for v in value]
    return value


# --------------------------------------------------------------------------- messages
def pack_request(req_id: int, op: str, args: dict[str, Any] | None = None, token: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(header, tensors) of a request, for :func:`encode_frame`."""
    tensors: dict[str, torch.Tensor] = {}
    header: dict[str, Any] = {"id": req_id, "op": op, "args": pack_value(args, tensors, "a") if args else {}}
    if token is not None:
        header["token"] = token
    return header, tensors


def request(req_id: int, op: str, args: dict[str, Any] | None = None, token: str | None = None) -> tuple[list, dict[str, torch.Tensor]]:
    """Build (buffers) for a request; tensors anywhere in ``args`` travel in the body."""
    header, tensors = pack_request(req_id, op, args, token)
    return encode_frame(Kind.REQUEST, header, tensors), tensors


def ok_response(req_id: Any, result: Any, shm: ShmTarget | None = None) -> list:
    """A success answer; ``shm``: the requester's segment for its tensors (see encode_frame)."""
    tensors: dict[str, torch.Tensor] = {}
    header = {"id": req_id, "ok": True, "result": pack_value(result, tensors, "r")}
    return encode_frame(Kind.RESPONSE, header, tensors, shm)


def error_response(req_id: Any, code: ErrorCode | str, message: str) -> list:
    """An error answer; ``message`` is cut to MAX_MESSAGE_CHARS so that it always fits.
    ``req_id`` must be echoable (see :func:`echo_id`)."""
    code = ErrorCode(code).value
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "..."
    return encode_frame(Kind.RESPONSE, {"id": req_id, "ok": False, "error": {"code": code, "message": message or code}})


class Request(NamedTuple):
    # A NamedTuple built with tuple.__new__ (parse_request), like Frame.
    id: Any
    op: str
    args: dict[str, Any]
    token: str | None


def parse_request(frame: Frame) -> Request:
    """Validate a request frame's header (its tensor references are already resolved).
    Raises only LunaError (bad_frame); answer it with ``echo_id(frame.header.get("id"))``."""
    h = frame.header
    if frame.kind != 1:  # Kind.REQUEST
        raise ProtocolError(ErrorCode.BAD_FRAME, "expected a request frame")
    req_id = h.get("id")
    # 0 is a perfectly good id (an earlier tool treated it as "no id" and hung). A
    # "$tensor" or "$tuple" id is already a tensor / tuple here, and refused. The test
    # is echo_id's, inlined: every request pays it.
    kind = type(req_id)
    if not ((kind is int and -2**63 <= req_id < 2**64) or (kind is str and len(req_id) <= MAX_ID_CHARS)):
        raise ProtocolError(ErrorCode.BAD_FRAME, f"request 'id' must be a 64-bit int or a string of <= {MAX_ID_CHARS} chars")
    op = h.get("op")
    if type(op) is not str or not op:
        raise ProtocolError(ErrorCode.BAD_FRAME, "request 'op' must be a non-empty string")
    args = h.get("args", {})
    if type(args) is not dict:
        raise ProtocolError(ErrorCode.BAD_FRAME, "request 'args' must be an object")
    token = h.get("token")
    if token is not None and type(token) is not str:
        raise ProtocolError(ErrorCode.BAD_FRAME, "'token' must be a string")
    return _new_tuple(Request, (req_id, op, args, token))


def parse_response(frame: Frame) -> tuple[Any, bool, Any]:
    """-> (id, ok, result-or-(code, message))."""
    h = frame.header
    if frame.kind != 2:  # Kind.RESPONSE
        raise ProtocolError(ErrorCode.BAD_FRAME, "expected a response frame")
    if h.get("ok") is True:
        return h.get("id"), True, h.get("result")
    err = h.get("error")
    if type(err) is not dict:
        err = {}
    code = err.get("code", "internal")
    try:
        code = ErrorCode(code).value
    except (ValueError, TypeError):  # TypeError: an unhashable code (a list)
        code = ErrorCode.INTERNAL.value
    return h.get("id"), False, (code, str(err.get("message") or code))
