// Previews: launch a grid (targets × prompts × seeds) or a sweep, with the WebUI's settings or a
// pasted A1111 infotext / txt2img body; watch the images come in; open one with its parameters;
// compare two side by side (swipe or blink).

import { all, api } from "../api.js";
import { JsonEditor } from "../editor.js";
import { badge, duration, errorBox, field, h, json, when, put } from "../ui.js";
import { cancelButton, errorOf, isLive, progressOf } from "./jobs.js";

const SAMPLERS = ["euler", "euler_a", "dpmpp_2m_karras"];
const DRAFT = "sdmerge.preview-draft";
const SWEEP_WORDS = ["base", "kind", "candidates", "at", "path", "values", "start", "stop", "steps", "x", "y", "recipe", "merge", "name", "method", "models", "model", "weight"];
const SWEEP_KINDS = ["text_encoder", "unet", "vae", "leave_one_out", "weight", "uniform", "weighted", "add_difference"];

export async function render(view, ctx, id) {
  return id ? detail(view, ctx, id) : list(view, ctx);
}

function examples(names) {
  const [a = "a", b = "b", c = "c"] = names;
  const three = names.length ? names.slice(0, 3) : [a, b, c];
  const base = { recipe: { name: "mix", merge: { method: "uniform", models: three } } };
  return {
    text_encoder: { base, kind: "text_encoder", candidates: three },
    unet: { base, kind: "unet", candidates: three },
    vae: { base: a, kind: "vae", candidates: [b, c] },
    leave_one_out: { base, kind: "leave_one_out" },
    weight: { base: { recipe: { name: "ab", merge: { method: "weighted", models: [{ model: a, weight: 1 }, { model: b, weight: 1 }] } } },
      kind: "weight", path: "merge.models.1.weight", values: [0, 0.5, 1, 2] },
    xy: { base, x: { kind: "leave_one_out" }, y: { kind: "vae", candidates: [a, b] } },
  };
}

async function list(view, ctx) {
  const models = await all("/models?status=ready");
  const names = models.map((m) => m.name);
  const draft = JSON.parse(sessionStorage.getItem(DRAFT) || "{}");
  const message = h("div", { id: "preview-error" });
  const completions = (isKey) => (isKey ? SWEEP_WORDS.map((value) => ({ value }))
    : [...models.map((m) => ({ value: m.name, hint: m.architecture || "" })), ...SWEEP_KINDS.map((value) => ({ value }))]);

  // Targets: the models in the order they were checked (the grid's columns), then an inline recipe.
  const chosen = (draft.targets || []).filter((n) => names.includes(n));
  const order = h("p", { class: "muted", id: "target-order" });
  const showOrder = () => { order.textContent = chosen.length ? `Columns: ${chosen.join(", ")}` : "Columns: none checked"; };
  const boxes = models.map((m) => h("label", { class: "target", "data-name": m.name, style: { display: "block" } },
    h("input", {
      type: "checkbox", name: "target", value: m.name, checked: chosen.includes(m.name), onchange: (event) => {
        const at = chosen.indexOf(m.name);
        if (event.target.checked && at < 0) chosen.push(m.name);
        if (!event.target.checked && at >= 0) chosen.splice(at, 1);
        showOrder(); save();
      },
    }), " ", m.name, " ", h("span", { class: "muted" }, m.architecture || "")));
  const filter = h("input", { type: "search", placeholder: "filter models…", "aria-label": "filter models" });
  filter.addEventListener("input", () => boxes.forEach((b) => { b.hidden = !b.dataset.name.toLowerCase().includes(filter.value.toLowerCase()); }));
  const recipe = new JsonEditor({ value: draft.recipe || "", rows: 6, completions });
  recipe.textarea.style.minHeight = "120px";
  recipe.textarea.placeholder = '{"name": "mix", "merge": {"method": "uniform", "models": [...]}}';
  recipe.textarea.setAttribute("aria-label", "inline recipe target");
  recipe.element.id = "recipe-target";
  showOrder();

  const sweepExamples = examples(names);
  const sweep = new JsonEditor({ value: draft.sweep || JSON.stringify(sweepExamples.text_encoder, null, 2), rows: 16, completions });
  sweep.textarea.style.minHeight = "260px";
  sweep.textarea.setAttribute("aria-label", "sweep JSON");
  sweep.element.id = "sweep-editor";
  const example = h("select", { id: "sweep-example", "aria-label": "sweep example" }, h("option", { value: "" }, "start from an example…"),
    Object.keys(sweepExamples).map((k) => h("option", { value: k }, k === "xy" ? "XY: leave one out × VAE" : k)));
  example.addEventListener("change", () => {
    if (example.value) sweep.value = JSON.stringify(sweepExamples[example.value], null, 2);
    example.value = "";
    save();
  });

  // Settings: empty means the default, or what the pasted payload says.
  const input = (name, attrs = {}) => h("input", { name, value: draft[name] ?? "", ...attrs });
  const prompts = h("textarea", { name: "prompts", rows: 4, placeholder: "one prompt per line" });
  prompts.value = draft.prompts || "";
  const negative = h("textarea", { name: "negative_prompt", rows: 2, placeholder: "negative prompt" });
  negative.value = draft.negative_prompt || "";
  const seeds = input("seeds", { placeholder: "0", size: 12 });
  const steps = input("steps", { type: "number", min: 1, max: 1000, placeholder: "20", style: { width: "80px" } });
  const cfg = input("cfg_scale", { type: "number", min: 0, max: 30, step: 0.5, placeholder: "7", style: { width: "80px" } });
  const sampler = h("select", { name: "sampler" }, h("option", { value: "" }, "default (euler)"), SAMPLERS.map((s) => h("option", { value: s }, s)));
  sampler.value = draft.sampler || "";
  const width = input("width", { type: "number", min: 64, max: 2048, step: 8, placeholder: "model's", style: { width: "90px" } });
  const height = input("height", { type: "number", min: 64, max: 2048, step: 8, placeholder: "model's", style: { width: "90px" } });
  const clipSkip = input("clip_skip", { type: "number", min: 1, max: 12, placeholder: "1", style: { width: "70px" } });
  const payload = h("textarea", { name: "payload", rows: 5, placeholder: "paste an A1111 infotext (PNG Info's text) or a txt2img API payload (JSON); the fields above override it" });
  payload.value = draft.payload || "";
  const numbers = { steps, cfg_scale: cfg, width, height, clip_skip: clipSkip };

  let mode = draft.mode === "sweep" ? "sweep" : "targets";
  const targetsPart = h("div", { id: "targets-part" },
    group("Models", h("div", {}, h("div", { class: "row" }, filter,
      h("button", { type: "button", class: "secondary", onclick: () => boxes.forEach((b) => { const box = b.querySelector("input"); if (!b.hidden && !box.checked) box.click(); }) }, "Check shown")),
    h("div", { style: { maxHeight: "240px", overflow: "auto", marginTop: "6px" } }, boxes.length ? boxes : h("p", { class: "muted" }, "no ready models: register some first")))),
    order, field("Inline recipe target (optional, the last column)", recipe.element));
  const sweepPart = h("div", { id: "sweep-part" }, h("div", { class: "row", style: { marginBottom: "6px" } }, example,
    h("small", { class: "muted" }, "a base and an axis (kind) or two (x, y); Ctrl+Space completes")), sweep.element);
  const modes = ["targets", "sweep"].map((m) => h("label", {}, h("input", {
    type: "radio", name: "mode", value: m, id: `mode-${m}`, checked: mode === m,
    onchange: () => { mode = m; showMode(); save(); },
  }), m === "targets" ? " Grid of targets" : " Sweep"));
  const showMode = () => { targetsPart.hidden = mode !== "targets"; sweepPart.hidden = mode !== "sweep"; };
  showMode();

  const submit = h("button", { type: "submit", id: "preview-submit" }, "Render");
  const form = h("form", { id: "preview-form", onsubmit: (event) => { event.preventDefault(); launch(); } },
    h("div", { class: "row", style: { marginBottom: "10px" } }, modes),
    h("div", { class: "cols" },
      h("div", {}, targetsPart, sweepPart),
      h("div", {}, field("Prompts", prompts), field("Negative prompt", negative),
        h("div", { class: "row" }, field("Seeds (comma list)", seeds), field("Steps", steps), field("CFG", cfg), field("Sampler", sampler)),
        h("div", { class: "row", style: { marginTop: "6px" } }, field("Width", width), field("Height", height), field("Clip skip", clipSkip)),
        field("A1111 infotext or txt2img payload", payload))),
    h("p", { class: "row" }, submit, h("small", { class: "muted" }, "empty fields take the default, or the pasted payload's value")), message);
  form.addEventListener("input", () => save());

  function save() {
    const values = { mode, targets: chosen, recipe: recipe.value, sweep: sweep.value, prompts: prompts.value, negative_prompt: negative.value,
      seeds: seeds.value, sampler: sampler.value, payload: payload.value };
    for (const [name, el] of Object.entries(numbers)) values[name] = el.value;
    sessionStorage.setItem(DRAFT, JSON.stringify(values));
  }

  const settings = () => {
    const body = {};
    const lines = prompts.value.split("\n").map((l) => l.trim()).filter(Boolean);
    if (lines.length) body.prompts = lines;
    if (negative.value.trim()) body.negative_prompt = negative.value.trim();
    const seedList = seeds.value.split(/[\s,]+/).filter(Boolean).map((s) => (/^-?\d+$/.test(s) ? Number(s) : s));
    if (seedList.length) body.seeds = seedList;
    for (const [name, el] of Object.entries(numbers)) if (el.value !== "") body[name] = Number(el.value);
    if (sampler.value) body.sampler = sampler.value;
    const pasted = payload.value.trim();
    if (pasted.startsWith("{")) {
      try { body.a1111 = JSON.parse(pasted); } catch (error) {
        throw { code: "malformed_json", message: `the pasted txt2img payload is not valid JSON: ${error.message}` };
      }
    } else if (pasted) body.infotext = pasted;
    return body;
  };
  const targetsOf = () => {
    const targets = [...chosen];
    if (recipe.value.trim()) {
      const value = recipe.parse();
      if (value === null) throw { code: "malformed_json", message: "the inline recipe is not valid JSON (see the editor)" };
      targets.push(value && value.recipe && !value.merge ? value : { recipe: value });
    }
    return { targets };
  };
  const sweepOf = () => {
    const value = sweep.parse();
    if (value === null) throw { code: "malformed_json", message: "the sweep is not valid JSON (see the editor)" };
    return { sweep: value };
  };

  async function launch() {
    message.replaceChildren();
    recipe.clearMarks();
    sweep.clearMarks();
    let body;
    try { body = { ...settings(), ...(mode === "sweep" ? sweepOf() : targetsOf()) }; } catch (error) {
      message.replaceChildren(errorBox(error));
      return;
    }
    submit.disabled = true;
    try {
      const preview = await api("/previews", { method: "POST", body });
      location.hash = `#/previews/${preview.id}`;
    } catch (error) {
      message.replaceChildren(errorBox(error));
      if (mode === "sweep") sweep.showError(within(error, ["sweep"], sweep.value));
      else if (recipe.value.trim()) recipe.showError(within(error, ["targets", body.targets.length - 1, "recipe"], recipe.value));
    } finally {
      submit.disabled = false;
    }
  }

  const body = h("tbody");
  put(view, h("h1", {}, "Previews"), h("div", { class: "card" }, h("h2", {}, "New preview"), form),
    h("h2", {}, "Recent previews"), h("table", { class: "data", id: "previews" },
      h("thead", {}, h("tr", {}, ["#", "Targets", "Status", "Progress", "Created", ""].map((t) => h("th", {}, t)))), body));
  let first = true;
  ctx.poll(async () => {
    const page = await api("/previews?limit=20");
    body.replaceChildren(...(page.items.length ? page.items.map((p) => h("tr", { "data-id": p.id, "data-status": p.status },
      h("td", { class: "num" }, p.id), h("td", {}, h("a", { href: `#/previews/${p.id}` }, labels(p))), h("td", {}, badge(p.status)),
      h("td", { style: { minWidth: "200px" } }, progressOf("previews", p)), h("td", {}, when(p.created_at)),
      h("td", {}, cancelButton("previews", p)))) : [h("tr", {}, h("td", { colspan: 6, class: "muted" }, "none yet"))]));
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

function labels(p) {
  const targets = p.targets || [];
  const shown = [...new Set(targets.map((t) => t.label))];
  return shown.slice(0, 4).join(", ") + (shown.length > 4 ? ", …" : "") + (p.grid_rows ? ` × ${p.grid_rows.length} rows` : "");
}

// The API's error with its field paths made relative to the part of the body an editor holds
// (pydantic `loc`s under `prefix`; "invalid sweep at x.kind: …" messages), for editor.showError.
function within(error, prefix, text) {
  const errors = [];
  for (const e of (error.details && error.details.errors) || []) {
    if (error.code === "invalid_recipe") { errors.push(e); continue; }  // its locs are the recipe's own
    const loc = (e.loc || []).filter((p) => p !== "body");
    if (prefix.every((p, i) => String(loc[i]) === String(p))) errors.push({ ...e, loc: loc.slice(prefix.length) });
  }
  const at = /^invalid sweep at ([\w.]+): (.*)$/.exec(error.message || "");
  if (at) {
    let loc = at[1].split(".").map((p) => (/^\d+$/.test(p) ? Number(p) : p));
    let value = {};
    try { value = JSON.parse(text); } catch { /* marked by the editor */ }
    if (loc[0] === "x" && value && !("x" in value)) loc = loc.slice(1);  // a one-axis sweep is its x
    errors.push({ loc, msg: at[2] });
  }
  return { ...error, details: { ...(error.details || {}), errors } };
}

// Images are numbered target-major, then topic, prompt, seed. The table's rows are the
// (topic, prompt, seed) lines — within each of an XY sweep's rows (`grid_rows`) — and its
// columns the targets (an XY sweep's x variants).
export function layoutOf(p) {
  const topics = p.topics && p.topics.length ? p.topics : [p.sampling];
  const lines = [];
  topics.forEach((t, topic) => (t.prompts || []).forEach((prompt, pi) => (t.seeds || [0]).forEach((seed) =>
    lines.push({ topic, prompt: pi, text: prompt, seed, offset: lines.length }))));
  const per = lines.length;
  let ys = p.grid_rows && p.grid_rows.length ? p.grid_rows : [null];
  if (p.targets.length % ys.length) ys = [null];
  const width = p.targets.length / ys.length;
  const rows = ys.flatMap((y, r) => lines.map((line) => ({ ...line, y, cells: Array.from({ length: width }, (_, c) => (r * width + c) * per + line.offset) })));
  return { topics: topics.length, columns: p.targets.slice(0, width), rows, per, total: p.targets.length * per };
}

async function detail(view, ctx, id) {
  let p = await api(`/previews/${encodeURIComponent(id)}`);
  const layout = layoutOf(p);
  const byIndex = new Map();  // n -> {label, line}
  layout.rows.forEach((row) => row.cells.forEach((n, c) => byIndex.set(n, { n, row, column: c, target: p.targets[Math.floor(n / layout.per)] })));
  const imageUrl = (n) => { const image = (p.images || []).find((i) => i.index === n); return image ? image.url : `/previews/${p.id}/images/${n}.png`; };
  const rendered = (n) => p.status === "succeeded" ? (p.images || []).some((i) => i.index === n) : n < ((p.progress || {}).images_done || 0);
  const describe = (n) => {
    const { row, target } = byIndex.get(n);
    return `${target.label}${row.y ? ` · ${row.y}` : ""} · ${layout.topics > 1 ? `topic ${row.topic + 1} · ` : ""}${row.text} · seed ${row.seed}`;
  };

  const header = h("div", { id: "preview-header" });
  const viewer = h("div", { class: "card", id: "image-viewer", hidden: true });
  const compare = h("div", { class: "card", id: "compare", hidden: true });
  const hint = h("p", { class: "muted", id: "compare-hint" });
  const picked = [];  // up to two image indexes to compare

  const cells = new Map();
  const table = h("table", { class: "images", id: "preview-images", "data-status": p.status },
    h("thead", {}, h("tr", {}, h("th"), layout.columns.map((t, c) => h("th", { class: "column", "data-column": c, title: t.model_name || t.label }, t.label)))),
    h("tbody", {}, layout.rows.map((row, r) => h("tr", { "data-row": r },
      h("th", { class: "line", style: { textAlign: "left", fontWeight: "normal", fontSize: "12px", maxWidth: "220px" } },
        row.y ? h("div", { style: { fontWeight: 600 } }, row.y) : null, layout.topics > 1 ? h("div", { class: "muted" }, `topic ${row.topic + 1}`) : null,
        h("div", { title: row.text }, row.text.length > 80 ? `${row.text.slice(0, 80)}…` : row.text), h("div", { class: "muted" }, `seed ${row.seed}`)),
      row.cells.map((n, c) => {
        const td = h("td", { class: "pending", "data-index": n, "data-column": c, "data-state": "pending" });
        cells.set(n, td);
        return td;
      })))));

  const fill = (td, n) => {
    const url = imageUrl(n);
    const img = h("img", {
      src: url, alt: describe(n), title: `${describe(n)} (click: open; shift-click: compare)`, loading: "lazy",
      onclick: (event) => (event.shiftKey ? toggle(n) : open(n)),
    });
    img.addEventListener("load", () => {  // small images shown at 128 px at least, crisp
      img.style.width = `${Math.min(256, Math.max(128, img.naturalWidth))}px`;
      if (img.naturalWidth < 128) img.style.imageRendering = "pixelated";
    });
    img.addEventListener("error", () => {  // the preview finished just as it was fetched: ask again
      if (img.dataset.retried) {  // a cancelled or failed preview keeps no images
        td.dataset.state = "missing";
        td.className = "pending";
        td.replaceChildren(h("small", { class: "muted" }, "not kept"));
        return;
      }
      img.dataset.retried = "1";
      setTimeout(() => { img.src = `${imageUrl(n)}?again=1`; }, 800);
    });
    const box = h("input", { type: "checkbox", class: "compare-pick", "data-index": n, checked: picked.includes(n), onchange: () => toggle(n) });
    td.className = picked.includes(n) ? "picked" : "";
    td.dataset.state = "ready";
    td.replaceChildren(img, h("label", { class: "muted", style: { fontSize: "11px" } }, box, " compare"));
  };

  const update = () => {
    table.dataset.status = p.status;
    for (const [n, td] of cells) if (td.dataset.state === "pending" && rendered(n)) fill(td, n);
    const done = p.status === "succeeded";
    header.replaceChildren(h("div", {},
      h("h1", {}, `Preview #${p.id} `, badge(p.status)),
      h("div", { class: "row" }, h("div", { style: { minWidth: "260px" } }, progressOf("previews", p)), cancelButton("previews", p, refresh),
        done && p.grid ? h("a", { href: p.grid, target: "_blank", id: "grid-link" }, "the grid (PNG)") : null,
        done && p.seconds ? h("span", { class: "muted" }, `rendered in ${duration(p.seconds)}`) : null,
        h("a", { href: "#/previews" }, "all previews")),
      errorOf(p),
      h("p", { class: "muted" }, samplingLine(p.sampling), ` · ${layout.total} images, ${p.targets.length} targets`,
        p.grid_rows ? ` (${layout.columns.length} × ${p.grid_rows.length} table)` : ""),
      !isLive(p) && p.status !== "succeeded" && ![...cells.values()].some((td) => td.dataset.state === "ready")
        ? h("p", { class: "muted" }, `The preview is ${p.status}: it has no images to show.`) : null));
    drawHint();
  };

  // -- the viewer: one image, big, with its parameters ------------------------------------------
  let current = null;
  const open = (n) => {
    current = n;
    const image = (p.images || []).find((i) => i.index === n);
    const { row, target } = byIndex.get(n);
    const big = h("img", { src: imageUrl(n), alt: describe(n), id: "viewer-image", style: { width: "100%", maxWidth: "768px" } });
    big.addEventListener("load", () => { if (big.naturalWidth < 256) big.style.imageRendering = "pixelated"; });
    const step = (d) => { for (let m = n + d; m >= 0 && m < layout.total; m += d) if (rendered(m)) return open(m); };
    viewer.hidden = false;
    viewer.dataset.index = n;
    viewer.replaceChildren(
      h("div", { class: "row", style: { justifyContent: "space-between" } }, h("h2", { style: { margin: 0 } }, `Image ${n}`),
        h("div", { class: "row" },
          h("button", { class: "secondary", id: "viewer-prev", onclick: () => step(-1), title: "←" }, "‹ previous"),
          h("button", { class: "secondary", id: "viewer-next", onclick: () => step(1), title: "→" }, "next ›"),
          h("button", { class: "secondary", id: "viewer-compare", onclick: () => toggle(n) }, picked.includes(n) ? "Remove from compare" : "Add to compare"),
          h("a", { href: imageUrl(n), target: "_blank" }, "open the PNG"),
          h("button", { class: "secondary", id: "viewer-close", onclick: close, title: "Esc" }, "Close"))),
      h("div", { class: "viewer", style: { marginTop: "10px" } }, h("div", {}, big),
        h("div", {}, h("table", { class: "data" }, h("tbody", {},
          [["Target", target.label], row.y ? ["Row", row.y] : null, layout.topics > 1 ? ["Topic", row.topic + 1] : null, ["Prompt", row.text], ["Seed", row.seed]]
            .filter(Boolean).map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, v))))),
        h("h2", {}, "Parameters"),
        image ? h("pre", { class: "json infotext", id: "viewer-infotext", style: { whiteSpace: "pre-wrap" } }, image.infotext)
          : h("p", { class: "muted", id: "viewer-infotext" }, "The infotext is listed once the preview has finished (it is also in the PNG's parameters chunk)."),
        h("details", {}, h("summary", {}, "The target's recipe"), json(target.recipe)))));
    viewer.scrollIntoView({ block: "nearest" });
  };
  const close = () => { current = null; viewer.hidden = true; };
  const onKey = (event) => {
    if (ctx.left) return document.removeEventListener("keydown", onKey);
    if (viewer.hidden || event.target.closest("input, textarea, select")) return;
    if (event.key === "Escape") close();
    else if (event.key === "ArrowLeft") viewer.querySelector("#viewer-prev").click();
    else if (event.key === "ArrowRight") viewer.querySelector("#viewer-next").click();
  };
  document.addEventListener("keydown", onKey);

  // -- compare two images: swipe (a slider reveals A over B) or blink (A, B, A, …) --------------
  const toggle = (n) => {
    const at = picked.indexOf(n);
    if (at >= 0) picked.splice(at, 1); else picked.push(n);
    if (picked.length > 2) picked.shift();
    for (const [m, td] of cells) {
      if (td.dataset.state !== "ready") continue;
      td.classList.toggle("picked", picked.includes(m));
      td.querySelector(".compare-pick").checked = picked.includes(m);
    }
    if (current !== null) viewer.querySelector("#viewer-compare").textContent = picked.includes(current) ? "Remove from compare" : "Add to compare";
    drawHint();
    drawCompare(mode);
  };
  const drawHint = () => {
    hint.textContent = picked.length === 2 ? "" : picked.length === 1
      ? `Comparing image ${picked[0]} with…: pick one more (shift-click or its compare box).`
      : "Click an image to open it; shift-click two (or tick their compare boxes) to compare them.";
  };
  let mode = "swipe", drawn = 0;
  const drawCompare = (next) => {
    mode = next;
    const generation = ++drawn;
    if (picked.length < 2) { compare.hidden = true; return; }
    compare.hidden = false;
    const [a, b] = picked;
    const nameA = `A: image ${a} (${byIndex.get(a).target.label})`, nameB = `B: image ${b} (${byIndex.get(b).target.label})`;
    compare.dataset.mode = mode;
    compare.dataset.a = a;
    compare.dataset.b = b;
    const bottom = h("img", { src: imageUrl(b), alt: describe(b), class: "b" });
    const upper = h("img", { src: imageUrl(a), alt: describe(a), class: "a" });
    const top = h("div", { class: "top" }, upper);
    const frame = h("div", { class: "compare", id: "compare-frame" }, bottom, top);
    let controls;
    if (mode === "swipe") {
      Object.assign(top.style, { right: "auto", width: "50%", borderRight: "2px solid #fff" });
      const slider = h("input", { type: "range", min: 0, max: 100, value: 50, id: "compare-slider", "aria-label": "reveal image A", style: { width: "100%" },
        oninput: () => { top.style.width = `${slider.value}%`; } });
      controls = h("div", {}, slider, h("div", { class: "row", style: { justifyContent: "space-between" } },
        h("small", {}, `◀ ${nameA}`), h("small", {}, `${nameB} ▶`)));
    } else {
      let paused = false;
      const showing = h("strong", { id: "compare-showing" }, nameA);
      const flip = () => {
        const showA = top.style.visibility === "hidden";
        top.style.visibility = showA ? "visible" : "hidden";
        frame.dataset.showing = showA ? "a" : "b";
        showing.textContent = showA ? nameA : nameB;
      };
      frame.dataset.showing = "a";
      frame.style.cursor = "pointer";
      const pause = h("button", { class: "secondary", id: "compare-pause", type: "button",
        onclick: () => { paused = !paused; pause.textContent = paused ? "Play" : "Pause"; } }, "Pause");
      frame.addEventListener("click", () => { paused = true; pause.textContent = "Play"; flip(); });
      controls = h("div", { class: "row" }, showing, pause, h("small", { class: "muted" }, "every 500 ms; click the image to flip by hand"));
      let started = false;
      ctx.poll(() => {
        if (generation !== drawn) return false;
        if (started && !paused) flip();
        started = true;
        return 500;
      }, 500);
    }
    const size = () => {
      const width = Math.min(Math.max(bottom.naturalWidth || 512, 512), Math.max(compare.clientWidth - 30, 128));
      bottom.style.width = upper.style.width = `${width}px`;
      bottom.style.maxWidth = "none";
      bottom.style.imageRendering = upper.style.imageRendering = bottom.naturalWidth && bottom.naturalWidth < 256 ? "pixelated" : "auto";
    };
    bottom.addEventListener("load", size);
    compare.replaceChildren(
      h("div", { class: "row", style: { justifyContent: "space-between" } }, h("h2", { style: { margin: 0 } }, "Compare"),
        h("div", { class: "row" }, ["swipe", "blink"].map((m) => h("button", {
          type: "button", class: m === mode ? "" : "secondary", "data-mode": m, "aria-pressed": String(m === mode), onclick: () => drawCompare(m),
        }, m)),
        h("button", { type: "button", class: "secondary", id: "compare-swap", onclick: () => { picked.reverse(); drawCompare(mode); } }, "Swap A and B"),
        h("button", { type: "button", class: "secondary", id: "compare-close", onclick: () => { while (picked.length) toggle(picked[0]); } }, "Close"))),
      h("p", {}, h("strong", {}, "A"), ` image ${a}: ${describe(a)}`, h("br"), h("strong", {}, "B"), ` image ${b}: ${describe(b)}`),
      h("div", { style: { overflow: "auto" } }, frame), controls);
    size();
    compare.scrollIntoView({ block: "nearest" });
  };

  async function refresh() {
    p = await api(`/previews/${p.id}`);
    update();
    return isLive(p) ? 1000 : false;
  }

  put(view, header, viewer, compare, hint,
    h("div", { style: { overflow: "auto" } }, table),
    h("details", { style: { marginTop: "16px" } }, h("summary", {}, "Targets and their recipes"), json(p.targets)),
    h("details", {}, h("summary", {}, "Sampling settings"), json(p.topics)));
  update();
  ctx.ready();
  if (isLive(p)) setTimeout(() => ctx.poll(refresh, 1000), 1000);
}

function samplingLine(s) {
  if (!s) return "";
  return [`${s.steps} steps`, s.sampler, `CFG ${s.cfg_scale}`, s.width && s.height ? `${s.width}×${s.height}` : null,
    s.clip_skip > 1 ? `clip skip ${s.clip_skip}` : null, s.hires ? "hires fix" : null, s.freeu ? "FreeU" : null,
    s.dynamic_thresholding ? "dynamic thresholding" : null].filter(Boolean).join(", ");
}
