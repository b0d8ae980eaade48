// Sizes and durations for people: the same rules as luna_daemon/units.py (binary units,
// one decimal; durations in their largest two whole units). Integer rounding, half up,
// so that Python and JavaScript agree on ties. tests/test_units.py runs both.
"use strict";
(() => {
  const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];
  function fmtBytes(n) {
    if (n === null || n === undefined) return "—";
    n = Math.trunc(Number(n));
    if (!isFinite(n)) return "—";
    if (n < 0) return "-" + fmtBytes(-n);
    if (n < 1024) return `${n} B`;
    let i = 1;
    while (i < UNITS.length - 1 && n >= 1024 ** (i + 1)) i++;
    let unit = 1024 ** i;
    let tenths = Math.floor((n * 10 + unit / 2) / unit);
    if (tenths >= 10240 && i < UNITS.length - 1) {
      i++; unit *= 1024;
      tenths = Math.floor((n * 10 + unit / 2) / unit);
    }
    return `${Math.floor(tenths / 10)}.${tenths % 10} ${UNITS[i]}`;
  }
  function fmtDuration(s) {
    if (s === null || s === undefined) return "forever";
    s = Number(s);
    if (Number.isNaN(s)) return "—";
    if (s < 0 || !isFinite(s)) return "forever";
    if (s > 0 && s < 1) {
      const ms = Math.floor(s * 1000 + 0.5);
      if (ms < 1000) return `${ms} ms`;
    }
    if (s > 0 && s < 10) {
      const tenths = Math.floor(s * 10 + 0.5);
      if (tenths < 100) return `${Math.floor(tenths / 10)}.${tenths % 10} s`;
    }
    const t = Math.floor(s + 0.5);
    for (const [big, bigName, small, smallName] of [[86400, "d", 3600, "h"], [3600, "h", 60, "min"], [60, "min", 1, "s"]]) {
      if (t >= big) {
        const hi = Math.floor(t / big), lo = Math.floor((t % big) / small);
        return `${hi} ${bigName}` + (lo ? ` ${lo} ${smallName}` : "");
      }
    }
    return `${t} s`;
  }
  const api = { fmtBytes, fmtDuration };
  if (typeof module !== "undefined" && module.exports) module.exports = api;  // node (the tests)
  else globalThis.LunaUnits = api;
})();
