// /dashboard/guardrails: the report of `dashboard:guardrails` (live): alerts, what is paused (with an
// unpause button), health per loop and experiment against the thresholds, refusals, fraud holds.

import {
  announce, api, badge, connect, fmtInt, fmtNum, fmtPct, follow, h, humanize, isNum, joinError,
  metric, replace, requireAdmin, table, timeEl,
} from "./common.js";

const session = await requireAdmin();
let report = null;

const socket = connect(session);
follow(socket, "dashboard:guardrails", {}, (view) => {
  report = view;
  render();
}, joinError);

document.getElementById("check-now").addEventListener("click", async (event) => {
  const button = event.currentTarget;
  button.disabled = true;
  const { ok, data } = await api(session, "POST", "/api/guardrails/check");
  button.disabled = false;
  if (!ok) {
    announce(`The check failed: ${(data && data.error) || "error"}`, "error");
    return;
  }
  report = data;
  render();
  const open = (data.alerts || []).filter((a) => a.state === "open").length;
  announce(`Checked: ${open} open alert${open === 1 ? "" : "s"}.`);
});

// ---------------------------------------------------------------- formatting per metric

const COUNTS = new Set(["invite_spam_rate", "max_per_sender", "prompts", "shown", "recipients", "exposed"]);

function fmtMetric(name, v) {
  if (!isNum(v)) return "—";
  if (name === "k_factor") return fmtNum(v, 2);
  if (name === "sessions_per_user" || name === "sessions_per_user_before") return fmtNum(v, 2);
  if (name.startsWith("session_minutes") && !name.endsWith("_drop")) return `${fmtNum(v, 1)} min`;
  if (name === "invite_spam_rate" || name === "max_per_sender") return fmtNum(v, 1);
  if (COUNTS.has(name)) return fmtInt(v);
  return fmtPct(v, 1);
}

const LABELS = {
  opt_out_rate: "Opt-out rate",
  complaint_rate: "Complaint rate",
  invite_spam_rate: "Invites per sender per day",
  max_per_sender: "Most by one sender",
  rejection_rate: "Refused by the gate",
  delivery_failure_rate: "Delivery failures",
  sessions_per_user: "Sessions per user",
  session_minutes: "Session minutes",
  sessions_per_user_drop: "Drop in sessions per user",
  session_minutes_drop: "Drop in session minutes",
  k_factor: "K-factor (7 days)",
};

function label(name) {
  return LABELS[name] || humanize(name);
}

function thresholdFor(scope, name) {
  return ((report && report.thresholds) || []).find((t) => t.scope === scope && t.metric === name) || null;
}

/** "critical" | "warn" | null for a value against its threshold. */
function level(t, v) {
  if (!t || !isNum(v)) return null;
  const crossed = (limit) => isNum(limit) && (t.direction === "below" ? v <= limit : v >= limit);
  if (crossed(t.critical)) return "critical";
  if (crossed(t.warn)) return "warn";
  return null;
}

function thresholdText(t, name) {
  if (!t) return "";
  const dir = t.direction === "below" ? "≤" : "≥";
  const parts = [`warn ${dir} ${fmtMetric(name, t.warn)}`];
  if (isNum(t.critical)) parts.push(`critical ${dir} ${fmtMetric(name, t.critical)}`);
  return parts.join(" · ");
}

/** A metric cell: the value, and when a threshold is crossed, a badge saying so (not only colour). */
function metricCell(scope, name, value) {
  const t = thresholdFor(scope, name);
  const lvl = level(t, value);
  return h("span", { class: lvl ? `lvl-${lvl}` : null },
    metric(name, value, fmtMetric(name, value), lvl ? { "data-level": lvl } : {}),
    lvl ? [" ", badge(lvl, lvl === "critical" ? "critical" : "warn")] : null);
}

function headerFor(scope, name) {
  const t = thresholdFor(scope, name);
  if (!t) return label(name);
  return h("span", {}, label(name), h("span", { class: "th-sub" }, thresholdText(t, name)));
}

// ---------------------------------------------------------------- sections

function renderAlerts() {
  const open = (report.alerts || []).filter((a) => a.state === "open");
  replace("alerts", table({
    id: "alerts-table",
    caption: open.length ? `${open.length} open alert${open.length === 1 ? "" : "s"}` : "No open alerts",
    columns: [
      { key: "level", label: "Level", cell: (a) => badge(a.level, a.level === "critical" ? "critical" : "warn", { "data-metric": "level", "data-value": a.level }) },
      { key: "metric", label: "Metric", fmt: label },
      { key: "scope", label: "Scope" },
      { key: "value", label: "Value", numeric: true, fmt: (v, a) => fmtMetric(a.metric, v) },
      { key: "threshold", label: "Threshold", numeric: true, fmt: (v, a) => fmtMetric(a.metric, v) },
      { key: "action", label: "Action taken", fmt: (v) => v || "alert only" },
      { key: "webhook", label: "Webhook" },
      { key: "created_at", label: "Opened", cell: (a) => timeEl(a.created_at) },
    ],
    rows: open.map((a) => ({ ...a, __key: `${a.metric}:${a.scope}` })),
    csvName: "guardrail-alerts",
    empty: "All clear: no threshold is crossed.",
  }));
}

function unpauseButton(scope) {
  return h("button", {
    type: "button",
    class: "small",
    "data-unpause": scope,
    "aria-label": `Unpause ${scope}`,
    onclick: async (event) => {
      const button = event.currentTarget;
      button.disabled = true;
      const { ok, data } = await api(session, "POST", "/api/guardrails/unpause", { scope });
      if (!ok) {
        button.disabled = false;
        announce(`Could not unpause ${scope}: ${(data && data.error) || "error"}`, "error");
        return;
      }
      announce(`Unpaused ${scope}.`);
      // The push brings the new report; until then, take it off the list here.
      if (scope.startsWith("loop:")) {
        report.paused.loops = report.paused.loops.filter((l) => `loop:${l.loop}` !== scope);
      } else {
        report.paused.experiments = report.paused.experiments.filter((k) => `experiment:${k}` !== scope);
      }
      renderPaused();
      document.getElementById("h-paused").setAttribute("tabindex", "-1");
      document.getElementById("h-paused").focus();
    },
  }, "Unpause");
}

function renderPaused() {
  const paused = report.paused || { loops: [], experiments: [] };
  const rows = [
    ...(paused.loops || []).map((l) => ({
      __key: `loop:${l.loop}`, scope: `loop:${l.loop}`, kind: "Loop", name: l.loop, reason: l.reason, by: l.by, at: l.at,
    })),
    ...(paused.experiments || []).map((k) => ({
      __key: `experiment:${k}`, scope: `experiment:${k}`, kind: "Experiment", name: k, reason: "", by: "", at: null,
    })),
  ];
  replace("paused", table({
    id: "paused-table",
    caption: rows.length ? "Paused loops and experiments" : "Nothing is paused",
    columns: [
      { key: "kind", label: "Kind" },
      { key: "name", label: "Name", cell: (r) => (r.kind === "Experiment"
        ? h("a", { href: `/dashboard/experiments/${encodeURIComponent(r.name)}` }, r.name) : h("span", {}, r.name)) },
      { key: "reason", label: "Why", fmt: (v) => v || "a critical guardrail alert" },
      { key: "by", label: "By", fmt: (v) => v || "guardrails" },
      { key: "at", label: "When", cell: (r) => timeEl(r.at) },
      { key: "unpause", label: "Action", cell: (r) => unpauseButton(r.scope), csv: () => "" },
    ],
    rows,
    csvName: "guardrail-paused",
    empty: "Nothing is paused.",
  }));
}

function renderLoops() {
  const loops = Object.entries(report.loops || {}).map(([name, m]) => ({ ...m, loop: name, __key: name }));
  const metrics = ["opt_out_rate", "complaint_rate", "invite_spam_rate", "max_per_sender", "rejection_rate", "delivery_failure_rate"];
  replace("loops", table({
    id: "loop-health",
    caption: `Health per loop, last ${fmtNum(report.window_hours, 0)} hours`,
    columns: [
      { key: "loop", label: "Loop", fmt: humanize },
      { key: "shown", label: "Prompts shown", numeric: true, fmt: fmtInt },
      { key: "recipients", label: "Recipients", numeric: true, fmt: fmtInt },
      ...metrics.map((name) => ({ key: name, label: headerFor("loop", name), numeric: true, cell: (r) => metricCell("loop", name, r[name]) })),
    ],
    rows: loops,
    csvName: "guardrail-loops",
  }));
}

function renderExperiments() {
  const rows = [];
  for (const [key, e] of Object.entries(report.experiments || {})) {
    rows.push({ __key: key, experiment: key, status: e.status, variant: "all (worst arm)", opt_out_rate: e.opt_out_rate,
      complaint_rate: e.complaint_rate, exposed: null, sessions_per_user: null, session_minutes: null, top: true });
    for (const [variant, v] of Object.entries(e.variants || {})) {
      rows.push({ __key: `${key}:${variant}`, experiment: key, status: e.status, variant, ...v });
    }
  }
  replace("experiments", table({
    id: "experiment-health",
    caption: "Health per running experiment and variant",
    columns: [
      { key: "experiment", label: "Experiment", cell: (r) => h("a", { href: `/dashboard/experiments/${encodeURIComponent(r.experiment)}` }, r.experiment) },
      { key: "status", label: "Status", cell: (r) => badge(r.status, r.status === "paused" ? "paused" : r.status === "running" ? "running" : "neutral") },
      { key: "variant", label: "Variant" },
      { key: "exposed", label: "Exposed", numeric: true, fmt: fmtInt },
      { key: "opt_out_rate", label: headerFor("experiment", "opt_out_rate"), numeric: true,
        cell: (r) => (r.top ? metricCell("experiment", "opt_out_rate", r.opt_out_rate) : metric("opt_out_rate", r.opt_out_rate, fmtPct(r.opt_out_rate))) },
      { key: "complaint_rate", label: headerFor("experiment", "complaint_rate"), numeric: true,
        cell: (r) => (r.top ? metricCell("experiment", "complaint_rate", r.complaint_rate) : metric("complaint_rate", r.complaint_rate, fmtPct(r.complaint_rate))) },
      { key: "sessions_per_user", label: "Sessions per user", numeric: true, fmt: (v) => fmtNum(v, 2) },
      { key: "session_minutes", label: "Session minutes", numeric: true, fmt: (v) => (isNum(v) ? fmtNum(v, 1) : "—") },
    ],
    rows,
    csvName: "guardrail-experiments",
    empty: "No experiment is running or paused.",
  }));
}

function renderGlobal() {
  const g = report.global || {};
  const rows = [
    { metric: "sessions_per_user", now: g.sessions_per_user, before: g.sessions_per_user_before, check: "sessions_per_user_drop", drop: g.sessions_per_user_drop },
    { metric: "session_minutes", now: g.session_minutes, before: g.session_minutes_before, check: "session_minutes_drop", drop: g.session_minutes_drop },
    { metric: "k_factor", now: g.k_factor, before: null, check: "k_factor", drop: null },
  ].map((r) => ({ ...r, __key: r.metric }));
  replace("global", table({
    id: "global-health",
    caption: "This window against the one before",
    columns: [
      { key: "metric", label: "Metric", fmt: label },
      { key: "now", label: "Now", numeric: true, cell: (r) => (r.check === r.metric ? metricCell("global", r.metric, r.now) : metric(r.metric, r.now, fmtMetric(r.metric, r.now))) },
      { key: "before", label: "Before", numeric: true, fmt: (v, r) => (r.metric === "k_factor" ? "" : fmtMetric(r.metric, v)) },
      { key: "drop", label: "Drop", numeric: true, cell: (r) => (r.metric === "k_factor" ? h("span", {}, "") : metricCell("global", r.check, r.drop)) },
    ],
    rows,
    csvName: "guardrail-global",
  }));
}

function renderThresholds() {
  replace("thresholds", table({
    id: "thresholds-table",
    caption: "Warn opens an alert; critical also pauses the loop or experiment (not the K-factor)",
    columns: [
      { key: "metric", label: "Metric", fmt: label },
      { key: "scope", label: "Scope" },
      { key: "direction", label: "Crossed when", fmt: (v) => (v === "below" ? "at or below" : "at or above") },
      { key: "warn", label: "Warn", numeric: true, fmt: (v, t) => fmtMetric(t.metric, v) },
      { key: "critical", label: "Critical", numeric: true, fmt: (v, t) => (isNum(v) ? fmtMetric(t.metric, v) : "—") },
    ],
    rows: (report.thresholds || []).map((t) => ({ ...t, __key: `${t.scope}:${t.metric}` })),
    csvName: "guardrail-thresholds",
  }));
}

function renderRefusals() {
  const rows = Object.entries(report.refusals_by_reason || {})
    .map(([reason, count]) => ({ reason, count, __key: reason }))
    .sort((a, b) => b.count - a.count || a.reason.localeCompare(b.reason));
  const total = rows.reduce((a, r) => a + r.count, 0);
  replace("refusals", table({
    id: "refusals-table",
    caption: `${fmtInt(total)} prompt${total === 1 ? "" : "s"} refused by the compliance gate`,
    columns: [
      { key: "reason", label: "Reason", fmt: humanize },
      { key: "count", label: "Refusals", numeric: true, fmt: fmtInt },
      { key: "share", label: "Share", numeric: true, cell: (r) => h("span", {}, fmtPct(total ? r.count / total : 0, 0)), csv: (r) => (total ? r.count / total : 0) },
    ],
    rows,
    csvName: "compliance-refusals",
    empty: "Nothing was refused in this window.",
  }));
}

function renderFraud() {
  const f = report.fraud;
  if (!f) {
    replace("fraud", h("p", { class: "hint" }, "This server does not report fraud holds."));
    return;
  }
  replace("fraud", h("div", { class: "cards" },
    h("article", { class: "card" }, h("h3", {}, "Flagged conversions"),
      h("p", { class: "big" }, metric("flagged", f.flagged, fmtInt(f.flagged))),
      h("p", { class: "sub" }, "held out of the fraud-filtered K")),
    h("article", { class: "card" }, h("h3", {}, "Pending review"),
      h("p", { class: "big" }, metric("pending", f.pending, fmtInt(f.pending))),
      h("p", { class: "sub" }, "not yet counted as clean"))),
  h("p", {}, h("a", { href: "/dashboard/k-factor" }, "Compare raw and filtered K on the K-factor page")));
}

function render() {
  if (!report) return;
  const w = document.getElementById("window");
  w.textContent = fmtNum(report.window_hours, 0);
  w.dataset.value = String(report.window_hours);
  renderAlerts();
  renderPaused();
  renderLoops();
  renderExperiments();
  renderGlobal();
  renderThresholds();
  renderRefusals();
  renderFraud();
}
