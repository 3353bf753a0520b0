// /dashboard/experiments/{key}: one experiment's results from `dashboard:experiment:{key}` (live),
// its definition from `dashboard:experiments`, and its lifecycle buttons.

import {
  announce, api, badge, chartWidth, confirmInline, confirming, connect, fmtInt, fmtP, fmtPct, fmtSignedPct, follow, h, isNum,
  metric, replace, requireAdmin, STATUS_KIND, svg, table, timeEl,
} from "./common.js";

const session = await requireAdmin();
const key = decodeURIComponent(window.location.pathname.split("/").filter(Boolean).pop());
document.title = `${key} · Experiments · viral-engine dashboards`;
replace("exp-title", `Experiment ${key}`);

let definition = null;
let results = null;

const socket = connect(session);
follow(socket, `dashboard:experiment:${key}`, {}, (view) => {
  results = view;
  renderResults();
  renderActions();
}, (reply) => {
  const reason = (reply.response && reply.response.reason) || reply.status;
  replace("errors", h("p", { class: "error", role: "alert" }, `No live results: ${reason}`));
});
follow(socket, "dashboard:experiments", {}, (view) => {
  const found = (view.experiments || []).find((e) => e.key === key);
  if (found) {
    definition = found;
    renderDefinition();
    renderActions();
  } else {
    replace("definition", h("p", { class: "error" }, `There is no experiment ${key}.`));
  }
});

// ---------------------------------------------------------------- lifecycle

function status() {
  return (results && results.status) || (definition && definition.status) || "draft";
}

function variantKeys() {
  return ((definition && definition.variants) || (results && results.variants) || []).map((v) => v.key);
}

function renderActions() {
  if (confirming()) return; // re-rendered once the question is answered
  const s = status();
  const parts = [badge(s, STATUS_KIND[s] || "neutral", { id: "exp-status", "data-metric": "status", "data-value": s })];
  const b = (action, label, cls = "") =>
    h("button", { type: "button", class: cls || null, "data-action": action, onclick: () => lifecycle(action) }, label);
  if (s === "draft" || s === "paused") parts.push(b("start", s === "draft" ? "Start" : "Resume"));
  if (s === "running") parts.push(b("pause", "Pause", "secondary"));
  if (s === "running" || s === "paused") parts.push(b("stop", "Stop", "danger"));
  if (s !== "draft" && !(results && results.winner)) {
    const select = h("select", { id: "winner-variant" },
      variantKeys().map((v) => h("option", { value: v }, v)));
    if (results && results.recommendation && results.recommendation.variant) select.value = results.recommendation.variant;
    parts.push(h("span", { class: "actions" }, h("label", { for: "winner-variant" }, "Winner"), select,
      b("winner", "Declare winner", "secondary")));
  }
  const focused = document.activeElement && document.activeElement.dataset ? document.activeElement.dataset.action : null;
  replace("exp-actions", parts);
  if (focused) document.querySelector(`#exp-actions [data-action="${focused}"]`)?.focus();
}

async function lifecycle(action) {
  let body;
  if (action === "winner") {
    const variant = document.getElementById("winner-variant").value;
    const sure = await confirmInline('#exp-actions [data-action="winner"]', `Stop ${key} with ${variant} as the winner?`);
    renderActions();
    if (!sure) return;
    body = { variant };
  } else if (action === "stop") {
    const sure = await confirmInline('#exp-actions [data-action="stop"]', `Stop ${key} for good?`);
    renderActions();
    if (!sure) return;
  }
  const { ok, data } = await api(session, "POST", `/api/experiments/${encodeURIComponent(key)}/${action}`, body);
  if (!ok) {
    announce(`Could not ${action}: ${(data && data.error) || "error"}`, "error");
    return;
  }
  announce(`${key} is now ${data.status}${data.winner ? `, winner ${data.winner}` : ""}.`);
  definition = data;
  if (results) results = { ...results, status: data.status, winner: data.winner };
  renderDefinition();
  renderActions();
}

// ---------------------------------------------------------------- definition

function renderDefinition() {
  const d = definition;
  if (!d) return;
  const facts = [
    ["Name", d.name],
    ["Hypothesis", d.hypothesis || "—"],
    ["Loop", d.loop || "—"],
    ["Target metric", d.target_metric],
    ["Guardrail metrics", (d.guardrail_metrics || []).join(", ") || "—"],
    ["Variants", d.variants.map((v, i) => `${v.key}${i === 0 ? " (control)" : ""} ${fmtPct(v.weight, 0)}`).join(" · ")],
    ["Coverage", fmtPct(d.coverage, 0)],
    ["Conversion window", `${d.window_days} days`],
    ["Minimum detectable effect", fmtPct(d.mde, 1)],
    ["Created", timeEl(d.created_at)],
    ["Started", timeEl(d.started_at)],
    ["Stopped", timeEl(d.stopped_at)],
  ];
  replace("definition", h("dl", { class: "facts" }, facts.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
    d.status !== "stopped" ? h("p", {}, h("a", { href: "/dashboard/experiments" }, "Edit on the experiments page")) : null);
}

// ---------------------------------------------------------------- results

const ACTIONS = {
  ship: ["Ship", "good"],
  keep_running: ["Keep running", "ok"],
  no_difference: ["No difference", "neutral"],
  stop: ["Stop", "bad"],
  check_setup: ["Check the setup", "bad"],
};

let resizeTimer = null;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => results && renderIntervals(results.variants || []), 150);
});

function renderResults() {
  const r = results;
  const banners = [];
  if (r.srm) {
    banners.push(h("div", { class: "banner bad", role: "alert", id: "srm-warning" },
      h("strong", {}, "Sample ratio mismatch. "),
      "The exposures do not match the weights (SRM p = ", metric("srm_p_value", r.srm_p_value, fmtP(r.srm_p_value)),
      "): assignment or exposure logging is broken, so the results cannot be trusted until it is fixed."));
  }
  if (r.winner) {
    banners.push(h("div", { class: "banner good" }, h("strong", {}, "Winner declared: "), r.winner));
  }
  const rec = r.recommendation || {};
  const [label, kind] = ACTIONS[rec.action] || [rec.action || "—", "neutral"];
  banners.push(h("div", { class: `banner ${kind}`, id: "recommendation", "data-metric": "recommendation", "data-value": rec.action || "" },
    h("strong", {}, `Recommendation: ${label}`), rec.variant ? ` (${rec.variant})` : "", rec.text ? ` — ${rec.text}` : ""));
  replace("banners", banners);

  const p = r.power || {};
  const statusFacts = [
    ["Mode", r.sequential
      ? h("span", {}, badge("Sequential", "good", { "data-metric": "sequential", "data-value": "true" }),
        ` always-valid intervals, tuned at ${fmtInt(r.sequential_tuning)} users: safe to peek`)
      : h("span", {}, badge("Fixed horizon", "ok", { "data-metric": "sequential", "data-value": "false" }),
        " read it once the sample size is reached")],
    ["Significance level", fmtPct(r.alpha, 0)],
    ["SRM p-value", h("span", {}, metric("srm_p_value", r.srm_p_value, fmtP(r.srm_p_value)), " ",
      r.srm ? badge("mismatch", "bad") : badge("ok", "good"))],
    ["Users needed per variant", metric("users_needed_per_variant", p.users_needed_per_variant, fmtInt(p.users_needed_per_variant))],
    ["Smallest variant so far", metric("smallest_variant_exposures", p.smallest_variant_exposures, fmtInt(p.smallest_variant_exposures))],
    ["Power reached", h("span", {}, metric("achieved_power", p.achieved_power, fmtPct(p.achieved_power, 0)), " ",
      p.reached ? badge("sample size reached", "good") : badge("not yet", "warn"))],
  ];
  replace("stats-status", h("dl", { class: "facts" }, statusFacts.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])));

  renderIntervals(r.variants || []);
  renderVariants(r);
  renderGuardrails(r.guardrails || []);
}

function renderVariants(r) {
  const seq = !!r.sequential;
  const ci = (lo, hi) => (row) => (isNum(row[lo]) && isNum(row[hi])
    ? h("span", {}, metric(lo, row[lo], fmtSignedPct(row[lo])), " to ", metric(hi, row[hi], fmtSignedPct(row[hi])))
    : h("span", {}, "—"));
  replace("variants-table", table({
    id: "results-table",
    caption: `Results for ${r.target_metric || "the target metric"}`,
    columns: [
      { key: "key", label: "Variant", cell: (v) => h("span", {}, v.key, v === r.variants[0] ? h("span", { class: "why" }, " control") : null) },
      { key: "weight", label: "Weight", numeric: true, fmt: (v) => fmtPct(v, 0) },
      { key: "exposures", label: "Sample size", numeric: true, fmt: fmtInt },
      { key: "conversions", label: "Conversions", numeric: true, fmt: fmtInt },
      { key: "rate", label: "Rate", numeric: true, fmt: (v) => fmtPct(v, 2) },
      { key: "lift", label: "Lift", numeric: true, fmt: (v) => fmtSignedPct(v) },
      { key: "ci", label: `${seq ? "Always-valid" : "95%"} CI`, numeric: true, cell: ci("ci_low", "ci_high"),
        csv: (v) => (isNum(v.ci_low) ? `${v.ci_low} ${v.ci_high}` : "") },
      { key: "abs_lift", label: "Absolute lift", numeric: true, fmt: (v) => (isNum(v) ? `${fmtSignedPct(v, 2)}` : "—") },
      { key: "p_value", label: "p-value", numeric: true, fmt: fmtP },
      { key: "p_value_adjusted", label: "p (Holm)", numeric: true, fmt: fmtP },
      seq && { key: "fixed_p_value", label: "p (fixed horizon)", numeric: true, fmt: fmtP },
      { key: "chance_to_beat_control", label: "Chance to beat control", numeric: true, fmt: (v) => fmtPct(v, 0) },
    ].filter(Boolean),
    rows: (r.variants || []).map((v) => ({ ...v, __key: v.key })),
    csvName: `experiment-${key}`,
    empty: "No variants.",
  }));
}

function renderIntervals(variants) {
  const arms = variants.slice(1);
  const rel = arms.some((v) => isNum(v.ci_low) && isNum(v.ci_high));
  const lo = rel ? "ci_low" : "abs_ci_low";
  const hi = rel ? "ci_high" : "abs_ci_high";
  const mid = rel ? "lift" : "abs_lift";
  const values = arms.flatMap((v) => [v[lo], v[hi], v[mid]]).filter(isNum);
  const extent = Math.max(0.05, ...values.map(Math.abs));
  const span = niceExtent(extent);
  const W = chartWidth(document.getElementById("intervals"), 720);
  const rowH = 40;
  const left = Math.min(160, Math.round(W * 0.25));
  const right = 20;
  const top = 10;
  const Hh = top + Math.max(1, arms.length) * rowH + 30;
  const x = (v) => left + ((v + span) / (2 * span)) * (W - left - right);
  const tickValues = W < 480 ? [-span, 0, span] : [-span, -span / 2, 0, span / 2, span];
  const ticks = tickValues.map((t) => [
    svg("line", { x1: x(t), x2: x(t), y1: top, y2: Hh - 24, class: t === 0 ? "zero" : "grid" }),
    svg("text", { x: x(t), y: Hh - 8, class: "tick", "text-anchor": t === span ? "end" : t === -span ? "start" : "middle" }, fmtSignedPct(t, 0)),
  ]);
  const rows = arms.map((v, i) => {
    const y = top + i * rowH + rowH / 2;
    const label = svg("text", { x: 0, y: y + 4, class: "label" }, v.key);
    if (!isNum(v[lo]) || !isNum(v[hi])) {
      return svg("g", { "data-variant": v.key }, label,
        svg("text", { x: left, y: y + 4, class: "tick" }, "not enough data for an interval yet"));
    }
    const clamp = (t) => Math.max(-span, Math.min(span, t));
    const kind = v[lo] > 0 ? "good" : v[hi] < 0 ? "bad" : "";
    return svg("g", { "data-variant": v.key, class: "interval" }, label,
      svg("line", { x1: x(clamp(v[lo])), x2: x(clamp(v[hi])), y1: y, y2: y, class: `ci ${kind}`, "data-ci": "bar" },
        svg("title", {}, `${v.key}: ${fmtSignedPct(v[lo])} to ${fmtSignedPct(v[hi])}`)),
      isNum(v[mid]) ? svg("circle", { cx: x(clamp(v[mid])), cy: y, r: 6, class: "point" },
        svg("title", {}, `${v.key}: lift ${fmtSignedPct(v[mid])}`)) : null);
  });
  const described = arms.map((v) => `${v.key}: ${isNum(v[mid]) ? fmtSignedPct(v[mid]) : "no estimate"}` +
    (isNum(v[lo]) ? ` (${fmtSignedPct(v[lo])} to ${fmtSignedPct(v[hi])})` : "")).join("; ");
  const chart = svg("svg", { viewBox: `0 0 ${W} ${Hh}`, class: "intervals", role: "img", "aria-labelledby": "iv-title iv-desc", id: "intervals-svg" },
    svg("title", { id: "iv-title" }, `${rel ? "Relative" : "Absolute"} lift against the control with its interval`),
    svg("desc", { id: "iv-desc" }, described || "No treatment arms."),
    ticks, rows);
  const note = h("p", { class: "hint" }, rel
    ? "Lift relative to the control's rate. A bar entirely right of the dashed line is a significant improvement, entirely left a significant harm."
    : "The control has no conversions yet, so the lift is shown in absolute percentage points.");
  replace("intervals", note, arms.length ? chart : h("p", {}, "This experiment has no treatment arm."));
}

function niceExtent(v) {
  for (const s of [0.05, 0.1, 0.2, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100]) if (v <= s) return s;
  return Math.ceil(v);
}

function renderGuardrails(rows) {
  replace("guardrails", table({
    id: "experiment-guardrails",
    caption: "Guardrail metrics per treatment (a significantly higher rate of a bad event is harm)",
    columns: [
      { key: "metric", label: "Metric" },
      { key: "variant", label: "Variant" },
      { key: "harmed", label: "Harmed", cell: (g) => (g.harmed ? badge("harmed", "bad", { "data-metric": "harmed", "data-value": "true" })
        : badge("no harm seen", "good", { "data-metric": "harmed", "data-value": "false" })) },
      { key: "lift", label: "Lift", numeric: true, fmt: (v) => fmtSignedPct(v) },
      { key: "p_value", label: "p-value", numeric: true, fmt: fmtP },
    ],
    rows: rows.map((g) => ({ ...g, __key: `${g.metric}:${g.variant}` })),
    csvName: `experiment-${key}-guardrails`,
    empty: "No guardrail metrics are set for this experiment.",
  }));
}

