"""The one formatter of sizes and durations for people, used by every face.

Sizes are **binary** (KiB, MiB, GiB, TiB = powers of 1024, the units GPUs and the
settings use), with one decimal: ``fmt_bytes(4_089_446) == "3.9 MiB"``. Durations are
whole units, largest two: ``"2.5 s"`` (one decimal under 10 s), ``"45 s"``, ``"5 min"``, ``"5 min 30 s"``, ``"2 h 5 min"``,
``"3 d 4 h"``; under a second ``"250 ms"``; ``None`` or negative is ``"forever"`` (the
``keep_alive`` value -1). The dashboard's ``web/static/units.js`` implements the same
rules and ``tests/test_units.py`` runs both on the same values.

Rounding is done in integers (half up), never by ``format``/``toFixed``, so that Python
and JavaScript agree on ties such as 1.25 MiB. Pure: no I/O, no imports beyond stdlib.
"""

from __future__ import annotations

import math
from typing import Any

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
FOREVER_TEXT = "forever"


def fmt_bytes(n: Any) -> str:
    """``n`` bytes as ``"12 B"``, ``"3.9 MiB"``, ``"1.5 GiB"``; ``None`` is ``"—"``."""
    if n is None:
        return "—"
    n = int(n)
    if n < 0:
        return "-" + fmt_bytes(-n)
    if n < 1024:
        return f"{n} B"
    i = 1
    while i < len(_UNITS) - 1 and n >= 1024 ** (i + 1):
        i += 1
    unit = 1024**i
    tenths = (n * 10 + unit // 2) // unit
    if tenths >= 10240 and i < len(_UNITS) - 1:  # 1023.96 KiB rounds to the next unit
        i, unit = i + 1, unit * 1024
        tenths = (n * 10 + unit // 2) // unit
    return f"{tenths // 10}.{tenths % 10} {_UNITS[i]}"


def fmt_duration(seconds: Any) -> str:
    """Seconds for people (see the module doc); ``None`` / negative is ``"forever"``."""
    if seconds is None:
        return FOREVER_TEXT
    s = float(seconds)
    if math.isnan(s):
        return "—"
    if s < 0 or math.isinf(s):
        return FOREVER_TEXT
    if 0 < s < 1:
        ms = math.floor(s * 1000 + 0.5)
        if ms < 1000:
            return f"{ms} ms"
    if 0 < s < 10:
        tenths = math.floor(s * 10 + 0.5)
        if tenths < 100:
            return f"{tenths // 10}.{tenths % 10} s"
    t = math.floor(s + 0.5)
    for big, big_name, small, small_name in ((86400, "d", 3600, "h"), (3600, "h", 60, "min"), (60, "min", 1, "s")):
        if t >= big:
            hi, rest = divmod(t, big)
            lo = rest // small
            return f"{hi} {big_name}" + (f" {lo} {small_name}" if lo else "")
    return f"{t} s"
