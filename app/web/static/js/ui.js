// Small DOM helpers: h() builds elements, and the pieces every page shows.

export function h(tag, attrs = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2).toLowerCase(), value);
    else if (name === "class") element.className = value;
    else if (name === "style" && typeof value === "object") Object.assign(element.style, value);
    else if (name in element && typeof value !== "string") element[name] = value;
    else element.setAttribute(name, value === true ? "" : value);
  }
  append(element, children);
  return element;
}

// Append children as h() does: null, undefined and false are skipped, arrays flattened.
export function put(element, ...children) {
  append(element, children);
}

function append(element, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(element, child);
    else element.append(child instanceof Node ? child : String(child));
  }
}

export function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(n < 10 ? 2 : 1) : n} ${units[i]}`;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "";
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  const m = Math.floor(seconds / 60), s = Math.round(seconds % 60);
  return m < 60 ? `${m} min ${s} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

export function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

export function badge(status) {
  return h("span", { class: `badge ${status}` }, status);
}

export function progressBar(fraction, label) {
  const pct = Math.max(0, Math.min(1, fraction || 0)) * 100;
  return h("div", { class: "progress", role: "progressbar", "aria-valuenow": pct.toFixed(0), "aria-valuemin": "0", "aria-valuemax": "100" },
    h("div", { class: "bar", style: { width: `${pct}%` } }),
    h("div", { class: "label" }, label ?? `${pct.toFixed(0)}%`));
}

export function errorBox(error) {
  const details = error && error.details && Object.keys(error.details).length ? JSON.stringify(error.details, null, 2) : null;
  return h("div", { class: "errorbox", role: "alert" },
    h("span", { class: "code" }, error.code || "error"), " ", error.message || String(error),
    details && h("pre", {}, details));
}

export function json(value) {
  return h("pre", { class: "json" }, JSON.stringify(value, null, 2));
}

// A table sorted by clicking its headers. columns: [{key, label, value(row), render(row), num}]
export function sortableTable(columns, rows, state = { key: columns[0].key, desc: false }) {
  const table = h("table", { class: "data" });
  const draw = () => {
    const column = columns.find((c) => c.key === state.key) || columns[0];
    const value = column.value || ((row) => row[column.key]);
    const sorted = [...rows].sort((a, b) => {
      const x = value(a), y = value(b);
      const order = x === y ? 0 : x === null || x === undefined ? 1 : y === null || y === undefined ? -1
        : typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y), undefined, { numeric: true });
      return state.desc ? -order : order;
    });
    table.replaceChildren(
      h("thead", {}, h("tr", {}, columns.map((c) => h("th", {
        class: ["sortable", c.num ? "num" : "", c.key === state.key ? (state.desc ? "sorted-desc" : "sorted-asc") : ""].join(" "),
        "data-key": c.key,
        onclick: () => { state.desc = state.key === c.key ? !state.desc : false; state.key = c.key; draw(); },
      }, c.label)))),
      h("tbody", {}, sorted.map((row) => h("tr", { "data-id": row.id }, columns.map((c) =>
        h("td", { class: c.num ? "num" : "" }, c.render ? c.render(row) : ((c.value ? c.value(row) : row[c.key]) ?? "")))))));
  };
  draw();
  table.update = (next) => { rows = next; draw(); };
  return table;
}

export function field(label, input, hint) {
  return h("label", { class: "field", style: { display: "flex", flexDirection: "column", gap: "3px" } },
    h("span", { class: "muted" }, label), input, hint && h("small", { class: "muted" }, hint));
}
