// A tenant's pages: datasets, fine-tunes, adapters, evals (the playground: playground.js).

import * as api from "./api.js";
import { lossChart } from "./chart.js";
import {
  bytes, confirmChange, errorBox, h, keyValues, link, section, stageBadge, table, time,
} from "./ui.js";

const FINISHED = new Set(["succeeded", "failed", "cancelled"]);
const enc = encodeURIComponent;

export async function baseModels() {
  const models = await api.get("/v1/models");
  return models.data.filter((m) => m.owned_by === "loraplex").map((m) => m.id);
}

// ---- datasets ----

export async function datasets({ view }) {
  const input = h("input", { type: "file", id: "dataset-file", accept: ".jsonl" });
  const status = h("div", { "aria-live": "polite" });
  const send = async (file) => {
    status.replaceChildren(h("p", {}, `Uploading ${file.name}…`));
    try {
      const row = await api.upload(file);
      location.hash = `#/datasets/${row.id}`;
    } catch (e) {
      status.replaceChildren(errorBox(e));
    }
  };
  input.addEventListener("change", () => input.files[0] && send(input.files[0]));
  const zone = h("div", { class: "dropzone" },
    h("p", {}, "Drop a JSONL file here (one chat example per line), or"),
    h("label", { for: "dataset-file", class: "button" }, "Choose a dataset file"), input);
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files[0]) send(e.dataTransfer.files[0]);
  });
  const files = await api.get("/v1/files", { purpose: "fine-tune", limit: 100 });
  view.append(
    section("Upload a dataset", zone, status),
    section("Your datasets", table("Datasets", ["File", "Status", "Size", "Uploaded"],
      files.data.map((f) => [link(`#/datasets/${f.id}`, f.filename), f.status, bytes(f.bytes),
        time(f.created_at)]), "No datasets yet: upload one above.")));
}

function chatTurns(line, n) {
  let row;
  try { row = JSON.parse(line); } catch { return h("p", { class: "error" }, `Example ${n}: not JSON`); }
  const messages = Array.isArray(row.messages) ? row.messages : [];
  return h("article", { class: "example", "aria-label": `Example ${n}` },
    h("h3", {}, `Example ${n}`),
    messages.map((m) => h("div", { class: `turn turn-${m.role}` },
      h("span", { class: "role" }, m.role), h("p", {}, String(m.content ?? "")))));
}

export async function dataset({ view, title }, id) {
  const file = await api.get(`/v1/files/${enc(id)}`);
  title(`Dataset ${file.filename}`);
  const valid = file.status === "processed";
  const details = (file.status_details || "").split("\n").filter(Boolean);
  view.append(h("p", {}, link("#/datasets", "← All datasets")),
    h("p", { class: valid ? "ok" : "error", role: valid ? "status" : "alert" },
      valid ? `${file.filename} is valid: ready for a fine-tune.`
        : `${file.filename} has problems: fix them and upload it again.`));
  if (details.length) {
    view.append(section("Validation problems",
      h("ul", { class: "problems", "aria-label": "Validation problems" },
        details.map((d) => h("li", {}, d)))));
  }
  view.append(section("Stats", keyValues({ id: file.id, bytes: file.bytes, sha256: file.sha256,
    ...(file.stats || {}) })));
  const preview = section("Preview: the first examples");
  view.append(preview);
  try {
    const lines = await api.firstLines(id, 3);
    preview.append(...lines.map((l, i) => chatTurns(l, i + 1)));
  } catch (e) {
    preview.append(errorBox(e));
  }
}

// ---- fine-tunes ----

export function numberField(id, label, attrs = {}) {
  return h("div", { class: "field" }, h("label", { for: id }, label),
    h("input", { id, name: id, type: "number", ...attrs }));
}

function selectField(id, label, options, { optional = false } = {}) {
  return h("div", { class: "field" }, h("label", { for: id }, label),
    h("select", { id, name: id },
      optional ? h("option", { value: "" }, "None") : null,
      options.map(([value, text]) => h("option", { value }, text))));
}

function jobBody(form) {
  const v = (name) => form.elements[name].value.trim();
  const hyper = { method: v("method") };
  for (const [field, key, parse] of [["epochs", "n_epochs", parseInt],
    ["batch-size", "batch_size", parseInt], ["lr-multiplier", "learning_rate_multiplier", parseFloat]]) {
    if (v(field)) hyper[key] = parse(v(field));
  }
  const body = { model: v("model"), training_file: v("training-file"),
    method: { type: "supervised", supervised: { hyperparameters: hyper } } };
  if (v("validation-file")) body.validation_file = v("validation-file");
  if (v("suffix")) body.suffix = v("suffix");
  return body;
}

export async function jobs({ view }) {
  const [models, files, list] = await Promise.all([baseModels(),
    api.get("/v1/files", { purpose: "fine-tune", limit: 100 }),
    api.get("/v1/fine_tuning/jobs", { limit: 50 })]);
  const usable = files.data.filter((f) => f.status === "processed").map((f) => [f.id, f.filename]);
  const status = h("div", { "aria-live": "polite" });
  const form = h("form", { class: "grid-form" },
    selectField("model", "Base model", models.map((m) => [m, m])),
    selectField("training-file", "Training file", usable),
    selectField("validation-file", "Validation file", usable, { optional: true }),
    h("div", { class: "field" }, h("label", { for: "suffix" }, "Adapter name (suffix)"),
      h("input", { id: "suffix", name: "suffix", pattern: "[a-z0-9\\-]{1,64}",
        placeholder: "support-bot" })),
    numberField("epochs", "Epochs (blank: auto)", { min: 1, max: 50 }),
    numberField("batch-size", "Batch size (blank: auto)", { min: 1 }),
    numberField("lr-multiplier", "Learning rate multiplier (blank: auto)", { min: 0, step: "any" }),
    selectField("method", "Method", [["auto", "auto"], ["lora", "LoRA"], ["qlora", "QLoRA"]]),
    h("button", { type: "submit" }, "Start fine-tune"));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      const job = await api.post("/v1/fine_tuning/jobs", jobBody(form));
      location.hash = `#/jobs/${job.id}`;
    } catch (err) {
      status.replaceChildren(errorBox(err));
    }
  });
  view.append(section("New fine-tune", usable.length ? form
    : h("p", {}, "Upload a valid dataset first: ", link("#/datasets", "Datasets")), status),
  section("Your fine-tunes", table("Fine-tunes", ["Job", "Adapter", "Model", "Status", "Created"],
    list.data.map((j) => [link(`#/jobs/${j.id}`, j.id), j.user_provided_suffix || "—", j.model,
      j.status, time(j.created_at)]))));
}

function lossSeries(events) {
  const metrics = events.filter((e) => e.type === "metrics" && e.data);
  const train = metrics.filter((e) => e.data.train_loss != null)
    .map((e) => ({ step: e.data.step, loss: e.data.train_loss }))
    .sort((a, b) => a.step - b.step);
  return { train, latest: metrics.length ? metrics[0].data : null };
}

function jobSummary(job, latest) {
  const progress = latest ? h("progress", { max: latest.total_steps, value: latest.step,
    "aria-label": "Training progress" }) : null;
  return h("div", {},
    h("p", { class: `status status-${job.status}`, role: "status" }, `Status: ${job.status}`,
      latest ? ` · step ${latest.step} of ${latest.total_steps}` : "",
      latest?.eta_seconds && !FINISHED.has(job.status)
        ? ` · about ${Math.ceil(latest.eta_seconds)} s left` : ""),
    progress,
    job.error?.message ? h("p", { class: "error", role: "alert" }, job.error.message) : null,
    keyValues({ model: job.model, adapter: job.user_provided_suffix,
      fine_tuned_model: job.fine_tuned_model, training_file: job.training_file,
      validation_file: job.validation_file, trained_tokens: job.trained_tokens }));
}

export async function job({ view, alive }, id) {
  const cancel = h("button", { type: "button", class: "danger" }, "Cancel fine-tune");
  const parts = { summary: h("div"), chart: h("div"), events: h("div"), checkpoints: h("div"),
    message: h("div", { "aria-live": "polite" }) };
  cancel.addEventListener("click", async () => {
    if (!await confirmChange("Cancel this fine-tune?",
      `Job ${id} stops training; no adapter version is produced.`)) return;
    try { await api.post(`/v1/fine_tuning/jobs/${enc(id)}/cancel`); }
    catch (e) { parts.message.replaceChildren(errorBox(e)); }
  });
  view.append(h("p", {}, link("#/jobs", "← All fine-tunes")), parts.summary, parts.message,
    section("Training loss", parts.chart), section("Events", parts.events),
    section("Checkpoints", parts.checkpoints));
  for (;;) {
    const [row, events, ckpts] = await Promise.all([api.get(`/v1/fine_tuning/jobs/${enc(id)}`),
      api.get(`/v1/fine_tuning/jobs/${enc(id)}/events`, { limit: 1000 }),
      api.get(`/v1/fine_tuning/jobs/${enc(id)}/checkpoints`, { limit: 100 })]);
    if (!alive()) return;
    const { train, latest } = lossSeries(events.data);
    parts.summary.replaceChildren(jobSummary(row, latest),
      FINISHED.has(row.status) ? "" : cancel);
    parts.chart.replaceChildren(lossChart({ train }));
    parts.events.replaceChildren(table("Newest events first", ["Time", "Level", "Message"],
      events.data.filter((e) => e.type !== "metrics").slice(0, 20)
        .map((e) => [time(e.created_at), e.level, e.message])));
    parts.checkpoints.replaceChildren(table("Checkpoints", ["Step", "Model name", "Loss"],
      ckpts.data.map((c) => [c.step_number, c.fine_tuned_model_checkpoint,
        c.metrics.train_loss?.toFixed?.(4) ?? "—"]), "No checkpoints."));
    if (FINISHED.has(row.status)) return;
    await new Promise((r) => setTimeout(r, 1000));
  }
}

// ---- adapters ----

export async function adapters({ view }) {
  const list = await api.get("/v1/adapters");
  view.append(section("Your adapters", table("Adapters",
    ["Adapter", "Base model", "Production", "Canary", "Versions"],
    list.data.map((a) => [link(`#/adapters/${enc(a.name)}`, a.name), a.base_model,
      a.production_version ? `v${a.production_version}` : "—",
      a.canary_version ? `v${a.canary_version} (${a.canary_percent}%)` : "—",
      a.versions.length]), "No adapters yet: a succeeded fine-tune makes one.")));
}

function metricsSummary(metrics) {
  const shown = {};
  for (const [k, v] of Object.entries(metrics || {})) {
    if (typeof v === "number") shown[k] = Number.isInteger(v) ? v : v.toFixed(4);
    else if (v && typeof v === "object" && typeof v.score === "number") shown[k] = v.score.toFixed(3);
  }
  return keyValues(shown);
}

export async function adapter({ view, title }, name) {
  const a = await api.get(`/v1/adapters/${enc(name)}`);
  title(`Adapter ${a.name}`);
  const message = h("div", { "aria-live": "polite" });
  view.append(h("p", {}, link("#/adapters", "← All adapters")), message,
    keyValues({ name: a.name, base_model: a.base_model, production_version: a.production_version,
      canary: a.canary_version ? `v${a.canary_version} at ${a.canary_percent}%` : "none" }));
  for (const v of [...a.versions].reverse()) {
    const get = h("button", { type: "button" }, `Download v${v.version}`);
    get.addEventListener("click", () => api.download(
      `/v1/adapters/${enc(name)}/versions/${v.version}/files`, `${name}-v${v.version}.tar`)
      .catch((e) => message.replaceChildren(errorBox(e))));
    view.append(h("section", { class: "version" },
      h("h2", {}, `Version ${v.version} `, stageBadge(v.stage)),
      h("p", { class: "mono" }, v.id),
      v.stage_reason ? h("p", {}, v.stage_reason) : null,
      keyValues({ created: time(v.created_at), rank: v.rank, size: bytes(v.size_bytes),
        target_modules: v.target_modules }),
      h("h3", {}, "Metrics"), metricsSummary(v.metrics),
      h("details", {}, h("summary", {}, "Lineage"), keyValues(v.lineage)),
      get));
  }
}

// ---- evals ----

export async function evals({ view }) {
  const list = await api.get("/v1/evals", { limit: 50 });
  if (!list.data.length) {
    view.append(h("p", { class: "empty" }, "No evals yet."));
    return;
  }
  for (const ev of list.data) {
    const runs = await api.get(`/v1/evals/${enc(ev.id)}/runs`, { limit: 50 });
    view.append(section(ev.name || ev.id, table("Runs", ["Run", "Model", "Status", "Passed",
      "Failed", "Errored", "Total"], runs.data.map((r) => [r.name, r.model || "—", r.status,
      r.result_counts?.passed, r.result_counts?.failed, r.result_counts?.errored,
      r.result_counts?.total]), "No runs yet.")));
  }
}
