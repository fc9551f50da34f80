// Analyses: which models are alike. Launch one (models, components, metrics, an optional base for
// task vectors); follow it; read its heatmaps and maps per component, its outliers and identical
// components, with every model a link to its registry row.

import { all, api } from "../api.js";
import { badge, errorBox, field, h, json, when, put } from "../ui.js";
import { cancelButton, errorOf, isLive, progressOf } from "./jobs.js";

const COMPONENTS = ["text_encoder", "unet", "vae", "text_encoder_2"];
const METRICS = ["l2", "cosine"];

export async function render(view, ctx, id) {
  return id ? detail(view, ctx, id) : list(view, ctx);
}

async function list(view, ctx) {
  const models = await all("/models?status=ready");
  const message = h("div", { id: "analysis-error" });
  const count = h("span", { class: "muted", id: "analysis-count" });
  const boxes = models.map((m) => h("label", { class: "model", "data-name": m.name, style: { display: "block" } },
    h("input", { type: "checkbox", name: "model", value: m.name, onchange: () => counted() }), " ", m.name, " ",
    h("span", { class: "muted" }, m.architecture || "")));
  const checked = () => boxes.map((b) => b.querySelector("input")).filter((i) => i.checked).map((i) => i.value);
  const counted = () => { count.textContent = `${checked().length} checked (at least 2)`; };
  counted();
  const filter = h("input", { type: "search", placeholder: "filter models…", "aria-label": "filter models" });
  filter.addEventListener("input", () => boxes.forEach((b) => { b.hidden = !b.dataset.name.toLowerCase().includes(filter.value.toLowerCase()); }));
  const showAll = h("button", { type: "button", class: "secondary", onclick: () => { boxes.forEach((b) => { if (!b.hidden) b.querySelector("input").checked = true; }); counted(); } }, "Check shown");
  const ticks = (name, values, on) => h("div", { class: "row", id: `analysis-${name}` }, values.map((v) =>
    h("label", {}, h("input", { type: "checkbox", name, value: v, checked: on.includes(v) }), ` ${v}`)));
  const components = ticks("components", COMPONENTS, []);
  const metrics = ticks("metrics", METRICS, METRICS);
  const base = h("select", { name: "base", "aria-label": "base model" }, h("option", { value: "" }, "none: compare the weights"),
    models.map((m) => h("option", { value: m.name }, m.name)));
  const submit = h("button", { type: "submit", id: "analysis-submit" }, "Analyse");
  const values = (group) => [...group.querySelectorAll("input:checked")].map((i) => i.value);
  const form = h("form", {
    id: "analysis-form", onsubmit: async (event) => {
      event.preventDefault();
      message.replaceChildren();
      const body = { models: checked() };
      if (values(components).length) body.components = values(components);
      if (values(metrics).length) body.metrics = values(metrics);
      if (base.value) body.base = base.value;
      submit.disabled = true;
      try {
        const analysis = await api("/analyses", { method: "POST", body });
        location.hash = `#/analyses/${analysis.id}`;
      } catch (error) {
        message.replaceChildren(errorBox(error));
      } finally {
        submit.disabled = false;
      }
    },
  },
  h("div", { class: "cols" },
    group("Models", h("div", {}, h("div", { class: "row" }, filter, showAll, count),
      h("div", { style: { maxHeight: "260px", overflow: "auto", marginTop: "6px" } }, boxes.length ? boxes : h("p", { class: "muted" }, "no ready models: register some first")))),
    h("div", {}, group("Components", components, "none ticked: every component all the models have"),
      group("Metrics", metrics, "none ticked: both"),
      field("Base", base, "with a base, each model minus the base is compared (task vectors)"))),
  h("p", {}, submit), message);

  const body = h("tbody");
  put(view, h("h1", {}, "Analyses"), h("div", { class: "card" }, h("h2", {}, "New analysis"), form),
    h("h2", {}, "Recent analyses"), h("table", { class: "data", id: "analyses" },
      h("thead", {}, h("tr", {}, ["#", "Models", "Components", "Status", "Progress", "Created", ""].map((t) => h("th", {}, t)))), body));
  let first = true;
  ctx.poll(async () => {
    const page = await api("/analyses?limit=20");
    body.replaceChildren(...(page.items.length ? page.items.map((a) => h("tr", { "data-id": a.id, "data-status": a.status },
      h("td", { class: "num" }, a.id), h("td", {}, h("a", { href: `#/analyses/${a.id}` }, names(a.models))),
      h("td", {}, (a.components || []).join(", ")), h("td", {}, badge(a.status)),
      h("td", { style: { minWidth: "200px" } }, progressOf("analyses", a)), h("td", {}, when(a.created_at)),
      h("td", {}, cancelButton("analyses", a)))) : [h("tr", {}, h("td", { colspan: 7, class: "muted" }, "none yet"))]));
    if (first) { first = false; ctx.ready(); }
    return page.items.some(isLive) ? 1000 : 5000;
  });
}

// As field(), for a group of checkboxes: a <label> around them would tick the first when its
// caption is clicked.
function group(label, content, hint) {
  return h("div", { class: "field", role: "group", "aria-label": label, style: { display: "flex", flexDirection: "column", gap: "3px", marginBottom: "8px" } },
    h("span", { class: "muted" }, label), content, hint && h("small", { class: "muted" }, hint));
}

function names(models = []) {
  return models.map((m) => m.name).slice(0, 4).join(", ") + (models.length > 4 ? `, … (${models.length})` : "");
}

const modelLink = (m) => h("a", { href: `#/models/${m.id}`, class: "model-link", "data-model": m.id, title: m.sha256 || "" }, m.name);

async function detail(view, ctx, id) {
  let a = await api(`/analyses/${encodeURIComponent(id)}`);
  const header = h("div", { id: "analysis-header" });
  const results = h("div", { id: "analysis-results" });
  const draw = () => {
    header.replaceChildren(h("div", {},
      h("h1", {}, `Analysis #${a.id} `, badge(a.status)),
      isLive(a) ? h("div", { class: "row" }, h("div", { style: { minWidth: "300px" } }, progressOf("analyses", a)), cancelButton("analyses", a, refresh)) : null,
      errorOf(a),
      h("div", { class: "card", id: "analysis-models" },
        h("h2", { style: { marginTop: 0 } }, "Models ", h("small", { class: "muted" }, "(click a model to open it)")),
        h("ol", {}, (a.models || []).map((m) => h("li", {}, modelLink(m), " ", h("code", { class: "muted" }, (m.sha256 || "").slice(0, 10))))),
        h("p", {}, "Base: ", a.base ? modelLink(a.base) : h("span", { class: "muted" }, "none (the weights themselves are compared)"),
          " · components: ", (a.components || []).join(", "), " · metrics: ", (a.metrics || []).join(", "),
          a.architecture ? ` · ${a.architecture}` : ""))));
    if (a.status === "succeeded" && a.files) results.replaceChildren(h("div", {}, report(a)));
  };
  async function refresh() {
    a = await api(`/analyses/${a.id}`);
    draw();
    return isLive(a) ? 1000 : false;
  }
  put(view, header, results);
  draw();
  ctx.ready();
  if (isLive(a)) setTimeout(() => ctx.poll(refresh, 1000), 1000);
}

// Per component: a heatmap per metric, the map, and what the report flags.
function report(a) {
  const models = a.models || [];
  const named = (i) => (models[i] ? modelLink(models[i]) : `#${i}`);
  const joined = (items, sep) => items.flatMap((item, n) => (n ? [sep, item] : [item]));
  const figures = (a.result && a.result.components) || {};
  const sections = (a.components || []).map((component) => {
    const f = figures[component] || {};
    const heatmaps = (a.files.heatmaps || {})[component] || {};
    const map = (a.files.maps || {})[component];
    const outliers = f.outliers || [], groups = f.identical_groups || [];
    const blocks = Object.entries(f.blocks || {}).filter(([, b]) => (b.outliers || []).length);
    return h("div", { class: "card component", "data-component": component },
      h("h2", { style: { marginTop: 0 } }, component, f.params ? h("small", { class: "muted" }, ` · ${f.keys} keys, ${Number(f.params).toLocaleString()} parameters`) : null),
      h("ul", { class: "flags" },
        h("li", { class: "outliers" }, "Outliers: ", outliers.length ? joined(outliers.map(named), ", ") : h("span", { class: "muted" }, "none")),
        h("li", { class: "identical" }, "Identical: ", groups.length ? joined(groups.map((g) => h("span", {}, joined(g.map(named), " = "))), "; ")
          : h("span", { class: "muted" }, "none")),
        blocks.length ? h("li", { class: "block-outliers" }, "Blocks with outliers: ",
          joined(blocks.map(([name, b]) => h("span", {}, h("code", {}, name), " (", joined(b.outliers.map(named), ", "), ")")), "; ")) : null),
      h("div", { class: "heatmaps row", style: { alignItems: "flex-start" } },
        Object.entries(heatmaps).map(([metric, url]) => h("figure", { style: { margin: 0, maxWidth: "560px" } },
          h("a", { href: url, target: "_blank" }, h("img", { src: url, class: "heatmap", alt: `${component} ${metric} heatmap`, "data-component": component, "data-metric": metric, loading: "lazy" })),
          h("figcaption", { class: "muted" }, metric === "l2" ? "L2 distance" : "cosine similarity", " (clustered order)"))),
        map ? h("figure", { style: { margin: 0, maxWidth: "700px" } },
          h("a", { href: map, target: "_blank" }, h("img", { src: map, class: "map", alt: `${component} map`, "data-component": component, loading: "lazy" })),
          h("figcaption", { class: "muted" }, "map (classical MDS of the L2 distances), with and without the outliers")) : null));
  });
  return [...sections, a.result ? h("details", { class: "card" }, h("summary", {}, "The report (analysis.json)"), json(a.result)) : null];
}
