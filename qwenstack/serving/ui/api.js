// Every call to the server's /v1/ and /api/ goes through here. A server started with --api-key wants
// `Authorization: Bearer <key>`: the page asks for the key on the first 401, keeps it in localStorage and
// sends it on every call; a wrong key asks again. One place, so no module can forget the key.
import { errorText } from "./sse.js";

const $ = (testid, root = document) => root.querySelector(`[data-testid="${testid}"]`);
const API_KEY_ITEM = "qwenstack.apiKey";
let keyPrompt = null;  // one prompt shared by the calls that got a 401 together

function authHeaders(key, headers = {}) {
  return key ? { ...headers, Authorization: `Bearer ${key}` } : headers;
}

function askForApiKey(message) {
  if (keyPrompt) return keyPrompt;
  const dialog = $("api-key-dialog");
  const input = $("api-key-input");
  const error = $("api-key-error");
  error.textContent = message;
  error.hidden = !message;
  input.value = "";
  const form = $("api-key-form");
  keyPrompt = new Promise((resolve, reject) => {
    let saved = false;
    const submit = (e) => {
      e.preventDefault();
      const key = input.value.trim();
      if (!key) { input.focus(); return; }
      localStorage.setItem(API_KEY_ITEM, key);
      saved = true;
      dialog.close();
    };
    const closed = () => {  // saved, or dismissed with Escape: the calls waiting on the key fail readably
      form.removeEventListener("submit", submit);
      dialog.removeEventListener("close", closed);
      keyPrompt = null;
      if (saved) resolve();
      else reject(new Error("this server needs an API key (Authorization: Bearer <key>)"));
    };
    form.addEventListener("submit", submit);
    dialog.addEventListener("close", closed);
  });
  if (!dialog.open) dialog.showModal();
  input.focus();
  return keyPrompt;
}

// fetch with the key; on a 401 asks for a key and tries again (until the server takes it).
export async function apiFetch(path, init = {}) {
  for (;;) {
    const sent = localStorage.getItem(API_KEY_ITEM);
    const res = await fetch(path, { ...init, headers: authHeaders(sent, init.headers) });
    if (res.status !== 401) return res;
    const data = await res.json().catch(() => null);
    // A key saved while this call was on its way (the prompt another call opened) is tried before asking:
    // asking again would reopen the dialog the user has just closed with the right key.
    if (localStorage.getItem(API_KEY_ITEM) !== sent) continue;
    await askForApiKey(sent ? `The server refused the key: ${httpErrorText(res, data)}` : "");
    if (init.signal?.aborted) throw new DOMException("aborted", "AbortError");
  }
}

export async function api(method, path, body) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await apiFetch(path, init);
  const data = await res.json().catch(() => null);
  if (!res.ok) throw new Error(httpErrorText(res, data));
  return data;
}

// OpenAI error JSON first; FastAPI's {"detail": ...} and bare statuses as a fallback.
export function httpErrorText(res, data) {
  if (data && data.error) return errorText(data.error);
  if (data && data.detail) return typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail);
  return `${res.status} ${res.statusText}`;
}

// A WebSocket to one of the API's realtime routes. Browsers cannot set headers on a socket, so the key
// travels as OpenAI's browser subprotocol ("openai-insecure-api-key.<key>") beside "realtime".
export function apiSocket(path) {
  const url = new URL(path, window.location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  const key = localStorage.getItem(API_KEY_ITEM);
  return new WebSocket(url, key ? ["realtime", `openai-insecure-api-key.${key}`] : ["realtime"]);
}
