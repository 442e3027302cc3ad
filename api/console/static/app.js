// The console's shell: log in and out, the navigation, and a hash router that renders pages.

import * as api from "./api.js";
import * as admin from "./admin.js";
import { playground } from "./playground.js";
import * as tenant from "./tenant.js";
import { errorBox, h } from "./ui.js";

const TENANT_PAGES = [
  ["datasets", "Datasets"], ["jobs", "Fine-tunes"], ["adapters", "Adapters"],
  ["playground", "Playground"], ["evals", "Evals"],
];
const ADMIN_PAGES = [
  ["admin/adapters", "All adapters"], ["admin/audit", "Audit log"], ["admin/usage", "Usage"],
  ["admin/tenants", "Tenants and keys"], ["admin/replicas", "Replicas"],
];
// [pattern, title, page]; a capture group is the page's second argument.
const ROUTES = [
  [/^datasets$/, "Datasets", tenant.datasets], [/^datasets\/([^/]+)$/, "Dataset", tenant.dataset],
  [/^jobs$/, "Fine-tunes", tenant.jobs], [/^jobs\/([^/]+)$/, "Fine-tune", tenant.job],
  [/^adapters$/, "Adapters", tenant.adapters], [/^adapters\/([^/]+)$/, "Adapter", tenant.adapter],
  [/^playground$/, "Playground", playground], [/^evals$/, "Evals", tenant.evals],
  [/^admin\/adapters$/, "All adapters", admin.adapters],
  [/^admin\/adapters\/([^/]+)$/, "Adapter", admin.adapter],
  [/^admin\/audit$/, "Audit log", admin.audit], [/^admin\/usage$/, "Usage", admin.usage],
  [/^admin\/tenants$/, "Tenants and keys", admin.tenants],
  [/^admin\/replicas$/, "Replicas", admin.replicas],
];

const view = document.getElementById("view");
const nav = document.getElementById("nav");
const login = document.getElementById("login");
let rendering = 0;  // each render's number: a page still polling stops when it changes

async function isAdmin() {
  try {
    await api.get("/v1/admin/tenants");
    return true;
  } catch (e) {
    if (e.status === 404) return false;
    throw e;
  }
}

function showNav(pages) {
  const path = location.hash.slice(2).split("?")[0];
  nav.replaceChildren(h("ul", {}, pages.map(([href, text]) => h("li", {},
    h("a", { href: `#/${href}`, "aria-current": path.startsWith(href) ? "page" : null }, text)))));
  document.getElementById("account").hidden = false;
}

async function render(flash) {
  const mine = ++rendering;
  if (!api.session.key) {
    showLogin();
    return;
  }
  login.hidden = true;
  const admin = sessionStorage.getItem("loraplex.isAdmin") === "true";
  const path = decodeURIComponent(location.hash.slice(2).split("?")[0]);
  if (!path) {
    location.replace(admin ? "#/admin/adapters" : "#/datasets");
    return;
  }
  showNav(admin ? ADMIN_PAGES : TENANT_PAGES);
  const route = ROUTES.find(([re]) => re.test(path));
  const heading = h("h1", { tabindex: "-1" }, route ? route[1] : "Not found");
  view.replaceChildren(heading);
  document.title = `${heading.textContent} · Loraplex console`;
  if (!flash) heading.focus();
  if (!route) {
    view.append(h("p", {}, "No console page here."));
    return;
  }
  const ctx = {
    view, flash, alive: () => mine === rendering, refresh: (f) => render(f),
    title: (text) => {  // a page naming what it shows, once it knows
      heading.textContent = text;
      document.title = `${text} · Loraplex console`;
    },
  };
  try {
    await route[2](ctx, ...(path.match(route[0]).slice(1)));
  } catch (e) {
    if (mine !== rendering) return;
    if (e.status === 401) logout(e.message);
    else view.append(errorBox(e));
  }
}

function showLogin(message) {
  nav.replaceChildren();
  document.getElementById("account").hidden = true;
  view.replaceChildren();
  login.hidden = false;
  const error = document.getElementById("login-error");
  error.textContent = message || "";
  error.hidden = !message;
  document.getElementById("api-key").focus();
}

function logout(message) {
  api.session.key = null;
  sessionStorage.removeItem("loraplex.isAdmin");
  history.replaceState(null, "", location.pathname);
  showLogin(message);
}

login.addEventListener("submit", async (e) => {
  e.preventDefault();
  const input = document.getElementById("api-key");
  api.session.key = input.value.trim();
  try {
    const admin = await isAdmin();
    if (!admin) await api.get("/v1/models");  // a wrong key: the API's 401 says why
    sessionStorage.setItem("loraplex.isAdmin", String(admin));
    input.value = "";
    if (location.hash.length > 2) render();
    else location.hash = admin ? "#/admin/adapters" : "#/datasets";
  } catch (err) {
    api.session.key = null;
    showLogin(err.message);
  }
});
document.getElementById("logout").addEventListener("click", () => logout("You are logged out."));
window.addEventListener("hashchange", () => render());
render();
