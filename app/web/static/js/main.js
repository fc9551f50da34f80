// The dashboard's router: #/<page>[/<id>] picks a page module; a page renders into <main> and
// may poll (ctx.poll), which stops when the user leaves it.

import { h, errorBox } from "./ui.js";

const PAGES = {
  models: () => import("./pages/models.js"),
  merge: () => import("./pages/merge.js"),
  jobs: () => import("./pages/jobs.js"),
  previews: () => import("./pages/previews.js"),
  studies: () => import("./pages/studies.js"),
  analyses: () => import("./pages/analyses.js"),
};

let current = null;

class Context {
  constructor(page) {
    this.page = page;
    this.timers = [];
    this.left = false;
  }
  // Run `fn` now and again every `ms` (or the milliseconds it returns) until it returns false
  // or the page is left.
  poll(fn, ms = 1000) {
    const tick = async () => {
      if (this.left) return;
      let next = ms;
      try {
        const answer = await fn();
        if (answer === false) return;
        if (typeof answer === "number") next = answer;
      } catch (error) { console.error(error); }
      if (!this.left) this.timers.push(setTimeout(tick, next));
    };
    tick();
  }
  // The page's content is on screen: the browser test reads this mark for first paint.
  ready() {
    performance.mark(`sdmerge:ready:${this.page}`);
    document.body.dataset.ready = this.page;
  }
  leave() {
    this.left = true;
    this.timers.forEach(clearTimeout);
  }
}

async function route() {
  const [name = "models", ...params] = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean);
  const page = PAGES[name] ? name : "models";
  if (current) current.leave();
  const ctx = current = new Context(page);
  delete document.body.dataset.ready;
  for (const link of document.querySelectorAll("#nav a[data-page]")) {
    link.classList.toggle("active", link.dataset.page === page);
  }
  const view = document.getElementById("view");
  try {
    const module = await PAGES[page]();
    if (ctx.left) return;
    view.replaceChildren();
    await module.render(view, ctx, ...params.map(decodeURIComponent));
  } catch (error) {
    if (ctx.left) return;
    view.replaceChildren(h("h1", {}, "Something went wrong"), errorBox(error));
    ctx.ready();
  }
}

window.addEventListener("hashchange", route);
route();
