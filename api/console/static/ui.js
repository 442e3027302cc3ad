// Small DOM helpers: elements, tables, errors, confirmation dialogs. No framework.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2).toLowerCase(), v);
    else if (k === "class") el.className = v;
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, String(v));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function link(href, text) {
  return h("a", { href }, text);
}

export function time(unix) {
  if (!unix) return "—";
  return new Date(unix * 1000).toLocaleString();
}

export function bytes(n) {
  if (n === null || n === undefined) return "—";
  if (n < 1024) return `${n} B`;
  if (n < 1024 ** 2) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 ** 2).toFixed(1)} MB`;
}

// A table with a caption and one header row; `rows` are arrays of cells.
export function table(caption, columns, rows, empty = "Nothing yet.") {
  if (!rows.length) return h("p", { class: "empty" }, empty);
  return h("table", {},
    h("caption", {}, caption),
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, r.map((cell) => h("td", {}, cell))))));
}

// An error as the API words it, announced to screen readers.
export function errorBox(error) {
  return h("p", { class: "error", role: "alert" }, error.message || String(error));
}

export function section(title, ...children) {
  return h("section", {}, h("h2", {}, title), ...children);
}

export function keyValues(obj) {
  const entries = Object.entries(obj || {});
  if (!entries.length) return h("p", { class: "empty" }, "None.");
  return h("dl", { class: "kv" }, entries.flatMap(([k, v]) => [
    h("dt", {}, k),
    h("dd", {}, v === null || v === undefined ? "—"
      : typeof v === "object" ? JSON.stringify(v) : String(v)),
  ]));
}

// Asks before a change: `what` says what will change. Resolves true on confirm.
export function confirmChange(title, what) {
  const dialog = document.getElementById("confirm");
  dialog.querySelector("h2").textContent = title;
  dialog.querySelector("p").textContent = what;
  dialog.returnValue = "";
  dialog.showModal();
  dialog.querySelector("button[value=cancel]").focus();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "confirm"),
      { once: true });
  });
}

export function stageBadge(stage) {
  return h("span", { class: `badge stage-${stage}` }, stage);
}
