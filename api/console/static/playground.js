// The playground: one prompt to the base model and adapters side by side, each answer streamed.

import * as api from "./api.js";
import { baseModels, numberField } from "./tenant.js";
import { errorBox, h, section } from "./ui.js";

export async function playground({ view }) {
  const [bases, list] = await Promise.all([baseModels(), api.get("/v1/adapters")]);
  // By name, an adapter serves its production version (and canary share), as callers see it.
  const choices = [...bases.map((m) => [m, `${m} (base)`]),
    ...list.data.filter((a) => a.production_version)
      .map((a) => [a.name, `${a.name} by name (production v${a.production_version})`]),
    ...list.data.flatMap((a) => a.versions.filter((v) => v.stage !== "rejected")
      .map((v) => [v.id, `${a.name} v${v.version} (${v.stage})`]))];
  const boxes = choices.map(([id, text], i) => h("div", { class: "check" },
    h("input", { type: "checkbox", id: `model-${i}`, value: id, checked: i === 0 || i === choices.length - 1 }),
    h("label", { for: `model-${i}` }, text)));
  const prompt = h("textarea", { id: "prompt", rows: 3, required: true });
  const columns = h("div", { class: "columns" });
  const form = h("form", {},
    h("fieldset", {}, h("legend", {}, "Models to compare"), boxes),
    h("div", { class: "field" }, h("label", { for: "prompt" }, "Prompt"), prompt),
    numberField("max-tokens", "Max tokens", { min: 1, max: 2048, value: 64 }),
    h("button", { type: "submit" }, "Send to all"));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const models = [...form.querySelectorAll("input[type=checkbox]:checked")].map((b) => b.value);
    const maxTokens = parseInt(form.elements["max-tokens"].value, 10) || 64;
    const messages = [{ role: "user", content: prompt.value }];
    columns.replaceChildren(...models.map((model) => {
      const out = h("p", { class: "answer", "aria-live": "polite" });
      const column = h("section", { class: "answer-column", "aria-label": `Answer from ${model}` },
        h("h3", {}, model), out);
      api.streamChat({ model, messages, maxTokens, onDelta: (t) => out.append(t) })
        .then(() => column.classList.add("done"))
        .catch((err) => { column.append(errorBox(err)); column.classList.add("done"); });
      return column;
    }));
  });
  view.append(section("Compare answers", form), columns);
}
