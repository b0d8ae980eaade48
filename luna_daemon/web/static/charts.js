// Luna Daemon dashboard charts: small SVG line / stacked-area charts drawn here (no
// third-party code, no build step; the CSP allows only this origin's scripts and styles).
// Colours come from style.css classes (.s0 … .s7), so the light and dark themes apply.
//
//   const c = LunaCharts.create(parentElement, { title, format, stacked });
//   c.update(times, [{ name, values }]);   // values aligned with times; null = no value
//
// Hovering shows the nearest sample's time and every series' value (.chart-tip).
"use strict";
(() => {
  const NS = "http://www.w3.org/2000/svg";
  const H = 150, PAD_L = 58, PAD_R = 8, PAD_T = 8, PAD_B = 20;
  const svg = (tag, attrs = {}) => {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    return e;
  };
  const pad = (n) => String(n).padStart(2, "0");
  const hhmm = (t) => { const d = new Date(t * 1000); return `${pad(d.getHours())}:${pad(d.getMinutes())}`; };
  const hhmmss = (t) => { const d = new Date(t * 1000); return `${hhmm(t)}:${pad(d.getSeconds())}`; };

  // The smallest "nice" number (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8 × 10^n) at or above x.
  function niceMax(x) {
    if (!(x > 0)) return 1;
    const p = 10 ** Math.floor(Math.log10(x));
    for (const m of [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (m * p >= x * (1 - 1e-9)) return m * p;
    return 10 * p;
  }
  // Bytes scale in powers of 1024 so that the axis reads 2 GiB, not 2.1 GB.
  function niceBytes(x) {
    if (!(x > 0)) return 1024;
    const p = 1024 ** Math.floor(Math.log(x) / Math.log(1024));
    return niceMax(x / p) * p;
  }

  function create(parent, { title, format = String, stacked = false, bytes = false, testid = "" } = {}) {
    const root = document.createElement("figure");
    root.className = "chart";
    if (testid) root.dataset.testid = testid;
    const cap = document.createElement("figcaption");
    cap.textContent = title;
    const box = document.createElement("div");
    box.className = "chart-box";
    const s = svg("svg", { class: "chart-svg", height: H, role: "img", "aria-label": title });
    const tip = document.createElement("div");
    tip.className = "chart-tip"; tip.dataset.testid = "chart-tip"; tip.hidden = true;
    const legend = document.createElement("div");
    legend.className = "chart-legend";
    const empty = document.createElement("div");
    empty.className = "chart-empty muted small"; empty.textContent = "collecting…";
    box.append(s, tip, empty);
    root.append(cap, box, legend);
    parent.append(root);

    let times = [], series = [], width = 0, geom = null;
    const cursor = svg("line", { class: "chart-cursor", y1: PAD_T, y2: H - PAD_B, visibility: "hidden" });

    function draw() {
      width = Math.max(160, Math.round(box.clientWidth || 320));
      s.setAttribute("width", width);
      s.setAttribute("viewBox", `0 0 ${width} ${H}`);
      s.replaceChildren();
      empty.hidden = times.length >= 2;
      geom = null;
      if (times.length < 2) return;
      const t0 = times[0], t1 = times[times.length - 1] > t0 ? times[times.length - 1] : t0 + 1;
      // Stacked: each series sits on the ones before it (memory: weights, other, free).
      const tops = series.map((sr) => sr.values.map((v) => (v === null || v === undefined ? null : Number(v))));
      if (stacked) for (let i = 1; i < tops.length; i++) {
        tops[i] = tops[i].map((v, k) => (v === null ? tops[i - 1][k] : v + (tops[i - 1][k] || 0)));
      }
      let hi = 0;
      for (const col of tops) for (const v of col) if (v !== null && v > hi) hi = v;
      const ymax = bytes ? niceBytes(hi) : niceMax(hi);
      const x = (t) => PAD_L + (t - t0) / (t1 - t0) * (width - PAD_L - PAD_R);
      const y = (v) => PAD_T + (1 - v / ymax) * (H - PAD_T - PAD_B);
      geom = { x, t0, t1 };
      for (const f of [0, 0.5, 1]) {
        const v = ymax * f;
        s.append(svg("line", { class: "chart-grid", x1: PAD_L, x2: width - PAD_R, y1: y(v), y2: y(v) }));
        const lab = svg("text", { class: "chart-axis", x: PAD_L - 6, y: y(v) + 4, "text-anchor": "end" });
        lab.textContent = format(v);
        s.append(lab);
      }
      const clock = t1 - t0 < 600 ? hhmmss : hhmm; // a short history: its seconds matter
      for (const [t, anchor] of [[t0, "start"], [t1, "end"]]) {
        const lab = svg("text", { class: "chart-axis", x: x(t), y: H - 5, "text-anchor": anchor });
        lab.textContent = clock(t);
        s.append(lab);
      }
      tops.forEach((col, i) => {
        // A null breaks the line: no invented values across a stopped daemon.
        let d = "", open = false;
        col.forEach((v, k) => {
          if (v === null) { open = false; return; }
          d += `${open ? "L" : "M"}${x(times[k]).toFixed(1)},${y(v).toFixed(1)}`;
          open = true;
        });
        if (!d) return;
        const cls = `s${i % 8}`;
        if (stacked) {
          const below = i ? tops[i - 1] : col.map(() => 0);
          let area = "", seg = [];
          const flush = () => {
            if (seg.length) {
              area += seg.map((k, n) => `${n ? "L" : "M"}${x(times[k]).toFixed(1)},${y(col[k]).toFixed(1)}`).join("");
              area += seg.slice().reverse().map((k) => `L${x(times[k]).toFixed(1)},${y(below[k] || 0).toFixed(1)}`).join("") + "Z";
            }
            seg = [];
          };
          col.forEach((v, k) => { if (v === null) flush(); else seg.push(k); });
          flush();
          s.append(svg("path", { class: `chart-area ${cls}`, d: area }));
        }
        s.append(svg("path", { class: `chart-line ${cls}`, d, "data-series": series[i].name }));
        // A value with no neighbours draws no line: mark it with a dot instead.
        col.forEach((v, k) => {
          if (v !== null && (k === 0 || col[k - 1] === null) && (k === col.length - 1 || col[k + 1] === null)) {
            s.append(svg("circle", { class: `chart-dot ${cls}`, cx: x(times[k]).toFixed(1), cy: y(v).toFixed(1), r: 2.5 }));
          }
        });
      });
      s.append(cursor);
    }

    function renderLegend() {
      legend.replaceChildren(...series.map((sr, i) => {
        const item = document.createElement("span");
        const sw = document.createElement("i");
        sw.className = `sw s${i % 8}`;
        item.append(sw, sr.name);
        return item;
      }));
    }

    function nearest(t) {
      let lo = 0, hi = times.length - 1;
      while (hi - lo > 1) { const mid = (lo + hi) >> 1; if (times[mid] <= t) lo = mid; else hi = mid; }
      return Math.abs(times[hi] - t) < Math.abs(times[lo] - t) ? hi : lo;
    }
    function hover(ev) {
      if (!geom) return;
      const r = s.getBoundingClientRect();
      const px = (ev.clientX - r.left) * (width / (r.width || width));
      const t = geom.t0 + (px - PAD_L) / (width - PAD_L - PAD_R) * (geom.t1 - geom.t0);
      const k = nearest(t);
      const cx = geom.x(times[k]);
      cursor.setAttribute("x1", cx); cursor.setAttribute("x2", cx); cursor.setAttribute("visibility", "visible");
      const rows = [hhmmss(times[k])];
      for (const sr of series) {
        const v = sr.values[k];
        rows.push(`${sr.name}: ${v === null || v === undefined ? "—" : format(v)}`);
      }
      tip.textContent = rows.join("\n");
      tip.hidden = false;
      // Keep the tip inside the chart: on the left of the cursor in the right half.
      const left = cx / width * r.width;
      tip.classList.toggle("flip", left > r.width / 2);
      tip.style.left = `${Math.round(left)}px`;
    }
    let lastEv = null;
    function leave() { lastEv = null; tip.hidden = true; cursor.setAttribute("visibility", "hidden"); }
    s.addEventListener("pointermove", (ev) => { lastEv = ev; hover(ev); });
    s.addEventListener("pointerleave", leave);
    if (typeof ResizeObserver === "function") {
      let last = 0;
      new ResizeObserver(() => { const w = Math.round(box.clientWidth); if (w && w !== last) { last = w; draw(); } }).observe(box);
    }

    return {
      root,
      update(ts, srs) {
        const names = series.map((x) => x.name).join("\n");
        times = ts; series = srs;
        if (names !== srs.map((x) => x.name).join("\n")) renderLegend();
        draw();
        if (lastEv) hover(lastEv); // new values under a resting cursor
      },
    };
  }

  globalThis.LunaCharts = { create };
})();
