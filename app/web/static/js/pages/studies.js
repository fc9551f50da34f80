// Studies: the look-and-pick rounds. Create one from models and topics; run a round (a preview
// with a column per candidate); pick candidates by clicking column headers or cells; the picks
// are carried into the next round; open the final recipe and merge it.

import { all, api } from "../api.js";
import { badge, errorBox, field, h, json, when, put } from "../ui.js";
import { downloadOf, errorOf, isLive, progressOf } from "./jobs.js";

const KINDS = {
  raw: "Raw: all N merged, then each candidate alone — pick those to keep",
  text_encoder: "Text encoders: the merge of the kept, with each candidate's text encoder — pick the useful ones",
  unet: "UNets: each candidate's UNet with the picked text encoders merged — pick the useful ones",
  leave_one_out: "Leave one out: the picked UNets merged, without one at a time — pick those to leave out",
  final: "Final: the recipe of the picks",
};

export async function render(view, ctx, id) {
  return id ? detail(view, ctx, id) : list(view, ctx);
}

async function list(view, ctx) {
  const [studies, models] = await Promise.all([api("/studies?limit=50"), all("/models?status=ready")]);
  const message = h("div");
  const filter = h("input", { type: "search", placeholder: "filter models…", "aria-label": "filter candidates" });
  const boxes = models.map((m) => h("label", { class: "candidate", "data-name": m.name, style: { display: "block" } },
    h("input", { type: "checkbox", value: m.name, name: "candidate" }), " ", m.name, " ", h("span", { class: "muted" }, m.architecture || "")));
  filter.addEventListener("input", () => boxes.forEach((b) => { b.hidden = !b.dataset.name.toLowerCase().includes(filter.value.toLowerCase()); }));
  const all_ = h("button", { type: "button", class: "secondary", onclick: () => boxes.forEach((b) => { if (!b.hidden) b.querySelector("input").checked = true; }) }, "Select shown");
  const name = h("input", { name: "name", placeholder: "study name" });
  const vae = h("select", { name: "vae", "aria-label": "VAE to bake in" }, h("option", { value: "" }, "no baked VAE"), models.filter((m) => (m.components || {}).vae).map((m) => h("option", { value: m.name }, m.name)));
  const topics = h("textarea", { name: "topics", rows: 6, placeholder: "one prompt per line — or a JSON list of topics: A1111 txt2img bodies {\"a1111\": {...}}, infotexts {\"infotext\": \"...\"} or {\"prompts\": [...]}" });
  const steps = h("input", { name: "steps", type: "number", value: 20, min: 1, max: 1000 });
  const width = h("input", { name: "width", type: "number", value: 512, step: 8 });
  const height = h("input", { name: "height", type: "number", value: 512, step: 8 });
  const seeds = h("input", { name: "seeds", value: "1" });
  const cfg = h("input", { name: "cfg_scale", type: "number", value: 7, step: 0.5 });
  const sampler = h("select", { name: "sampler" }, ["euler", "euler_a", "dpmpp_2m_karras"].map((s) => h("option", { value: s }, s)));
  const form = h("form", {
    id: "study-form", onsubmit: async (event) => {
      event.preventDefault();
      try {
        const body = {
          candidates: boxes.map((b) => b.querySelector("input")).filter((i) => i.checked).map((i) => i.value),
          steps: Number(steps.value), width: Number(width.value), height: Number(height.value), cfg_scale: Number(cfg.value),
          sampler: sampler.value, seeds: seeds.value.split(",").map((s) => s.trim()).filter(Boolean).map(Number),
          ...topicsOf(topics.value),
        };
        if (name.value) body.name = name.value;
        if (vae.value) body.vae = vae.value;
        const study = await api("/studies", { method: "POST", body });
        location.hash = `#/studies/${study.id}`;
      } catch (error) {
        message.replaceChildren(errorBox(error));
      }
    },
  },
  h("div", { class: "cols" },
    h("div", {}, field("Candidates", h("div", {}, h("div", { class: "row" }, filter, all_), h("div", { style: { maxHeight: "260px", overflow: "auto", marginTop: "6px" } }, boxes)))),
    h("div", {}, h("div", { class: "row" }, field("Name", name), field("Bake in the VAE of", vae)),
      field("Topics", topics, "the fields below apply to every topic but what it sets itself"),
      h("div", { class: "row" }, field("Steps", steps), field("Width", width), field("Height", height), field("Seeds", seeds), field("CFG", cfg), field("Sampler", sampler)))),
  h("p", {}, h("button", { type: "submit" }, "Create the study")), message);
  put(view, h("h1", {}, "Studies"), h("div", { class: "card" }, h("h2", {}, "New study"), form),
    h("h2", {}, "Studies"), h("table", { class: "data", id: "studies" },
      h("thead", {}, h("tr", {}, ["#", "Name", "Candidates", "Rounds", "Created"].map((t) => h("th", {}, t)))),
      h("tbody", {}, studies.items.length ? studies.items.map((s) => h("tr", {}, h("td", {}, s.id), h("td", {}, h("a", { href: `#/studies/${s.id}` }, s.name || `study #${s.id}`)),
        h("td", {}, s.candidates.length), h("td", {}, s.rounds.map((r) => r.kind).join(" → ")), h("td", {}, when(s.created_at))))
        : h("tr", {}, h("td", { colspan: 5, class: "muted" }, "none yet")))));
  ctx.ready();
}

// One prompt per line, or a JSON list of topics (each an object as the API takes it).
export function topicsOf(text) {
  const trimmed = text.trim();
  if (trimmed.startsWith("[")) return { topics: JSON.parse(trimmed) };
  const prompts = trimmed.split("\n").map((l) => l.trim()).filter(Boolean);
  return { topics: prompts.map((prompt) => ({ prompts: [prompt] })) };
}

async function detail(view, ctx, id) {
  let study = await api(`/studies/${encodeURIComponent(id)}`);
  const header = h("div");
  const rounds = h("div", { id: "rounds" });
  const side = h("div");
  const message = h("div");
  const picks = new Map();  // round number -> Set of candidate names, while being chosen
  put(view, header, message, h("div", { class: "viewer" }, rounds, side));

  const start = async (kind) => {
    try {
      await api(`/studies/${study.id}/rounds`, { method: "POST", body: { kind } });
      message.replaceChildren();
      await refresh();
    } catch (error) { message.replaceChildren(errorBox(error)); }
  };
  const save = async (round) => {
    try {
      await api(`/studies/${study.id}/rounds/${round.number}/picks`, { method: "POST", body: { picks: [...(picks.get(round.number) || [])] } });
      picks.delete(round.number);
      message.replaceChildren();
      await refresh();
    } catch (error) { message.replaceChildren(errorBox(error)); }
  };
  const mergeIt = async () => {
    try {
      await api(`/studies/${study.id}/merge`, { method: "POST" });
      await refresh();
    } catch (error) { message.replaceChildren(errorBox(error)); }
  };

  const previews = new Map();
  let job = null;
  const refresh = async () => {
    study = await api(`/studies/${study.id}`);
    for (const r of study.rounds) {
      const known = previews.get(r.preview);
      if (r.preview && (!known || isLive(known))) previews.set(r.preview, await api(`/previews/${r.preview}`).catch(() => null));
    }
    job = study.merge ? await api(`/merges/${study.merge}`) : null;
    draw();
    const live = study.rounds.some((r) => previews.get(r.preview) && isLive(previews.get(r.preview))) || (job && isLive(job));
    return live ? 1000 : 4000;
  };

  const draw = () => {
    const s = study.selection;
    header.replaceChildren(h("h1", {}, study.name || `Study #${study.id}`, " ", h("span", { class: "muted" }, `${study.architecture || ""} · ${study.candidates.length} candidates`)));
    rounds.replaceChildren(...study.rounds.map((r, n) => roundView(r, previews.get(r.preview), n === study.rounds.length - 1)).reverse());
    side.replaceChildren(
      h("div", { class: "card", id: "next-round" }, h("h2", {}, "Next round"),
        h("p", { class: "muted" }, "Built from the picks so far:"),
        h("table", { class: "data", id: "selection" }, h("tbody", {},
          [["Kept", s.kept], ["Text encoders", s.text_encoders], ["UNets", s.unets], ["Left out", s.left_out]].map(([k, v]) =>
            h("tr", {}, h("th", {}, k), h("td", { "data-role": k }, (v || []).join(", ") || "—"))))),
        Object.entries(KINDS).map(([kind, text]) => h("p", {}, h("button", { class: kind === "final" ? "" : "secondary", "data-kind": kind, onclick: () => start(kind) }, `Run ${kind.replace("_", " ")}`), " ", h("small", { class: "muted" }, text)))),
      h("div", { class: "card", id: "final" }, h("h2", {}, "Final recipe"), study.final_recipe ? json(study.final_recipe) : h("p", { class: "muted" }, "no picks yet"),
        study.merge ? h("div", { id: "study-merge", "data-status": job && job.status }, h("p", {}, `Merge #${study.merge} `, job && badge(job.status)), job && progressOf("merges", job), job && downloadOf(job), job && errorOf(job))
          : h("button", { id: "merge-final", onclick: mergeIt, disabled: !study.final_recipe }, "Merge the final recipe")));
  };

  const roundView = (r, preview, latest) => {
    const chosen = picks.get(r.number) || new Set(r.picks || []);
    const editable = latest && r.kind !== "final" && preview && preview.status === "succeeded";
    const toggle = (candidate) => {
      if (!editable || !candidate) return;
      const set = new Set(chosen);
      set.has(candidate) ? set.delete(candidate) : set.add(candidate);
      picks.set(r.number, set);
      draw();
    };
    const columns = r.columns;
    let body = [];
    if (preview && preview.images && preview.images.length) {
      const rows = new Map();
      for (const image of preview.images) {
        const key = `${image.topic_index}/${image.prompt_index}/${image.seed}`;
        if (!rows.has(key)) rows.set(key, []);
        rows.get(key)[image.target_index] = image;
      }
      body = [...rows.values()].map((cells) => h("tr", {}, columns.map((c, i) => h("td", {
        class: chosen.has(c.candidate) ? "picked" : "", "data-column": i,
        onclick: () => toggle(c.candidate),
      }, cells[i] ? h("img", { src: cells[i].url, alt: `${c.label}`, title: cells[i].infotext, loading: "lazy" }) : null))));
    } else if (preview) {
      body = [h("tr", {}, h("td", { colspan: columns.length }, progressOf("previews", preview), errorOf(preview)))];
    }
    return h("div", { class: "card round", "data-number": r.number, "data-kind": r.kind, "data-status": preview ? preview.status : r.status },
      h("h2", {}, `Round ${r.number}: ${r.kind.replace("_", " ")} `, badge(preview ? preview.status : r.status),
        r.picked_at && !picks.has(r.number) ? h("small", { class: "muted" }, ` picked ${when(r.picked_at)}`) : null),
      h("div", { style: { overflow: "auto" } }, h("table", { class: "images" },
        h("thead", {}, h("tr", {}, columns.map((c, i) => h("th", {
          class: ["column", chosen.has(c.candidate) ? "picked" : ""].join(" "), "data-column": i, "data-candidate": c.candidate || "",
          title: c.candidate ? (editable ? "click to pick or unpick" : c.candidate) : "", onclick: () => toggle(c.candidate),
        }, c.label)))), h("tbody", {}, body))),
      r.kind !== "final" ? h("p", { class: "row" },
        h("span", {}, r.kind === "leave_one_out" ? "Left out: " : "Picks: ", h("strong", { class: "picks" }, [...chosen].join(", ") || "none")),
        editable ? h("button", { class: "save-picks", onclick: () => save(r), disabled: !picks.has(r.number) }, "Save picks") : null,
        preview && preview.grid ? h("a", { href: preview.grid, target: "_blank" }, "grid.png") : null) : null);
  };

  await refresh();
  ctx.ready();
  ctx.poll(refresh, 1000);
}
