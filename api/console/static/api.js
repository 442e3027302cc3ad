// The public API, as any client calls it: `/v1/...` with the key as a Bearer token.
// The key lives in sessionStorage only (gone when the tab closes; never a cookie).

const KEY = "loraplex.apiKey";

export class ApiError extends Error {
  constructor(message, status, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export const session = {
  get key() { return sessionStorage.getItem(KEY); },
  set key(value) {
    if (value) sessionStorage.setItem(KEY, value);
    else sessionStorage.removeItem(KEY);
  },
};

function headers(extra = {}) {
  return { Authorization: `Bearer ${session.key}`, ...extra };
}

// The API's own words: every error has OpenAI's shape {"error": {"message", ...}}.
async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) {
      message = body.error.message;
      code = body.error.code;
    }
  } catch { /* not JSON: keep the status line */ }
  return new ApiError(message, response.status, code);
}

export async function request(path, { method = "GET", body, form, query } = {}) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(query || {})) {
    if (v !== undefined && v !== null && v !== "") url.searchParams.set(k, v);
  }
  const init = { method, headers: headers() };
  if (form) init.body = form;
  else if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(url, init);
  if (!response.ok) throw await failure(response);
  return response;
}

export async function get(path, query) {
  return (await request(path, { query })).json();
}

export async function post(path, body) {
  return (await request(path, { method: "POST", body })).json();
}

export async function upload(file) {
  const form = new FormData();
  form.append("purpose", "fine-tune");
  form.append("file", file, file.name);
  return (await request("/v1/files", { method: "POST", form })).json();
}

// The first `lines` lines of a file's content, reading no more of it than that.
export async function firstLines(fileId, lines = 5, maxBytes = 256 * 1024) {
  const response = await request(`/v1/files/${encodeURIComponent(fileId)}/content`);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let text = "";
  while (text.split("\n").length <= lines && text.length < maxBytes) {
    const { done, value } = await reader.read();
    if (done) break;
    text += decoder.decode(value, { stream: true });
  }
  reader.cancel().catch(() => {});
  return text.split("\n").filter((l) => l.trim()).slice(0, lines);
}

// A chat completion streamed as server-sent events; `onDelta` gets each piece of text.
export async function streamChat({ model, messages, maxTokens, onDelta }) {
  const response = await request("/v1/chat/completions", {
    method: "POST",
    body: { model, messages, stream: true, max_tokens: maxTokens, temperature: 0 },
  });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(chunk.error.message, 500, chunk.error.code);
        const text = chunk.choices?.[0]?.delta?.content;
        if (text) onDelta(text);
      }
    }
  }
}

// A download the browser saves: the request needs the key, so not a plain link.
export async function download(path, filename) {
  const blob = await (await request(path)).blob();
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}
