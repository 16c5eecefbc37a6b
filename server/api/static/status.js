// Hostler's status page: reads GET /status/events (server-sent events, read with fetch so
// that the API key can go in a header) and draws what it says. No build step, no
// library. Text from the server goes in with textContent only, never as HTML.
"use strict";

const KEY_STORE = "hostler-api-key";
const state = { controller: null, retry: 1000, timer: null, last: null, busy: new Set() };
const $ = (id) => document.getElementById(id);

// -- the key (asked once, kept in this tab's session storage only) -------------------

function apiKey() {
  try { return sessionStorage.getItem(KEY_STORE) || ""; } catch { return ""; }
}

function setKey(value) {
  try {
    if (value) sessionStorage.setItem(KEY_STORE, value);
    else sessionStorage.removeItem(KEY_STORE);
  } catch { /* storage off: the key lives until the page goes */ }
  state.memoryKey = value;
}

function headers(extra) {
  const out = Object.assign({}, extra || {});
  const key = apiKey() || state.memoryKey || "";
  if (key) out.Authorization = "Bearer " + key;
  return out;
}

function askForKey(message) {
  $("key-panel").hidden = false;
  $("key-error").textContent = message || "";
  $("key-input").focus();
}

// -- formatting ------------------------------------------------------------------------

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(n < 10 ? 2 : 1)) + " " + units[i];
}

function duration(s) {
  if (s === null || s === undefined) return "–";
  s = Math.max(0, Math.round(s));
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}

function num(v, digits) {
  if (v === null || v === undefined) return "–";
  return Number(v).toLocaleString(undefined, { maximumFractionDigits: digits || 0 });
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function facts(pairs) {
  const dl = el("dl", { class: "facts" });
  for (const [name, value] of pairs) {
    if (value === null || value === undefined || value === "") continue;
    dl.append(el("div", {}, el("dt", { text: name }), el("dd", { text: String(value) })));
  }
  return dl;
}

// -- the feed --------------------------------------------------------------------------

function connection(text, live) {
  const node = $("connection");
  node.textContent = text;
  node.className = "connection " + (live ? "live" : "down");
}

function stop() {
  clearTimeout(state.timer);
  if (state.controller) state.controller.abort();
  state.controller = null;
}

function later() {
  clearTimeout(state.timer);
  state.timer = setTimeout(connect, state.retry);
  state.retry = Math.min(state.retry * 2, 10000);
}

async function connect() {
  stop();
  if (document.visibilityState === "hidden") return; // a hidden tab costs nothing
  const controller = new AbortController();
  state.controller = controller;
  let response;
  try {
    response = await fetch("/status/events", {
      headers: headers({ Accept: "text/event-stream" }),
      signal: controller.signal,
      cache: "no-store",
    });
  } catch (err) {
    if (controller.signal.aborted) return;
    connection("Cannot reach the server; retrying…", false);
    later();
    return;
  }
  if (response.status === 401) {
    connection("This server needs an API key.", false);
    askForKey(apiKey() ? "That key was refused." : "");
    return;
  }
  if (!response.ok) {
    connection("The server answered " + response.status + "; retrying…", false);
    later();
    return;
  }
  $("key-panel").hidden = true;
  state.retry = 1000;
  connection("Live", true);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer = (buffer + value).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        onEvent(block);
      }
    }
  } catch (err) {
    if (controller.signal.aborted) return;
  }
  if (controller.signal.aborted) return;
  connection("Disconnected; retrying…", false);
  later();
}

function onEvent(block) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  if (name !== "status" || !data.length) return;
  try { render(JSON.parse(data.join("\n"))); } catch (err) { console.error(err); }
}

// -- drawing ---------------------------------------------------------------------------

function setText(id, text) {
  const node = $(id);
  if (node.textContent !== text) node.textContent = text; // unchanged: no layout, no paint
}

function render(snap) {
  state.last = snap;
  const t = snap.totals;
  setText("stat-toks", num(t.tok_s, 1));
  const recent = snap.series.filter((p) => p.ttft_ms !== null);
  setText("stat-ttft", recent.length ? num(recent[recent.length - 1].ttft_ms) + " ms" : "–");
  setText("stat-slots", t.slots_busy + " of " + t.slots);
  setText("stat-queued", num(t.queued));
  const up = snap.server.uptime_seconds;
  const upText = up < 60 ? "under a minute" : up < 3600 ? Math.floor(up / 60) + " min" : duration(up);
  setText("version", "Hostler " + snap.server.version + " · up " + upText); // not every second
  const hideKey = !snap.server.key_required;
  if ($("key-button").hidden !== hideKey) $("key-button").hidden = hideKey;
  // Only what changed is drawn again: the plot gains a point a second, an idle model's
  // card and the request list change rarely (a page left open costs little CPU).
  const lastPoint = snap.series.length ? snap.series[snap.series.length - 1].t : 0;
  if (lastPoint !== state.plotted) { state.plotted = lastPoint; drawPlot(snap.series); }
  renderModels(snap.models);
  const requests = JSON.stringify(snap.requests);
  if (requests !== state.requests) { state.requests = requests; renderRequests(snap.requests); }
}

function drawPlot(series) {
  const canvas = $("plot");
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  if (!width || !height) return;
  if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
  if (canvas.height !== Math.round(height * ratio)) canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const css = getComputedStyle(document.documentElement);
  const color = (name) => css.getPropertyValue(name).trim();
  const pad = { left: 40, right: 48, top: 10, bottom: 18 };
  const w = width - pad.left - pad.right, h = height - pad.top - pad.bottom;
  const span = 300, now = series.length ? series[series.length - 1].t : 0;
  const peak = Math.max(1, ...series.map((p) => p.tok_s));
  const ttftPeak = Math.max(1, ...series.map((p) => p.ttft_ms || 0));
  const anyTtft = series.some((p) => p.ttft_ms !== null);
  const x = (t) => pad.left + w - ((now - t) / span) * w;
  ctx.strokeStyle = color("--line");
  ctx.fillStyle = color("--muted");
  ctx.lineWidth = 1;
  ctx.font = "11px system-ui, sans-serif";
  for (let i = 0; i <= 2; i += 1) {
    const y = pad.top + (h * i) / 2;
    ctx.beginPath(); ctx.moveTo(pad.left, y); ctx.lineTo(pad.left + w, y); ctx.stroke();
    ctx.textAlign = "right";
    ctx.fillText(num((peak * (2 - i)) / 2, 1), pad.left - 4, y + 4);
    ctx.textAlign = "left";
    if (anyTtft) ctx.fillText(num((ttftPeak * (2 - i)) / 2) + " ms", pad.left + w + 4, y + 4);
  }
  ctx.textAlign = "center";
  ctx.fillText("−5 min", pad.left + 16, height - 4);
  ctx.fillText("now", pad.left + w - 10, height - 4);
  ctx.strokeStyle = color("--toks");
  ctx.lineWidth = 2;
  ctx.beginPath();
  series.forEach((p, i) => {
    const px = x(p.t), py = pad.top + h - (p.tok_s / peak) * h;
    if (i === 0) ctx.moveTo(px, py); else ctx.lineTo(px, py);
  });
  ctx.stroke();
  ctx.fillStyle = color("--ttft");
  for (const p of series) {
    if (p.ttft_ms === null) continue;
    ctx.beginPath();
    ctx.arc(x(p.t), pad.top + h - (p.ttft_ms / ttftPeak) * h, 3, 0, 2 * Math.PI);
    ctx.fill();
  }
  const latest = series.length ? series[series.length - 1].tok_s : 0;
  canvas.dataset.latest = String(latest);
  canvas.dataset.peak = String(series.length ? Math.max(...series.map((p) => p.tok_s)) : 0);
  canvas.dataset.points = String(series.length);
  canvas.setAttribute(
    "aria-label",
    "Tokens per second over the last " + Math.ceil(series.length / 60) + " minutes: now " +
      num(latest, 1) + ", peak " + num(Number(canvas.dataset.peak), 1) + "."
  );
}

const cards = new Map();

function card(model) {
  let c = cards.get(model.id);
  if (c) return c;
  const title = el("h3", { text: model.name });
  const kind = el("span", { class: "badge", text: model.kind });
  const badge = el("span", { class: "badge" });
  const load = el("button", { type: "button", text: "Load", "aria-label": "Load " + model.id });
  const unload = el("button", { type: "button", class: "quiet", text: "Unload", "aria-label": "Unload " + model.id });
  const pull = el("button", { type: "button", text: "Download", "aria-label": "Download " + model.id });
  load.addEventListener("click", () => act(model.id, "load", load));
  unload.addEventListener("click", () => act(model.id, "unload", unload));
  pull.addEventListener("click", () => act(model.id, "pull", pull));
  const body = el("div");
  const node = el(
    "article",
    { class: "model", "data-model": model.id, "aria-label": model.name },
    el("div", { class: "model-head" }, title, kind, badge, el("div", { class: "buttons" }, load, unload, pull)),
    body
  );
  c = { node, badge, load, unload, pull, body };
  cards.set(model.id, c);
  return c;
}

function renderModels(models) {
  const box = $("models");
  const seen = new Set();
  models.forEach((m, i) => {
    const c = card(m);
    seen.add(m.id);
    if (box.children[i] !== c.node) box.insertBefore(c.node, box.children[i] || null);
    c.node.dataset.state = m.state;
    c.badge.textContent = m.state;
    c.badge.className = "badge " + m.state.replace(/\s+/g, "-");
    const waiting = state.busy.has(m.id);
    const downloadable = m.state === "not downloaded" || (m.download && m.download.state === "failed" && m.state !== "loaded");
    c.load.hidden = !(m.state === "downloaded" || m.state === "failed" || m.state === "dead");
    c.unload.hidden = !(m.state === "loaded" || m.state === "dead");
    c.pull.hidden = !downloadable;
    for (const b of [c.load, c.unload, c.pull]) b.disabled = waiting;
    // Replaced only when what it shows changed: each change costs the browser a frame.
    const nodes = details(m);
    const shown = nodes.map((n) => n.textContent).join("|") + JSON.stringify(m.download);
    if (shown !== c.shown) { c.shown = shown; c.body.replaceChildren(...nodes); }
  });
  for (const [id, c] of cards) {
    if (!seen.has(id)) { c.node.remove(); cards.delete(id); }
  }
}

function details(m) {
  const out = [];
  const loaded = m.state === "loaded";
  const gpu = m.gpu_layers ? m.gpu_layers + " of " + m.layers : (loaded ? "none (CPU)" : null);
  out.push(facts([
    ["Context", num(m.context)],
    ["Slots", loaded ? m.slots_busy + " busy of " + m.slots : null],
    ["KV cache", m.kv_type],
    ["Layers on GPU", gpu],
    ["Memory", loaded ? bytes(m.memory_bytes) : null],
    ["VRAM", loaded && m.vram_bytes ? "≈ " + bytes(m.vram_bytes) : null],
    ["Process", m.pid ? "pid " + m.pid + (m.rss_bytes ? ", " + bytes(m.rss_bytes) + " resident" : "") : null],
    ["Unloads in", m.unloads_in_seconds !== undefined && m.unloads_in_seconds !== null ? duration(m.unloads_in_seconds) : (loaded && m.pinned ? "never (pinned)" : null)],
    ["Loading for", m.loading_seconds !== undefined ? duration(m.loading_seconds) : null],
    ["Requests", loaded ? num(m.requests_served) : null],
    ["Queued", loaded ? num(m.queued) : null],
  ]));
  const d = m.download;
  if (d && (d.state === "downloading" || m.state === "downloading")) {
    const bar = el("progress", { max: String(d.total_bytes || 1), value: String(d.done_bytes), "aria-label": "Download of " + m.id });
    if (!d.total_bytes) bar.removeAttribute("value");
    const words = bytes(d.done_bytes) + (d.total_bytes ? " of " + bytes(d.total_bytes) : "") +
      (d.bytes_per_second ? " · " + bytes(d.bytes_per_second) + "/s" : "") +
      (d.eta_seconds !== null ? " · " + duration(d.eta_seconds) + " left" : "");
    out.push(el("div", { class: "progress" }, bar, el("span", { text: words })));
  }
  const error = m.error || (d && d.state === "failed" ? "Download failed: " + d.error : null);
  if (error) out.push(el("p", { class: "error", text: error }));
  if (loaded && m.slot_list && m.slot_list.length) {
    out.push(el("h4", { class: "sub", text: "Slots" }));
    const list = el("ul", { class: "slots", "aria-label": "Slots of " + m.id });
    for (const s of m.slot_list) {
      const words = s.busy
        ? s.phase + " · " + num(s.generated) + " generated" + (s.tok_s ? " · " + num(s.tok_s, 1) + " tok/s" : "")
        : "idle · " + num(s.tokens) + " tokens kept";
      list.append(el("li", { class: "slot" + (s.busy ? " busy" : ""), "data-busy": String(s.busy) },
        el("strong", { text: "Slot " + s.id + (s.busy ? " · busy" : "") }), words));
    }
    out.push(list);
  }
  if (loaded && m.cache) out.push(cacheTable(m));
  return out;
}

function cacheTable(m) {
  const rows = m.cache.map((t) => {
    if (t.tier === "slots") {
      return el("tr", {}, el("th", { scope: "row", text: "slots (prefix kept)" }),
        el("td", { class: "num", text: "–" }), el("td", { class: "num", text: "–" }),
        el("td", { class: "num", text: num(t.cached_tokens) + " tokens reused" }),
        el("td", { class: "num", text: "–" }));
    }
    return el("tr", {}, el("th", { scope: "row", text: t.tier }),
      el("td", { class: "num", text: num(t.entries) }),
      el("td", { class: "num", text: bytes(t.bytes) + " of " + bytes(t.limit_bytes) }),
      el("td", { class: "num", text: num(t.hits) + " hits" }),
      el("td", { class: "num", text: t.hit_rate === null ? "–" : num(t.hit_rate * 100, 1) + " %" }));
  });
  const head = el("tr", {}, ...["Tier", "Entries", "Size", "Hits", "Hit rate"].map(
    (h, i) => el("th", { scope: "col", class: i ? "num" : "", text: h })));
  return el("div", {},
    el("h4", { class: "sub", text: "Prompt cache" }),
    el("div", { class: "table-wrap" }, el("table", { "aria-label": "Prompt cache of " + m.id },
      el("thead", {}, head), el("tbody", {}, ...rows))));
}

function renderRequests(requests) {
  const body = $("requests").tBodies[0];
  if (!requests.length) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: "9", class: "empty", text: "No requests yet." })));
    return;
  }
  body.replaceChildren(...requests.map((r) => el("tr", {},
    el("td", { text: new Date(r.created_at).toLocaleTimeString() }),
    el("td", { text: r.route || "–" }),
    el("td", { text: r.model }),
    el("td", { class: "num", text: num(r.prompt_tokens) }),
    el("td", { class: "num", text: num(r.cached_tokens) }),
    el("td", { class: "num", text: num(r.completion_tokens) }),
    el("td", { class: "num", text: r.ttft_ms === null ? "–" : num(r.ttft_ms) + " ms" }),
    el("td", { class: "num", text: num(r.tok_s, 1) }),
    el("td", { text: r.status || "–" }))));
}

// -- the buttons -----------------------------------------------------------------------

async function act(model, verb, button) {
  const words = { load: "Loading", unload: "Unloading", pull: "Starting the download of" }[verb];
  $("action").textContent = words + " " + model + "…";
  state.busy.add(model);
  if (state.last) renderModels(state.last.models);
  try {
    const response = await fetch("/v1/models/" + encodeURIComponent(model) + "/" + verb, {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: "{}",
    });
    let body = {};
    try { body = await response.json(); } catch { /* not JSON */ }
    if (response.status === 401) {
      $("action").textContent = "";
      askForKey(apiKey() ? "That key was refused." : "Loading and unloading need the API key.");
    } else if (!response.ok) {
      const message = body.error && body.error.message ? body.error.message : "HTTP " + response.status;
      $("action").textContent = "Could not " + verb + " " + model + ": " + message;
    } else {
      const done = { load: "Loaded", unload: body.loaded ? "Will unload once idle:" : "Unloaded", pull: "Downloading" }[verb];
      $("action").textContent = done + " " + model + ".";
    }
  } catch (err) {
    $("action").textContent = "Could not reach the server to " + verb + " " + model + ".";
  } finally {
    state.busy.delete(model);
    if (state.last) renderModels(state.last.models);
    if (button.isConnected && !button.hidden) button.focus();
  }
}

// -- start -----------------------------------------------------------------------------

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  setKey($("key-input").value.trim());
  $("key-input").value = "";
  $("key-error").textContent = "";
  connect();
});
$("key-forget").addEventListener("click", () => { setKey(""); askForKey("The key is forgotten."); stop(); connect(); });
$("key-button").addEventListener("click", () => askForKey(""));
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "hidden") stop(); else connect();
});
window.addEventListener("pagehide", stop);
window.addEventListener("resize", () => { if (state.last) drawPlot(state.last.series); });
document.addEventListener("visibilitychange", () => { state.plotted = null; });
connect();
