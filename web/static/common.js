// Shared by every dashboard page: sign-in, the API and socket, number formatting, DOM and tables.
// Everything that shows data builds DOM nodes with textContent: nothing from the server is parsed as HTML.

import { Socket } from "./phoenix.js";

export const LOGIN = "/dashboard/login";

// ---------------------------------------------------------------- sign-in
//
// The session is an HttpOnly cookie the server set when an admin signed in (`?token=` or the login
// form): no script here ever holds the token. The browser sends the cookie with our own API calls and
// the socket upgrade; a 401 or 403 means the session is gone or not an admin's, so off to the login page.

function toLogin(reason) {
  const next = window.location.pathname + window.location.search;
  const query = new URLSearchParams({ next });
  if (reason) query.set("reason", reason);
  window.location.replace(`${LOGIN}?${query}`);
  return new Promise(() => {}); // the page is going away: nothing after this runs
}

/** Who is signed in, asked of the server. Resolves with {status, body}. */
export async function checkSession() {
  try {
    const response = await fetch("/dashboard/session", { credentials: "same-origin", cache: "no-store" });
    let body = {};
    try {
      body = await response.json();
    } catch (err) {
      body = {};
    }
    return { status: response.status, body };
  } catch (err) {
    return { status: 0, body: { error: "the server could not be reached" } };
  }
}

/** Start of every dashboard page: an admin's session, or off to the login page (before any data). */
export async function requireAdmin() {
  const { status, body } = await checkSession();
  if (status === 401) return toLogin("expired");
  if (status === 403) return toLogin("forbidden");
  if (status !== 200) {
    showFatal(`Could not check your sign-in (${body.error || status}). Reload to try again.`);
    return new Promise(() => {});
  }
  const session = { ...body };
  setupShell(session);
  return session;
}

async function signOut() {
  try {
    await fetch("/dashboard/logout", { method: "POST", credentials: "same-origin", cache: "no-store" });
  } finally {
    window.location.replace(`${LOGIN}?reason=signed_out`);
  }
}

function setupShell(session) {
  const who = document.getElementById("who");
  if (who) who.textContent = `Signed in as ${session.sub}`;
  const signout = document.getElementById("signout");
  if (signout) signout.addEventListener("click", signOut);
  document.getElementById("gate")?.remove();
  if (session.demo && !document.getElementById("demo-banner")) {
    const banner = document.createElement("p");
    banner.id = "demo-banner";
    banner.className = "demo-banner";
    banner.setAttribute("role", "note");
    banner.textContent = "Demo data: these numbers come from a simulated cohort (viral-engine serve --demo).";
    document.body.prepend(banner);
  }
  const main = document.getElementById("main");
  if (main) main.hidden = false;
}

export function showFatal(message) {
  const gate = document.getElementById("gate");
  if (gate) {
    gate.textContent = message;
    gate.setAttribute("role", "alert");
  }
}

// ---------------------------------------------------------------- API and socket

export async function api(session, method, path, body) {
  const init = { method, headers: {}, credentials: "same-origin", cache: "no-store" };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    return { ok: false, status: 0, data: { error: "the server could not be reached" } };
  }
  if (response.status === 401) await toLogin("expired");
  if (response.status === 403) {
    // Refused: if the session is no longer an admin's, sign in again; else the answer is shown as is.
    const { status } = await checkSession();
    if (status === 401) await toLogin("expired");
    else if (status === 403) await toLogin("forbidden");
  }
  let data = null;
  try {
    data = await response.json();
  } catch (err) {
    data = null;
  }
  return { ok: response.ok, status: response.status, data };
}

/** The socket, with the connection state shown in #live (and the time of the last update). */
export function connect(session) {
  const live = document.getElementById("live");
  let lastUpdate = null;
  let state = "connecting";
  const paint = () => {
    if (!live) return;
    let text = {
      connecting: "Connecting…",
      open: "Live",
      reconnecting: "Reconnecting…",
      closed: "Offline",
    }[state] || state;
    if (state === "open" && lastUpdate) text += ` · updated ${fmtRelative(lastUpdate)}`;
    live.textContent = text;
    live.dataset.state = state;
  };
  // No token in the URL: the browser sends the session cookie with the upgrade.
  const socket = new Socket("/socket/websocket", {
    onStatus: (status) => {
      state = status;
      paint();
    },
    onFailure: async (attempts) => {
      if (attempts === 3) {
        // Several failed connects in a row: maybe the session expired (the upgrade gets 403).
        const { status } = await checkSession();
        if (status === 401) toLogin("expired");
        else if (status === 403) toLogin("forbidden");
      }
    },
  });
  socket.touched = () => {
    lastUpdate = new Date();
    paint();
  };
  setInterval(paint, 10000);
  socket.connect();
  return socket;
}

/** Join `topic` and call `render(json)` with the join reply and with every `metrics_update`. */
export function follow(socket, topic, params, render, onError) {
  const channel = socket.channel(topic, params);
  channel.onJoinReply = (reply) => {
    if (reply.status === "ok") {
      socket.touched();
      render(reply.response);
    } else if (onError) {
      onError(reply);
    }
  };
  channel.on("metrics_update", (payload) => {
    socket.touched();
    render(payload);
  });
  if (socket.status === "open") channel.join(params);
  else channel.wanted = true; // joined when the socket opens
  return channel;
}

// ---------------------------------------------------------------- formatting

const INT = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });

export function isNum(v) {
  return typeof v === "number" && Number.isFinite(v);
}

export function fmtInt(v) {
  return isNum(v) ? INT.format(v) : "—";
}

export function fmtNum(v, digits = 2) {
  if (!isNum(v)) return "—";
  return new Intl.NumberFormat("en-US", {
    minimumFractionDigits: digits,
    maximumFractionDigits: digits,
  }).format(v);
}

export function fmtPct(v, digits = 1) {
  if (!isNum(v)) return "—";
  return new Intl.NumberFormat("en-US", {
    style: "percent",
    minimumFractionDigits: digits,
    maximumFractionDigits: digits,
  }).format(v);
}

export function fmtSignedPct(v, digits = 1) {
  if (!isNum(v)) return "—";
  const s = fmtPct(Math.abs(v), digits);
  return v > 0 ? `+${s}` : v < 0 ? `−${s}` : s;
}

export function fmtP(p) {
  if (!isNum(p)) return "—";
  if (p < 0.001) return "< 0.001";
  return fmtNum(p, 3);
}

export function fmtHours(h) {
  if (!isNum(h)) return "—";
  if (h < 1) return `${fmtInt(h * 60)} min`;
  if (h < 48) return `${fmtNum(h, 1)} h`;
  return `${fmtNum(h / 24, 1)} days`;
}

const RELATIVE = new Intl.RelativeTimeFormat("en", { numeric: "auto" });

export function fmtRelative(when) {
  if (!when) return "—";
  const date = when instanceof Date ? when : new Date(when);
  if (Number.isNaN(date.getTime())) return "—";
  const seconds = (date.getTime() - Date.now()) / 1000;
  const abs = Math.abs(seconds);
  if (abs < 10) return "just now";
  if (abs < 60) return RELATIVE.format(Math.round(seconds), "second");
  if (abs < 3600) return RELATIVE.format(Math.round(seconds / 60), "minute");
  if (abs < 86400) return RELATIVE.format(Math.round(seconds / 3600), "hour");
  return RELATIVE.format(Math.round(seconds / 86400), "day");
}

/** A <time> element showing a relative time, with the exact time as its title. */
export function timeEl(iso) {
  if (!iso) return h("span", {}, "—");
  return h("time", { datetime: iso, title: new Date(iso).toLocaleString("en-GB", { timeZone: "UTC" }) + " UTC" },
    fmtRelative(iso));
}

/** "1 referrer", "2 referrers" (the number formatted). */
export function plural(n, one, many = `${one}s`) {
  return `${fmtInt(n)} ${n === 1 ? one : many}`;
}

/** The width a chart has to draw in (its container's), so its text stays at its real size. */
export function chartWidth(el, fallback = 800) {
  const w = el ? el.clientWidth : 0;
  return Math.max(280, Math.round(w || fallback));
}

export function humanize(key) {
  const s = String(key).replace(/_/g, " ");
  return s.charAt(0).toUpperCase() + s.slice(1);
}

// ---------------------------------------------------------------- DOM

/** h("p", {class: "x", "data-metric": "k"}, "text", child, ...): attributes, then text or node children. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

const SVG_NS = "http://www.w3.org/2000/svg";

export function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    el.setAttribute(k, String(v));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** A number as shown: the formatted text, with data-metric (the JSON key) and data-value (raw). */
export function metric(key, value, text, extra = {}) {
  return h(
    "span",
    { class: "num", "data-metric": key, "data-value": value === null || value === undefined ? "" : value, ...extra },
    text,
  );
}

export function replace(id, ...children) {
  const el = typeof id === "string" ? document.getElementById(id) : id;
  if (!el) return null;
  el.replaceChildren();
  append(el, children);
  return el;
}

let announcer = null;

/** Say something to screen readers (and show it briefly in the status line). */
export function announce(message, kind = "info") {
  if (!announcer) {
    announcer = h("div", { class: "toast", role: "status", "aria-live": "polite", id: "toast" });
    document.body.append(announcer);
  }
  announcer.textContent = message;
  announcer.dataset.kind = kind;
  announcer.classList.add("show");
  clearTimeout(announcer.timer);
  announcer.timer = setTimeout(() => announcer.classList.remove("show"), 6000);
}

// ---------------------------------------------------------------- tables and CSV

/**
 * A table with a caption and an "Export CSV" button.
 * columns: [{key, label, fmt?(value, row), numeric?, metric?(row) → data-metric, cell?(row) → node}]
 */
export function table({ id, caption, columns, rows, csvName, empty = "Nothing yet." }) {
  const head = h("tr", {}, columns.map((c) => h("th", { scope: "col", class: c.numeric ? "n" : null }, c.label)));
  const body = rows.length
    ? rows.map((row, i) =>
        h(
          "tr",
          { "data-row": row.__key ?? i },
          columns.map((c, j) => {
            const value = row[c.key];
            const content = c.cell
              ? c.cell(row)
              : metric(c.metricKey || c.key, value, c.fmt ? c.fmt(value, row) : value ?? "—");
            const Tag = j === 0 && !c.numeric ? "th" : "td";
            return h(Tag, { scope: Tag === "th" ? "row" : null, class: c.numeric ? "n" : null }, content);
          }),
        ),
      )
    : [h("tr", {}, h("td", { colspan: columns.length, class: "empty" }, empty))];
  const tableEl = h(
    "table",
    { id },
    h("caption", {}, caption),
    h("thead", {}, head),
    h("tbody", {}, body),
  );
  const tools = csvName
    ? h(
        "button",
        {
          type: "button",
          class: "csv",
          "data-csv": csvName,
          onclick: () => download(`${csvName}.csv`, toCsv(columns, rows)),
        },
        "Export CSV",
        h("span", { class: "visually-hidden" }, ` of ${caption}`),
      )
    : null;
  return h("div", { class: "table-wrap" }, h("div", { class: "scroll", tabindex: "0", role: "region", "aria-label": caption }, tableEl), tools);
}

/**
 * One CSV cell, by the rule every CSV the server writes follows (metrics/growth.py csv_cell): a string
 * starting with = + - @, a tab or a carriage return, which a spreadsheet would run as a formula, gets a
 * leading apostrophe; numbers (and booleans) stay as they are; null is an empty cell.
 */
export function csvCell(value) {
  if (value === null || value === undefined) return "";
  let s;
  if (typeof value === "number" || typeof value === "boolean") s = String(value);
  else {
    s = typeof value === "object" ? JSON.stringify(value) : String(value);
    if (/^[=+\-@\t\r]/.test(s)) s = `'${s}`;
  }
  return /[",\r\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

/** CSV of the raw values (not the formatted text), one column per table column. */
export function toCsv(columns, rows) {
  const lines = [columns.map((c) => csvCell(c.csvKey || c.key)).join(",")];
  for (const row of rows) {
    lines.push(columns.map((c) => csvCell(c.csv ? c.csv(row) : row[c.key])).join(","));
  }
  return lines.join("\r\n") + "\r\n";
}

export function download(name, text) {
  const blob = new Blob([text], { type: "text/csv;charset=utf-8" });
  const url = URL.createObjectURL(blob);
  const a = h("a", { href: url, download: name, hidden: true });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
  announce(`Exported ${name}`);
}

/** A badge: text plus a class for its colour (the text says it, colour only repeats it). */
export function badge(text, kind, attrs = {}) {
  return h("span", { class: `badge ${kind}`, ...attrs }, text);
}

/** Routes the join errors of a dashboard topic to a visible message. */
export function joinError(reply) {
  const reason = (reply.response && reply.response.reason) || reply.status;
  const msg = reason === "unauthorized"
    ? "This session may not read the dashboards: sign in with an admin token."
    : `Could not subscribe to live updates: ${reason}`;
  announce(msg, "error");
  const box = document.getElementById("errors");
  if (box) replace(box, h("p", { class: "error", role: "alert" }, msg));
}

// ---------------------------------------------------------------- experiments

export const STATUS_KIND = { draft: "draft", running: "running", paused: "paused", stopped: "stopped" };

let confirmsOpen = 0;

/** True while a confirm question is on screen: live re-renders of its area wait until it is answered. */
export function confirming() {
  return confirmsOpen > 0;
}

/** Replace a button by "Are you sure? [Confirm] [Cancel]" in place; resolves true on Confirm. */
export function confirmInline(selector, question) {
  const button = document.querySelector(selector);
  if (!button) return Promise.resolve(false);
  confirmsOpen += 1;
  return new Promise((resolve) => {
    const done = (answer) => {
      confirmsOpen -= 1;
      box.replaceWith(button);
      button.focus();
      resolve(answer);
    };
    const yes = h("button", { type: "button", class: "small danger", "data-confirm": "yes", onclick: () => done(true) }, "Confirm");
    const no = h("button", { type: "button", class: "small secondary", "data-confirm": "no", onclick: () => done(false) }, "Cancel");
    const box = h("span", { class: "confirm", role: "group", "aria-label": question }, h("span", {}, question), yes, no);
    button.replaceWith(box);
    yes.focus();
  });
}
