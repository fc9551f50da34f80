// Models: the registry as a sortable, filterable table; register a path, scan the roots, upload
// with a progress bar; one model's details with the lineage its merge recipe records.

import { all, api, upload } from "../api.js";
import { badge, bytes, errorBox, field, h, json, progressBar, sortableTable, when, put } from "../ui.js";

export async function render(view, ctx, id) {
  return id ? detail(view, ctx, id) : list(view, ctx);
}

const COLUMNS = [
  { key: "name", label: "Name", render: (m) => h("a", { href: `#/models/${m.id}` }, m.name) },
  { key: "architecture", label: "Architecture" },
  { key: "components", label: "Components", value: (m) => Object.keys(m.components || {}).join(", ") },
  { key: "size", label: "Size", num: true, render: (m) => bytes(m.size) },
  { key: "sha256", label: "Hash", value: (m) => (m.sha256 || "").slice(0, 10), render: (m) => h("code", { title: m.sha256 || "" }, (m.sha256 || "").slice(0, 10)) },
  { key: "autov3", label: "AutoV3", value: (m) => (m.autov3 || "").slice(0, 12), render: (m) => h("code", { title: m.autov3 || "" }, (m.autov3 || "").slice(0, 12)) },
  { key: "status", label: "Status", render: (m) => h("span", { title: m.error || "" }, badge(m.status), m.error ? h("div", { class: "error" }, m.error) : null) },
];

async function list(view, ctx) {
  const message = h("div");
  const count = h("span", { class: "muted" });
  const text = h("input", { type: "search", placeholder: "name or hash…", "aria-label": "filter by name or hash" });
  const architecture = h("select", { "aria-label": "architecture" }, ["", "sd1", "sd2", "sdxl"].map((a) => h("option", { value: a }, a || "any architecture")));
  const status = h("select", { "aria-label": "status" }, ["", "ready", "hashing", "failed"].map((s) => h("option", { value: s }, s || "any status")));
  let models = [];
  const table = sortableTable(COLUMNS, []);
  const filtered = () => {
    const needle = text.value.trim().toLowerCase();
    return models.filter((m) => (!needle || m.name.toLowerCase().includes(needle) || hashMatch(m, needle))
      && (!architecture.value || m.architecture === architecture.value) && (!status.value || m.status === status.value));
  };
  const redraw = () => {
    const rows = filtered();
    table.update(rows);
    count.textContent = `${rows.length} of ${models.length} models`;
  };
  for (const input of [text, architecture, status]) input.addEventListener("input", redraw);

  const path = h("input", { name: "path", placeholder: "path under a model root", size: 40 });
  const name = h("input", { name: "name", placeholder: "name (optional)" });
  const register = h("form", {
    class: "row", onsubmit: async (event) => {
      event.preventDefault();
      await act(message, async () => {
        const model = await api("/models", { method: "POST", body: { path: path.value, ...(name.value ? { name: name.value } : {}) } });
        message.replaceChildren(h("p", {}, "Registered ", h("a", { href: `#/models/${model.id}` }, model.name), "."));
        path.value = name.value = "";
      });
      await reload();
    },
  }, path, name, h("button", { type: "submit" }, "Register"));
  const scan = h("button", {
    class: "secondary", onclick: async () => {
      await act(message, async () => {
        const result = await api("/models/scan", { method: "POST" });
        message.replaceChildren(h("p", {}, `Scan: ${result.registered.length} registered, ${result.skipped.length} skipped.`),
          result.skipped.length ? h("ul", {}, result.skipped.map((s) => h("li", { class: "error" }, `${s.path}: ${s.error}`))) : null);
      });
      await reload();
    },
  }, "Scan the model roots");
  const file = h("input", { type: "file", accept: ".safetensors", "aria-label": "checkpoint to upload" });
  const uploadProgress = h("div");
  const uploadButton = h("button", {
    class: "secondary", onclick: async () => {
      const chosen = file.files[0];
      if (!chosen) return;
      uploadButton.disabled = true;
      await act(message, async () => {
        uploadProgress.replaceChildren(progressBar(0));
        const model = await upload(chosen, chosen.name, (fraction, sent) =>
          uploadProgress.replaceChildren(progressBar(fraction, `${bytes(sent)} of ${bytes(chosen.size)}`)));
        uploadProgress.replaceChildren(progressBar(1, "uploaded"));
        message.replaceChildren(h("p", {}, "Uploaded ", h("a", { href: `#/models/${model.id}` }, model.name), "."));
      });
      uploadButton.disabled = false;
      await reload();
    },
  }, "Upload");

  put(view, h("h1", {}, "Models"),
    h("div", { class: "card" }, h("div", { class: "row" }, register, scan), h("div", { class: "row", style: { marginTop: "10px" } }, file, uploadButton, uploadProgress), message),
    h("div", { class: "row", style: { marginBottom: "8px" } }, text, architecture, status, count), table);

  async function reload() {
    let first = true;
    const loaded = [];
    await all("/models", (page, sofar) => {
      loaded.length = 0;
      loaded.push(...sofar);
      if (first || sofar.length === page.length) { models = [...loaded]; redraw(); }
      if (first) { first = false; ctx.ready(); }
    });
    models = loaded;
    redraw();
    if (first) ctx.ready();
  }
  await reload();
  // Models still hashing turn ready (or failed) by themselves: look again while any is.
  ctx.poll(async () => {
    if (!models.some((m) => m.status === "hashing")) return true;
    await reload();
    return true;
  }, 2000);
}

// A hash as Civitai shows it (any kind, any case) finds its model, as GET /models?hash= does.
function hashMatch(model, needle) {
  if (needle.length < 8 || !/^[0-9a-f]+$/.test(needle)) return false;
  if (needle.length === 8 && (model.legacy_hash === needle || model.crc32 === needle)) return true;
  return needle.length >= 10 && [model.sha256, model.autov3, model.blake3].some((x) => (x || "").startsWith(needle));
}

async function act(message, fn) {
  try { await fn(); } catch (error) { message.replaceChildren(errorBox(error)); }
}

async function detail(view, ctx, id) {
  const model = await api(`/models/${encodeURIComponent(id)}`);
  const metadata = model.metadata || {};
  const lineage = await lineageOf(model, metadata);
  const remove = h("button", {
    class: "danger", onclick: async () => {
      if (!confirm(`Forget ${model.name}? (an uploaded file is deleted too)`)) return;
      await api(`/models/${model.id}`, { method: "DELETE" });
      location.hash = "#/models";
    },
  }, "Forget");
  put(view, 
    h("h1", {}, model.name, " ", badge(model.status)),
    model.error ? h("div", { class: "errorbox" }, model.error) : null,
    h("div", { class: "cols" },
      h("div", { class: "card" }, h("table", { class: "data" }, h("tbody", {}, [
        ["Path", h("code", {}, model.path)], ["Size", bytes(model.size)], ["Architecture", model.architecture || ""],
        ["sha256", h("code", {}, model.sha256 || "")], ["AutoV3", h("code", {}, model.autov3 || "")],
        ["Legacy hash", h("code", {}, model.legacy_hash || "")], ["CRC32", h("code", {}, model.crc32 || "")],
        ["BLAKE3", h("code", {}, model.blake3 || "")],
        ["On Civitai", h("span", {}, Object.entries(model.civitai || {}).filter(([k]) => !["SHA256", "BLAKE3"].includes(k))
          .map(([k, v]) => h("span", { class: "hash" }, `${k} `, h("code", {}, v), " ")))],
        ["Registered", when(model.created_at)],
      ].map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, v))))), h("p", {}, remove)),
      h("div", { class: "card" }, h("h2", {}, "Components"), h("table", { class: "data" },
        h("thead", {}, h("tr", {}, h("th", {}, "Component"), h("th", { class: "num" }, "Keys"), h("th", { class: "num" }, "Parameters"), h("th", {}, "dtypes"))),
        h("tbody", {}, Object.entries(model.components || {}).map(([name, c]) => h("tr", {},
          h("td", {}, name), h("td", { class: "num" }, c.keys ?? ""), h("td", { class: "num" }, (c.params ?? "").toLocaleString()),
          h("td", {}, Object.entries(c.dtypes || {}).map(([d, n]) => `${d} ${n}`).join(", ")))))))),
    h("div", { class: "card", id: "lineage" }, h("h2", {}, "Lineage"), lineage),
    h("div", { class: "card" }, h("h2", {}, "Metadata"), Object.keys(metadata).length ? json(metadata) : h("p", { class: "muted" }, "none")));
  ctx.ready();
}

// The API hands metadata values that hold JSON as parsed values; a string is parsed here.
const parsed = (value) => (typeof value === "string" ? JSON.parse(value) : value);
const readable = (value) => { try { return parsed(value); } catch { return null; } };

// What the file says it was merged from, as a tree: GET /models/{id}/lineage walks the recorded
// recipes (registered models, merge outputs, the ancestors A1111 and sdmerge carry forward); each
// parent under the merge that took it, with its weight; a file reached twice is listed once.
async function lineageOf(model, metadata) {
  const recipe = readable(metadata.sdmerge_recipe ?? metadata.sd_merge_recipe ?? null);
  const study = readable(metadata.sdmerge_study ?? null);
  if (model.status !== "ready") return h("p", { class: "muted" }, "known once the model is hashed");
  const graph = await api(`/models/${model.id}/lineage`);
  const nodes = new Map(graph.nodes.map((n) => [n.id, n]));
  const parents = new Map();
  for (const edge of graph.edges) {
    if (!parents.has(edge.child)) parents.set(edge.child, []);
    parents.get(edge.child).push(edge);
  }
  if (!parents.has(graph.root)) return h("p", { class: "muted" }, "not a recorded merge");
  const listed = new Set();
  const item = (id, edge) => {
    const node = nodes.get(id);
    const again = listed.has(id);
    listed.add(id);
    const below = again ? [] : parents.get(id) || [];
    const label = node.model_id
      ? h("a", { href: `#/models/${node.model_id}` }, node.model_name)
      : h("span", {}, node.name || id.slice(0, 10), " ", h("span", { class: "muted" }, node.artifact_id ? `(merge output #${node.artifact_id})` : "(not registered)"));
    return h("li", {}, label,
      node.sha256 ? h("code", { title: node.sha256 }, ` ${node.sha256.slice(0, 10)}`) : null,
      edge && edge.weight_exact !== null ? h("span", {}, ` × ${edge.weight_exact}`) : null,
      node.merge ? h("span", { class: "muted" }, ` ${node.merge.method || "merge"} (${node.merge.tool || "?"})`) : null,
      again && (parents.get(id) || []).length ? h("span", { class: "muted" }, " (see above)") : null,
      below.length ? h("ul", {}, below.map((e) => item(e.parent, e))) : null);
  };
  return h("div", {}, h("ul", { class: "lineage" }, item(graph.root, null)),
    graph.cyclic ? h("p", { class: "error" }, "the recorded lineage loops: some file claims to be its own ancestor") : null,
    graph.truncated ? h("p", { class: "muted" }, "the lineage is cut short (too large or too deep)") : null,
    study ? h("p", {}, "Chosen by a selection study: ", h("code", {}, study.name || "")) : null,
    recipe ? h("h2", {}, "Recipe") : null, recipe ? json(recipe) : null);
}
