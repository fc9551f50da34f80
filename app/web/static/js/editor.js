// A JSON editor: line numbers, messages shown at the line of the field at fault (a pydantic
// `loc` path, or a model reference), and completion (Ctrl+Space, or typing in a string) from a
// JSON Schema's property names and values and from the registry's model names.

import { h } from "./ui.js";

// JSON text -> a tree whose nodes know where they are: {type, start, end, keyStart, children}.
export function parsePositions(text) {
  let i = 0;
  const fail = (what) => { const e = new SyntaxError(what); e.position = i; throw e; };
  const ws = () => { while (i < text.length && " \t\n\r".includes(text[i])) i++; };
  const expect = (c) => { if (text[i] !== c) fail(`expected ${c === '"' ? "a string" : `'${c}'`}`); i++; };
  const string = () => {
    const start = i;
    expect('"');
    while (i < text.length && text[i] !== '"') { if (text[i] === "\\") i++; i++; }
    expect('"');
    return JSON.parse(text.slice(start, i));
  };
  const value = () => {
    ws();
    const start = i;
    if (text[i] === "{") {
      i++;
      const node = { type: "object", start, children: new Map() };
      ws();
      if (text[i] === "}") { i++; node.end = i; return node; }
      for (;;) {
        ws();
        const keyStart = i;
        const key = string();
        ws(); expect(":");
        const child = value();
        child.keyStart = keyStart;
        node.children.set(key, child);
        ws();
        if (text[i] === ",") { i++; continue; }
        expect("}"); node.end = i; return node;
      }
    }
    if (text[i] === "[") {
      i++;
      const node = { type: "array", start, children: [] };
      ws();
      if (text[i] === "]") { i++; node.end = i; return node; }
      for (;;) {
        node.children.push(value());
        ws();
        if (text[i] === ",") { i++; continue; }
        expect("]"); node.end = i; return node;
      }
    }
    if (text[i] === '"') { const v = string(); return { type: "string", start, end: i, value: v }; }
    while (i < text.length && !",]} \t\n\r".includes(text[i])) i++;
    if (i === start) fail("expected a value");
    return { type: "literal", start, end: i };
  };
  const tree = value();
  ws();
  if (i < text.length) fail("unexpected text after the JSON value");
  return tree;
}

// The node a pydantic `loc` names; parts that are not keys or indexes (union tags) are skipped.
export function locate(tree, loc) {
  let node = tree;
  for (const part of loc || []) {
    if (node.type === "object" && node.children.has(String(part))) node = node.children.get(String(part));
    else if (node.type === "array" && Number.isInteger(part) && part < node.children.length) node = node.children[part];
  }
  return node;
}

export function stringsEqual(tree, value, found = []) {
  if (tree.type === "string" && tree.value === value) found.push(tree);
  const children = tree.type === "object" ? [...tree.children.values()] : tree.type === "array" ? tree.children : [];
  for (const child of children) stringsEqual(child, value, found);
  return found;
}

const LINE = 18; // px, as in app.css

export class JsonEditor {
  constructor({ value = "", rows = 22, completions = () => [] } = {}) {
    this.completions = completions;
    this.gutter = h("div", { class: "gutter", "aria-hidden": "true" });
    this.textarea = h("textarea", { rows, spellcheck: false, autocomplete: "off", "aria-label": "recipe JSON", class: "json-input" });
    this.textarea.value = value;
    this.messages = h("div");
    this.popup = h("div", { class: "completions", hidden: true, role: "listbox" });
    this.element = h("div", { class: "editor" }, this.gutter, this.textarea, this.messages, this.popup);
    this.marks = [];
    this.textarea.addEventListener("input", () => { this.clearMarks(); this.drawGutter(); this.complete(false); });
    this.textarea.addEventListener("scroll", () => { this.gutter.scrollTop = this.textarea.scrollTop; this.placeMarks(); });
    this.textarea.addEventListener("keydown", (event) => this.key(event));
    this.textarea.addEventListener("blur", () => setTimeout(() => { this.popup.hidden = true; }, 150));
    this.drawGutter();
  }

  get value() { return this.textarea.value; }
  set value(text) { this.textarea.value = text; this.clearMarks(); this.drawGutter(); }

  lineOf(offset) { return this.textarea.value.slice(0, offset).split("\n").length; }

  drawGutter() {
    const lines = this.textarea.value.split("\n").length;
    const bad = new Set(this.marks.map((m) => m.line));
    this.gutter.replaceChildren(...Array.from({ length: lines }, (_, n) =>
      h("div", {}, bad.has(n + 1) ? h("span", { class: "bad" }, n + 1) : String(n + 1))));
  }

  clearMarks() { this.marks = []; this.messages.replaceChildren(); this.drawGutter(); }

  // Show `message` under the line holding `offset` (a field's key, or its value).
  mark(offset, message) {
    const line = this.lineOf(offset);
    const note = h("div", { class: "field-error", "data-line": line, role: "alert" }, `line ${line}: ${message}`);
    this.marks.push({ line, note });
    this.messages.append(note);
    this.drawGutter();
    this.placeMarks();
    return line;
  }

  placeMarks() {
    const taken = new Map();
    for (const { line, note } of this.marks) {
      const stack = taken.get(line) || 0;
      taken.set(line, stack + 1);
      note.style.top = `${8 + line * LINE - this.textarea.scrollTop + stack * 22}px`;
    }
  }

  // Messages from the API placed at their fields: pydantic errors (`details.errors[].loc`),
  // unknown model references (`details.unresolved[].leaf`), else at the top.
  showError(error) {
    this.clearMarks();
    let tree = null;
    try { tree = parsePositions(this.value); } catch (syntax) {
      return this.mark(syntax.position ?? 0, `not valid JSON: ${syntax.message}`);
    }
    const placed = [];
    for (const e of (error.details && error.details.errors) || []) {
      const loc = (e.loc || []).filter((p) => p !== "body");
      let node = locate(tree, loc);
      // "not a model reference or a known method": the method named is what is at fault.
      if (e.type === "invalid_source" && node.type === "object" && node.children.has("method")) node = node.children.get("method");
      placed.push(this.mark(node.keyStart ?? node.start, `${loc.join(".") || "recipe"}: ${e.msg}`));
      if (placed.length >= 5) break;
    }
    for (const u of (error.details && error.details.unresolved) || []) {
      for (const node of stringsEqual(tree, String(u.leaf)).slice(0, 3)) placed.push(this.mark(node.start, `${u.leaf}: ${u.reason || "unknown model"}`));
    }
    if (!placed.length && error.details && error.details.model) {
      for (const node of stringsEqual(tree, String(error.details.model)).slice(0, 1)) placed.push(this.mark(node.start, error.message));
    }
    return placed[0] ?? null;
  }

  // Syntax check before sending; returns the value or null (with the message at its line).
  parse() {
    try {
      parsePositions(this.value);
      return JSON.parse(this.value);
    } catch (syntax) {
      this.clearMarks();
      this.mark(syntax.position ?? 0, `not valid JSON: ${syntax.message}`);
      return null;
    }
  }

  // -- completion ------------------------------------------------------------------------------

  context() {
    const text = this.textarea.value, caret = this.textarea.selectionStart;
    let quote = -1;
    const stack = [];
    let afterColon = false;
    for (let i = 0; i < caret; i++) {
      const c = text[i];
      if (c === '"') {
        let j = i + 1;
        while (j < caret && text[j] !== '"') { if (text[j] === "\\") j++; j++; }
        if (j >= caret) { quote = i; break; }
        i = j;
        continue;
      }
      if (c === "{" || c === "[") { stack.push(c); afterColon = false; }
      else if (c === "}" || c === "]") stack.pop();
      else if (c === ",") afterColon = false;
      else if (c === ":") afterColon = true;
    }
    if (quote < 0) return null;
    const isKey = stack[stack.length - 1] === "{" && !afterColon;
    return { start: quote + 1, prefix: text.slice(quote + 1, caret), isKey };
  }

  complete(forced) {
    const ctx = this.context();
    if (!ctx || (!forced && !ctx.prefix)) { this.popup.hidden = true; return; }
    const needle = ctx.prefix.toLowerCase();
    const options = this.completions(ctx.isKey).filter((o) => o.value.toLowerCase().startsWith(needle) && o.value !== ctx.prefix).slice(0, 30);
    if (!options.length) { this.popup.hidden = true; return; }
    this.options = options;
    this.selected = 0;
    this.ctx = ctx;
    this.drawPopup();
    const { top, left } = this.caretXY();
    Object.assign(this.popup.style, { top: `${top + LINE + 4}px`, left: `${left}px` });
    this.popup.hidden = false;
  }

  drawPopup() {
    this.popup.replaceChildren(...this.options.map((o, n) => h("div", {
      class: n === this.selected ? "selected" : "", role: "option",
      onmousedown: (event) => { event.preventDefault(); this.selected = n; this.accept(); },
    }, o.value, o.hint ? h("small", {}, o.hint) : null)));
  }

  accept() {
    const option = this.options[this.selected];
    const ta = this.textarea, caret = ta.selectionStart;
    const quoted = ta.value[caret] === '"';
    ta.setRangeText(option.value + (quoted ? "" : '"'), this.ctx.start, caret, "end");
    let at = this.ctx.start + option.value.length + 1;  // past the closing quote
    if (this.ctx.isKey && !/^\s*:/.test(ta.value.slice(at))) {
      ta.setRangeText(": ", at, at, "end");
      at += 2;
    }
    ta.selectionStart = ta.selectionEnd = at;
    ta.dispatchEvent(new Event("input"));
    this.popup.hidden = true;
  }

  key(event) {
    if (event.key === " " && event.ctrlKey) { event.preventDefault(); this.complete(true); return; }
    if (this.popup.hidden) {
      if (event.key === "Tab") { event.preventDefault(); this.textarea.setRangeText("  ", this.textarea.selectionStart, this.textarea.selectionEnd, "end"); }
      return;
    }
    if (event.key === "ArrowDown" || event.key === "ArrowUp") {
      event.preventDefault();
      this.selected = (this.selected + (event.key === "ArrowDown" ? 1 : this.options.length - 1)) % this.options.length;
      this.drawPopup();
    } else if (event.key === "Enter" || event.key === "Tab") {
      event.preventDefault();
      this.accept();
    } else if (event.key === "Escape") {
      this.popup.hidden = true;
    }
  }

  // The caret's position inside the editor, measured on a copy of the textarea's text.
  caretXY() {
    const ta = this.textarea, style = getComputedStyle(ta);
    const mirror = h("div", { style: { position: "absolute", visibility: "hidden", whiteSpace: "pre", font: style.font, padding: style.padding, lineHeight: style.lineHeight } });
    mirror.textContent = ta.value.slice(0, ta.selectionStart);
    const marker = h("span", {}, "\u200b");
    mirror.append(marker);
    this.element.append(mirror);
    const top = marker.offsetTop - ta.scrollTop, left = marker.offsetLeft - ta.scrollLeft + this.gutter.offsetWidth;
    mirror.remove();
    return { top, left };
  }
}

// Property names, enum and const values of a JSON Schema (with $refs into `defs`), for completion.
export function schemaWords(schema, defs) {
  const keys = new Map(), values = new Map();
  const seen = new Set();
  const walk = (node, where) => {
    if (!node || typeof node !== "object") return;
    if (node.$ref) {
      const name = node.$ref.split("/").pop();
      if (seen.has(name)) return;
      seen.add(name);
      return walk(defs[name], name);
    }
    for (const [key, sub] of Object.entries(node.properties || {})) {
      if (!keys.has(key)) keys.set(key, where);
      walk(sub, where);
    }
    for (const v of node.enum || []) if (typeof v === "string") values.set(v, where);
    if (typeof node.const === "string") values.set(node.const, where);
    for (const part of ["anyOf", "oneOf", "allOf", "prefixItems"]) for (const sub of node[part] || []) walk(sub, where);
    for (const part of ["items", "additionalProperties"]) if (typeof node[part] === "object") walk(node[part], where);
    if (node.discriminator && node.discriminator.mapping) for (const v of Object.keys(node.discriminator.mapping)) values.set(v, where);
  };
  walk(schema, "recipe");
  return { keys: [...keys].map(([value, hint]) => ({ value, hint })), values: [...values].map(([value, hint]) => ({ value, hint })) };
}
