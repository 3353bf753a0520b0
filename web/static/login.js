// The login page. The form posts the token to the server (POST /dashboard/login), which sets an
// HttpOnly session cookie and redirects, or answers this page again with the reason it refused.
// This script only keeps the token out of the address bar and catches an empty form.

// This page is also what the server answers for a dashboard URL whose `?token=` it refused: take the
// token out of the address bar (and the history).
const here = new URL(window.location.href);
if (here.searchParams.has("token")) {
  here.searchParams.delete("token");
  window.history.replaceState(null, "", here.pathname + here.search + here.hash);
}

function showError(text) {
  const box = document.getElementById("login-error");
  box.textContent = text;
  document.getElementById("token").setAttribute("aria-invalid", text ? "true" : "false");
}

const form = document.getElementById("login-form");
const input = document.getElementById("token");
const status = document.getElementById("main").dataset.errorStatus;
if (status === "401" || status === "403") input.setAttribute("aria-invalid", "true");
input.focus();
form.addEventListener("submit", (event) => {
  if (!input.value.trim()) {
    event.preventDefault();
    showError("Enter a token.");
    input.focus();
    return;
  }
  form.querySelector("button[type=submit]").disabled = true;
});
// Back from another page (bfcache): the button works again.
window.addEventListener("pageshow", () => {
  form.querySelector("button[type=submit]").disabled = false;
});
