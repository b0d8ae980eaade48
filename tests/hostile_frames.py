"""Hypothesis strategies for hostile Luna frames (shared by test_protocol and test_hardening_wire).

Headers are written with the stdlib json module on purpose: unlike orjson it writes ints
beyond 64 bits and escapes non-ASCII as \\uXXXX, both of which a hostile peer may send.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

from luna_daemon import protocol

# Replaced by the real token when a frame is sent to a daemon (strategies cannot know it).
REAL_TOKEN = "\x00real-token\x00"

huge_ints = st.one_of(st.integers(-2**70, 2**70), st.sampled_from([2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -1, -2**63]))
json_scalars = st.one_of(st.none(), st.booleans(), huge_ints, st.floats(allow_nan=False, allow_infinity=False),
                         st.text(max_size=12), st.text(min_size=300, max_size=400))
json_any = st.recursive(json_scalars, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=8), c, max_size=4)),
                        max_leaves=12)


@st.composite
def deep(draw) -> Any:
    """Nesting of lists, dicts and $tuple markers, sometimes past MAX_JSON_DEPTH (and orjson's 1024)."""
    depth = draw(st.sampled_from([0, 10, protocol.MAX_JSON_DEPTH - 2, protocol.MAX_JSON_DEPTH + 1, 200, 600]))
    kinds = draw(st.lists(st.sampled_from(["list", "dict", "tuple"]), min_size=1, max_size=3))
    value: Any = draw(json_scalars)
    for i in range(depth):
        kind = kinds[i % len(kinds)]
        value = [value] if kind == "list" else {"k": value} if kind == "dict" else {"$tuple": [value]}
    return value


dims = st.one_of(st.integers(0, 8), huge_ints, st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                 st.none(), st.text(max_size=3))


@st.composite
def descriptor(draw) -> Any:
    """A tensor descriptor: mostly plausible, each field sometimes any JSON at all."""
    d: dict[str, Any] = {
        "name": draw(st.one_of(st.sampled_from(["t", "a0", "r0"]), st.text(max_size=200), json_any)),
        "dtype": draw(st.one_of(st.sampled_from(sorted(protocol.DTYPE_ITEMSIZE)), st.sampled_from(["float64", "object", ""]), json_any)),
        "shape": draw(st.one_of(st.lists(dims, max_size=10), st.lists(st.integers(0, 4), max_size=3), json_any)),
        "offset": draw(st.one_of(st.sampled_from([0, 64, 128]), huge_ints, json_any)),
        "nbytes": draw(st.one_of(st.integers(0, 256), huge_ints, json_any)),
    }
    if draw(st.booleans()):
        for k in draw(st.lists(st.sampled_from(sorted(d)), max_size=2, unique=True)):
            del d[k]
    return d


ids = st.one_of(st.integers(0, 2**40), huge_ints, st.text(max_size=12), st.text(min_size=257, max_size=300), json_any,
                st.builds(lambda n: {"$tensor": n}, st.sampled_from(["t", "a0", "missing"])),
                st.builds(lambda v: {"$tuple": v}, st.lists(json_scalars, max_size=3)))
ops = st.one_of(st.sampled_from(["ping", "hello", "status", "ps", "vae_decode", "clip_encode", "lora_has", "lora_put"]),
                st.text(max_size=12).filter(lambda s: s not in ("shutdown", "echo", "unload")), st.text(min_size=1000, max_size=1200),
                json_any)
args = st.one_of(st.dictionaries(st.text(max_size=6), st.one_of(json_any, deep(), st.builds(lambda n: {"$tensor": n}, st.sampled_from(["t", "a0", "x"])))),
                 json_any, deep())


@st.composite
def hostile_header(draw) -> dict:
    """A request header: fields of any JSON type, descriptors of any shape, or random JSON."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.dictionaries(st.text(max_size=8), json_any, max_size=6))
    h: dict[str, Any] = {"id": draw(ids), "op": draw(ops), "args": draw(args)}
    token = draw(st.sampled_from([None, "wrong", REAL_TOKEN, 5]))
    if token is not None:
        h["token"] = token
    tensors = draw(st.one_of(st.none(), st.lists(descriptor(), max_size=4), json_any))
    if tensors is not None:
        h["tensors"] = tensors
    for k in draw(st.lists(st.sampled_from(["id", "op", "args"]), max_size=1)):
        h.pop(k, None)
    return h


@st.composite
def hostile_frame(draw) -> tuple[dict, bytes]:
    """(header, body): the body is a few hundred bytes at most; lengths in the prefix are exact."""
    return draw(hostile_header()), draw(st.binary(max_size=320))


def encode(header: dict, body: bytes = b"", *, token: str | None = None, body_len: int | None = None) -> bytes:
    """The raw frame bytes (stdlib json: big ints and \\u escapes pass through)."""
    if token is not None and header.get("token") == REAL_TOKEN:
        header = {**header, "token": token}
    hb = json.dumps(header, allow_nan=False).encode()
    return protocol.PREFIX.pack(b"LUNA", 1, 1, 0, len(hb), len(body) if body_len is None else body_len) + hb + body
