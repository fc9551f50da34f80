// Jobs: merges, previews and analyses, live: progress with rate and ETA, cancel, errors in full,
// downloads with size and sha256. Polls every second while anything is queued or running.

import { api } from "../api.js";
import { badge, bytes, duration, errorBox, h, progressBar, when, put } from "../ui.js";

const LIVE = new Set(["queued", "running"]);

export function isLive(item) {
  return LIVE.has(item.status);
}

// The progress cell of any leased work: a merge's bytes, an analysis's bytes, a preview's images.
export function progressOf(kind, item) {
  const p = item.progress || {};
  if (item.status === "succeeded") return progressBar(1, "100%");
  if (item.status === "queued") return progressBar(0, "queued");
  if (kind === "previews") {
    const total = p.images_total || 0;
    return progressBar(total ? p.images_done / total : 0, total ? `${p.images_done} / ${total} images` : "starting");
  }
  const fraction = p.bytes_total ? p.bytes_read / p.bytes_total : p.tensors_total ? p.tensors_done / p.tensors_total : 0;
  const rate = p.rate_bytes_per_second ? `${bytes(p.rate_bytes_per_second)}/s` : "";
  const eta = p.eta_seconds !== undefined && p.eta_seconds !== null ? `ETA ${duration(p.eta_seconds)}` : "";
  return h("div", {}, progressBar(fraction), h("small", { class: "muted" }, [rate, eta].filter(Boolean).join(" · ")));
}

export function errorOf(item) {
  return item.error ? errorBox(item.error) : null;
}

export function cancelButton(kind, item, after) {
  if (!isLive(item) || item.cancel_requested) return item.cancel_requested && isLive(item) ? h("span", { class: "muted" }, "cancelling…") : null;
  return h("button", {
    class: "danger", onclick: async (event) => {
      event.target.disabled = true;
      try { await api(`/${kind}/${item.id}/cancel`, { method: "POST" }); } catch (error) { event.target.replaceWith(errorBox(error)); }
      after && after();
    },
  }, "Cancel");
}

export function downloadOf(job) {
  const a = job.artifact;
  if (!a) return job.status === "succeeded" ? h("span", { class: "muted" }, "artifact deleted") : null;
  return h("div", {}, h("a", { href: a.url, download: a.filename, class: "download" }, `⬇ ${a.filename}`),
    h("div", { class: "muted" }, bytes(a.size), " · sha256 ", h("code", { class: "sha256", title: a.sha256 }, a.sha256)));
}

const KINDS = {
  merges: { title: "Merges", what: (j) => j.name || h("span", { class: "muted" }, `merge #${j.id}`), extra: downloadOf },
  previews: { title: "Previews", what: (p) => h("a", { href: `#/previews/${p.id}` }, (p.targets || []).map((t) => t.label).slice(0, 4).join(", ") + ((p.targets || []).length > 4 ? ", …" : "")), extra: (p) => p.status === "succeeded" ? h("a", { href: `#/previews/${p.id}` }, "open") : null },
  analyses: { title: "Analyses", what: (a) => h("a", { href: `#/analyses/${a.id}` }, (a.models || []).map((m) => m.name).slice(0, 4).join(", ") + ((a.models || []).length > 4 ? ", …" : "")), extra: (a) => a.status === "succeeded" ? h("a", { href: `#/analyses/${a.id}` }, "open") : null },
};

export function row(kind, item, after) {
  const spec = KINDS[kind];
  return h("tr", { "data-kind": kind, "data-id": item.id, "data-status": item.status },
    h("td", { class: "num" }, item.id), h("td", {}, spec.what(item)), h("td", {}, badge(item.status)),
    h("td", { style: { minWidth: "220px" } }, progressOf(kind, item)), h("td", {}, when(item.created_at)),
    h("td", {}, spec.extra(item), errorOf(item)), h("td", {}, cancelButton(kind, item, after)));
}

export async function render(view, ctx) {
  const sections = {};
  put(view, h("h1", {}, "Jobs"));
  for (const [kind, spec] of Object.entries(KINDS)) {
    const body = h("tbody");
    sections[kind] = body;
    put(view, h("h2", {}, spec.title), h("table", { class: "data", id: `jobs-${kind}` },
      h("thead", {}, h("tr", {}, ["#", "What", "Status", "Progress", "Created", "Result", ""].map((t) => h("th", {}, t)))), body));
  }
  let first = true;
  const refresh = async () => {
    const pages = await Promise.all(Object.keys(KINDS).map((kind) => api(`/${kind}?limit=50`)));
    let live = false;
    Object.keys(KINDS).forEach((kind, i) => {
      const items = pages[i].items;
      live ||= items.some(isLive);
      sections[kind].replaceChildren(...(items.length ? items.map((item) => row(kind, item, refresh))
        : [h("tr", {}, h("td", { colspan: 7, class: "muted" }, "none yet"))]));
    });
    if (first) { first = false; ctx.ready(); }
    return live ? 1000 : 5000;
  };
  ctx.poll(refresh);
}
