// /dashboard/k-factor: the K-factor report of `dashboard:k_factor` (join param `days`), live.

import {
  api, badge, chartWidth, connect, fmtHours, fmtInt, fmtNum, fmtPct, follow, h, humanize, isNum,
  joinError, metric, replace, requireAdmin, svg, table,
} from "./common.js";

const session = await requireAdmin();
const PERIODS = session.periods || [7, 14, 30, 90];
const TARGET = session.k_target || 1.2;

const select = document.getElementById("period");
const fromUrl = Number(new URLSearchParams(window.location.search).get("days"));
let days = PERIODS.includes(fromUrl) ? fromUrl : 7;
select.value = String(days);

const socket = connect(session);
const channel = follow(socket, "dashboard:k_factor", { days }, render, joinError);

select.addEventListener("change", () => {
  days = Number(select.value);
  const url = new URL(window.location.href);
  url.searchParams.set("days", String(days));
  window.history.replaceState(null, "", url.pathname + url.search);
  document.getElementById("main").setAttribute("aria-busy", "true");
  channel.join({ days }); // the server replaces the old join: pushes now carry this window
});

// ---------------------------------------------------------------- loop efficiency (REST, on each change)

let loopsBusy = false;
let loopsAgain = false;

async function loadLoops() {
  if (loopsBusy) {
    loopsAgain = true;
    return;
  }
  loopsBusy = true;
  const asked = days;
  const { ok, data } = await api(session, "GET", `/api/metrics/loops?days=${asked}`);
  loopsBusy = false;
  if (ok && asked === days) renderLoops(data.loops || []);
  if (loopsAgain || asked !== days) {
    loopsAgain = false;
    loadLoops();
  }
}

const BANDS = {
  scale: ["Scale", "good", "K ≥ 1.2: give it more users"],
  continue: ["Continue", "ok", "self-sustaining: keep it on"],
  optimise: ["Optimise", "warn", "close to 1: work on its conversion"],
  deprioritise: ["Deprioritise", "bad", "K < 0.8: returns little for its prompts"],
};

function renderLoops(loops) {
  const filtered = loops.some((l) => "k_factor_filtered" in l);
  const columns = [
    { key: "source", label: "Loop", fmt: humanize },
    { key: "k_factor", label: "K", numeric: true, fmt: (v) => fmtNum(v, 2) },
    filtered && { key: "k_factor_filtered", label: "K (fraud-filtered)", numeric: true, fmt: (v) => fmtNum(v, 2) },
    {
      key: "recommendation",
      label: "Recommendation",
      cell: (row) => {
        const [text, kind, why] = BANDS[row.recommendation] || [row.recommendation, "neutral", ""];
        return h("span", {}, badge(text, kind, { "data-metric": "recommendation", "data-value": row.recommendation }),
          why ? h("span", { class: "why" }, ` ${why}`) : null);
      },
    },
    { key: "invites_sent", label: "Invites", numeric: true, fmt: fmtInt },
    { key: "signups", label: "Signups", numeric: true, fmt: fmtInt },
    { key: "conversion_rate", label: "Conversion", numeric: true, fmt: (v) => fmtPct(v) },
    { key: "conversions_per_referrer", label: "Per referrer", numeric: true, fmt: (v) => fmtNum(v, 2) },
    { key: "mean_cycle_hours", label: "Mean cycle", numeric: true, fmt: fmtHours },
  ].filter(Boolean);
  replace("loops", table({
    id: "loops-table",
    caption: `Loop efficiency, last ${days} days`,
    columns,
    rows: loops.map((l) => ({ ...l, __key: l.source })),
    csvName: `loop-efficiency-${days}d`,
    empty: "No loop has sent invites in this window.",
  }));
}

// ---------------------------------------------------------------- the report

function kStatus(k) {
  if (!isNum(k)) return ["No data", "neutral"];
  if (k >= TARGET) return [`On target (≥ ${fmtNum(TARGET, 1)})`, "good"];
  if (k >= 1) return ["Self-sustaining, below target", "ok"];
  if (k >= 0.8) return ["Below target", "warn"];
  return ["Far below target", "bad"];
}

function card(title, key, value, text, ...sub) {
  return h(
    "article",
    { class: "card", "data-card": key },
    h("h3", {}, title),
    h("p", { class: "big" }, metric(key, value, text)),
    sub.length ? h("p", { class: "sub" }, sub) : null,
  );
}

function renderCards(r) {
  const cards = [];
  const [status, kind] = kStatus(r.k_factor);
  cards.push(card("K-factor", "k_factor", r.k_factor, fmtNum(r.k_factor, 2),
    badge(status, kind, { "data-status": "k_factor" }), h("span", { class: "block" }, `target ${fmtNum(TARGET, 1)}`)));
  if ("k_factor_filtered" in r) {
    const [fstatus, fkind] = kStatus(r.k_factor_filtered);
    const held = [];
    if ("flagged" in r) held.push(metric("flagged", r.flagged, fmtInt(r.flagged)), " flagged");
    if ("pending" in r) held.push(", ", metric("pending", r.pending, fmtInt(r.pending)), " pending");
    cards.push(card("K-factor, fraud-filtered", "k_factor_filtered", r.k_factor_filtered,
      fmtNum(r.k_factor_filtered, 2), badge(fstatus, fkind, { "data-status": "k_factor_filtered" }),
      held.length ? h("span", { class: "block" }, "excludes ", held, " conversions") : null));
  }
  cards.push(card("Invites sent", "invites_sent", r.invites_sent, fmtInt(r.invites_sent),
    "by ", metric("referrers", r.referrers, fmtInt(r.referrers)), r.referrers === 1 ? " referrer" : " referrers"));
  cards.push(card("Invites per user", "invites_per_user", r.invites_per_user, fmtNum(r.invites_per_user, 2),
    "of ", metric("active_users", r.active_users, fmtInt(r.active_users)), " active users"));
  cards.push(card("Conversion rate", "conversion_rate", r.conversion_rate, fmtPct(r.conversion_rate),
    metric("clicks", r.clicks, fmtInt(r.clicks)), r.clicks === 1 ? " unique click" : " unique clicks"));
  const signupSub = "signups_filtered" in r
    ? [metric("signups_filtered", r.signups_filtered, fmtInt(r.signups_filtered)), " after the fraud filter; "]
    : [];
  cards.push(card("Signups", "signups", r.signups, fmtInt(r.signups), signupSub,
    metric("k_per_referrer", r.k_per_referrer, fmtNum(r.k_per_referrer, 2)), " per referrer"));
  cards.push(card("Activated", "activated", r.activated, fmtInt(r.activated),
    r.signups ? [fmtPct(r.activated / r.signups, 0), " of signups"] : "reached first value"));
  const ct = r.cycle_time || {};
  cards.push(card("Cycle time (median)", "median_hours", ct.median_hours, fmtHours(ct.median_hours),
    "p90 ", metric("p90_hours", ct.p90_hours, fmtHours(ct.p90_hours)), " · invite → signup"));
  replace("cards", cards);
}

function renderTimeline(rows) {
  const series = [
    { key: "invites_sent", label: "Invites sent", cls: "s1" },
    { key: "clicks", label: "Clicks", cls: "s2" },
    { key: "signups", label: "Signups", cls: "s3" },
  ];
  const W = chartWidth(document.getElementById("timeline"));
  const H = W < 500 ? 180 : 240;
  const pad = { l: 44, r: 24, t: 12, b: 28 };
  const max = Math.max(1, ...rows.flatMap((d) => series.map((s) => d[s.key] || 0)));
  const step = niceStep(max);
  const top = Math.ceil(max / step) * step;
  const x = (i) => pad.l + (rows.length <= 1 ? 0 : (i * (W - pad.l - pad.r)) / (rows.length - 1));
  const y = (v) => H - pad.b - (v / top) * (H - pad.t - pad.b);
  const grid = [];
  for (let v = 0; v <= top + 1e-9; v += step) {
    grid.push(svg("line", { x1: pad.l, x2: W - pad.r, y1: y(v), y2: y(v), class: "grid" }));
    grid.push(svg("text", { x: pad.l - 6, y: y(v) + 4, class: "tick", "text-anchor": "end" }, fmtInt(v)));
  }
  const every = Math.max(1, Math.ceil(rows.length / Math.max(2, Math.floor(W / 90))));
  const labels = rows.map((d, i) => {
    const last = i === rows.length - 1;
    if (!last && (i % every !== 0 || rows.length - 1 - i < every / 2)) return null;
    const anchor = i === 0 ? "start" : last ? "end" : "middle";
    return svg("text", { x: x(i), y: H - 8, class: "tick", "text-anchor": anchor }, d.date.slice(5));
  });
  const lines = series.map((s) => {
    const points = rows.map((d, i) => `${x(i).toFixed(1)},${y(d[s.key] || 0).toFixed(1)}`).join(" ");
    const dots = rows.map((d, i) =>
      svg("circle", { cx: x(i), cy: y(d[s.key] || 0), r: 3, class: `dot ${s.cls}` },
        svg("title", {}, `${d.date}: ${fmtInt(d[s.key] || 0)} ${s.label.toLowerCase()}`)),
    );
    return svg("g", { "data-series": s.key }, svg("polyline", { points, class: `line ${s.cls}` }), dots);
  });
  const total = (key) => rows.reduce((a, d) => a + (d[key] || 0), 0);
  const summary = series.map((s) => `${fmtInt(total(s.key))} ${s.label.toLowerCase()}`).join(", ");
  const chart = svg(
    "svg",
    { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-labelledby": "tl-title tl-desc", class: "timeline", id: "timeline-svg" },
    svg("title", { id: "tl-title" }, `Daily invites, clicks and signups, last ${days} days`),
    svg("desc", { id: "tl-desc" }, `In total ${summary}.`),
    grid,
    labels,
    lines,
  );
  const legend = h("ul", { class: "legend" },
    series.map((s) => h("li", {}, h("span", { class: `key ${s.cls}`, "aria-hidden": "true" }), s.label)));
  const data = h("details", {}, h("summary", {}, "Show the numbers"), table({
    id: "timeline-table",
    caption: "Daily timeline",
    columns: [
      { key: "date", label: "Day" },
      { key: "invites_sent", label: "Invites", numeric: true, fmt: fmtInt },
      { key: "clicks", label: "Clicks", numeric: true, fmt: fmtInt },
      { key: "signups", label: "Signups", numeric: true, fmt: fmtInt },
      ...(rows.some((d) => "signups_filtered" in d)
        ? [{ key: "signups_filtered", label: "Signups (filtered)", numeric: true, fmt: fmtInt }]
        : []),
    ],
    rows: rows.map((d) => ({ ...d, __key: d.date })),
    csvName: `timeline-${days}d`,
  }));
  replace("timeline", legend, chart, data);
}

function niceStep(max) {
  const raw = max / 4;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const n = raw / mag;
  const step = (n <= 1 ? 1 : n <= 2 ? 2 : n <= 5 ? 5 : 10) * mag;
  return Math.max(1, step);
}

function renderFunnel(stages) {
  const W = Math.min(chartWidth(document.getElementById("funnel"), 420), 640);
  const rowH = 34;
  const max = Math.max(1, ...stages.map((s) => s.count));
  const bars = stages.map((s, i) => {
    const w = Math.max(2, (s.count / max) * (W - 150));
    return svg("g", { transform: `translate(0 ${i * rowH})`, "data-stage": s.stage },
      svg("text", { x: 0, y: 20, class: "label" }, humanize(s.stage)),
      svg("rect", { x: 90, y: 6, width: w, height: 20, rx: 3, class: "bar" }),
      svg("text", { x: 96 + w, y: 21, class: "value" }, fmtInt(s.count)));
  });
  const chart = svg("svg", { viewBox: `0 0 ${W} ${stages.length * rowH}`, role: "img", "aria-label": "Funnel: " +
    stages.map((s) => `${humanize(s.stage)} ${fmtInt(s.count)}`).join(", "), class: "funnel" }, bars);
  replace("funnel", chart, table({
    id: "funnel-table",
    caption: "Funnel stages",
    columns: [
      { key: "stage", label: "Stage", fmt: humanize },
      { key: "count", label: "Count", numeric: true, fmt: fmtInt },
      { key: "rate_from_previous", label: "Rate from previous", numeric: true, fmt: (v) => fmtPct(v) },
    ],
    rows: stages.map((s) => ({ ...s, __key: s.stage })),
    csvName: `funnel-${days}d`,
  }));
}

function renderSources(rows) {
  const filtered = rows.some((r) => "k_factor_filtered" in r);
  replace("sources", table({
    id: "sources-table",
    caption: `K by loop source, last ${days} days`,
    columns: [
      { key: "source", label: "Source", fmt: humanize },
      { key: "k_factor", label: "K", numeric: true, fmt: (v) => fmtNum(v, 2) },
      filtered && { key: "k_factor_filtered", label: "K (filtered)", numeric: true, fmt: (v) => fmtNum(v, 2) },
      { key: "invites_sent", label: "Invites", numeric: true, fmt: fmtInt },
      { key: "signups", label: "Signups", numeric: true, fmt: fmtInt },
      { key: "conversion_rate", label: "Conversion", numeric: true, fmt: (v) => fmtPct(v) },
    ].filter(Boolean),
    rows: rows.map((r) => ({ ...r, __key: r.source })),
    csvName: `k-by-source-${days}d`,
    empty: "No invites in this window.",
  }));
}

function renderCohorts(rows) {
  replace("cohorts", table({
    id: "cohorts-table",
    caption: "Weekly signup cohorts",
    columns: [
      { key: "cohort", label: "Week of" },
      { key: "size", label: "Size", numeric: true, fmt: fmtInt },
      { key: "signups", label: "Signups brought", numeric: true, fmt: fmtInt },
      { key: "k_factor", label: "Cohort K", numeric: true, fmt: (v) => fmtNum(v, 2) },
    ],
    rows: rows.map((r) => ({ ...r, __key: r.cohort })),
    csvName: `cohorts-${days}d`,
    empty: "No signups in this window.",
  }));
}

function renderReferrers(rows) {
  const filtered = rows.some((r) => "conversions_filtered" in r);
  replace("referrers", table({
    id: "referrers-table",
    caption: "Top referrers by conversions",
    columns: [
      { key: "user_id", label: "User" },
      { key: "conversions", label: "Conversions", numeric: true, fmt: fmtInt },
      filtered && { key: "conversions_filtered", label: "After fraud filter", numeric: true, fmt: fmtInt },
      { key: "invites_sent", label: "Invites", numeric: true, fmt: fmtInt },
      { key: "conversion_rate", label: "Conversion", numeric: true, fmt: (v) => fmtPct(v) },
    ].filter(Boolean),
    rows: rows.slice(0, 10).map((r) => ({ ...r, __key: r.user_id })),
    csvName: `top-referrers-${days}d`,
    empty: "No conversions in this window.",
  }));
}

let last = null;
let resizeTimer = null;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => {
    if (!last) return;
    renderTimeline(last.timeline || []);
    renderFunnel(last.funnel || []);
  }, 150);
});

function render(report) {
  if (!report || report.days !== days) return; // a late answer for another window
  last = report;
  document.getElementById("main").removeAttribute("aria-busy");
  const w = document.getElementById("window-days");
  w.textContent = String(report.days);
  w.dataset.value = String(report.days);
  renderCards(report);
  renderTimeline(report.timeline || []);
  renderSources(report.by_source || []);
  renderFunnel(report.funnel || []);
  renderCohorts(report.cohorts || []);
  renderReferrers(report.top_referrers || []);
  document.body.dataset.rendered = String(Number(document.body.dataset.rendered || 0) + 1);
  loadLoops();
}
