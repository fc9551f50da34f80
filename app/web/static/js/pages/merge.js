// New merge: a recipe editor (JSON, with completion from the engine's schema and the registry's
// names, and the API's messages at the field at fault), the plan's exact weights per component,
// A1111 merge metadata pasted and converted, and the submitted job followed live.

import { all, api } from "../api.js";
import { JsonEditor, schemaWords } from "../editor.js";
import { badge, bytes, errorBox, h, put } from "../ui.js";
import { downloadOf, errorOf, isLive, progressOf } from "./jobs.js";

const EXAMPLE = { name: "my-mix", merge: { method: "uniform", models: [] } };
const DRAFT = "sdmerge.draft";

export async function render(view, ctx) {
  const [models, openapi] = await Promise.all([all("/models?status=ready"), api("/openapi.json").catch(() => null)]);
  const defs = (openapi && openapi.components && openapi.components.schemas) || {};
  const words = defs.Recipe ? schemaWords({ $ref: "#/components/schemas/Recipe" }, defs) : { keys: [], values: [] };
  const names = models.map((m) => ({ value: m.name, hint: `${m.architecture || "?"} · ${(m.sha256 || "").slice(0, 10)}` }));
  const example = { ...EXAMPLE, merge: { ...EXAMPLE.merge, models: models.slice(0, 2).map((m) => m.name) } };
  const editor = new JsonEditor({
    value: sessionStorage.getItem(DRAFT) || JSON.stringify(example, null, 2),
    completions: (isKey) => (isKey ? words.keys : [...names, ...words.values]),
  });
  editor.textarea.addEventListener("input", () => sessionStorage.setItem(DRAFT, editor.value));
  const result = h("div", { id: "plan-result" });
  const job = h("div", { id: "merge-job" });

  const planIt = async () => {
    const body = editor.parse();
    if (body === null) return null;
    try {
      const plan = await api("/merges/plan", { method: "POST", body });
      editor.clearMarks();
      result.replaceChildren(planView(plan));
      return plan;
    } catch (error) {
      editor.showError(error);
      result.replaceChildren(errorBox(error));
      return null;
    }
  };
  const submit = async () => {
    const body = editor.parse();
    if (body === null) return;
    try {
      const created = await api("/merges", { method: "POST", body });
      editor.clearMarks();
      follow(created);
    } catch (error) {
      editor.showError(error);
      result.replaceChildren(errorBox(error));
    }
  };
  let following = 0;
  const follow = (created) => {
    const mine = ++following;
    let current = created, fresh = true;
    ctx.poll(async () => {
      if (mine !== following) return false;  // a newer submission is followed instead
      if (!fresh) current = await api(`/merges/${created.id}`);
      fresh = false;
      job.replaceChildren(h("div", { class: "card", "data-id": current.id, "data-status": current.status },
        h("h2", {}, `Merge #${current.id} `, badge(current.status)), progressOf("merges", current),
        downloadOf(current), errorOf(current), h("p", {}, h("a", { href: "#/jobs" }, "All jobs"))));
      return isLive(current) ? 1000 : false;
    });
  };

  const a1111 = h("textarea", { rows: 8, placeholder: '{"sd_merge_recipe": …, "sd_merge_models": …} — a file\'s __metadata__ from the WebUI\'s checkpoint merger', "aria-label": "A1111 metadata" });
  const convert = async () => {
    let body;
    try { body = JSON.parse(a1111.value); } catch (error) { result.replaceChildren(errorBox({ code: "malformed_json", message: error.message })); return; }
    // A file's __metadata__ pasted as it is, or the whole header with it.
    if (body && typeof body === "object" && !body.__metadata__ && body.sd_merge_recipe) body = { __metadata__: body };
    try {
      const plan = await api("/merges/plan", { method: "POST", body });
      editor.value = JSON.stringify(plan.recipe, null, 2);
      sessionStorage.setItem(DRAFT, editor.value);
      result.replaceChildren(h("p", {}, "Converted: the recipe above is the A1111 merge over its leaf models, with exact weights."), planView(plan));
    } catch (error) {
      result.replaceChildren(errorBox(error));
    }
  };

  put(view, h("h1", {}, "New merge"),
    h("div", { class: "cols" },
      h("div", {},
        h("div", { class: "card" }, editor.element,
          h("p", { class: "muted" }, "Ctrl+Space completes keys, methods and model names. Messages from the engine appear at the field at fault."),
          h("div", { class: "row" }, h("button", { class: "secondary", onclick: planIt, id: "plan" }, "Plan"),
            h("button", { onclick: submit, id: "submit" }, "Merge"),
            h("button", { class: "secondary", onclick: () => { editor.value = JSON.stringify(example, null, 2); sessionStorage.removeItem(DRAFT); } }, "Reset"))),
        h("div", { class: "card" }, h("h2", {}, "Paste A1111 merge metadata"), a1111, h("p", {}, h("button", { class: "secondary", onclick: convert, id: "convert" }, "Convert")))),
      h("div", {}, job, result)));
  ctx.ready();
}

function planView(plan) {
  return h("div", { class: "card plan" },
    h("h2", {}, `Plan: ${plan.name || "unnamed"} · ${plan.architecture || "?"}`),
    h("p", {}, `Output: ${plan.output.keys} tensors, ${bytes(plan.output.bytes)} (${plan.output.dtype}, accumulated in ${plan.output.accumulate}); reads ${bytes(plan.bytes_to_read)}.`),
    plan.warnings.length ? h("ul", {}, plan.warnings.map((w) => h("li", { class: "error" }, w))) : null,
    h("table", { class: "data", id: "plan-weights" },
      h("thead", {}, h("tr", {}, h("th", {}, "Component"), h("th", {}, "Model"), h("th", {}, "sha256"), h("th", { class: "num" }, "Weight"), h("th", {}, "Exact"))),
      h("tbody", {}, Object.entries(plan.components).flatMap(([component, c]) => c.sources.map((s, n) => h("tr", {},
        h("td", {}, n ? "" : `${component} (${c.keys} keys)`), h("td", {}, s.model), h("td", {}, h("code", {}, (s.sha256 || "").slice(0, 10))),
        h("td", { class: "num" }, s.weight === undefined ? "" : s.weight.toPrecision(6)),
        h("td", {}, s.weight === undefined ? (n ? "" : h("code", {}, `${c.evaluation.method} (per tensor)`)) : h("code", {}, s.exact_weight))))))));
}
