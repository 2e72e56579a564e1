"use strict";
const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const embedded = JSON.parse($("data").textContent);
const token = new URLSearchParams(location.search).get("token");

function text(v, digits) { return v === null || v === undefined ? "\u2013" : v.toFixed(digits); }
function clock(t) { return new Date(t * 1000).toLocaleTimeString(); }
function ago(s) {
  s = Math.max(0, s);
  if (s < 60) return Math.round(s) + " s ago";
  return s < 3600 ? Math.round(s / 60) + " min ago" : (s / 3600).toFixed(1) + " h ago";
}
function node(tag, content, attrs) {
  const e = document.createElement(tag);
  if (content !== undefined) e.textContent = content;
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}
function svgNode(tag, attrs, content) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (content !== undefined) e.textContent = content;
  return e;
}

// Round numbers for an axis (Heckbert, "Nice numbers for graph labels", Graphics Gems, 1990): a
// step of 1, 2 or 5 times a power of ten, and the range widened to whole steps.
function niceNumber(x, round) {
  const power = Math.pow(10, Math.floor(Math.log10(x))), f = x / power;
  const nice = round ? (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) : (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10);
  return nice * power;
}
function niceTicks(lo, hi, count) {
  const step = niceNumber(niceNumber(hi - lo, false) / (count - 1), true);
  const first = Math.floor(lo / step + 1e-9), last = Math.ceil(hi / step - 1e-9);
  const digits = Math.max(0, -Math.floor(Math.log10(step) + 1e-9));
  const values = [];
  for (let i = first; i <= last; i++) values.push(i * step);
  // toFixed with the step's own decimals: 0.2, 0.4 (never 0.6000000000000001).
  return {lo: first * step, hi: last * step, values: values, labels: values.map((v) => v.toFixed(digits))};
}

// The rounds' `key` as a line with dots; `also`, if given, a second (dashed) line on the same axes.
function chart(svg, rows, key, also) {
  const series = (k) => rows.filter((r) => r[k] !== null && r[k] !== undefined).map((r) => [r.round, r[k]]);
  const pts = series(key), more = also ? series(also) : [];
  svg.replaceChildren();
  svg.dataset.points = pts.length;
  svg.dataset.values = pts.map((p) => p[1].toPrecision(6)).join(" ");
  svg.dataset.also = more.map((p) => p[1].toPrecision(6)).join(" ");
  const W = 480, H = 220, L = 52, R = 14, T = 10, B = 30;
  if (!pts.length) {
    svg.dataset.ticks = "";
    svg.append(svgNode("text", {x: W / 2, y: H / 2, "text-anchor": "middle"}, "no rounds yet"));
    return;
  }
  const x0 = pts[0][0], x1 = Math.max(pts[pts.length - 1][0], x0 + 1);
  const all = pts.concat(more);
  let y0 = all.reduce((m, p) => Math.min(m, p[1]), Infinity), y1 = all.reduce((m, p) => Math.max(m, p[1]), -Infinity);
  const pad = (y1 - y0) * 0.08 || Math.abs(y0) * 0.1 || 0.5;
  y0 = y0 >= 0 ? Math.max(0, y0 - pad) : y0 - pad;  // a loss or an accuracy never shown below 0
  y1 += pad;
  const ticks = niceTicks(y0, y1, 5);
  svg.dataset.ticks = ticks.labels.join(" ");
  const X = (x) => L + (x - x0) / (x1 - x0) * (W - L - R);
  const Y = (y) => H - B - (y - ticks.lo) / (ticks.hi - ticks.lo) * (H - T - B);
  ticks.values.forEach((y, i) => {
    svg.append(svgNode("line", {class: "grid", x1: L, x2: W - R, y1: Y(y), y2: Y(y)}));
    svg.append(svgNode("text", {x: L - 6, y: Y(y) + 4, "text-anchor": "end"}, ticks.labels[i]));
  });
  const step = Math.max(1, niceNumber((x1 - x0) / 8, true));  // rounds: whole steps of 1, 2, 5, 10, ...
  for (let x = Math.ceil(x0 / step) * step; x <= x1; x += step) {
    svg.append(svgNode("text", {x: X(x), y: H - B + 16, "text-anchor": "middle"}, String(x)));
  }
  svg.append(svgNode("text", {x: W - R, y: H - 2, "text-anchor": "end"}, "round"));
  svg.append(svgNode("line", {class: "axis", x1: L, x2: L, y1: T, y2: H - B}));
  svg.append(svgNode("line", {class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B}));
  const line = (series, extra) => {
    const points = series.map((p) => X(p[0]).toFixed(1) + "," + Y(p[1]).toFixed(1)).join(" ");
    svg.append(svgNode("polyline", {class: "line" + extra, points: points}));
    for (const p of series) {
      const dot = svgNode("circle", {class: extra.trim(), cx: X(p[0]).toFixed(1), cy: Y(p[1]).toFixed(1), r: 3});
      dot.append(svgNode("title", {}, "round " + p[0] + ": " + p[1].toPrecision(5)));
      svg.append(dot);
    }
  };
  line(pts, "");
  if (more.length) line(more, " also");
}

function drawClients(state) {
  const body = $("clients-body");
  body.replaceChildren();
  for (const c of state.clients) {
    const tr = node("tr", undefined, {"data-client": c.id});
    for (const v of [c.id, c.address, clock(c.connected_at), ago(state.now - c.last_seen)]) {
      tr.append(node("td", String(v)));
    }
    body.append(tr);
  }
  $("client-count").textContent = state.clients.length;
  $("no-clients").hidden = state.clients.length > 0;
}

function drawTask(state) {
  const t = state.task, box = $("task");
  box.replaceChildren();
  if (!t) { box.append(node("p", "no round has started yet", {class: "muted"})); return; }
  const refused = new Map(t.refused.map((r) => [r.client, r.reason]));
  const arrived = new Set(t.arrived);
  const waiting = t.expected.filter((c) => !arrived.has(c) && !refused.has(c));
  box.dataset.task = t.id;
  box.append(node("p", "round " + t.round + " (task " + t.id + (t.done ? ", done" : "") + "): " + t.arrived.length +
    " of " + t.expected.length + " updates arrived, " + t.refused.length + " refused" +
    (t.done ? "" : ", " + waiting.length + " awaited")));
  const chips = node("ul", undefined, {class: "chips"});
  for (const c of t.expected) {
    const status = arrived.has(c) ? "arrived" : refused.has(c) ? "refused" : t.done ? "no update" : "waiting";
    chips.append(node("li", "client " + c + ": " + status, {"data-status": status}));
  }
  box.append(chips);
  if (t.refused.length) {
    const list = node("ul");
    for (const r of t.refused) list.append(node("li", "client " + r.client + ": " + r.reason));
    box.append(list);
  }
}

function draw(state) {
  const run = state.run || {}, rows = state.rounds, last = rows.length ? rows[rows.length - 1] : null;
  const metric = run.metric || "accuracy";
  $("name").textContent = run.name || "";
  $("setup").textContent = run.dataset ? [run.dataset, run.model, run.strategy].join(" \u00b7 ") : "";
  $("status").textContent = state.status;
  $("round").textContent = (last ? last.round : "\u2013") + (run.rounds ? " / " + run.rounds : "");
  $("metric-label").textContent = "test " + metric;
  $("metric").textContent = text(last && last.metric, 4);
  $("loss").textContent = text(last && last.loss, 4);
  // The clients' own models on their own held-out data, in the last round that evaluated them.
  const own = rows.filter((r) => r.personalized !== null && r.personalized !== undefined), mine = own[own.length - 1];
  $("personalized-card").hidden = !mine;
  $("personalized-label").textContent = "personalized " + metric + (mine && last && mine.round !== last.round ?
    " (round " + mine.round + ")" : "");
  $("personalized").textContent = text(mine && mine.personalized, 4);
  $("personalized-spread").textContent = mine && mine.personalized_p10 !== null && mine.personalized_p90 !== null ?
    "p10 " + mine.personalized_p10.toFixed(3) + ", p90 " + mine.personalized_p90.toFixed(3) : "";
  $("metric-title").textContent = "test " + metric + " per round" + (own.length ? " (dashed: personalized)" : "");
  const eps = rows.filter((r) => r.epsilon !== null);
  $("epsilon").textContent = eps.length ? eps[eps.length - 1].epsilon.toFixed(3) : "not private";
  $("connected").textContent = state.static ? "\u2013" : state.clients.length;
  chart($("chart-metric"), rows, "metric", "personalized");
  chart($("chart-loss"), rows, "loss");
  drawClients(state);
  drawTask(state);
  const log = $("log");
  log.replaceChildren();
  for (const line of state.log.slice().reverse()) {
    const li = node("li");
    li.append(node("time", clock(line.time)), document.createTextNode(line.message));
    log.append(li);
  }
  $("no-log").hidden = state.log.length > 0;
  $("updated").textContent = state.static ? "a finished run's report" : "updated " + clock(state.now);
}

async function poll() {
  try {
    const headers = token ? {Authorization: "Bearer " + token} : {};
    const response = await fetch("api/state", {cache: "no-store", headers: headers});
    if (response.ok) draw(await response.json());
    else $("status").textContent = "dashboard: HTTP " + response.status;
  } catch (e) {
    $("status").textContent = "server unreachable (the run may have ended)";
  }
  setTimeout(poll, 1000);
}

if (embedded) { document.body.classList.add("static"); draw(embedded); } else { poll(); }
