// The REST client of the dashboard: every call carries the token (Authorization: Bearer), which
// is asked for once, when the server first answers 401, and kept in this tab's sessionStorage.
// <img> and download links cannot send a header: a SameSite=Strict session cookie carries the
// token for those reads (the server accepts the cookie on GET and HEAD only).

const KEY = "sdmerge.token";

export class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || (typeof body === "string" ? body : `HTTP ${status}`));
    this.status = status;
    this.code = error.code || `http_${status}`;
    this.details = error.details || {};
  }
}

export function token() {
  return sessionStorage.getItem(KEY);
}

function remember(value) {
  sessionStorage.setItem(KEY, value);
  document.cookie = `sdmerge_token=${encodeURIComponent(value)}; path=/; SameSite=Strict`;
}

if (token()) remember(token());  // a reload keeps the tab's token and its cookie

export function authHeaders(extra = {}) {
  const value = token();
  return value ? { ...extra, Authorization: `Bearer ${value}` } : { ...extra };
}

let asking = null;

export function askToken(refused) {
  if (asking) return asking;
  asking = new Promise((resolve) => {
    const dialog = document.getElementById("token-dialog");
    const input = document.getElementById("token-input");
    document.getElementById("token-error").textContent = refused ? "That token was refused; try again." : "";
    input.value = "";
    dialog.addEventListener("close", () => {
      remember(input.value.trim());
      asking = null;
      resolve();
    }, { once: true });
    dialog.addEventListener("cancel", (event) => event.preventDefault(), { once: true });
    dialog.showModal();
    input.focus();
  });
  return asking;
}

export async function api(path, { method = "GET", body } = {}) {
  for (;;) {
    const init = { method, headers: authHeaders(body === undefined ? {} : { "Content-Type": "application/json" }) };
    if (body !== undefined) init.body = typeof body === "string" ? body : JSON.stringify(body);
    const response = await fetch(path, init);
    if (response.status === 401) {
      await askToken(Boolean(token()));
      continue;
    }
    if (response.status === 204) return null;
    const type = response.headers.get("content-type") || "";
    const data = type.includes("json") ? await response.json() : await response.text();
    if (!response.ok) throw new ApiError(response.status, data);
    return data;
  }
}

// Every page of a list route, `limit` rows at a time; `onPage(items)` sees each page as it comes.
export async function all(path, onPage, { limit = 500, max = 20000 } = {}) {
  const items = [];
  let cursor = null;
  do {
    const sep = path.includes("?") ? "&" : "?";
    const page = await api(`${path}${sep}limit=${limit}${cursor ? `&cursor=${cursor}` : ""}`);
    items.push(...page.items);
    if (onPage) onPage(page.items, items);
    cursor = page.next;
  } while (cursor && items.length < max);
  return items;
}

// A streamed upload (PUT /models/upload/{name}) with progress: fetch cannot report upload progress.
export function upload(file, name, onProgress) {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("PUT", `/models/upload/${encodeURIComponent(name)}`);
    for (const [header, value] of Object.entries(authHeaders({ "Content-Type": "application/octet-stream" }))) {
      request.setRequestHeader(header, value);
    }
    request.upload.onprogress = (event) => event.lengthComputable && onProgress(event.loaded / event.total, event.loaded);
    request.onerror = () => reject(new ApiError(0, "the connection failed"));
    request.onload = async () => {
      let data = request.responseText;
      try { data = JSON.parse(data); } catch { /* not JSON */ }
      if (request.status === 401) {
        await askToken(Boolean(token()));
        upload(file, name, onProgress).then(resolve, reject);
      } else if (request.status >= 400) {
        reject(new ApiError(request.status, data));
      } else {
        resolve(data);
      }
    };
    request.send(file);
  });
}
