// /dashboard/experiments: the list of `dashboard:experiments` (live), lifecycle buttons, and the
// create/edit form (POST / PATCH /api/experiments).

import {
  announce, api, badge, confirmInline, confirming, connect, fmtPct, follow, h, joinError, metric, replace, requireAdmin,
  STATUS_KIND, table, timeEl,
} from "./common.js";

const session = await requireAdmin();
const EVENT_TYPES = (session.event_types || []).filter((t) => t !== "experiment_exposure");
const LOOPS = session.loops || [];

let experiments = [];
let editing = null; // the experiment being edited, or null for a new one

const socket = connect(session);
follow(socket, "dashboard:experiments", {}, (view) => {
  experiments = view.experiments || [];
  renderList();
}, joinError);

const filter = document.getElementById("status-filter");
filter.addEventListener("change", renderList);

// ---------------------------------------------------------------- the list

function actionButtons(exp) {
  const buttons = [];
  const b = (action, label, cls = "small") =>
    h("button", {
      type: "button",
      class: cls,
      "data-action": action,
      "data-key": exp.key,
      "aria-label": `${label} ${exp.key}`,
      onclick: () => lifecycle(exp.key, action),
    }, label);
  if (exp.status === "draft" || exp.status === "paused") buttons.push(b("start", exp.status === "draft" ? "Start" : "Resume"));
  if (exp.status === "running") buttons.push(b("pause", "Pause", "small secondary"));
  if (exp.status === "running" || exp.status === "paused") buttons.push(b("stop", "Stop", "small danger"));
  if (exp.status !== "stopped") {
    buttons.push(h("button", {
      type: "button",
      class: "small secondary",
      "data-action": "edit",
      "data-key": exp.key,
      "aria-label": `Edit ${exp.key}`,
      onclick: () => edit(exp),
    }, "Edit"));
  }
  return h("div", { class: "actions" }, buttons);
}

function renderList() {
  if (confirming()) return; // re-rendered once the question is answered
  const wanted = filter.value;
  const rows = experiments
    .filter((e) => !wanted || e.status === wanted)
    .map((e) => ({ ...e, __key: e.key }));
  replace("list", table({
    id: "experiments-table",
    caption: wanted ? `Experiments: ${wanted}` : "Experiments",
    columns: [
      { key: "key", label: "Key", cell: (e) => h("a", { href: `/dashboard/experiments/${encodeURIComponent(e.key)}`, "data-metric": "key", "data-value": e.key }, e.key) },
      { key: "name", label: "Name" },
      { key: "status", label: "Status", cell: (e) => {
        const parts = [badge(e.status, STATUS_KIND[e.status] || "neutral", { "data-metric": "status", "data-value": e.status })];
        if (e.winner) parts.push(h("span", { class: "why" }, ` winner ${e.winner}`));
        return h("span", {}, parts);
      } },
      { key: "loop", label: "Loop", fmt: (v) => v || "—" },
      { key: "variants", label: "Variants", cell: (e) => h("span", {}, e.variants.map((v, i) =>
        h("span", { class: "block", "data-variant": v.key }, `${v.key}${i === 0 ? " (control)" : ""} `, metric("weight", v.weight, fmtPct(v.weight, 0))))),
        csv: (e) => e.variants.map((v) => `${v.key}:${v.weight}`).join(" ") },
      { key: "coverage", label: "Coverage", numeric: true, fmt: (v) => fmtPct(v, 0) },
      { key: "target_metric", label: "Target" },
      { key: "started_at", label: "Started", cell: (e) => timeEl(e.started_at) },
      { key: "actions", label: "Actions", cell: actionButtons, csv: () => "" },
    ],
    rows,
    csvName: "experiments",
    empty: wanted ? `No ${wanted} experiments.` : "No experiments yet: create one below.",
  }));
}

async function lifecycle(key, action) {
  if (action === "stop") {
    const sure = await confirmInline(`[data-key="${CSS.escape(key)}"][data-action="stop"]`, `Stop ${key} for good?`);
    if (!sure) {
      renderList();
      return;
    }
  }
  const { ok, data } = await api(session, "POST", `/api/experiments/${encodeURIComponent(key)}/${action}`);
  if (!ok) {
    announce(`Could not ${action} ${key}: ${(data && data.error) || "error"}`, "error");
    return;
  }
  announce(`${key} is now ${data.status}.`);
  experiments = experiments.map((e) => (e.key === key ? data : e));
  renderList();
  document.querySelector(`[data-key="${CSS.escape(key)}"][data-action]`)?.focus();
}

// ---------------------------------------------------------------- the form

const form = document.getElementById("experiment-form");
const variantsBox = document.getElementById("variants");
const target = document.getElementById("f-target");
const loopSelect = document.getElementById("f-loop");
const guardBox = document.getElementById("f-guardrails");

for (const t of EVENT_TYPES) target.append(h("option", { value: t }, t));
target.value = EVENT_TYPES.includes("first_value") ? "first_value" : EVENT_TYPES[0];
for (const l of LOOPS) loopSelect.append(h("option", { value: l }, l));
for (const t of EVENT_TYPES) {
  const id = `g-${t}`;
  guardBox.append(h("span", { class: "field checkbox" },
    h("input", { type: "checkbox", id, name: "guardrail_metrics", value: t }),
    h("label", { for: id }, t)));
}

let variantSeq = 0;

function variantRow(v = {}, locked = false) {
  variantSeq += 1;
  const n = variantSeq;
  const field = (label, name, attrs) => h("div", { class: "field" },
    h("label", { for: `v${n}-${name}` }, label),
    h("input", { id: `v${n}-${name}`, "data-v": name, ...attrs }));
  const row = h("div", { class: "variant-row", "data-variant-row": n },
    field("Variant key", "key", { value: v.key || "", required: true, disabled: locked }),
    field("Name", "name", { value: v.name && v.name !== v.key ? v.name : "" }),
    field("Weight", "weight", { type: "number", min: 0, max: 1, step: 0.01, value: v.weight ?? "", required: true }),
    field("Config (JSON)", "config", { value: v.config && Object.keys(v.config).length ? JSON.stringify(v.config) : "", placeholder: "{}" }),
    h("button", { type: "button", class: "small secondary", disabled: locked, "aria-label": "Remove this variant",
      onclick: () => { if (variantsBox.children.length > 2) { row.remove(); labelControl(); sumWeights(); } } }, "Remove"));
  row.addEventListener("input", sumWeights);
  return row;
}

function labelControl() {
  [...variantsBox.children].forEach((row, i) => {
    row.querySelector("[data-v=key]").setAttribute("aria-description", i === 0 ? "the control" : "a treatment");
  });
}

function sumWeights() {
  const total = [...variantsBox.querySelectorAll("[data-v=weight]")].reduce((a, el) => a + (Number(el.value) || 0), 0);
  const out = document.getElementById("weight-total");
  out.textContent = `Weights add up to ${Math.round(total * 1000) / 1000}${Math.abs(total - 1) > 1e-6 ? " (should be 1)" : ""}`;
}

function setVariants(list, locked = false) {
  variantsBox.replaceChildren(...list.map((v) => variantRow(v, locked)));
  labelControl();
  sumWeights();
}

document.getElementById("add-variant").addEventListener("click", () => {
  if (variantsBox.children.length >= 10) return;
  const row = variantRow({});
  variantsBox.append(row);
  labelControl();
  row.querySelector("input").focus();
});
document.getElementById("even-weights").addEventListener("click", () => {
  const inputs = [...variantsBox.querySelectorAll("[data-v=weight]")];
  const share = Math.floor((1 / inputs.length) * 10000) / 10000;
  inputs.forEach((el, i) => {
    el.value = i === inputs.length - 1 ? String(Math.round((1 - share * (inputs.length - 1)) * 10000) / 10000) : String(share);
  });
  sumWeights();
});
document.getElementById("new-experiment").addEventListener("click", () => {
  reset();
  document.getElementById("f-key").focus();
});
document.getElementById("cancel-edit").addEventListener("click", reset);

function reset() {
  editing = null;
  form.reset();
  target.value = EVENT_TYPES.includes("first_value") ? "first_value" : EVENT_TYPES[0];
  document.getElementById("f-key").disabled = false;
  setVariants([{ key: "control", weight: 0.5 }, { key: "treatment", weight: 0.5 }]);
  document.getElementById("form-title").textContent = "New experiment";
  document.getElementById("save").textContent = "Create experiment";
  document.getElementById("cancel-edit").hidden = true;
  clearErrors();
}

function edit(exp) {
  editing = exp;
  clearErrors();
  const started = exp.status !== "draft";
  document.getElementById("f-key").value = exp.key;
  document.getElementById("f-key").disabled = true;
  document.getElementById("f-name").value = exp.name || "";
  document.getElementById("f-hypothesis").value = exp.hypothesis || "";
  loopSelect.value = exp.loop || "";
  target.value = exp.target_metric;
  document.getElementById("f-coverage").value = String(exp.coverage);
  document.getElementById("f-window").value = String(exp.window_days);
  document.getElementById("f-mde").value = String(exp.mde);
  document.getElementById("f-sequential").checked = !!exp.sequential;
  for (const box of guardBox.querySelectorAll("input")) box.checked = (exp.guardrail_metrics || []).includes(box.value);
  setVariants(exp.variants, started);
  document.getElementById("form-title").textContent = `Edit ${exp.key}`;
  document.getElementById("save").textContent = "Save changes";
  document.getElementById("cancel-edit").hidden = false;
  if (started) announce(`${exp.key} has started: its variant keys are fixed; weights, names and configs may change.`);
  document.getElementById("editor").scrollIntoView({ block: "start" });
  document.getElementById("f-name").focus();
}

function clearErrors() {
  for (const el of form.querySelectorAll(".error")) el.textContent = "";
  for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
}

function readForm() {
  const errors = {};
  const body = {
    name: document.getElementById("f-name").value.trim() || undefined,
    hypothesis: document.getElementById("f-hypothesis").value.trim(),
    target_metric: target.value,
    coverage: Number(document.getElementById("f-coverage").value),
    window_days: Number(document.getElementById("f-window").value),
    mde: Number(document.getElementById("f-mde").value),
    sequential: document.getElementById("f-sequential").checked,
    guardrail_metrics: [...guardBox.querySelectorAll("input:checked")].map((el) => el.value),
  };
  if (!editing) body.key = document.getElementById("f-key").value.trim();
  if (loopSelect.value) body.loop = loopSelect.value;
  if (!body.name) delete body.name;
  body.variants = [...variantsBox.children].map((row, i) => {
    const get = (name) => row.querySelector(`[data-v=${name}]`).value.trim();
    const v = { key: get("key"), weight: Number(get("weight")) };
    if (get("name")) v.name = get("name");
    const raw = get("config");
    if (raw) {
      try {
        v.config = JSON.parse(raw);
      } catch (err) {
        errors[`variants[${i}].config`] = "is not valid JSON";
      }
    }
    return v;
  });
  return { body, errors };
}

function showErrors(fields, message) {
  const leftovers = [];
  for (const [field, text] of Object.entries(fields || {})) {
    const base = field.split(/[[.]/)[0];
    const box = form.querySelector(`.error[data-field="${CSS.escape(base)}"]`);
    if (box) {
      box.textContent = (box.textContent ? `${box.textContent} ` : "") + `${field}: ${text}.`;
      const input = document.getElementById(box.id.replace(/^e-/, "f-")) || null;
      input?.setAttribute("aria-invalid", "true");
    } else {
      leftovers.push(`${field}: ${text}`);
    }
  }
  document.getElementById("form-error").textContent =
    [message, ...leftovers].filter(Boolean).join(" · ");
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  clearErrors();
  const { body, errors } = readForm();
  if (Object.keys(errors).length) {
    showErrors(errors, "Please fix the marked fields.");
    return;
  }
  const save = document.getElementById("save");
  save.disabled = true;
  const result = editing
    ? await api(session, "PATCH", `/api/experiments/${encodeURIComponent(editing.key)}`, body)
    : await api(session, "POST", "/api/experiments", body);
  save.disabled = false;
  if (!result.ok) {
    const data = result.data || {};
    showErrors(data.fields, data.error || `The server answered ${result.status}.`);
    document.getElementById("form-error").focus?.();
    return;
  }
  const saved = result.data;
  announce(editing ? `Saved ${saved.key}.` : `Created ${saved.key} as a draft.`);
  if (!experiments.some((e) => e.key === saved.key)) experiments = [saved, ...experiments];
  else experiments = experiments.map((e) => (e.key === saved.key ? saved : e));
  renderList();
  reset();
});

reset();
