// An admin's pages: every tenant's adapters and their stages, promotion and canaries, the
// audit log, usage, tenants and keys. A tenant key gets the API's 404 on each of them.

import * as api from "./api.js";
import { confirmChange, errorBox, h, keyValues, link, section, stageBadge, table, time } from "./ui.js";

const enc = encodeURIComponent;
const ADMIN = "/v1/admin";

export async function adapters({ view }) {
  const [list, tenants] = await Promise.all([api.get(`${ADMIN}/adapters`),
    api.get(`${ADMIN}/tenants`)]);
  const names = Object.fromEntries(tenants.data.map((t) => [t.id, t.name]));
  view.append(section("All tenants' adapters", table("Adapters",
    ["Tenant", "Adapter", "Production", "Canary", "Versions and stages"],
    list.data.map((a) => [names[a.tenant_id] || a.tenant_id,
      link(`#/admin/adapters/${enc(a.id)}`, a.name),
      a.production_version ? `v${a.production_version}` : "—",
      a.canary_version ? `v${a.canary_version} at ${a.canary_percent}%` : "—",
      h("span", {}, a.versions.map((v) => h("span", { class: "pair" }, `v${v.version} `,
        stageBadge(v.stage))))]), "No adapters yet.")));
}

function auditEntry(entry) {
  return h("div", { class: "audit-entry", role: "status" },
    h("h3", {}, `Audit entry: ${entry.action}`),
    keyValues({ action: entry.action, target: entry.target_id, time: time(entry.created_at),
      forced: entry.forced, reason: entry.reason }));
}

// One registry action: confirm what changes, call the API, show the adapter and the audit.
async function act(ctx, a, { title, what, path, body, action }) {
  if (!await confirmChange(title, what)) return;
  try {
    await api.post(`${ADMIN}/adapters/${enc(a.id)}${path}`, body);
    // The entry this action left: the newest of its kind for the adapter's tenant.
    const audit = await api.get(`${ADMIN}/audit`, { tenant_id: a.tenant_id, action, limit: 1 });
    ctx.refresh(audit.data[0]);
  } catch (e) {
    ctx.view.querySelector(".result").replaceChildren(errorBox(e));
  }
}

function versionActions(ctx, a, v) {
  const current = a.production_version ? `v${a.production_version}` : "no version";
  const promote = (stage) => h("button", { type: "button" , onclick: () => act(ctx, a, {
    title: `Promote ${a.name} v${v.version} to ${stage}?`,
    what: stage === "production"
      ? `Calls to ${a.name} by name are answered by v${v.version} instead of ${current}.`
      : `v${v.version} moves from ${v.stage} to ${stage}; by-name traffic is unchanged.`,
    path: `/versions/${v.version}/promote`, action: `promote.${stage}`,
    body: { stage, force: ctx.view.querySelector("#force")?.checked || false } }) },
  `Promote v${v.version} to ${stage}`);
  const share = h("select", { id: `share-${v.version}` },
    [5, 25, 50].map((p) => h("option", { value: p }, `${p} %`)));
  const canary = h("button", { type: "button", onclick: () => act(ctx, a, {
    title: `Canary ${a.name} v${v.version} at ${share.value} %?`,
    what: `${share.value} % of calls to ${a.name} by name go to v${v.version}; the rest stay on ${current}.`,
    path: "/canary", action: "canary.set", body: { version: v.version, percent: parseInt(share.value, 10) } }) },
  `Start canary of v${v.version}`);
  const cells = [];
  if (v.stage !== "production") cells.push(promote("production"));
  if (v.stage === "candidate") cells.push(promote("staging"));
  if (v.stage !== "production" && a.production_version && a.canary_version !== v.version) {
    cells.push(h("label", { for: `share-${v.version}` }, "Canary share"), share, canary);
  }
  return h("div", { class: "actions" }, cells);
}

function adapterActions(ctx, a) {
  const buttons = [];
  if (a.canary_version) {
    buttons.push(h("button", { type: "button", onclick: () => act(ctx, a, {
      title: `Promote the canary v${a.canary_version}?`,
      what: `v${a.canary_version} takes all by-name calls to ${a.name}; v${a.production_version} is archived.`,
      path: "/canary/promote", action: "canary.promote", body: {} }) }, "Promote canary"),
    h("button", { type: "button", onclick: () => act(ctx, a, {
      title: `Abort the canary v${a.canary_version}?`,
      what: `v${a.canary_version} gets no more calls; v${a.production_version} takes them all.`,
      path: "/canary/abort", action: "canary.abort", body: {} }) }, "Abort canary"));
  }
  if (a.production_version) {
    buttons.push(h("button", { type: "button", class: "danger", onclick: () => act(ctx, a, {
      title: `Roll back ${a.name}?`,
      what: `v${a.production_version} leaves production; the version that was production before it comes back.`,
      path: "/rollback", action: "rollback", body: {} }) }, "Roll back production"));
  }
  return h("div", { class: "actions" }, buttons);
}

export async function adapter(ctx, id) {
  const a = await api.get(`${ADMIN}/adapters/${enc(id)}`);
  ctx.title(`Adapter ${a.name}`);
  ctx.view.append(h("p", {}, link("#/admin/adapters", "← All adapters")),
    h("div", { class: "result", "aria-live": "polite" }, ctx.flash ? auditEntry(ctx.flash) : null),
    keyValues({ id: a.id, tenant: a.tenant_id, base_model: a.base_model,
      production: a.production_version ? `v${a.production_version}` : "none",
      canary: a.canary_version ? `v${a.canary_version} at ${a.canary_percent}%` : "none" }),
    h("div", { class: "check" }, h("input", { type: "checkbox", id: "force" }),
      h("label", { for: "force" }, "Force (moves outside the normal flow; audited as forced)")),
    adapterActions(ctx, a),
    section("Versions", table("Versions", ["Version", "Stage", "Model id", "Actions"],
      a.versions.map((v) => [`v${v.version}`, stageBadge(v.stage), v.id,
        versionActions(ctx, a, v)]))));
}

export async function audit({ view }) {
  const more = h("div");
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const field = (id, label) => h("div", { class: "field" }, h("label", { for: id }, label),
    h("input", { id, name: id, value: params.get(id) || "" }));
  const form = h("form", { class: "filters", role: "search" },
    field("action", "Action"), field("tenant_id", "Tenant id"), field("target_id", "Target id"),
    h("button", { type: "submit" }, "Filter"));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const q = new URLSearchParams();
    for (const k of ["action", "tenant_id", "target_id"]) {
      if (form.elements[k].value.trim()) q.set(k, form.elements[k].value.trim());
    }
    location.hash = `#/admin/audit?${q}`;
  });
  const filters = Object.fromEntries(params);
  const row = (e) => [time(e.created_at), e.action, e.target_id, e.tenant_id || "—",
    e.forced ? "yes" : "no", e.reason || "—"];
  const page = await api.get(`${ADMIN}/audit`, { ...filters, limit: 100 });
  const log = table("Audit log, newest first",
    ["Time", "Action", "Target", "Tenant", "Forced", "Reason"], page.data.map(row),
    "No audit entries match.");
  // Older entries, a page at a time, appended below (the API pages with `after`).
  let last = page.data.at(-1)?.id;
  const older = h("button", { type: "button", onclick: async () => {
    try {
      const next = await api.get(`${ADMIN}/audit`, { ...filters, limit: 100, after: last });
      log.querySelector("tbody").append(...next.data.map((e) => h("tr", {},
        row(e).map((c) => h("td", {}, c)))));
      last = next.data.at(-1)?.id;
      older.hidden = !next.has_more;
    } catch (e) { more.replaceChildren(errorBox(e)); }
  } }, "Show older entries");
  older.hidden = !page.has_more;
  view.append(form, log, older, more);
}

const ms = (v) => (v === null || v === undefined ? "—" : `${Math.round(v)} ms`);

export async function usage({ view }) {
  const [rows, tenants] = await Promise.all([api.get(`${ADMIN}/usage`),
    api.get(`${ADMIN}/tenants`)]);
  const names = Object.fromEntries(tenants.data.map((t) => [t.id, t.name]));
  const totals = {};
  for (const r of rows.data) {
    const t = (totals[r.tenant_id] ||= { requests: 0, tokens: 0 });
    t.requests += r.requests;
    t.tokens += r.prompt_tokens + r.completion_tokens;
  }
  view.append(
    section("Per tenant", table("Usage per tenant", ["Tenant", "Requests", "Tokens"],
      Object.entries(totals).map(([id, t]) => [names[id] || id, t.requests, t.tokens]),
      "No requests served yet.")),
    section("Per model and adapter version", table("Usage per adapter",
      ["Tenant", "Model", "Requests", "Unavailable", "Prompt tokens", "Completion tokens",
        "p50", "p95", "p99"],
      rows.data.map((r) => [names[r.tenant_id] || r.tenant_id, r.model, r.requests, r.unavailable,
        r.prompt_tokens, r.completion_tokens, ms(r.latency_ms?.p50), ms(r.latency_ms?.p95),
        ms(r.latency_ms?.p99)]), "No requests served yet.")));
}

export async function tenants(ctx) {
  const [list, keys] = await Promise.all([api.get(`${ADMIN}/tenants`), api.get(`${ADMIN}/keys`)]);
  const shown = h("div", { "aria-live": "polite" });
  const reveal = ({ what, key }) => shown.replaceChildren(h("div", { class: "secret", role: "status" },
    h("p", {}, `${what}. Its key is shown once: copy it now.`), h("code", {}, key)));
  if (ctx.flash) reveal(ctx.flash);
  const name = h("input", { id: "tenant-name", required: true, maxlength: 128 });
  const form = h("form", { class: "filters" }, h("div", { class: "field" },
    h("label", { for: "tenant-name" }, "New tenant name"), name),
  h("button", { type: "submit" }, "Create tenant"));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      const body = await api.post(`${ADMIN}/tenants`, { name: name.value.trim() });
      ctx.refresh({ what: `Tenant ${body.name} created`, key: body.api_key });
    } catch (err) { shown.replaceChildren(errorBox(err)); }
  });
  const newKey = (t) => h("button", { type: "button", onclick: async () => {
    if (!await confirmChange(`New key for ${t.name}?`,
      `A new API key for tenant ${t.name}; its other keys keep working.`)) return;
    try {
      const body = await api.post(`${ADMIN}/tenants/${enc(t.id)}/keys`, {});
      ctx.refresh({ what: `Key created for ${t.name}`, key: body.api_key });
    } catch (err) { shown.replaceChildren(errorBox(err)); }
  } }, `New key for ${t.name}`);
  const revoke = (k) => h("button", { type: "button", class: "danger", onclick: async () => {
    if (!await confirmChange(`Revoke key ${k.prefix}…?`,
      "Every request made with this key is refused from now on. This cannot be undone.")) return;
    try { await api.post(`${ADMIN}/keys/${enc(k.id)}/revoke`, {}); ctx.refresh(); }
    catch (err) { shown.replaceChildren(errorBox(err)); }
  } }, `Revoke ${k.prefix}…`);
  const names = Object.fromEntries(list.data.map((t) => [t.id, t.name]));
  ctx.view.append(section("Create a tenant", form), shown,
    section("Tenants", table("Tenants", ["Name", "Id", "Created", "Keys"],
      list.data.map((t) => [t.name, t.id, time(t.created_at), newKey(t)]))),
    section("Keys", table("API keys", ["Prefix", "Tenant", "Admin", "Last used", "Revoked", "Revoke"],
      keys.data.map((k) => [`${k.prefix}…`, names[k.tenant_id] || k.tenant_id || "—",
        k.is_admin ? "yes" : "no", time(k.last_used_at), time(k.revoked_at),
        k.revoked_at ? "" : revoke(k)]))));
}

export async function replicas({ view }) {
  const list = await api.get(`${ADMIN}/replicas`);
  view.append(table("Serving replicas", ["Replica", "Healthy", "Queue", "Adapters held"],
    list.data.map((r) => [r.name, r.healthy ? "yes" : "no", r.queue_depth,
      r.loaded.length ? h("ul", { class: "plain" }, r.loaded.map((n) => h("li", {}, n))) : "none"]),
    "No replicas: this API process runs no serving gateway, or its engine has not started."));
}
