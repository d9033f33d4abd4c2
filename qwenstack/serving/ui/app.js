// The qwenstack chat page: conversations from /api/, answers streamed from /v1/chat/completions.
// Plain ES modules, no build step; every URL is relative so the page also works under a path prefix.
import { AnswerAccumulator, errorText, readSSE } from "./sse.js";
import { copyButton, setMarkdown } from "./markdown.js";

const MAX_FILE_BYTES = 16 * 1024 * 1024;
const DEFAULT_SETTINGS = Object.freeze({
  system_prompt: "", temperature: null, top_p: null, max_tokens: null, thinking_budget: null, enable_thinking: true,
});
const THEMES = ["system", "light", "dark"];

const $ = (testid, root = document) => root.querySelector(`[data-testid="${testid}"]`);
const ui = {
  app: $("app"), sidebar: $("sidebar"), scrim: $("scrim"), list: $("conversation-list"), search: $("search-input"),
  newChat: $("new-chat"), theme: $("theme-toggle"), sidebarToggle: $("sidebar-toggle"), models: $("model-select"),
  title: $("chat-title"), thinking: $("thinking-switch"), settingsButton: $("settings-button"), banner: $("banner"),
  messages: $("messages"), composer: $("composer"), input: $("composer-input"), send: $("send-button"),
  stop: $("stop-button"), attach: $("attach-button"), attachWrap: $("attach-wrap"), file: $("attach-input"),
  pending: $("attachments"), dialog: $("settings-panel"),
};

const state = {
  models: [],            // /v1/models entries
  conversations: [],     // sidebar summaries
  conv: null,            // the open conversation, with .messages; null for a new chat not yet saved
  draftSettings: { ...DEFAULT_SETTINGS },
  pending: [],           // attachments for the next message: {kind, name, mime, data_url}
  streaming: null,       // {controller, convId}
  editing: null,         // id of the user message being edited
};

// ---------------------------------------------------------------------------------------------- helpers

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "testid") el.dataset.testid = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (value === true) el.setAttribute(key, "");
    else el.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

async function api(method, path, body) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  const data = await res.json().catch(() => null);
  if (!res.ok) throw new Error(httpErrorText(res, data));
  return data;
}

// OpenAI error JSON first; FastAPI's {"detail": ...} and bare statuses as a fallback.
function httpErrorText(res, data) {
  if (data && data.error) return errorText(data.error);
  if (data && data.detail) return typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail);
  return `${res.status} ${res.statusText}`;
}

let bannerTimer = null;
function showBanner(text, { sticky = false } = {}) {
  ui.banner.textContent = text;
  ui.banner.hidden = !text;
  clearTimeout(bannerTimer);
  if (text && !sticky) bannerTimer = setTimeout(() => { ui.banner.hidden = true; }, 8000);
}

function titleFrom(text) {
  const line = (text || "").trim().split("\n")[0].trim();
  return line ? (line.length > 60 ? `${line.slice(0, 57)}…` : line) : "New chat";
}

function settingsOf() { return state.conv ? { ...DEFAULT_SETTINGS, ...state.conv.settings } : state.draftSettings; }

// ---------------------------------------------------------------------------------------------- theme

function currentTheme() {
  const saved = localStorage.getItem("qwenstack.theme");
  return THEMES.includes(saved) ? saved : "system";
}

function applyTheme(theme) {
  if (theme === "system") {
    localStorage.removeItem("qwenstack.theme");
    document.documentElement.removeAttribute("data-theme");
  } else {
    localStorage.setItem("qwenstack.theme", theme);
    document.documentElement.setAttribute("data-theme", theme);
  }
  ui.theme.textContent = `Theme: ${theme}`;
  ui.theme.dataset.theme = theme;
}

// ---------------------------------------------------------------------------------------------- models

function capabilities(modelId) {
  const entry = state.models.find((m) => m.id === modelId);
  if (!entry) return new Set();
  let caps = entry.capabilities ?? entry.qwenstack?.capabilities ?? [];
  if (!Array.isArray(caps)) caps = Object.keys(caps).filter((k) => caps[k]);
  return new Set(caps.map(String));
}

function accepts(modelId, kind) {
  return capabilities(modelId).has(kind === "image" ? "vision" : "audio");
}

function selectedModel() { return ui.models.value || null; }

async function loadModels() {
  try {
    const data = await api("GET", "v1/models");
    state.models = Array.isArray(data?.data) ? data.data : [];
  } catch (e) {
    state.models = [];
    showBanner(`Could not list the models (GET /v1/models): ${e.message}`, { sticky: true });
  }
  const wanted = state.conv?.model || localStorage.getItem("qwenstack.model");
  ui.models.replaceChildren(...state.models.map((m) => h("option", { value: m.id }, m.id)));
  if (!state.models.length) ui.models.append(h("option", { value: "" }, "no models"));
  if (wanted && state.models.some((m) => m.id === wanted)) ui.models.value = wanted;
  updateAttachButton();
}

function updateAttachButton() {
  const model = selectedModel();
  const kinds = [];
  if (accepts(model, "image")) kinds.push("image");
  if (accepts(model, "audio")) kinds.push("audio");
  const allowed = kinds.length > 0;
  ui.attach.disabled = !allowed || Boolean(state.streaming);
  ui.file.accept = kinds.map((k) => `${k}/*`).join(",");
  const tip = allowed
    ? `Attach ${kinds.map((k) => (k === "image" ? "images" : "audio")).join(" or ")}`
    : `${model ? `The model “${model}”` : "This model"} does not accept images or audio`;
  ui.attach.title = tip;
  ui.attachWrap.title = tip;
  ui.attach.setAttribute("aria-label", tip);
}

// ---------------------------------------------------------------------------------------------- sidebar

async function refreshConversations() {
  const q = ui.search.value.trim();
  try {
    const data = await api("GET", `api/conversations${q ? `?q=${encodeURIComponent(q)}` : ""}`);
    state.conversations = data.data;
  } catch (e) {
    showBanner(`Could not load the conversations: ${e.message}`);
  }
  renderConversationList();
}

function renderConversationList() {
  const items = state.conversations.map((c) => {
    const li = h("li", { class: `conv-item${state.conv?.id === c.id ? " active" : ""}`, testid: "conversation-item",
      "data-id": c.id });
    const open = h("button", { type: "button", class: "conv-open", title: c.title, onclick: () => openConversation(c.id) },
      h("span", { class: "conv-title", testid: "conversation-title" }, c.title));
    const rename = h("button", { type: "button", class: "btn", testid: "rename-conversation", title: "Rename",
      onclick: () => startRename(li, c) }, "Rename");
    const del = h("button", { type: "button", class: "btn", testid: "delete-conversation", title: "Delete",
      onclick: () => askDelete(li, c) }, "Delete");
    li.append(open, h("span", { class: "conv-actions" }, rename, del));
    return li;
  });
  if (!items.length) {
    items.push(h("li", { class: "conv-empty", testid: "conversation-empty" },
      ui.search.value.trim() ? "No conversation matches." : "No conversations yet."));
  }
  ui.list.replaceChildren(...items);
}

function startRename(li, conv) {
  const input = h("input", { class: "rename-input", testid: "rename-input", value: conv.title, maxlength: "200",
    "aria-label": "New title" });
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    const title = input.value.trim();
    if (save && title && title !== conv.title) {
      try {
        await api("PATCH", `api/conversations/${conv.id}`, { title });
        if (state.conv?.id === conv.id) { state.conv.title = title; renderTitle(); }
      } catch (e) { showBanner(`Could not rename: ${e.message}`); }
    }
    await refreshConversations();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") { e.preventDefault(); finish(true); }
    if (e.key === "Escape") { e.preventDefault(); e.stopPropagation(); finish(false); }
  });
  input.addEventListener("blur", () => finish(true));
  li.replaceChildren(input);
  input.focus();
  input.select();
}

function askDelete(li, conv) {
  const actions = li.querySelector(".conv-actions");
  const confirm = h("button", { type: "button", class: "btn confirm", testid: "confirm-delete",
    onclick: () => deleteConversation(conv.id) }, "Delete?");
  const cancel = h("button", { type: "button", class: "btn", testid: "cancel-delete",
    onclick: () => renderConversationList() }, "Keep");
  actions.replaceChildren(confirm, cancel);
  confirm.focus();
}

async function deleteConversation(id) {
  try {
    await api("DELETE", `api/conversations/${id}`);
  } catch (e) { showBanner(`Could not delete: ${e.message}`); }
  if (state.conv?.id === id) newChat();
  await refreshConversations();
}

function setSidebar(open) {
  ui.app.classList.toggle("sidebar-open", open);
  ui.scrim.hidden = !open;
}

// ---------------------------------------------------------------------------------------------- conversations

function renderTitle() {
  const title = state.conv ? state.conv.title : "New chat";
  ui.title.textContent = title;
  document.title = `${title} · qwenstack`;
}

function setHash(id) {
  const url = id ? `#c=${id}` : location.pathname + location.search;
  history.replaceState(null, "", url);
}

function newChat() {
  if (state.streaming) stop();
  state.conv = null;
  state.editing = null;
  state.draftSettings = { ...DEFAULT_SETTINGS };
  ui.thinking.checked = true;
  setHash(null);
  renderTitle();
  renderMessages();
  renderConversationList();
  setSidebar(false);
  ui.input.focus();
}

async function openConversation(id) {
  let conv;
  try {
    conv = await api("GET", `api/conversations/${id}`);
  } catch (e) {
    showBanner(`Could not open the conversation: ${e.message}`);
    setHash(null);
    return;
  }
  state.conv = conv;
  state.editing = null;
  ui.thinking.checked = settingsOf().enable_thinking !== false;
  if (conv.model && state.models.some((m) => m.id === conv.model)) ui.models.value = conv.model;
  updateAttachButton();
  setHash(id);
  renderTitle();
  renderMessages();
  renderConversationList();
  setSidebar(false);
  scrollToBottom(true);
}

async function ensureConversation(firstText) {
  if (state.conv) return state.conv;
  const conv = await api("POST", "api/conversations", {
    title: titleFrom(firstText), model: selectedModel(), settings: state.draftSettings,
  });
  conv.messages = [];
  state.conv = conv;
  setHash(conv.id);
  renderTitle();
  return conv;
}

async function saveSettings(settings) {
  if (!state.conv) { state.draftSettings = settings; return; }
  state.conv.settings = await api("PUT", `api/conversations/${state.conv.id}/settings`, settings);
}

// ---------------------------------------------------------------------------------------------- messages

function nearBottom() {
  const m = ui.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
}

function scrollToBottom(force = false) {
  if (force || nearBottom()) ui.messages.scrollTop = ui.messages.scrollHeight;
}

function renderMessages() {
  const conv = state.conv;
  if (!conv || !conv.messages.length) {
    const model = selectedModel();
    ui.messages.replaceChildren(h("div", { class: "empty-state", testid: "empty-state" },
      h("h2", {}, "What can I help with?"),
      h("p", {}, model ? `Answers come from ${model}, running on this machine.` : "No model is loaded.")));
    return;
  }
  const answered = new Set(conv.messages.filter((m) => m.role === "tool").map((m) => m.tool_call_id));
  const lastAssistant = conv.messages.map((m) => m.role).lastIndexOf("assistant");
  const views = conv.messages.map((m, i) => {
    if (m.role === "user") return userView(m, i);
    if (m.role === "tool") return toolResultView(m);
    if (m.role === "system") return h("div", { class: "msg muted", testid: "message", "data-role": "system" }, m.content);
    const tail = conv.messages.slice(i + 1).every((n) => n.role === "tool");
    return assistantView(m, { index: i, last: i === lastAssistant, tail, answered }).root;
  });
  ui.messages.replaceChildren(...views);
}

function attachmentList(attachments) {
  if (!attachments || !attachments.length) return null;
  return h("div", { class: "attach-list" }, attachments.map((a) => (a.kind === "image"
    ? h("img", { src: a.data_url, alt: a.name || "image", testid: "message-attachment" })
    : h("audio", { src: a.data_url, controls: true, testid: "message-attachment" }))));
}

function userView(m, index) {
  const root = h("article", { class: "msg msg-user", testid: "message", "data-role": "user", "data-id": m.id });
  if (state.editing === m.id) {
    const area = h("textarea", { testid: "edit-input", "aria-label": "Edit message" });
    area.value = m.content;
    const save = () => editAndResend(index, area.value);
    const cancel = () => { state.editing = null; renderMessages(); };
    area.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); save(); }
      if (e.key === "Escape") { e.preventDefault(); e.stopPropagation(); cancel(); }
    });
    root.append(h("div", { class: "msg-body edit-box" }, attachmentList(m.attachments), area,
      h("div", { class: "edit-actions" },
        h("button", { type: "button", class: "btn", testid: "edit-cancel", onclick: cancel }, "Cancel"),
        h("button", { type: "button", class: "btn btn-primary", testid: "edit-save", onclick: save }, "Send"))));
    requestAnimationFrame(() => area.focus());
    return root;
  }
  const content = h("div", { class: "md", testid: "message-content" });
  setMarkdown(content, m.content);
  root.append(h("div", { class: "msg-body" }, attachmentList(m.attachments), content));
  root.append(h("footer", { class: "msg-meta" },
    copyButton(() => m.content, "copy-message"),
    h("button", { type: "button", class: "btn btn-small", testid: "edit-button", disabled: Boolean(state.streaming),
      onclick: () => { state.editing = m.id; renderMessages(); } }, "Edit")));
  return root;
}

function toolResultView(m) {
  return h("article", { class: "msg msg-tool", testid: "message", "data-role": "tool", "data-id": m.id },
    h("div", { class: "msg-body" },
      h("details", { class: "card", testid: "tool-result", open: true },
        h("summary", {}, h("span", { class: "tag" }, "Tool result"), h("code", {}, m.name || m.tool_call_id || "")),
        h("pre", {}, m.content))));
}

function prettyArguments(text) {
  try { return JSON.stringify(JSON.parse(text), null, 2); } catch (e) { return text; }
}

function guardNotice(guard, finishReason) {
  if (!guard && finishReason !== "content_filter") return null;
  if (!guard) {
    return h("div", { class: "notice notice-guard", testid: "guard-verdict", role: "status" },
      h("strong", {}, "Withheld by the content filter"), "The server stopped this answer (finish_reason content_filter).");
  }
  const blocked = (guard.action ?? "block") === "block";
  const what = guard.direction === "prompt" ? "Your message" : "The answer";
  const verdict = `${what} was judged ${guard.safety || "unsafe"} by the safety guard`;
  const categories = Array.isArray(guard.categories) ? guard.categories : [];
  return h("div", { class: "notice notice-guard", testid: "guard-verdict", role: "status",
    "data-direction": guard.direction || "" },
    h("strong", {}, blocked ? "Blocked by the safety guard" : "Flagged by the safety guard"),
    h("span", {}, blocked ? `${verdict}${guard.direction === "prompt" ? " and was not answered." : " and withheld."}`
      : `${verdict}.`),
    categories.length ? h("div", { testid: "guard-categories" }, "Categories: ",
      categories.map((c) => h("span", { class: "category" }, c))) : null);
}

function metricsText(metrics, finishReason) {
  const parts = [];
  if (metrics) {
    if (metrics.ttft_s != null) parts.push(`TTFT ${metrics.ttft_s.toFixed(2)} s`);
    if (metrics.tokens_per_s != null) parts.push(`${metrics.estimated ? "~" : ""}${metrics.tokens_per_s.toFixed(1)} tok/s`);
    if (metrics.completion_tokens != null) {
      parts.push(`${metrics.estimated ? "~" : ""}${metrics.completion_tokens} tokens`);
    }
  }
  if (finishReason === "length") parts.push("cut at max tokens");
  return parts.join(" · ");
}

// Builds an assistant message; returns {root, update(m, live)} so a streaming answer can be redrawn in place.
function assistantView(m, { index = -1, last = false, tail = false, answered = new Set(), live = false } = {}) {
  const root = h("article", { class: "msg msg-assistant", testid: "message", "data-role": "assistant" });
  const thinking = h("details", { class: "thinking", testid: "thinking", hidden: true });
  const summary = h("summary", { testid: "thinking-toggle" });
  const thinkingBody = h("div", { class: "thinking-body md", testid: "thinking-content" });
  thinking.append(summary, thinkingBody);
  const tools = h("div", { class: "tool-calls" });
  const content = h("div", { class: "md content", testid: "message-content" });
  const notices = h("div", { class: "notices" });
  const meta = h("footer", { class: "msg-meta" });
  root.append(h("div", { class: "msg-role" }, m.model || "assistant"),
    h("div", { class: "msg-body" }, thinking, tools, content, notices), meta);

  const view = { root, userToggled: false, folded: false, shown: { reasoning: null, content: null, tools: null } };
  summary.addEventListener("click", () => { view.userToggled = true; });

  view.update = (msg, isLive, thinkingSeconds) => {
    root.dataset.id = msg.id || "";
    root.dataset.finish = msg.finish_reason || "";
    root.dataset.streaming = isLive ? "true" : "false";
    const reasoning = msg.reasoning || "";
    thinking.hidden = !reasoning;
    thinking.classList.toggle("live", isLive && !msg.content && !(msg.tool_calls || []).length);
    if (reasoning !== view.shown.reasoning) { setMarkdown(thinkingBody, reasoning); view.shown.reasoning = reasoning; }
    const seconds = thinkingSeconds ?? msg.metrics?.thinking_s;
    summary.textContent = thinking.classList.contains("live") ? "Thinking…"
      : seconds != null ? `Thought for ${seconds.toFixed(1)} s` : "Thoughts";
    if (isLive && reasoning && !view.userToggled) {
      // Open while the model thinks; fold once, when the answer starts.
      const answering = Boolean(msg.content || (msg.tool_calls || []).length);
      if (!answering && !view.folded) thinking.open = true;
      if (answering && !view.folded) { thinking.open = false; view.folded = true; }
    }
    const calls = msg.tool_calls || [];
    const toolsKey = JSON.stringify(calls) + (isLive ? "live" : "") + [...answered].join();
    if (toolsKey !== view.shown.tools) {
      view.shown.tools = toolsKey;
      tools.replaceChildren(...calls.map((call) => toolCallCard(call, { canAnswer: !isLive && tail && last, answered })));
    }
    const text = msg.content || "";
    if (text !== view.shown.content) { setMarkdown(content, text); view.shown.content = text; }
    content.classList.toggle("cursor", isLive);
    const empty = !isLive && !text && !reasoning && !calls.length && !msg.error && !msg.guard
      && msg.finish_reason !== "content_filter";
    if (empty) content.replaceChildren(h("span", { class: "muted" }, msg.finish_reason === "abort" ? "" : "(empty answer)"));
    notices.replaceChildren(...[
      guardNotice(msg.guard, msg.finish_reason),
      msg.error ? h("div", { class: "notice notice-error", testid: "message-error", role: "alert" },
        h("strong", {}, "The server returned an error"), h("span", {}, msg.error)) : null,
    ].filter(Boolean));
    meta.replaceChildren();
    if (isLive) return;
    const metrics = metricsText(msg.metrics, msg.finish_reason);
    if (metrics) meta.append(h("span", { class: "metrics", testid: "message-metrics" }, metrics));
    if (msg.finish_reason === "abort") meta.append(h("span", { class: "stopped", testid: "message-stopped" }, "Stopped"));
    if (text) meta.append(copyButton(() => msg.content, "copy-message"));
    if (last && index >= 0) {
      meta.append(h("button", { type: "button", class: "btn btn-small", testid: "regenerate-button",
        disabled: Boolean(state.streaming), onclick: () => regenerate(index) }, "Regenerate"));
    }
  };
  view.update(m, live);
  return view;
}

function toolCallCard(call, { canAnswer, answered }) {
  const fn = call.function || {};
  const card = h("details", { class: "card", testid: "tool-call", open: true, "data-id": call.id || "" },
    h("summary", {}, h("span", { class: "tag" }, "Tool call"), h("code", {}, fn.name || "…")),
    h("pre", {}, prettyArguments(fn.arguments || "")));
  if (canAnswer && call.id && !answered.has(call.id)) {
    const area = h("textarea", { testid: "tool-result-input", placeholder: `Result of ${fn.name || "the call"}`,
      "aria-label": "Tool result" });
    card.append(h("div", { class: "tool-result-form" }, area,
      h("button", { type: "button", class: "btn btn-small", testid: "tool-result-submit",
        onclick: () => submitToolResult(call, area.value) }, "Send result")));
  }
  return card;
}

// ---------------------------------------------------------------------------------------------- generation

function userContent(m) {
  const attachments = m.attachments || [];
  if (!attachments.length) return m.content;
  const parts = m.content ? [{ type: "text", text: m.content }] : [];
  for (const a of attachments) {
    if (a.kind === "image") parts.push({ type: "image_url", image_url: { url: a.data_url } });
    else {
      const sub = a.mime.split("/")[1] || "wav";
      const format = { mpeg: "mp3", "x-wav": "wav", wave: "wav" }[sub] || sub;
      parts.push({ type: "input_audio", input_audio: { data: a.data_url.split(",")[1], format } });
    }
  }
  return parts;
}

// The history as OpenAI messages. Failed turns (an error, a blocked prompt) are left out: resending a prompt
// that was too long or blocked would fail the same way again.
function openaiMessages(conv) {
  const settings = { ...DEFAULT_SETTINGS, ...conv.settings };
  const out = settings.system_prompt.trim() ? [{ role: "system", content: settings.system_prompt }] : [];
  const msgs = conv.messages;
  const skip = new Set();
  msgs.forEach((m, i) => {
    if (m.role !== "assistant") return;
    const blocked = (m.guard && (m.guard.action ?? "block") === "block") || m.finish_reason === "content_filter";
    const failed = Boolean(m.error) && !m.content && !(m.tool_calls || []).length;
    const empty = !m.content && !(m.tool_calls || []).length;
    if (blocked || failed || empty) skip.add(i);
    if (failed || (blocked && m.guard?.direction === "prompt")) {
      for (let j = i - 1; j >= 0; j -= 1) if (msgs[j].role === "user") { skip.add(j); break; }
    }
  });
  msgs.forEach((m, i) => {
    if (skip.has(i)) return;
    if (m.role === "user") out.push({ role: "user", content: userContent(m) });
    else if (m.role === "system") out.push({ role: "system", content: m.content });
    else if (m.role === "tool") out.push({ role: "tool", tool_call_id: m.tool_call_id, content: m.content });
    else {
      const msg = { role: "assistant", content: m.content || "" };
      if (m.tool_calls && m.tool_calls.length) msg.tool_calls = m.tool_calls;
      out.push(msg);
    }
  });
  return out;
}

function requestBody(conv, model) {
  const s = { ...DEFAULT_SETTINGS, ...conv.settings };
  const body = {
    model, messages: openaiMessages(conv), stream: true, stream_options: { include_usage: true },
    chat_template_kwargs: { enable_thinking: s.enable_thinking !== false },
  };
  if (s.temperature != null) body.temperature = s.temperature;
  if (s.top_p != null) body.top_p = s.top_p;
  if (s.max_tokens != null) body.max_tokens = s.max_tokens;
  if (s.enable_thinking !== false && s.thinking_budget != null) body.thinking_budget = s.thinking_budget;
  return body;
}

function setStreaming(on) {
  ui.app.dataset.streaming = on ? "true" : "false";
  ui.send.hidden = on;
  ui.stop.hidden = !on;
  updateAttachButton();
}

function stop() {
  if (state.streaming) state.streaming.controller.abort();
}

async function generate() {
  const conv = state.conv;
  const model = selectedModel();
  if (!conv || state.streaming) return;
  const controller = new AbortController();
  state.streaming = { controller, convId: conv.id };
  setStreaming(true);
  renderMessages();  // disables edit/regenerate while streaming
  const started = performance.now();
  const acc = new AnswerAccumulator(started);
  const view = assistantView({ role: "assistant", model, content: "" }, { live: true });
  ui.messages.querySelector(".empty-state")?.remove();
  ui.messages.append(view.root);
  scrollToBottom(true);
  let frame = 0;
  const snapshot = () => ({ role: "assistant", model, content: acc.content, reasoning: acc.reasoning || null,
    tool_calls: acc.toolCalls.length ? acc.toolCalls.filter(Boolean) : null, guard: acc.guard,
    finish_reason: acc.finishReason, error: acc.error });
  const thinkingSeconds = () => (acc.reasoning && acc.firstTokenAt !== null
    ? ((acc.contentAt ?? performance.now()) - acc.firstTokenAt) / 1000 : null);
  const redraw = () => {
    if (frame) return;
    frame = requestAnimationFrame(() => {
      frame = 0;
      const stick = nearBottom();
      view.update(snapshot(), true, thinkingSeconds());
      if (stick) scrollToBottom(true);
    });
  };
  let aborted = false;
  try {
    const res = await fetch("v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify(requestBody(conv, model)), signal: controller.signal,
    });
    const type = res.headers.get("content-type") || "";
    if (!res.ok) {
      const data = await res.json().catch(() => null);
      acc.error = httpErrorText(res, data);
      acc.guard = data?.qwenstack_guard || data?.error?.qwenstack_guard || null;
    } else if (type.includes("text/event-stream")) {
      await readSSE(res.body, (obj) => { acc.apply(obj, performance.now()); redraw(); });
    } else {
      acc.apply(await res.json(), performance.now());  // a server that ignored stream: true
    }
  } catch (e) {
    if (e.name === "AbortError") aborted = true;
    else acc.error = `Could not reach the server: ${e.message}`;
  }
  cancelAnimationFrame(frame);
  const ended = performance.now();
  const message = snapshot();
  if (aborted) message.finish_reason = "abort";
  message.metrics = { ...acc.metrics(ended) };
  const seconds = thinkingSeconds();
  if (seconds != null) message.metrics.thinking_s = Math.round(seconds * 100) / 100;
  state.streaming = null;
  setStreaming(false);
  try {
    const saved = await api("POST", `api/conversations/${conv.id}/messages`, message);
    conv.messages.push(saved);
  } catch (e) {
    conv.messages.push(message);
    showBanner(`The answer could not be saved: ${e.message}`);
  }
  if (state.conv === conv) {
    const stick = nearBottom();
    renderMessages();
    if (stick) scrollToBottom(true);
  }
  refreshConversations();
}

async function send() {
  if (state.streaming) return;
  const text = ui.input.value;
  const attachments = state.pending.slice();
  if (!text.trim() && !attachments.length) return;
  const model = selectedModel();
  if (!model) { showBanner("There is no model to answer: the server lists none in /v1/models."); return; }
  const refused = attachments.find((a) => !accepts(model, a.kind));
  if (refused) {
    showBanner(`The model “${model}” does not accept ${refused.kind === "image" ? "images" : "audio"}; remove ${refused.name}.`);
    return;
  }
  ui.input.value = "";
  autosize();
  try {
    const conv = await ensureConversation(text || attachments[0].name);
    const saved = await api("POST", `api/conversations/${conv.id}/messages`,
      { role: "user", content: text, attachments: attachments.length ? attachments : null, model });
    conv.messages.push(saved);
    state.pending = [];
    renderPending();
  } catch (e) {
    ui.input.value = text;
    autosize();
    showBanner(`Could not save your message: ${e.message}`);
    return;
  }
  renderMessages();
  refreshConversations();
  await generate();
}

async function truncateTo(keep) {
  const conv = state.conv;
  const data = await api("POST", `api/conversations/${conv.id}/truncate`, { keep });
  conv.messages = data.data;
}

async function regenerate(index) {
  if (state.streaming || !state.conv) return;
  try { await truncateTo(index); } catch (e) { showBanner(`Could not regenerate: ${e.message}`); return; }
  renderMessages();
  await generate();
}

async function editAndResend(index, text) {
  const conv = state.conv;
  const original = conv.messages[index];
  if (!text.trim() && !(original.attachments || []).length) return;
  state.editing = null;
  try {
    const { id, conversation_id, position, created_at, ...fields } = original;
    conv.messages[index] = await api("PUT", `api/conversations/${conv.id}/messages/${id}`, { ...fields, content: text });
    await truncateTo(index + 1);
  } catch (e) {
    showBanner(`Could not edit the message: ${e.message}`);
    renderMessages();
    return;
  }
  renderMessages();
  await generate();
}

async function submitToolResult(call, text) {
  const conv = state.conv;
  try {
    const saved = await api("POST", `api/conversations/${conv.id}/messages`,
      { role: "tool", tool_call_id: call.id, name: call.function?.name || null, content: text });
    conv.messages.push(saved);
  } catch (e) { showBanner(`Could not save the tool result: ${e.message}`); return; }
  // Continue once every call of the last assistant turn has its result.
  const lastAssistant = [...conv.messages].reverse().find((m) => m.role === "assistant");
  const answered = new Set(conv.messages.filter((m) => m.role === "tool").map((m) => m.tool_call_id));
  renderMessages();
  if ((lastAssistant?.tool_calls || []).every((c) => answered.has(c.id))) await generate();
}

// ---------------------------------------------------------------------------------------------- composer

function autosize() {
  ui.input.style.height = "auto";
  ui.input.style.height = `${Math.min(ui.input.scrollHeight + 2, window.innerHeight * 0.4)}px`;
}

function renderPending() {
  ui.pending.replaceChildren(...state.pending.map((a, i) => h("span", { class: "attach-chip", testid: "attachment-preview" },
    a.kind === "image" ? h("img", { src: a.data_url, alt: "" }) : null, a.name,
    h("button", { type: "button", class: "btn btn-small", testid: "attachment-remove", "aria-label": `Remove ${a.name}`,
      onclick: () => { state.pending.splice(i, 1); renderPending(); } }, "×"))));
}

function readDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function addFiles(files) {
  const model = selectedModel();
  for (const file of files) {
    const kind = file.type.startsWith("image/") ? "image" : file.type.startsWith("audio/") ? "audio" : null;
    if (!kind) { showBanner(`${file.name}: only images and audio can be attached.`); continue; }
    if (!accepts(model, kind)) {
      showBanner(`The model “${model}” does not accept ${kind === "image" ? "images" : "audio"}.`);
      continue;
    }
    if (file.size > MAX_FILE_BYTES) { showBanner(`${file.name} is larger than 16 MB.`); continue; }
    state.pending.push({ kind, name: file.name, mime: file.type, data_url: await readDataURL(file) });
  }
  renderPending();
}

// ---------------------------------------------------------------------------------------------- settings dialog

const field = (id) => $(id, ui.dialog);

function openSettings() {
  const s = settingsOf();
  field("settings-system-prompt").value = s.system_prompt || "";
  field("settings-temperature").value = s.temperature ?? "";
  field("settings-top-p").value = s.top_p ?? "";
  field("settings-max-tokens").value = s.max_tokens ?? "";
  field("settings-thinking-budget").value = s.thinking_budget ?? "";
  field("settings-error").hidden = true;
  ui.dialog.showModal();
}

function readNumber(id, label, integer) {
  const raw = field(id).value.trim();
  if (!raw) return null;
  const value = Number(raw);
  if (!Number.isFinite(value) || (integer && !Number.isInteger(value))) {
    throw new Error(`${label} must be ${integer ? "a whole number" : "a number"}.`);
  }
  return value;
}

async function saveSettingsDialog() {
  const error = field("settings-error");
  try {
    const settings = {
      ...settingsOf(),
      system_prompt: field("settings-system-prompt").value,
      temperature: readNumber("settings-temperature", "Temperature", false),
      top_p: readNumber("settings-top-p", "Top p", false),
      max_tokens: readNumber("settings-max-tokens", "Max tokens", true),
      thinking_budget: readNumber("settings-thinking-budget", "Thinking budget", true),
    };
    await saveSettings(settings);
    ui.dialog.close();
  } catch (e) {
    error.textContent = e.message;
    error.hidden = false;
  }
}

// ---------------------------------------------------------------------------------------------- wiring

function wire() {
  ui.composer.addEventListener("submit", (e) => { e.preventDefault(); send(); });
  ui.input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  ui.input.addEventListener("input", autosize);
  ui.input.addEventListener("paste", (e) => {
    const files = [...(e.clipboardData?.files || [])];
    if (files.length) { e.preventDefault(); addFiles(files); }
  });
  ui.composer.addEventListener("dragover", (e) => e.preventDefault());
  ui.composer.addEventListener("drop", (e) => {
    e.preventDefault();
    if (!ui.attach.disabled) addFiles([...(e.dataTransfer?.files || [])]);
    else showBanner(ui.attach.title);
  });
  ui.stop.addEventListener("click", stop);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && state.streaming && !ui.dialog.open) { e.preventDefault(); stop(); }
  });
  ui.attach.addEventListener("click", () => ui.file.click());
  ui.file.addEventListener("change", async () => { await addFiles([...ui.file.files]); ui.file.value = ""; });
  ui.newChat.addEventListener("click", newChat);
  let searchTimer = null;
  ui.search.addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(refreshConversations, 200);
  });
  ui.theme.addEventListener("click", () => applyTheme(THEMES[(THEMES.indexOf(currentTheme()) + 1) % THEMES.length]));
  ui.sidebarToggle.addEventListener("click", () => setSidebar(!ui.app.classList.contains("sidebar-open")));
  ui.scrim.addEventListener("click", () => setSidebar(false));
  ui.models.addEventListener("change", async () => {
    const model = selectedModel();
    localStorage.setItem("qwenstack.model", model);
    updateAttachButton();
    if (!state.conv) { renderMessages(); return; }
    try {
      await api("PATCH", `api/conversations/${state.conv.id}`, { model });
      state.conv.model = model;
    } catch (e) { showBanner(`Could not switch the model: ${e.message}`); }
  });
  ui.thinking.addEventListener("change", async () => {
    try { await saveSettings({ ...settingsOf(), enable_thinking: ui.thinking.checked }); } catch (e) {
      showBanner(`Could not save the thinking switch: ${e.message}`);
    }
  });
  ui.settingsButton.addEventListener("click", openSettings);
  field("settings-save").addEventListener("click", saveSettingsDialog);
  field("settings-close").addEventListener("click", () => ui.dialog.close());
  window.addEventListener("hashchange", () => {
    const id = new URLSearchParams(location.hash.slice(1)).get("c");
    if (id && id !== state.conv?.id) openConversation(id);
  });
}

// The keyboard hint does not fit a phone's composer.
function placeholderFor(narrow) {
  ui.input.placeholder = narrow ? "Message" : "Message (Enter sends, Shift+Enter adds a line)";
}

async function init() {
  applyTheme(currentTheme());
  const narrow = window.matchMedia("(max-width: 760px)");
  placeholderFor(narrow.matches);
  narrow.addEventListener("change", (e) => placeholderFor(e.matches));
  wire();
  setStreaming(false);
  renderMessages();
  await Promise.all([loadModels(), refreshConversations()]);
  const id = new URLSearchParams(location.hash.slice(1)).get("c");
  if (id) await openConversation(id);
  else renderMessages();
  ui.app.dataset.ready = "true";
  ui.input.focus();
}

init();
