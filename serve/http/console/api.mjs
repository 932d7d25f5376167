// The API client: the key (sessionStorage: gone with the tab), JSON calls, OpenAI-style errors, SSE streams.
const KEY = "tunestack_console_key";

export const getKey = () => sessionStorage.getItem(KEY) || "";
export const setKey = (k) => sessionStorage.setItem(KEY, k);

export class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `HTTP ${status}`);
    this.status = status;
    this.code = e.code || null;
    this.param = e.param || null;
  }
}

function headers(extra = {}) {
  const h = {...extra};
  const k = getKey();
  if (k) h["Authorization"] = "Bearer " + k;
  return h;
}

async function parse(r) {
  const text = await r.text();
  try { return JSON.parse(text); } catch (e) { return {error: {message: text.slice(0, 300) || r.statusText}}; }
}

// One JSON call: the body on 2xx, an ApiError (status, message, code) otherwise.
export async function api(path, {method = "GET", json, form} = {}) {
  const init = {method, headers: headers(json !== undefined ? {"Content-Type": "application/json"} : {})};
  if (json !== undefined) init.body = JSON.stringify(json);
  if (form) init.body = form;
  const r = await fetch(path, init);
  const body = await parse(r);
  if (!r.ok) throw new ApiError(r.status, body);
  return body;
}

// What a failed call means to the user: 401 and 403 get their own words, never a blank panel.
export function explain(err) {
  if (!(err instanceof ApiError)) return String(err && err.message || err);
  if (err.status === 401) return `401: the key was refused (${err.message}). Enter a valid API key above.`;
  if (err.status === 403) return `403: this key may not do that (${err.message}).`;
  return `${err.status}: ${err.message}`;
}

// A streamed chat completion: onDelta(text) per content delta; resolves to the final usage (or null).
export async function streamChat(body, onDelta, signal) {
  const r = await fetch("/v1/chat/completions", {method: "POST", signal,
    headers: headers({"Content-Type": "application/json"}),
    body: JSON.stringify({...body, stream: true, stream_options: {include_usage: true}})});
  if (!r.ok) throw new ApiError(r.status, await parse(r));
  const reader = r.body.getReader();
  const dec = new TextDecoder();
  let buf = "", usage = null;
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buf += dec.decode(value, {stream: true});
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const frame = buf.slice(0, i); buf = buf.slice(i + 2);
      if (!frame.startsWith("data: ") || frame === "data: [DONE]") continue;
      const obj = JSON.parse(frame.slice(6));
      if (obj.error) throw new ApiError(500, obj);
      if (obj.usage) usage = obj.usage;
      const delta = obj.choices && obj.choices[0] && obj.choices[0].delta;
      if (delta && delta.content) onDelta(delta.content);
    }
  }
  return usage;
}
