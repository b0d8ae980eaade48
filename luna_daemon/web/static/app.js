// Luna Daemon dashboard. Plain JS, no build step, no third-party code (charts: charts.js).
// Protocol (see docs/monitor.md): the server sends a "snapshot" on connect, then
// "event" messages with a gap-free "seq"; on a gap we ask for a new snapshot. "status"
// messages refresh the numbers every few seconds. Actions need a login: the tray opens
// this page with a one-time secret in the URL fragment, which we trade for a session.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const PAGES = ["status", "models", "logs", "settings"];
  const RANK = { DEBUG: 10, INFO: 20, REQUEST: 20, EVENT: 20, WARNING: 30, ERROR: 40, CRITICAL: 50 };
  const COLOURS = { stopped: "gray", starting: "yellow", running: "green", stopping: "yellow", error: "red" };
  const MAX_LINES = 5000;
  const SESSION_KEY = "luna-daemon-session";

  const st = {
    ws: null, lastSeq: null, awaitingSnapshot: true, authed: false, authError: "",
    status: null, models: [], loading: new Map(), logs: [], lastLogSeq: 0,
    paused: false, unseen: 0, settings: null, original: {}, nextId: 1, pending: new Map(),
    retry: 500, warnings: [], loginSecret: null, snapshots: 0,
    cards: new Map(), instMsg: new Map(),
    history: [], historyWindow: 0, charts: new Map(),
  };
  window.lunaDashboard = st; // for debugging (and the browser tests) only

  // ------------------------------------------------------------------ formatting
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  function fmtTime(t) {
    const d = new Date(t * 1000);
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
  }
  // One formatter for every face: static/units.js (the rules of luna_daemon/units.py).
  const { fmtBytes, fmtDuration } = globalThis.LunaUnits;
  const now = () => Date.now() / 1000;
  // A live figure (clients, queue, models loaded, memory saved) of an instance that is not
  // running is no measurement: "—" instead of a 0 that would look like one. Running with
  // nothing in use still shows 0.
  const NOT_RUNNING = "—";
  const live = (running, v) => (running ? (v ?? 0) : NOT_RUNNING);
  function el(tag, props = {}, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props)) {
      if (k === "class") e.className = v;
      else if (k === "dataset") Object.assign(e.dataset, v);
      else if (k in e) e[k] = v;
      else e.setAttribute(k, v);
    }
    for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return e;
  }
  function showMsg(id, text, kind = "") {
    const m = $(id);
    m.textContent = text;
    m.className = "msg" + (kind ? " " + kind : "");
  }

  // ------------------------------------------------------------------ pages
  function parseHash() {
    const raw = location.hash.replace(/^#/, "");
    const p = new URLSearchParams(raw);
    let page = p.get("page") || raw;
    if (!PAGES.includes(page)) page = "status";
    return { page, login: p.get("login") };
  }
  function showPage(page) {
    for (const p of PAGES) $("page-" + p).hidden = p !== page;
    for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.page === page);
    if (page === "logs") { const v = $("log-view"); v.scrollTop = v.scrollHeight; }
  }

  // ------------------------------------------------------------------ connection
  function setConn(text, cls) { const b = $("conn-label"); b.textContent = text; b.className = "badge " + cls; }
  function send(obj) { if (st.ws && st.ws.readyState === WebSocket.OPEN) st.ws.send(JSON.stringify(obj)); }
  function request(msg) {
    return new Promise((resolve) => {
      if (!st.ws || st.ws.readyState !== WebSocket.OPEN) {
        resolve({ ok: false, error: { code: "offline", message: "not connected to the dashboard server" } });
        return;
      }
      const id = st.nextId++;
      st.pending.set(id, resolve);
      send({ ...msg, id });
    });
  }
  function connect() {
    const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws");
    st.ws = ws; st.awaitingSnapshot = true; st.lastSeq = null;
    setConn("connecting…", "warn");
    ws.onopen = () => { st.retry = 500; setConn("live", "ok"); login(); };
    ws.onmessage = (ev) => {
      let m;
      try { m = JSON.parse(ev.data); } catch (e) { return; }
      handle(m);
    };
    ws.onclose = () => {
      if (st.ws !== ws) return;
      st.ws = null; st.authed = false;
      for (const resolve of st.pending.values()) resolve({ ok: false, error: { code: "offline", message: "connection lost" } });
      st.pending.clear();
      setConn("offline — retrying", "bad");
      renderAuth(); renderStatus();
      setTimeout(connect, st.retry);
      st.retry = Math.min(st.retry * 2, 5000);
    };
  }
  function login() {
    if (st.loginSecret) {
      send({ type: "login", secret: st.loginSecret });
      st.loginSecret = null; // one-time: a reconnect uses the session instead
      return;
    }
    const session = sessionStorage.getItem(SESSION_KEY);
    if (session) send({ type: "login", session });
    else { st.authError = ""; renderAuth(); }
  }

  function handle(m) {
    switch (m.type) {
      case "snapshot": applySnapshot(m); break;
      case "event":
        if (st.awaitingSnapshot || st.lastSeq === null || m.seq <= st.lastSeq) return;
        if (m.seq !== st.lastSeq + 1) {
          // Missed events: our picture may be wrong. Ask for a full one, ignore the rest until then.
          st.awaitingSnapshot = true;
          send({ type: "snapshot" });
          return;
        }
        st.lastSeq = m.seq;
        applyEvent(m);
        break;
      case "status":
        st.status = m.status; st.models = m.models || [];
        renderStatus(); renderModels();
        break;
      case "sample": addSample(m.sample); break;
      case "auth":
        st.authed = !!m.ok;
        if (m.ok) { sessionStorage.setItem(SESSION_KEY, m.session); st.authError = ""; }
        else { sessionStorage.removeItem(SESSION_KEY); st.authError = m.error || ""; }
        renderAuth(); renderStatus(); renderModels();
        break;
      case "reply": {
        const resolve = st.pending.get(m.id);
        if (resolve) { st.pending.delete(m.id); resolve(m); }
        break;
      }
      default: break;
    }
  }

  function applySnapshot(m) {
    st.lastSeq = m.seq; st.awaitingSnapshot = false; st.snapshots++;
    st.status = m.status; st.models = m.models || [];
    st.loading.clear();
    st.logs = []; st.lastLogSeq = 0;
    for (const line of m.logs || []) pushLog(fromLogRecord(line));
    applyHistory(m.history);
    renderStatus(); renderModels(); renderLoading(); renderLogs();
    applySettings(m.settings);
  }

  function applyEvent(m) {
    const d = m.data || {};
    switch (m.name) {
      case "log": addLine(fromLogRecord(d.line)); break;
      case "state": {
        const s = st.status;
        if (!s) break;
        // An event without "instance" (an older host) is the primary's.
        const name = d.instance || primaryName();
        const inst = (s.instances || []).find((i) => i.name === name);
        if (inst) { inst.state = d.state; inst.detail = d.detail || ""; inst.colour = COLOURS[d.state]; }
        if (!inst || inst.primary) { s.state = d.state; s.detail = d.detail || ""; s.colour = COLOURS[d.state]; }
        s.overall = overallState(s);
        renderStatus();
        break;
      }
      case "model_loading":
        st.loading.set(d.model, { ...d, since: m.time });
        renderLoading();
        break;
      case "model_loaded":
      case "model_unloaded":
        st.loading.delete(d.model);
        renderLoading();
        break;
      case "request":
        addLine({ level: "REQUEST", activity: true, time: m.time, logger: "request",
          message: `${d.op} from ${d.client} ok in ${Number(d.ms).toFixed(1)} ms` });
        break;
      case "request_failed":
        addLine({ level: "WARNING", time: m.time, logger: "request",
          message: `${d.op} from ${d.client} failed: ${d.code} (${Number(d.ms).toFixed(1)} ms)` });
        break;
      case "client_connected":
      case "client_disconnected":
        addLine({ level: "EVENT", activity: true, time: m.time, logger: "clients",
          message: `${d.client} ${m.name === "client_connected" ? "connected" : "disconnected"} (${d.clients} open)` });
        if (st.status && typeof d.clients === "number") { st.status.clients = d.clients; renderStatus(); }
        break;
      case "warning":
        st.warnings.unshift({ time: m.time, level: d.level || "warning",
          message: (d.instance && multi() ? `[${d.instance}] ` : "") + (d.message || JSON.stringify(d)) });
        st.warnings.length = Math.min(st.warnings.length, 20);
        renderWarnings();
        break;
      default: break;
    }
  }

  // ------------------------------------------------------------------ auth
  function renderAuth() {
    const b = $("auth-badge");
    const banner = $("banner");
    if (st.authed) {
      b.textContent = "logged in"; b.className = "badge ok";
      b.title = "this page may start, stop and unload";
      banner.hidden = true;
    } else {
      b.textContent = "read-only"; b.className = "badge warn";
      b.title = "run `luna-daemon dashboard` (or use the tray's Open Dashboard) to control the daemon";
      banner.hidden = false;
      banner.className = "banner";
      banner.textContent = (st.authError ? st.authError + ". " : "") +
        "Read-only view: run `luna-daemon dashboard` (or use the tray's Open Dashboard) to get a page that can start, stop, unload and save settings.";
    }
    for (const id of ["settings-save", "settings-restart", "btn-unload-all", "log-download"]) $(id).disabled = !st.authed;
    renderLogs();
  }

  // ------------------------------------------------------------------ status page
  function setDot(id, colour) { $(id).className = $(id).className.replace(/\b(gray|yellow|green|red)\b/g, "").trim() + " " + colour; }
  // The config file's state (Host.config_status): a file that cannot be used (red), or
  // edited keys that wait for a restart (yellow). Hidden when neither.
  function renderConfigBanner(s) {
    const b = $("config-banner");
    const waiting = s.restart_needed || [];
    if (s.config_error) {
      b.className = "banner error";
      b.textContent = `Config file not applied: ${s.config_error}. Fix ${s.config_file || "config.toml"}; the previous settings stay.`;
    } else if (waiting.length) {
      b.className = "banner";
      b.textContent = `Restart needed: ${waiting.join(", ")} changed in ${s.config_file || "config.toml"}` +
        " and apply after Restart (host, ports and folders: after restarting the tray / serve).";
    }
    b.hidden = !s.config_error && !waiting.length;
  }
  // ------------------------------------------------------------------ instances
  const instances = () => (st.status && st.status.instances) || [];
  const multi = () => instances().length > 1;
  function primaryName() { const p = instances().find((i) => i.primary); return p ? p.name : "main"; }
  // Host.overall_state's rule (daemon.overall_state): the worst state wins; a mix of
  // running and stopped (some stopped on purpose) counts as running.
  function overallState(s) {
    const states = (s.instances || []).map((i) => i.state);
    if (!states.length) return s.state;
    if (states.includes("error")) return "error";
    if (states.some((x) => x === "starting" || x === "stopping")) return "starting";
    if (states.every((x) => x === "stopped")) return "stopped";
    return "running";
  }
  function instanceCard(name) {
    let c = st.cards.get(name);
    if (c) return c;
    const dot = el("span", { class: "dot gray" });
    const state = el("span", { dataset: { testid: "instance-state" } }, "—");
    const detail = el("div", { class: "detail" });
    const kv = el("dl", { class: "kv" });
    const msg = el("div", { class: "msg", dataset: { testid: "instance-msg" } });
    const btn = (label, kind) => {
      const b = el("button", { type: "button", textContent: label, dataset: { testid: `instance-${kind}` } });
      b.addEventListener("click", () => instanceAction(name, kind));
      return b;
    };
    const start = btn("Start", "start"), stop = btn("Stop", "stop"), unload = btn("Unload", "unload");
    const title = el("h2", {}, name);
    const root = el("div", { class: "card instance-card", dataset: { instance: name, testid: "instance-card" } },
      title, el("div", { class: "inst-state" }, dot, state), detail, kv,
      el("div", { class: "buttons" }, start, stop, unload), msg);
    c = { root, title, dot, state, detail, kv, msg, start, stop, unload };
    st.cards.set(name, c);
    return c;
  }
  function renderInstances(s) {
    const list = s.instances || [];
    const box = $("instances");
    box.hidden = list.length <= 1; // one instance: the page looks as it always did
    if (box.hidden) return;
    const offline = !st.ws;
    const why = st.authed ? "" : "read-only: run `luna-daemon dashboard` (or use the tray's Open Dashboard)";
    const cards = list.map((i) => {
      const c = instanceCard(i.name);
      c.title.textContent = i.name + (i.primary ? " (primary)" : "");
      c.dot.className = "dot " + (COLOURS[i.state] || "gray");
      c.state.textContent = i.state; // the colour is never the only sign
      c.detail.textContent = i.detail || "";
      // The devices this instance uses: a VAE-only instance has no CLIP device to show.
      const devs = Object.entries(i.devices || {}).filter(([k]) => !i.service || i.service === "full" || i.service === k);
      const rows = [["Service", i.service], ["Devices", devs.map(([k, v]) => `${k}: ${v}`).join(" · ") || "—"],
        ["Address", i.address || "— (a free port once started)"], ["Models", live(i.state === "running", i.models)],
        ["Queue", live(i.state === "running", i.queue)], ["Clients", live(i.state === "running", i.clients)]];
      if (!i.primary && i.restarts) rows.push(["Restarts", i.restarts]);
      c.kv.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", { dataset: { field: k.toLowerCase() } }, v)]));
      for (const [b, ok] of [[c.start, i.state === "stopped" || i.state === "error"],
        [c.stop, i.state === "running" || i.state === "starting"], [c.unload, i.state === "running" && (i.models || 0) > 0]]) {
        b.disabled = offline || !st.authed || !ok; b.title = why;
      }
      const m = st.instMsg.get(i.name);
      c.msg.textContent = m ? m.text : ""; c.msg.className = "msg" + (m && m.kind ? " " + m.kind : "");
      return c.root;
    });
    // Keep the nodes (a click in flight stays on its button); only reorder / drop.
    if (cards.length !== box.childElementCount || cards.some((c, n) => box.children[n] !== c)) box.replaceChildren(...cards);
  }
  async function instanceAction(name, kind) {
    const say = (text, k = "") => { st.instMsg.set(name, { text, kind: k }); if (st.status) renderInstances(st.status); };
    say(`${kind}…`);
    const r = await request(kind === "unload" ? { type: "unload", all: true, instance: name } : { type: kind, instance: name });
    if (!r.ok) say(`${kind} failed: ${r.error.message}`, "error");
    else if (kind === "unload") say(`unloaded ${r.result.unloaded.length} model(s)`, "ok");
    else say(`${kind}: done (${r.result.state})`, "ok");
    return r;
  }

  // "N ComfyUI instances share M models: saved X GB" (docs/monitor.md "Memory saved"): the
  // host's total line from the server; the title lists what each instance saves.
  function renderSaved(sh, anyRunning) {
    const box = $("st-saved");
    const total = sh && sh.total;
    box.hidden = !total;
    if (!total) return;
    // views.SHARING_STOPPED's words, also right after a state event (before the next status).
    box.textContent = anyRunning ? total.text : `Memory saved: ${NOT_RUNNING} (stopped)`;
    box.classList.toggle("stopped", !anyRunning);
    box.title = Object.entries(sh.by_instance || {}).map(([name, i]) =>
      `${name}: ${i.clients} clients, ${i.models} models, saved ${fmtBytes(i.saved_bytes)}` +
      (i.per_model || []).map((m) => `\n  ${m.name}: ${m.users} users × ${fmtBytes(m.bytes)}`).join("")).join("\n");
  }

  function renderStatus() {
    const s = st.status;
    if (!s) return;
    const overall = s.overall || s.state;
    const colour = COLOURS[overall] || "gray";
    setDot("state-dot", colour); setDot("status-dot", colour);
    $("state-label").textContent = overall;
    $("status-state").textContent = overall;
    $("status-detail").textContent = multi()
      ? instances().filter((i) => i.state !== "running").map((i) => `${i.name}: ${i.state}${i.detail ? " (" + i.detail + ")" : ""}`).join(" · ")
      : s.detail || "";
    $("status-title").textContent = multi() ? "All instances" : "Daemon";
    $("overview-title").textContent = multi() ? `Overview (${primaryName()})` : "Overview";
    $("traffic-title").textContent = multi() ? `Traffic (${primaryName()})` : "Traffic";
    renderConfigBanner(s);
    renderInstances(s);
    renderLogInstances();
    document.title = `Luna Daemon — ${overall}`;
    const up = s.state === "running"; // the Overview / Traffic cards are the primary's
    renderSaved(s.sharing, instances().length ? instances().some((i) => i.state === "running") : up);
    $("st-uptime").textContent = s.state === "running" ? fmtDuration(s.uptime) : "—";
    $("st-engine").textContent = s.engine || `${s.engine_setting} (not started)`;
    $("st-address").textContent = `${s.host}:${s.port}`;
    $("st-version").textContent = s.version;
    $("st-models").textContent = live(up, s.models);
    $("st-clients").textContent = live(up, s.clients);
    $("st-queue").textContent = live(up, s.queue);
    $("st-inflight").textContent = live(up, s.in_flight);
    const r = s.requests || {};
    $("st-rpm").textContent = live(up, r.per_minute);
    $("st-total").textContent = `${r.total ?? 0} (${r.errors ?? 0})`;
    const lc = s.lora_cache;
    $("st-lora").textContent = lc
      ? `${fmtBytes(lc.bytes)}${lc.budget ? " / " + fmtBytes(lc.budget) : ""}, ${lc.hits} hits, ${lc.misses} misses`
      : "—";
    const rows = (s.devices || []).map((d) => {
      const mem = d.total ? `${fmtBytes(d.used)} / ${fmtBytes(d.total)}` : "not in use yet";
      return el("tr", {}, el("td", {}, d.name), el("td", { class: "num" }, mem),
        el("td", { class: "bar-cell" }, d.total ? memBar(d.name, partsOfDevice(d), false) : ""),
        el("td", { class: "num" }, up ? fmtBytes(d.models_bytes) : NOT_RUNNING));
    });
    $("devices-body").replaceChildren(...rows);
    renderMemoryCard();
    $("roots-body").replaceChildren(...(s.roots || []).map((r) =>
      el("tr", {}, el("td", {}, r.path), el("td", {}, r.source), el("td", {}, (r.kinds || []).join(", ")))));
    const offline = !st.ws;
    const why = st.authed ? "" : "read-only: run `luna-daemon dashboard` (or use the tray's Open Dashboard)";
    const set = (id, enabled) => { const b = $(id); b.disabled = offline || !st.authed || !enabled; b.title = why; };
    // Start / Stop / Restart act on every instance: enabled while any one could use them.
    const states = instances().length ? instances().map((i) => i.state) : [s.state];
    set("btn-start", states.some((x) => x === "stopped" || x === "error"));
    set("btn-stop", states.some((x) => x === "running" || x === "starting"));
    set("btn-restart", states.some((x) => x === "running"));
  }
  function renderWarnings() {
    const items = st.warnings.map((w) => el("li", {}, `${fmtTime(w.time)} ${w.message}`));
    $("warnings").replaceChildren(...(items.length ? items : [el("li", { class: "muted" }, "none")]));
  }
  async function control(kind) {
    showMsg("control-msg", `${kind}…`);
    const r = await request({ type: kind });
    if (r.ok) showMsg("control-msg", `${kind}: done (${r.result.state})`, "ok");
    else showMsg("control-msg", `${kind} failed: ${r.error.message}`, "error");
    return r;
  }

  // ------------------------------------------------------------------ memory bars
  // weights (models loaded there), other (the rest of what is used: caches, runtime, on a
  // GPU other processes too) and free; the same split as the memory charts (history.py).
  function partsOfDevice(d) {
    const used = d.used ?? null, total = d.total ?? null, weights = d.models_bytes || 0;
    return { weights, other: used === null ? null : Math.max(0, used - weights),
      free: used === null || total === null ? null : Math.max(0, total - used), total };
  }
  function memBar(name, d, withName = true) {
    const total = d.total || 0;
    const bar = el("div", { class: "membar" });
    for (const [k, cls] of [["weights", "seg-w"], ["other", "seg-o"], ["free", "seg-f"]]) {
      const seg = el("span", { class: "seg " + cls, title: `${k}: ${fmtBytes(d[k])}` });
      seg.style.width = total ? `${Math.max(0, Math.min(100, (d[k] || 0) / total * 100)).toFixed(2)}%` : "0";
      bar.append(seg);
    }
    const label = el("div", { class: "memlabel small" },
      el("span", { class: "key" }, el("i", { class: "sw seg-w" }), `weights ${fmtBytes(d.weights)}`), " ",
      el("span", { class: "key" }, el("i", { class: "sw seg-o" }), `other ${fmtBytes(d.other)}`), " ",
      el("span", { class: "key" }, el("i", { class: "sw seg-f" }), `free ${fmtBytes(d.free)}`),
      ` of ${fmtBytes(total)}`);
    return el("div", { class: "memrow", dataset: { testid: "membar", device: name } },
      ...(withName ? [el("div", { class: "memname" }, name)] : []), bar, label);
  }
  // The top row's memory card: every instance together (the newest chart sample), or the
  // primary's devices until the first sample arrives.
  function renderMemoryCard() {
    const last = st.history.length ? st.history[st.history.length - 1] : null;
    const entries = last && Object.keys(last.mem || {}).length ? Object.entries(last.mem)
      : ((st.status && st.status.devices) || []).filter((d) => d.total).map((d) => [d.name, partsOfDevice(d)]);
    const rows = entries.map(([name, d]) => memBar(name, d));
    $("memory-bars").replaceChildren(...(rows.length ? rows : [el("p", { class: "muted" }, "not in use yet")]));
  }

  // ------------------------------------------------------------------ charts
  const CHART_OPS = 4; // the busiest ops get a line each (a few lines stay readable)
  const fmtRate = (v) => `${Number(v).toFixed(v >= 10 || v === 0 ? 0 : v >= 1 ? 1 : 2)}/s`;
  const fmtMs = (v) => `${Number(v).toFixed(v >= 100 || v === 0 ? 0 : 1)} ms`;
  const fmtCount = (v) => String(Math.round(Number(v) * 10) / 10);
  function applyHistory(h) {
    st.history = h && Array.isArray(h.samples) ? h.samples.slice() : [];
    st.historyWindow = h ? Number(h.window) || 0 : 0;
    renderCharts();
  }
  function addSample(sample) {
    if (!sample || typeof sample.t !== "number") return;
    const h = st.history;
    if (h.length && sample.t <= h[h.length - 1].t) return; // already in the snapshot
    h.push(sample);
    // The server's bound: its window (and never more points than it keeps).
    while (h.length && st.historyWindow && h[0].t < sample.t - st.historyWindow) h.shift();
    if (h.length > 1100) h.splice(0, h.length - 1100);
    renderCharts();
    renderMemoryCard();
  }
  function chart(box, key, opts) {
    let c = st.charts.get(key);
    if (!c) { c = globalThis.LunaCharts.create($(box), opts); st.charts.set(key, c); }
    return c;
  }
  function renderCharts() {
    const h = st.history;
    const times = h.map((s) => s.t);
    const devs = [...new Set(h.flatMap((s) => Object.keys(s.mem || {})))];
    for (const dev of devs) {
      chart("charts-memory", "mem:" + dev, { title: `Memory: ${dev}`, format: fmtBytes, stacked: true, bytes: true,
        testid: "chart-memory" }).update(times, ["weights", "other", "free"].map((k) => ({
        name: k, values: h.map((s) => (s.mem && s.mem[dev] ? s.mem[dev][k] ?? null : null)) })));
    }
    const total = {};
    for (const s of h) for (const [op, v] of Object.entries(s.ops || {})) total[op] = (total[op] || 0) + v.rps;
    const ops = Object.keys(total).sort((a, b) => total[b] - total[a] || a.localeCompare(b)).slice(0, CHART_OPS);
    // An op missing from a sample had no requests in it: 0 per second, no latency.
    chart("charts-traffic", "rps", { title: "Requests per second", format: fmtRate, testid: "chart-rps" })
      .update(times, ops.map((op) => ({ name: op, values: h.map((s) => (s.ops && s.ops[op] ? s.ops[op].rps : 0)) })));
    chart("charts-traffic", "latency", { title: "Latency p50 / p95", format: fmtMs, testid: "chart-latency" })
      .update(times, ops.flatMap((op) => ["p50", "p95"].map((q) => ({ name: `${op} ${q}`,
        values: h.map((s) => (s.ops && s.ops[op] ? s.ops[op][q] : null)) }))));
    chart("charts-traffic", "load", { title: "Clients and queue depth", format: fmtCount, testid: "chart-load" })
      .update(times, [{ name: "clients", values: h.map((s) => s.clients) }, { name: "queue", values: h.map((s) => s.queue) }]);
  }

  // ------------------------------------------------------------------ models page
  function renderModels() {
    const t = now();
    const rows = st.models.map((m) => {
      const btn = el("button", { type: "button", class: "danger", textContent: "Unload", disabled: !st.authed,
        dataset: { model: m.id, testid: "unload" } });
      btn.addEventListener("click", () => unload(m.id, btn, m.instance));
      const expires = m.expires_at ? (m.expires_at > t ? `in ${fmtDuration(m.expires_at - t)}` : "now") : "never";
      return el("tr", { dataset: { model: m.id } },
        el("td", { class: "inst-col" }, m.instance || ""), el("td", {}, m.kind), el("td", { title: (m.paths || []).join("\n") }, m.file),
        el("td", {}, m.device), el("td", {}, m.dtype), el("td", { class: "num" }, fmtBytes(m.bytes)),
        el("td", {}, `${fmtDuration(t - m.last_used)} ago`), el("td", {}, expires),
        el("td", { class: "num" }, m.users), el("td", {}, btn));
    });
    $("models-body").replaceChildren(...rows);
    $("models-table").classList.toggle("single", !multi());
    $("models-empty").hidden = st.models.length > 0 || st.loading.size > 0;
  }
  function renderLoading() {
    const rows = [...st.loading.values()].map((d) => {
      const bar = el("progress", { max: 1 });
      if (d.progress > 0) bar.value = d.progress; // no value = indeterminate
      const file = (d.paths && d.paths[0] || "").split(/[\\/]/).pop();
      return el("tr", { class: "loading", dataset: { loading: d.model } },
        el("td", { class: "inst-col" }, d.instance || primaryName()), el("td", {}, d.kind || ""), el("td", {}, file), el("td", { colSpan: 5 }, bar, " loading…"), el("td", {}), el("td", {}));
    });
    $("loading-body").replaceChildren(...rows);
    $("models-empty").hidden = st.models.length > 0 || st.loading.size > 0;
  }
  async function unload(id, btn, instance) {
    if (btn) btn.disabled = true;
    showMsg("models-msg", "unloading…");
    const r = await request(instance && multi() ? { type: "unload", model: id, instance } : { type: "unload", model: id });
    if (r.ok) showMsg("models-msg", `unloaded ${r.result.unloaded.map((u) => u.paths[0].split(/[\\/]/).pop()).join(", ")}`, "ok");
    else { showMsg("models-msg", `unload failed: ${r.error.message}`, "error"); if (btn) btn.disabled = false; }
  }

  // ------------------------------------------------------------------ logs page
  function fromLogRecord(line) {
    return { level: line.level, time: line.time, logger: line.logger, message: line.message, seq: line.seq,
      instance: line.instance || primaryName() };
  }
  function formatLine(l) {
    const who = multi() ? `[${l.instance || primaryName()}] ` : "";
    return `${fmtTime(l.time)} ${l.level.padEnd(7)} ${who}${l.logger}: ${l.message}`;
  }
  // The instance filter: shown with more than one instance; its options follow the config.
  function renderLogInstances() {
    const sel = $("log-instance");
    const names = instances().map((i) => i.name);
    $("log-instance-label").hidden = names.length <= 1;
    const have = [...sel.options].slice(1).map((o) => o.value);
    if (have.join("\n") === names.join("\n")) return;
    const cur = sel.value;
    sel.replaceChildren(el("option", { value: "" }, "all instances"), ...names.map((n) => el("option", { value: n }, n)));
    sel.value = names.includes(cur) ? cur : "";
  }
  function pushLog(l) {
    if (l.seq) {
      if (l.seq <= st.lastLogSeq) return false; // already shown via the snapshot
      st.lastLogSeq = l.seq;
    }
    l.text = formatLine(l);
    st.logs.push(l);
    if (st.logs.length > MAX_LINES) st.logs.splice(0, st.logs.length - MAX_LINES);
    return true;
  }
  function visible(l) {
    if (l.activity && !$("log-activity").checked) return false;
    const only = $("log-instance").value;
    if (only && (l.instance || primaryName()) !== only) return false;
    if ((RANK[l.level] || 20) < RANK[$("log-level").value]) return false;
    const q = $("log-search").value.trim().toLowerCase();
    return !q || l.text.toLowerCase().includes(q);
  }
  function lineEl(l) { return el("div", { class: "log-line " + l.level }, l.text); }
  function addLine(l) {
    if (!pushLog(l)) return;
    if (st.paused) { st.unseen++; renderPause(); return; }
    if (!visible(l)) return;
    const view = $("log-view");
    const atBottom = view.scrollTop + view.clientHeight >= view.scrollHeight - 30;
    view.append(lineEl(l));
    while (view.childElementCount > MAX_LINES) view.firstElementChild.remove();
    if (atBottom) view.scrollTop = view.scrollHeight;
    renderCount();
  }
  function renderLogs() {
    if (st.paused) return;
    const view = $("log-view");
    if (!st.authed && !st.logs.length) {
      // The server sends log lines only to a logged-in page (they may hold paths and prompts).
      view.replaceChildren(el("div", { class: "muted" }, "Log lines are shown only to a logged-in page: run `luna-daemon dashboard logs` (or use View Logs in the tray menu)."));
      renderCount();
      return;
    }
    view.replaceChildren(...st.logs.filter(visible).map(lineEl));
    view.scrollTop = view.scrollHeight;
    renderCount();
  }
  function renderCount() { $("log-count").textContent = `${$("log-view").querySelectorAll(".log-line").length} of ${st.logs.length} lines shown`; }
  function renderPause() { $("log-pause").textContent = st.paused ? `Resume${st.unseen ? ` (${st.unseen} new)` : ""}` : "Pause"; }

  // ------------------------------------------------------------------ settings page
  const fieldEls = () => [...$("settings-form").querySelectorAll("[name]")];
  const valueOf = (e) => (e.type === "checkbox" ? e.checked : e.value);
  function changed() {
    const out = {};
    for (const e of fieldEls()) if (e.name in st.original && valueOf(e) !== st.original[e.name]) out[e.name] = valueOf(e);
    return out;
  }
  function applySettings(desc) {
    if (!desc) return;
    st.settings = desc;
    $("settings-file").textContent = desc.file;
    const dirty = changed();
    for (const [key, f] of Object.entries(desc.fields)) {
      const e = $("f-" + key);
      if (!e) continue;
      const field = e.closest(".field");
      const src = field.querySelector(".src");
      // Scope-widening keys (what the daemon runs, reads or listens on) are never saved
      // from a web page; the server refuses them too. Show them, read-only, with where to
      // change them instead.
      // Help from settings_help.HELP (the same text as the README's settings table).
      let help = field.querySelector(".help");
      if (!help) { help = el("span", { class: "help", dataset: { testid: "help" } }); field.append(help); }
      help.textContent = f.help || "";
      field.querySelector("label").title = f.help || "";
      let hint = field.querySelector(".hint");
      if (!hint) { hint = el("span", { class: "hint" }); field.append(hint); }
      hint.textContent = f.locked ? f.hint : "";
      field.classList.toggle("locked", !!f.locked);
      if (e.tagName === "SELECT" || e.type === "checkbox") e.disabled = !!f.locked; else e.readOnly = !!f.locked;
      if (f.overridden) {
        src.textContent = f.source === "env" ? `overridden by LUNA_${key.toUpperCase()}` : "overridden by a command-line flag";
        src.className = "src override";
        src.title = "that value wins over the file; a saved value applies once the override is removed";
      } else {
        src.textContent = f.source === "default" ? "default" : `from ${f.source}`;
        src.className = "src";
        src.title = "";
      }
      if (key in dirty) continue; // keep what the user is typing
      if (e.tagName === "SELECT") {
        const opts = [...(desc.choices[e.dataset.kind] || [])];
        const cur = String(f.value);
        const options = opts.map((o) => el("option", { value: o }, o));
        if (!opts.includes(cur)) options.push(el("option", { value: cur }, `${cur} (not available here)`));
        e.replaceChildren(...options);
        e.value = cur;
      } else if (e.type === "checkbox") {
        e.checked = !!f.value;
      } else {
        e.value = f.value === null || f.value === undefined ? "" : String(f.value);
      }
      st.original[key] = valueOf(e);
      field.classList.remove("dirty", "invalid");
      field.querySelector(".err").textContent = "";
    }
  }
  function markDirty(e) {
    const field = e.target.closest(".field");
    if (field) field.classList.toggle("dirty", valueOf(e.target) !== st.original[e.target.name]);
  }
  async function saveSettings(ev) {
    ev.preventDefault();
    const values = changed();
    for (const f of document.querySelectorAll(".field")) { f.classList.remove("invalid"); f.querySelector(".err").textContent = ""; }
    if (!Object.keys(values).length) { showMsg("settings-msg", "Nothing changed."); return; }
    showMsg("settings-msg", "saving…");
    const r = await request({ type: "save_settings", values });
    if (!r.ok) {
      const errors = (r.result && r.result.errors) || {};
      for (const [key, msg] of Object.entries(errors)) {
        const e = $("f-" + key);
        if (e) { const f = e.closest(".field"); f.classList.add("invalid"); f.querySelector(".err").textContent = msg; }
      }
      const general = errors._ || (r.error.code === "read_only" ? `Not saved: ${r.error.message} (see the marked fields).`
        : Object.keys(errors).length ? "Not saved: fix the highlighted fields." : r.error.message);
      showMsg("settings-msg", general, "error");
      return;
    }
    const res = r.result;
    for (const key of res.saved) {
      const e = $("f-" + key);
      if (e) { st.original[key] = valueOf(e); e.closest(".field").classList.remove("dirty"); }
    }
    showMsg("settings-msg", `Saved to ${res.file}.`, "ok");
    const parts = [];
    const running = st.status && st.status.state === "running";
    if (res.restart.length) {
      parts.push(running
        ? `Restart needed: changes to ${res.restart.join(", ")} take effect after the daemon restarts.`
        : `Changes to ${res.restart.join(", ")} take effect when the daemon starts.`);
    }
    if (res.overridden.length) parts.push(`Saved ${res.overridden.join(", ")}, but an environment variable or command-line flag overrides the file until it is removed.`);
    $("settings-notice-text").textContent = parts.join(" ");
    $("settings-restart").hidden = !(res.restart.length && running);
    $("settings-notice").hidden = parts.length === 0;
  }

  async function downloadLog() {
    // /api/logfile needs the session, which only this tab holds (sessionStorage): fetch
    // it with the header, then save the bytes (no cookie that other ports could see).
    showMsg("log-msg", "downloading…");
    try {
      const only = $("log-instance").value;
      const r = await fetch("/api/logfile" + (only ? "?instance=" + encodeURIComponent(only) : ""), { headers: { "X-Luna-Session": sessionStorage.getItem(SESSION_KEY) || "" }, cache: "no-store" });
      if (!r.ok) throw new Error(`${r.status}: ${(await r.text()).trim()}`);
      const url = URL.createObjectURL(await r.blob());
      const a = el("a", { href: url, download: only && only !== primaryName() ? `luna-daemon-${only}.log` : "luna-daemon.log", hidden: true });
      document.body.append(a); a.click(); a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
      showMsg("log-msg", "");
    } catch (e) {
      showMsg("log-msg", `download failed: ${e.message}`, "error");
    }
  }

  // ------------------------------------------------------------------ wiring
  function init() {
    const { page, login } = parseHash();
    if (login) {
      st.loginSecret = login;
      // Take the secret out of the address bar and history; it is single-use anyway.
      history.replaceState(null, "", location.pathname + "#page=" + page);
    }
    showPage(page);
    window.addEventListener("hashchange", () => showPage(parseHash().page));
    $("btn-start").addEventListener("click", () => control("start"));
    $("btn-stop").addEventListener("click", () => control("stop"));
    $("btn-restart").addEventListener("click", () => control("restart"));
    $("btn-unload-all").addEventListener("click", async () => {
      showMsg("models-msg", "unloading all…");
      const r = await request({ type: "unload", all: true });
      showMsg("models-msg", r.ok ? `unloaded ${r.result.unloaded.length} model(s)` : `unload failed: ${r.error.message}`, r.ok ? "ok" : "error");
    });
    for (const id of ["log-level", "log-activity", "log-instance"]) $(id).addEventListener("change", renderLogs);
    $("log-search").addEventListener("input", renderLogs);
    $("log-pause").addEventListener("click", () => {
      st.paused = !st.paused;
      if (!st.paused) { st.unseen = 0; renderLogs(); }
      renderPause();
    });
    $("log-clear").addEventListener("click", () => { $("log-view").replaceChildren(); renderCount(); });
    $("log-download").addEventListener("click", downloadLog);
    $("settings-form").addEventListener("submit", saveSettings);
    $("settings-form").addEventListener("input", markDirty);
    $("settings-form").addEventListener("change", markDirty);
    $("settings-revert").addEventListener("click", () => { st.original = {}; for (const f of document.querySelectorAll(".field")) f.classList.remove("dirty"); applySettings(st.settings); showMsg("settings-msg", ""); });
    $("settings-restart").addEventListener("click", async () => {
      $("settings-restart").disabled = true;
      const r = await control("restart");
      $("settings-restart").disabled = !st.authed;
      if (r.ok) { $("settings-notice-text").textContent = "Daemon restarted with the new settings."; $("settings-restart").hidden = true; }
      else $("settings-notice-text").textContent = `Restart failed: ${r.error.message}`;
    });
    renderAuth();
    connect();
  }
  init();
})();
