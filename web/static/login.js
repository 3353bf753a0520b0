// The login page: checks the token with the server and keeps it in sessionStorage only for an admin.

import { checkToken, clearToken, getToken, setToken } from "./common.js";

const REASONS = {
  expired: "Your token has expired or was refused. Sign in again with an admin token.",
  forbidden: "That token is not an admin's. The dashboards are for admins only.",
};

// This page is also what the server answers for a dashboard URL whose `?token=` it refused: take the
// token out of the address bar, and come back to that page after signing in.
const here = new URL(window.location.href);
if (here.searchParams.has("token")) {
  here.searchParams.delete("token");
  window.history.replaceState(null, "", here.pathname + here.search + here.hash);
}

function nextUrl() {
  const fallback = here.pathname.startsWith("/dashboard/login") ? "" : here.pathname + here.search;
  const next = new URLSearchParams(window.location.search).get("next") || fallback;
  // Only our own dashboard pages: never another site, never the login page again.
  if (/^\/dashboard\/[a-z0-9\-/]*(\?[^#]*)?$/i.test(next) && !next.startsWith("/dashboard/login")) {
    return next;
  }
  return "/dashboard/k-factor";
}

function showError(text) {
  const box = document.getElementById("login-error");
  box.textContent = text;
  document.getElementById("token").setAttribute("aria-invalid", text ? "true" : "false");
}

async function start() {
  const reason = new URLSearchParams(window.location.search).get("reason");
  if (reason && REASONS[reason] && !document.getElementById("login-error").textContent.trim()) {
    showError(REASONS[reason]);
  }
  // Already signed in (e.g. the back button): straight on.
  const existing = getToken();
  if (existing) {
    const { status } = await checkToken(existing);
    if (status === 200) {
      window.location.replace(nextUrl());
      return;
    }
    clearToken();
  }
  const form = document.getElementById("login-form");
  const input = document.getElementById("token");
  input.focus();
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = input.value.trim();
    if (!token) {
      showError("Enter a token.");
      input.focus();
      return;
    }
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    showError("");
    const { status, body } = await checkToken(token);
    button.disabled = false;
    if (status === 200) {
      setToken(token);
      window.location.assign(nextUrl());
      return;
    }
    if (status === 403) {
      showError(`Refused: ${body.error || "this token is not an admin's; the dashboards are for admins only"}.`);
    } else if (status === 401) {
      showError(`Refused: ${body.error || "invalid token"}.`);
    } else {
      showError(body.error || `The server answered ${status}. Try again.`);
    }
    input.focus();
    input.select();
  });
}

start();
