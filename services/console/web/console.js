// Kuma console: plain JavaScript, no build step. Three views behind hash
// routes (#/monitor, #/entity/<id>?v=N, #/projections), a JSON API under
// /api/ and the monitor's samples as Server-Sent Events from /api/events.
"use strict";

const $ = (id) => document.getElementById(id);
const fmtInt = new Intl.NumberFormat("en-US");
const state = { info: null, samples: [], last: null, view: "" };

// ---------- helpers ----------

class APIError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(path, opts = {}) {
  const init = { headers: { "Accept": "application/json" }, ...opts };
  if (opts.body !== undefined) {
    init.method = opts.method || "POST";
    init.headers["Content-Type"] = "application/json";
    init.headers["Kuma-Console"] = "1";
    init.body = JSON.stringify(opts.body);
  }
  const res = await fetch(path, init);
  let data = null;
  try { data = await res.json(); } catch (_) { /* not JSON */ }
  if (!res.ok) {
    const e = (data && data.error) || {};
    throw new APIError(res.status, e.code || "http_" + res.status, e.message || res.statusText);
  }
  return data;
}

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

// prettyJSON renders a value as indented, highlighted JSON.
function prettyJSON(v) {
  const text = esc(JSON.stringify(v, null, 2) ?? "null");
  return text.replace(/(&quot;(?:\\.|[^\\&]|&(?!quot;))*?&quot;)(\s*:)?|\b(true|false)\b|\bnull\b|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?/g,
    (m, str, colon, bool) => {
      if (str) return colon ? `<span class="k">${str}</span>${colon}` : `<span class="s">${str}</span>`;
      if (bool) return `<span class="b">${m}</span>`;
      if (m === "null") return `<span class="z">null</span>`;
      return `<span class="n">${m}</span>`;
    });
}

function fmtBytes(n) {
  const u = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(n < 10 ? 1 : 0)) + " " + u[i];
}

function fmtRate(n) {
  if (n >= 10000) return fmtInt.format(Math.round(n));
  if (n >= 100) return fmtInt.format(Math.round(n));
  return n.toFixed(n === 0 ? 0 : 1);
}

// fmtTime writes a time as ISO 8601 in UTC to the millisecond, as Kuma's
// replies and logs do, whatever the browser's time zone.
function fmtTime(iso) {
  const d = new Date(iso);
  if (isNaN(d)) return iso;
  return d.toISOString();
}

function fmtMs(ms) {
  if (ms >= 100) return Math.round(ms) + "";
  if (ms >= 10) return ms.toFixed(1);
  return ms.toFixed(2);
}

let toastTimer = 0;
function toast(msg, isError) {
  const t = $("toast");
  t.textContent = msg;
  t.className = "toast" + (isError ? " error" : "");
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.hidden = true; }, isError ? 9000 : 4000);
}

function showBanner(el, err) {
  if (!err) { el.hidden = true; el.innerHTML = ""; return; }
  el.innerHTML = err.code ? `<b>${esc(err.code)}</b> — ${esc(err.message)}` : esc(err.message || String(err));
  el.hidden = false;
}

// hue gives each node name a stable colour.
function hue(name) {
  let h = 0;
  for (const c of name) h = (h * 31 + c.charCodeAt(0)) >>> 0;
  return `hsl(${(h * 137) % 360} 62% 52%)`;
}

// ---------- routing ----------

function route() {
  const hash = location.hash.replace(/^#\/?/, "");
  const [path, query] = hash.split("?");
  const parts = path.split("/").map(decodeURIComponent);
  const view = ["monitor", "entity", "projections"].includes(parts[0]) ? parts[0] : "monitor";
  for (const v of ["monitor", "entity", "projections"]) $("view-" + v).hidden = v !== view;
  document.querySelectorAll("[data-nav]").forEach((a) => a.classList.toggle("active", a.dataset.nav === view));
  state.view = view;
  if (view === "monitor") { document.title = "Monitor · Kuma console"; renderMonitor(); }
  if (view === "projections") { document.title = "Projections · Kuma console"; renderProjections(); }
  if (view === "entity") {
    const id = parts[1] || "";
    const v = new URLSearchParams(query || "").get("v");
    document.title = (id ? id + " · " : "") + "Entities · Kuma console";
    openEntity(id, v ? parseInt(v, 10) : null);
  }
}

// ---------- live stream ----------

function connect() {
  const es = new EventSource("/api/events");
  const live = $("live");
  es.onopen = () => { live.className = "live on"; $("live-text").textContent = "live"; };
  es.onerror = () => { live.className = "live off"; $("live-text").textContent = "reconnecting"; };
  es.addEventListener("history", (e) => {
    state.samples = JSON.parse(e.data) || [];
    state.last = state.samples[state.samples.length - 1] || state.last;
    onSample();
  });
  es.addEventListener("sample", (e) => {
    const s = JSON.parse(e.data);
    state.samples.push(s);
    if (state.samples.length > 120) state.samples.shift();
    state.last = s;
    onSample();
  });
}

function onSample() {
  if (state.view === "monitor") renderMonitor();
  if (state.view === "projections") renderProjections();
}

// ---------- monitor ----------

function renderMonitor() {
  const s = state.last;
  if (!s) return;
  showBanner($("m-error"), s.error ? { code: s.error.code, message: "the status could not be read: " + s.error.message } : null);
  $("m-updated").textContent = "Context " + s.context + " · updated " + fmtTime(s.time).replace(/\.\d+Z$/, "Z");
  $("m-eps").textContent = fmtRate(s.events_per_sec);
  $("m-events-total").textContent = fmtInt.format(s.events_total);
  $("m-entities").textContent = fmtInt.format(s.entities);
  $("m-actors").textContent = fmtInt.format(s.live_actors) + " live actors in memory";
  $("m-shards").innerHTML = `${s.shards_online}<small>/ ${s.shards_total}</small>`;
  $("m-shards-hint").textContent = s.shards_online < s.shards_total ? (s.shards_total - s.shards_online) + " offline or moving" : "all shards open";
  $("m-nodes").textContent = s.nodes.length;
  $("m-nodes-hint").textContent = s.nodes.map((n) => n.name).join(", ") || "no node answered";
  $("m-relay").textContent = fmtInt.format(s.relay_lag);
  const mem = s.memory;
  $("m-memory").textContent = fmtBytes(mem.heap_alloc);
  $("m-mem-node").textContent = mem.node ? "· " + mem.node : "";
  $("m-memory-hint").textContent = `heap in use · ${fmtBytes(mem.sys)} from the OS · ${mem.goroutines} goroutines`;
  const lat = s.commit_latency;
  $("m-latency-card").hidden = !lat;
  if (lat) {
    if (lat.commits === 0) {
      $("m-latency").innerHTML = `–<small>idle</small>`;
      $("m-latency-hint").textContent = `no commits in the last ${Math.round(lat.window_seconds)} s`;
    } else {
      $("m-latency").innerHTML = `${fmtMs(lat.p50_ms)}<small>ms p50</small>`;
      $("m-latency-hint").textContent = `p95 ${fmtMs(lat.p95_ms)} · p99 ${fmtMs(lat.p99_ms)} ms · ${fmtInt.format(lat.commits)} commits, ${Math.round(lat.window_seconds)} s`;
    }
  }
  drawChart();
  renderShardMap(s);
  const tb = $("m-projections").querySelector("tbody");
  tb.innerHTML = s.projections.length ? s.projections.map((p) => `<tr>
      <td><b>${esc(p.name)}</b></td><td>${stateBadge(p)}</td>
      <td class="num">${fmtInt.format(p.applied_stream_seq)}</td><td class="num">${fmtInt.format(p.lag)}</td>
      <td class="num">${esc(replicaSummary(p))}</td></tr>`).join("")
    : `<tr><td colspan="5" class="muted">No projector answered.</td></tr>`;
}

// replicaSummary counts a projection's projector replicas, naming those
// that did not answer: each node's projector keeps its own copy.
function replicaSummary(p) {
  const rs = p.replicas || [];
  if (!rs.length) return "1";
  const gone = rs.filter((r) => r.state === "unavailable").map((r) => r.node);
  return gone.length ? `${rs.length - gone.length} of ${rs.length} (${gone.join(", ")} unavailable)` : String(rs.length);
}

function stateBadge(p) {
  const st = p.rebuild && p.rebuild.state !== "done" ? "rebuilding" : (p.state || "none");
  return `<span class="badge ${esc(st)}">${esc(st)}</span>`;
}

function renderShardMap(s) {
  const byN = new Map(s.shards.map((sh) => [sh.shard, sh]));
  const total = Math.max(s.shards_total, ...s.shards.map((sh) => sh.shard + 1), 0);
  const owners = new Set();
  let html = "";
  for (let n = 0; n < total; n++) {
    const sh = byN.get(n);
    if (!sh) {
      html += `<div class="shard offline" title="no node serves shard ${n}"><div class="n">#${String(n).padStart(2, "0")}</div><div class="owner">offline</div><div class="figs">&nbsp;</div></div>`;
      continue;
    }
    owners.add(sh.owner);
    const lag = sh.relay_lag > 0 ? `<span class="lag" title="relay lag">+${fmtInt.format(sh.relay_lag)}</span>` : "";
    html += `<div class="shard" style="--c:${hue(sh.owner)}" title="shard ${n} · owner ${esc(sh.owner)} · position ${esc(sh.position || "–")} · published ${esc(sh.published || "–")}">
      <div class="n">#${String(n).padStart(2, "0")}${lag}</div>
      <div class="owner">${esc(sh.owner)}</div>
      <div class="figs">${fmtInt.format(sh.events)} ev · ${fmtInt.format(sh.entities)} ent</div></div>`;
  }
  const map = $("m-shardmap");
  layoutShardMap(map, total);
  map.innerHTML = html;
  $("m-legend").innerHTML = [...owners].map((o) => `<span><i style="background:${hue(o)}"></i>${esc(o)}</span>`).join("");
}

// layoutShardMap sizes the tiles to the shard count (full cards up to 32
// shards, compact ones up to 128, colour tiles beyond, the details in each
// tile's tooltip) and picks a column count that divides the shards, so the
// last row is full: 16 shards lay out 8+8 or 4x4, never 5+5+5+1.
function layoutShardMap(map, total) {
  const density = total <= 32 ? "full" : total <= 128 ? "compact" : "dense";
  const minTile = { full: 112, compact: 62, dense: 30 }[density];
  const gap = density === "dense" ? 4 : 8;
  const width = map.clientWidth || 600;
  const maxCols = Math.max(1, Math.floor((width + gap) / (minTile + gap)));
  let cols = Math.min(maxCols, total || 1);
  for (let c = cols; c >= Math.ceil(cols / 2); c--) {
    if (total % c === 0) { cols = c; break; }
  }
  map.dataset.density = density;
  map.dataset.cols = String(cols);
  map.style.gridTemplateColumns = `repeat(${cols}, minmax(0, 1fr))`;
  map.style.gap = gap + "px";
}

function drawChart() {
  const c = $("m-chart");
  const dpr = window.devicePixelRatio || 1;
  const w = c.clientWidth, h = c.clientHeight;
  if (!w) return;
  if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) { c.width = Math.round(w * dpr); c.height = Math.round(h * dpr); }
  const g = c.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  const pts = state.samples.map((s) => ({ t: new Date(s.time).getTime(), v: s.events_per_sec }));
  const left = 56, right = 12, top = 12, bottom = 26;
  const pw = w - left - right, ph = h - top - bottom;
  const now = pts.length ? pts[pts.length - 1].t : Date.now();
  const span = 120000, t0 = now - span;
  let maxV = Math.max(10, ...pts.map((p) => p.v));
  const step = niceStep(maxV / 4);
  maxV = Math.ceil(maxV / step) * step;
  g.font = "11px system-ui, -apple-system, Segoe UI, Roboto, sans-serif";
  g.fillStyle = "#6b7385"; g.strokeStyle = "#edf0f4"; g.lineWidth = 1;
  g.textAlign = "right"; g.textBaseline = "middle";
  for (let v = 0; v <= maxV + 1e-9; v += step) {
    const y = top + ph - (v / maxV) * ph;
    g.beginPath(); g.moveTo(left, Math.round(y) + 0.5); g.lineTo(w - right, Math.round(y) + 0.5); g.stroke();
    g.fillText(fmtInt.format(v), left - 8, y);
  }
  g.textAlign = "center"; g.textBaseline = "top";
  for (let s = 0; s <= 120; s += 30) {
    const x = left + pw - (s / 120) * pw;
    g.fillText(s === 0 ? "now" : `-${s}s`, x, top + ph + 8);
  }
  const xy = (p) => [left + ((p.t - t0) / span) * pw, top + ph - (p.v / maxV) * ph];
  const vis = pts.filter((p) => p.t >= t0 - 1000);
  if (vis.length < 2) {
    g.fillStyle = "#9aa1b0"; g.textBaseline = "middle";
    g.fillText("collecting samples…", left + pw / 2, top + ph / 2);
    return;
  }
  g.save();
  g.beginPath(); g.rect(left, top, pw, ph + 1); g.clip();
  const grad = g.createLinearGradient(0, top, 0, top + ph);
  grad.addColorStop(0, "rgba(224,104,58,0.28)"); grad.addColorStop(1, "rgba(224,104,58,0.02)");
  g.beginPath();
  vis.forEach((p, i) => { const [x, y] = xy(p); i ? g.lineTo(x, y) : g.moveTo(x, y); });
  const [lx] = xy(vis[vis.length - 1]), [fx] = xy(vis[0]);
  g.lineTo(lx, top + ph); g.lineTo(fx, top + ph); g.closePath();
  g.fillStyle = grad; g.fill();
  g.beginPath();
  vis.forEach((p, i) => { const [x, y] = xy(p); i ? g.lineTo(x, y) : g.moveTo(x, y); });
  g.strokeStyle = "#e0683a"; g.lineWidth = 2; g.lineJoin = "round"; g.stroke();
  const [ex, ey] = xy(vis[vis.length - 1]);
  g.beginPath(); g.arc(ex, ey, 3.5, 0, Math.PI * 2); g.fillStyle = "#e0683a"; g.fill();
  g.restore();
}

function niceStep(x) {
  const p = Math.pow(10, Math.floor(Math.log10(x)));
  const f = x / p;
  return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * p;
}

// ---------- entity browser ----------

const ent = { id: "", version: 0, events: [], next: null, sel: 0, seq: 0, timer: 0 };

// The browser pages through the entities read model: a prefix, a filter on
// one state field, 25 rows a page. Cursors of the pages seen so far make
// "Prev" work; the count comes with the first page.
const browse = { prefix: "", where: "", cursors: [""], page: 0, count: null, capped: false, next: "", seq: 0 };
const browseLimit = 25;

async function loadBrowse() {
  const seq = ++browse.seq;
  const q = new URLSearchParams({ limit: String(browseLimit) });
  if (browse.prefix) q.set("prefix", browse.prefix);
  if (browse.where) q.set("where", browse.where);
  if (browse.cursors[browse.page]) q.set("cursor", browse.cursors[browse.page]);
  try {
    const r = await api("/api/entities?" + q);
    if (seq !== browse.seq) return;
    showBanner($("browse-error"), null);
    if (r.count !== undefined && r.count !== null) { browse.count = r.count; browse.capped = !!r.count_capped; }
    browse.next = r.next_cursor || "";
    const rows = r.rows || [];
    $("browse-table").querySelector("tbody").innerHTML = rows.map((row) => `<tr>
        <td><a class="mono" href="#/entity/${encodeURIComponent(row.entity)}">${esc(row.entity)}</a></td>
        <td class="num">${fmtInt.format(row.version)}</td>
        <td class="mono">${esc(fmtTime(row.updated_at))}</td>
        <td class="mono state-cell" title="${esc(JSON.stringify(row.state))}">${esc(JSON.stringify(row.state))}</td></tr>`).join("") ||
      `<tr><td colspan="4" class="muted">No entity matches.</td></tr>`;
    const what = [browse.prefix && `prefix ${browse.prefix}`, browse.where && `where ${browse.where}`].filter(Boolean).join(", ");
    $("browse-count").textContent = browse.count === null ? "" :
      `${fmtInt.format(browse.count)}${browse.capped ? "+" : ""} ${browse.count === 1 ? "entity" : "entities"}${what ? " · " + what : ""}`;
    const pages = browse.count === null ? null : Math.max(1, Math.ceil(browse.count / browseLimit));
    $("browse-page").textContent = `page ${browse.page + 1}${pages ? " of " + fmtInt.format(pages) + (browse.capped ? "+" : "") : ""}`;
    $("browse-prev").disabled = browse.page === 0;
    $("browse-next").disabled = !browse.next;
  } catch (e) {
    if (seq !== browse.seq) return;
    showBanner($("browse-error"), e);
  }
}

$("browse-form").addEventListener("submit", (e) => {
  e.preventDefault();
  browse.prefix = $("browse-prefix").value.trim();
  browse.where = $("browse-where").value.trim();
  browse.cursors = [""]; browse.page = 0; browse.count = null;
  loadBrowse();
});
$("browse-next").addEventListener("click", () => {
  if (!browse.next) return;
  browse.cursors[browse.page + 1] = browse.next;
  browse.page++;
  loadBrowse();
});
$("browse-prev").addEventListener("click", () => {
  if (browse.page === 0) return;
  browse.page--;
  loadBrowse();
});

let suggestTimer = 0;
$("entity-input").addEventListener("input", () => {
  clearTimeout(suggestTimer);
  const prefix = $("entity-input").value.trim();
  if (!prefix) return;
  suggestTimer = setTimeout(async () => {
    try {
      const r = await api("/api/entities?limit=20&prefix=" + encodeURIComponent(prefix));
      $("entity-suggestions").innerHTML = (r.rows || []).map((row) => `<option value="${esc(row.entity)}">`).join("");
    } catch (_) { /* suggestions are a nicety */ }
  }, 200);
});

$("entity-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const id = $("entity-input").value.trim();
  if (id) location.hash = "#/entity/" + encodeURIComponent(id);
});

async function openEntity(id, atVersion) {
  showBanner($("entity-error"), null);
  if (!id) {
    ent.id = "";
    $("entity-view").hidden = true; $("entity-empty").hidden = false;
    loadBrowse();
    return;
  }
  $("entity-input").value = id;
  if (id === ent.id && ent.version) { // same entity: only move the slider
    selectVersion(atVersion || ent.version, false);
    return;
  }
  ent.id = id; ent.events = []; ent.next = null; ent.version = 0;
  $("entity-empty").hidden = true;
  try {
    const cur = await api(`/api/entities/${encodeURIComponent(id)}`);
    if (ent.id !== id) return;
    ent.version = cur.version;
    ent.current = cur;
    $("entity-id").textContent = id;
    $("entity-meta").textContent = `version ${cur.version} · created ${fmtTime(cur.created_at)} · updated ${fmtTime(cur.updated_at)}`;
    $("export-link").href = `/api/entities/${encodeURIComponent(id)}/export`;
    $("export-link").setAttribute("download", id + ".json");
    $("attime-input").placeholder = cur.created_at;
    $("slider").max = cur.version;
    $("slider-max").textContent = "v" + cur.version;
    $("entity-view").hidden = false;
    await loadHistory(1);
    selectVersion(atVersion && atVersion <= cur.version ? atVersion : cur.version, false);
  } catch (e) {
    if (ent.id !== id) return;
    $("entity-view").hidden = true;
    $("entity-empty").hidden = false;
    const msg = e.code === "entity_forgotten" ? `${id} was forgotten: its events and key are gone.` :
      e.code === "not_found" ? `No entity ${id}: nothing was ever written to it.` : e.message;
    showBanner($("entity-error"), { code: e.code, message: msg });
    loadBrowse();
    ent.id = "";
  }
}

// loadHistory appends one page of up to 200 events to the timeline.
async function loadHistory(from) {
  const id = ent.id;
  const h = await api(`/api/entities/${encodeURIComponent(id)}/history?from=${from}&limit=200`);
  if (ent.id !== id) return;
  ent.events.push(...h.events);
  ent.next = h.next_version;
  renderTimeline();
}

$("timeline-more").addEventListener("click", async () => {
  if (ent.next) {
    try { await loadHistory(ent.next); } catch (e) { toast(e.message, true); }
  }
});

function renderTimeline() {
  $("timeline").innerHTML = ent.events.slice().reverse().map((ev) => `
    <li class="ev" data-v="${ev.version}">
      <div class="ev-head"><span class="ev-v">v${ev.version}</span><span class="ev-type">${esc(ev.type)}</span>
      <span class="ev-time" title="${esc(ev.time)}">${fmtTime(ev.time)}</span></div>
      <pre class="json">${prettyJSON(ev.data)}</pre></li>`).join("");
  $("timeline-caption").textContent = ent.next ? `newest first · ${ent.events.length} of ${ent.version} events loaded` : `newest first · ${ent.events.length} events`;
  $("timeline-more").hidden = !ent.next;
  markTimeline();
}

function markTimeline() {
  document.querySelectorAll("#timeline .ev").forEach((li) => {
    const v = parseInt(li.dataset.v, 10);
    li.classList.toggle("sel", v === ent.sel);
    li.classList.toggle("future", v > ent.sel);
  });
}

$("timeline").addEventListener("click", (e) => {
  const li = e.target.closest(".ev");
  if (li) selectVersion(parseInt(li.dataset.v, 10), true);
});

// selectVersion shows the state at version v (read with at_version), and
// keeps the slider, the timeline and the address in step.
function selectVersion(v, updateHash) {
  v = Math.max(1, Math.min(ent.version, v | 0));
  ent.sel = v;
  $("slider").value = v;
  $("state-version").textContent = v === ent.version ? `version ${v} (current)` : `version ${v}`;
  $("v-prev").disabled = v <= 1; $("v-next").disabled = v >= ent.version;
  markTimeline();
  if (updateHash) history.replaceState(null, "", `#/entity/${encodeURIComponent(ent.id)}?v=${v}`);
  clearTimeout(ent.timer);
  ent.timer = setTimeout(() => fetchState(v), 80);
}

async function fetchState(v) {
  const seq = ++ent.seq, id = ent.id;
  $("state-json").classList.add("loading");
  try {
    const r = v === ent.version && ent.current ? ent.current : await api(`/api/entities/${encodeURIComponent(id)}?at_version=${v}`);
    if (seq !== ent.seq) return;
    showState(r);
  } catch (e) {
    if (seq === ent.seq) showBanner($("entity-error"), e);
  }
}

function showState(r) {
  $("state-json").innerHTML = prettyJSON(r.state);
  $("state-json").dataset.version = r.version;
  $("state-json").classList.remove("loading");
  const ev = ent.events.find((e) => e.version === r.version);
  $("state-caption").textContent = ev ? `after ${ev.type} · ${fmtTime(ev.time)}` : `as of ${fmtTime(r.updated_at)}`;
}

$("slider").addEventListener("input", () => selectVersion(parseInt($("slider").value, 10), true));
$("v-prev").addEventListener("click", () => selectVersion(ent.sel - 1, true));
$("v-next").addEventListener("click", () => selectVersion(ent.sel + 1, true));

$("attime-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const t = $("attime-input").value.trim();
  if (!t || !ent.id) return;
  try {
    const r = await api(`/api/entities/${encodeURIComponent(ent.id)}?at_time=${encodeURIComponent(t)}`);
    ent.seq++;
    ent.sel = r.version; $("slider").value = r.version;
    $("state-version").textContent = `version ${r.version} at ${t}`;
    markTimeline();
    showState(r);
  } catch (err) { toast(err.message, true); }
});

// Forget: the operator types the id to confirm.
$("forget-open").addEventListener("click", () => {
  $("forget-name").textContent = ent.id;
  $("forget-confirm").value = ""; $("forget-reason").value = "";
  $("forget-go").disabled = true;
  showBanner($("forget-error"), null);
  $("forget-dialog").showModal();
  $("forget-confirm").focus();
});
$("forget-confirm").addEventListener("input", () => { $("forget-go").disabled = $("forget-confirm").value !== ent.id; });
$("forget-form").addEventListener("submit", (e) => e.preventDefault());
$("forget-cancel").addEventListener("click", () => $("forget-dialog").close());
$("forget-go").addEventListener("click", async () => {
  const id = ent.id;
  $("forget-go").disabled = true;
  try {
    const r = await api(`/api/entities/${encodeURIComponent(id)}/forget`, { body: { confirm: $("forget-confirm").value, reason: $("forget-reason").value } });
    $("forget-dialog").close();
    toast(`${id} forgotten: ${r.events_deleted} events deleted.`);
    ent.id = "";
    openEntity(id, null);
  } catch (e) {
    showBanner($("forget-error"), e);
    $("forget-go").disabled = false;
  }
});

// ---------- projections ----------

function renderProjections() {
  const s = state.last;
  if (!s) return;
  showBanner($("p-error"), s.error ? { code: s.error.code, message: "the status could not be read: " + s.error.message } : null);
  const list = $("p-list");
  if (!s.projections.length) {
    list.innerHTML = `<div class="empty"><div class="empty-title">No projections</div><div class="muted">No projector of context ${esc(s.context)} answered.</div></div>`;
    return;
  }
  // Keep the cards (and the buttons under the pointer) when only figures change.
  const key = s.projections.map((p) => p.name + "|" + p.state + "|" + (p.error ? p.error.position : "") + "|" + (p.rebuild ? p.rebuild.state : "")).join(",");
  if (list.dataset.key !== key) {
    list.dataset.key = key;
    list.innerHTML = s.projections.map(projCard).join("");
  }
  for (const p of s.projections) fillProj(p);
}

function projCard(p) {
  const n = esc(p.name);
  const stuck = p.error ? `<div class="stuck"><b>${p.state === "retrying" ? "Retrying after an error" : "Stopped at an event it could not apply"}</b>
      <div class="msg">${esc(p.error.message)}</div>
      <dl>${p.error.position ? `<dt>position</dt><dd>${esc(p.error.position)}</dd>` : ""}
        ${p.error.entity ? `<dt>entity</dt><dd><a href="#/entity/${encodeURIComponent(p.error.entity)}">${esc(p.error.entity)}</a></dd>` : ""}
        ${p.error.event_type ? `<dt>event type</dt><dd>${esc(p.error.event_type)}</dd>` : ""}
        <dt>since</dt><dd>${esc(fmtTime(p.error.since))}</dd></dl></div>` : "";
  const canAct = !!p.error;
  return `<div class="card proj" data-name="${n}">
    <div class="proj-top"><span class="proj-name">${n}</span>${stateBadge(p)}
      <div class="actions">
        <button class="btn small" data-act="retry" ${canAct ? "" : "disabled"} title="try the stuck event again">Retry</button>
        <button class="btn small danger" data-act="skip" ${canAct && p.error.position ? "" : "disabled"} title="skip the stuck event (recorded)">Skip event</button>
        <button class="btn small" data-act="rebuild" title="build a fresh copy from the first event; queries keep answering">Rebuild</button>
      </div></div>
    <div class="proj-figs">
      <div class="fig"><div class="label">Messages applied</div><div class="v" data-f="applied"></div></div>
      <div class="fig"><div class="label">Lag</div><div class="v" data-f="lag"></div></div>
      <div class="fig"><div class="label">Generation</div><div class="v" data-f="gen"></div></div>
      <div class="fig"><div class="label">Skipped</div><div class="v" data-f="skipped"></div></div>
      <div class="fig"><div class="label">Node</div><div class="v" data-f="node"></div></div>
    </div>
    ${stuck}
    <div class="progress" data-f="rebuild" hidden></div>
    <div class="replicas" data-f="replicas" hidden></div>
    <div class="positions" data-f="positions"></div>
  </div>`;
}

function fillProj(p) {
  const card = document.querySelector(`.proj[data-name="${CSS.escape(p.name)}"]`);
  if (!card) return;
  const f = (k) => card.querySelector(`[data-f="${k}"]`);
  f("applied").textContent = fmtInt.format(p.applied_stream_seq);
  f("lag").textContent = fmtInt.format(p.lag);
  f("gen").textContent = p.generation;
  f("skipped").textContent = fmtInt.format(p.skipped);
  f("node").textContent = p.node || "–";
  const pos = Object.entries(p.positions || {}).sort((a, b) => a[0].localeCompare(b[0], undefined, { numeric: true }));
  f("positions").innerHTML = pos.length ? "Positions: " + pos.map(([, v]) => `<code>${esc(v)}</code>`).join("") : "No events applied yet.";
  // Every replica's own copy: the figures above are the one furthest behind.
  const rs = p.replicas || [], rel = f("replicas");
  rel.hidden = rs.length < 2;
  if (rs.length >= 2) {
    rel.innerHTML = `<table class="table"><thead><tr><th>Replica (node)</th><th>State</th><th class="num">Messages applied</th><th class="num">Lag</th><th class="num">Generation</th></tr></thead><tbody>${
      rs.map((r) => `<tr><td>${esc(r.node)}</td><td>${stateBadge(r)}</td><td class="num">${fmtInt.format(r.applied_stream_seq)}</td>
        <td class="num">${fmtInt.format(r.lag)}</td><td class="num">${r.state === "unavailable" ? "–" : r.generation}</td></tr>`).join("")}</tbody></table>`;
  }
  const rb = p.rebuild, el = f("rebuild");
  el.hidden = !rb;
  if (rb) {
    const pct = Math.round((rb.progress || 0) * 100);
    el.innerHTML = `<div class="muted">Rebuild, generation ${rb.generation}: <b>${esc(rb.state)}</b> · ${fmtInt.format(rb.applied_stream_seq)} of ${fmtInt.format(rb.target_stream_seq)} messages (${pct}%)
      ${rb.error ? ` · <span style="color:var(--red)">${esc(rb.error.message)}</span>` : ""}</div><div class="bar"><i style="width:${pct}%"></i></div>`;
  }
}

$("p-list").addEventListener("click", async (e) => {
  const b = e.target.closest("button[data-act]");
  if (!b) return;
  const name = b.closest(".proj").dataset.name, act = b.dataset.act;
  const p = (state.last.projections || []).find((x) => x.name === name);
  const body = act === "skip" ? { position: p && p.error ? p.error.position : "" } : {};
  if (act === "skip" && !confirm(`Skip the event at ${body.position} in ${name}? It will be recorded as skipped and never applied.`)) return;
  b.disabled = true;
  try {
    const out = await api(`/api/projections/${encodeURIComponent(name)}/${act}`, { body });
    toast((act === "rebuild" ? `Rebuild of ${name} started; progress shows below.` : act === "retry" ? `${name} retries the event.` : `${name} skipped the event at ${body.position}.`) + fanoutNote(out));
  } catch (err) {
    toast(err.message, true);
  } finally {
    b.disabled = false;
  }
});

// fanoutNote says which projector replicas did not apply an admin command.
function fanoutNote(out) {
  if (!out || !out.replicas || out.replicas.length < 2 && !(out.missing || []).length) return "";
  const failed = out.replicas.filter((r) => !r.applied).map((r) => `${r.node} (${r.error ? r.error.message : "refused"})`);
  const missing = out.missing || [];
  let s = ` Applied on ${out.replicas.filter((r) => r.applied).length} of ${out.replicas.length + missing.length} replicas.`;
  if (failed.length) s += ` Refused by ${failed.join(", ")}.`;
  if (missing.length) s += ` No answer from ${missing.join(", ")}.`;
  return s;
}

// ---------- start ----------

async function start() {
  try {
    state.info = await api("/api/info");
    $("ctx-name").textContent = state.info.context;
    const m = $("mode-pill");
    m.textContent = state.info.allow_writes ? "writes allowed" : "read-only";
    m.className = "pill mode " + (state.info.allow_writes ? "rw" : "ro");
    m.title = state.info.allow_writes ? "forget, retry, skip and rebuild are allowed from this console" :
      "forget, retry, skip and rebuild are refused: this console was started read-only";
  } catch (e) {
    toast("The console's API did not answer: " + e.message, true);
  }
  window.addEventListener("hashchange", route);
  window.addEventListener("resize", () => { if (state.view === "monitor") drawChart(); });
  route();
  connect();
}
start();
