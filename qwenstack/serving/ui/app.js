// The qwenstack chat page: conversations from /api/, answers streamed from /v1/chat/completions.
// Plain ES modules, no build step; every URL is relative so the page also works under a path prefix.
import { api, apiFetch, httpErrorText } from "./api.js";
import { AnswerAccumulator, errorText, readSSE } from "./sse.js";
import { DEFAULT_SETTINGS, requestBody } from "./request.js";
import { ResponseEventAccumulator, responsesBody } from "./responses.js";
import { assistantView, h, toolResultView, userView } from "./views.js";
import { imageTask, runImageJob } from "./imagegen.js";
import { loadVoices, speakButton, voicePicker } from "./speak.js";
import { blobDataURL, startRecording } from "./recorder.js";
import { setupTranscription } from "./transcribe.js";
import { setupTranslation } from "./translate.js";
import { setupVoice } from "./voice.js";

const MAX_FILE_BYTES = 16 * 1024 * 1024;
const THEMES = ["system", "light", "dark"];

const $ = (testid, root = document) => root.querySelector(`[data-testid="${testid}"]`);
const ui = {
  app: $("app"), sidebar: $("sidebar"), scrim: $("scrim"), list: $("conversation-list"), search: $("search-input"),
  newChat: $("new-chat"), theme: $("theme-toggle"), sidebarToggle: $("sidebar-toggle"), models: $("model-select"),
  title: $("chat-title"), thinking: $("thinking-switch"), settingsButton: $("settings-button"), banner: $("banner"),
  messages: $("messages"), composer: $("composer"), input: $("composer-input"), send: $("send-button"),
  stop: $("stop-button"), attach: $("attach-button"), attachWrap: $("attach-wrap"), file: $("attach-input"),
  pending: $("attachments"), dialog: $("settings-panel"), record: $("record-button"),
};
let transcription = null;  // the transcription view (transcribe.js), set up in wire()
let translation = null;  // the live translation view (translate.js), set up in wire()
let voice = null;  // voice mode for models that answer aloud (voice.js), set up in wire()
let recording = null;  // the microphone recording in progress for the composer

const state = {
  models: [],            // /v1/models entries
  conversations: [],     // sidebar summaries
  conv: null,            // the open conversation, with .messages; null for a new chat not yet saved
  draftSettings: { ...DEFAULT_SETTINGS },
  pending: [],           // attachments for the next message: {kind, name, mime, data_url}
  streaming: null,       // {controller, convId}
  mcpServers: [],        // MCP servers the operator registered (GET /v1/mcp/servers)
  editing: null,         // id of the user message being edited
  sending: false,        // a message is being saved; generation has not started yet
  loading: false,        // the server is still loading its models (/health answers 503)
};

// ---------------------------------------------------------------------------------------------- helpers

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
  const caps = capabilities(modelId);
  return kind === "image" ? caps.has("vision") || caps.has("image_edit") : caps.has("audio");
}

function selectedModel() { return ui.models.value || null; }

// While the server loads its models (/health answers 503), the list is asked for again this often.
const LOADING_RETRY_MS = 2000;

async function serverLoading() {
  try { return (await fetch(new URL("health", document.baseURI))).status === 503; } catch { return false; }
}

async function loadModels() {
  try {
    const data = await api("GET", "v1/models");
    state.models = Array.isArray(data?.data) ? data.data : [];
  } catch (e) {
    state.models = [];
    showBanner(`Could not list the models (GET /v1/models): ${e.message}`, { sticky: true });
  }
  // A page opened right after `qwenstack serve` meets a server still loading: it says so, and lists the models
  // once they are ready (it used to say "No model is loaded" until reloaded).
  const wasLoading = state.loading;
  state.loading = !state.models.length && await serverLoading();
  if (state.loading) setTimeout(loadModels, LOADING_RETRY_MS);
  const wanted = state.conv?.model || localStorage.getItem("qwenstack.model");
  // translation pipelines, speech and embedding models are not chat models: the translate view and the speaker
  // button use the first two, /v1/embeddings the last
  const notChat = ["translation", "speech", "embedding"];
  const chatModels = state.models.filter((m) => !notChat.some((c) => capabilities(m.id).has(c)));
  ui.models.replaceChildren(...chatModels.map((m) => h("option", { value: m.id }, m.id)));
  if (!chatModels.length) ui.models.append(h("option", { value: "" }, state.loading ? "loading…" : "no models"));
  if (wanted && chatModels.some((m) => m.id === wanted)) ui.models.value = wanted;
  updateAttachButton();
  if (wasLoading !== state.loading) renderMessages();
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
  ui.record.hidden = !accepts(model, "audio");
  ui.record.disabled = Boolean(state.streaming);
  transcription?.refresh();
  translation?.refresh();
  voice?.refresh();
}

// The composer's microphone: the first click starts recording, the second attaches it as a WAV file.
async function toggleRecording() {
  if (recording) {
    const { blob } = await recording.stop();
    recording = null;
    ui.record.setAttribute("aria-pressed", "false");
    ui.record.classList.remove("recording");
    const name = `recording-${new Date().toTimeString().slice(0, 8).replaceAll(":", "")}.wav`;
    state.pending.push({ kind: "audio", name, mime: "audio/wav", data_url: await blobDataURL(blob) });
    renderPending();
    return;
  }
  try {
    recording = await startRecording();
  } catch (e) {
    showBanner(`Cannot record from the microphone: ${e.message}`);
    return;
  }
  ui.record.setAttribute("aria-pressed", "true");
  ui.record.classList.add("recording");
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
  // Held here before the server answers, so a message sent at once already uses them; put back if refused.
  const conv = state.conv;
  const before = conv.settings;
  conv.settings = settings;
  try {
    conv.settings = await api("PUT", `api/conversations/${conv.id}/settings`, settings);
  } catch (e) {
    conv.settings = before;
    throw e;
  }
}

// ---------------------------------------------------------------------------------------------- messages

function nearBottom() {
  const m = ui.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
}

function scrollToBottom(force = false) {
  if (force || nearBottom()) ui.messages.scrollTop = ui.messages.scrollHeight;
}

// What the message views may do: the page's actions, and whether a stream is running.
function viewContext() {
  return {
    streaming: Boolean(state.streaming), editing: state.editing, regenerate, editAndResend, submitToolResult,
    speakButton,
    setEditing: (id) => { state.editing = id; renderMessages(); },
  };
}

function renderMessages() {
  const conv = state.conv;
  if (!conv || !conv.messages.length) {
    const model = selectedModel();
    ui.messages.replaceChildren(h("div", { class: "empty-state", testid: "empty-state" },
      h("h2", {}, "What can I help with?"),
      h("p", {}, model ? `Answers come from ${model}, running on this machine.`
        : state.loading ? "The model is loading…" : "No model is loaded.")));
    return;
  }
  const answered = new Set(conv.messages.filter((m) => m.role === "tool").map((m) => m.tool_call_id));
  const lastAssistant = conv.messages.map((m) => m.role).lastIndexOf("assistant");
  const ctx = viewContext();
  const views = conv.messages.map((m, i) => {
    if (m.role === "user") return userView(m, i, ctx);
    if (m.role === "tool") return toolResultView(m);
    if (m.role === "system") return h("div", { class: "msg muted", testid: "message", "data-role": "system" }, m.content);
    const tail = conv.messages.slice(i + 1).every((n) => n.role === "tool");
    return assistantView(m, { index: i, last: i === lastAssistant, tail, answered }, ctx).root;
  });
  ui.messages.replaceChildren(...views);
}

// ---------------------------------------------------------------------------------------------- generation

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
  const task = imageTask(capabilities(model));
  if (task) { await generateImage(conv, model, task); return; }
  const controller = new AbortController();
  state.streaming = { controller, convId: conv.id };
  setStreaming(true);
  renderMessages();  // disables edit/regenerate while streaming
  const started = performance.now();
  const mcp = (settingsOf().mcp_servers || []).filter((n) => state.mcpServers.some((m) => m.name === n));
  const acc = mcp.length ? new ResponseEventAccumulator(started) : new AnswerAccumulator(started);
  const view = assistantView({ role: "assistant", model, content: "" }, { live: true }, viewContext());
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
    const res = await apiFetch(mcp.length ? "v1/responses" : "v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify(mcp.length ? responsesBody(conv, model, mcp) : requestBody(conv, model)),
      signal: controller.signal,
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
  const toSave = acc instanceof ResponseEventAccumulator ? acc.messages(message) : [message];
  for (const m of toSave) {
    try {
      conv.messages.push(await api("POST", `api/conversations/${conv.id}/messages`, m));
    } catch (e) {
      conv.messages.push(m);
      showBanner(`The answer could not be saved: ${e.message}`);
    }
  }
  if (state.conv === conv) {
    const stick = nearBottom();
    renderMessages();
    if (stick) scrollToBottom(true);
  }
  refreshConversations();
}

// An image model's answer: the last user message is the prompt; an edit uses that message's images, or else
// the latest images of the conversation (so a made image can be edited again with a follow-up message).
async function generateImage(conv, model, task) {
  const lastUser = [...conv.messages].reverse().find((m) => m.role === "user");
  const images = [...conv.messages].reverse().find((m) => (m.attachments || []).some((a) => a.kind === "image"));
  const controller = new AbortController();
  state.streaming = { controller, convId: conv.id };
  setStreaming(true);
  renderMessages();
  const started = performance.now();
  const live = { role: "assistant", model, content: "", image_progress: 0, image_preview: null };
  const view = assistantView(live, { live: true }, viewContext());
  ui.messages.querySelector(".empty-state")?.remove();
  ui.messages.append(view.root);
  scrollToBottom(true);
  const message = { role: "assistant", model, content: "" };
  try {
    const result = await runImageJob({ task, model, prompt: lastUser?.content || "",
      attachments: task === "edit" ? (images?.attachments || []) : [], signal: controller.signal,
      onUpdate: ({ progress, preview }) => {
        if (progress !== undefined) live.image_progress = progress;
        if (preview !== undefined) live.image_preview = preview;
        view.update(live, true);
        scrollToBottom();
      } });
    if (result.attachments.length) message.attachments = result.attachments;
    if (result.error) message.error = result.error;
  } catch (e) {
    if (e.name === "AbortError") message.finish_reason = "abort";
    else message.error = `Could not reach the server: ${e.message}`;
  }
  message.metrics = { elapsed_s: Math.round((performance.now() - started) / 10) / 100 };
  state.streaming = null;
  setStreaming(false);
  try {
    conv.messages.push(await api("POST", `api/conversations/${conv.id}/messages`, message));
  } catch (e) {
    conv.messages.push(message);
    showBanner(`The image could not be saved: ${e.message}`);
  }
  if (state.conv === conv) { renderMessages(); scrollToBottom(true); }
  refreshConversations();
}

async function send() {
  if (state.streaming || state.sending) return;  // a second Enter while the message is being saved
  state.sending = true;
  try { await sendNow(); } finally { state.sending = false; }
}

async function sendNow() {
  const text = ui.input.value;
  const attachments = state.pending.slice();
  if (!text.trim() && !attachments.length) return;
  const model = selectedModel();
  if (!model) {
    showBanner(state.loading ? "The model is still loading; send again in a moment."
      : "There is no model to answer: the server lists none in /v1/models.");
    return;
  }
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
  const started = generate();
  state.sending = false;
  await started;
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
  renderMcpChoices(s.mcp_servers || []);
  field("settings-error").hidden = true;
  ui.dialog.showModal();
}

// One checkbox per MCP server the operator registered (serve --mcp NAME=URL): the model may call its tools in
// this conversation, through /v1/responses.
function renderMcpChoices(enabled) {
  const box = field("settings-mcp");
  box.hidden = !state.mcpServers.length;
  field("settings-mcp-list").replaceChildren(...state.mcpServers.map((m) => h("label", { class: "mcp-choice" },
    h("input", { type: "checkbox", testid: "settings-mcp-server", value: m.name,
      checked: enabled.includes(m.name) }), ` ${m.name}`)));
}

async function loadMcpServers() {
  try {
    const data = await api("GET", "v1/mcp/servers");
    state.mcpServers = Array.isArray(data?.data) ? data.data : [];
  } catch (e) { state.mcpServers = []; }  // an older server: no MCP choices
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
      mcp_servers: [...ui.dialog.querySelectorAll('[data-testid="settings-mcp-server"]:checked')].map((c) => c.value),
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
  ui.record.addEventListener("click", toggleRecording);
  transcription = setupTranscription({
    audioModels: () => state.models.map((m) => m.id).filter((id) => accepts(id, "audio")),
    selectedModel,
  });
  translation = setupTranslation({
    pipelines: () => state.models.map((m) => m.id).filter((id) => capabilities(id).has("translation")),
  });
  voice = setupVoice({ speakingModels: () => state.models.filter((m) => capabilities(m.id).has("audio_output")) });
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
      ui.thinking.checked = settingsOf().enable_thinking !== false;
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
  await Promise.all([loadModels(), refreshConversations(), loadMcpServers()]);
  // Speech models add a voice picker and a speaker button on each answer (speak.js).
  loadVoices().then(() => { const picker = voicePicker(); if (picker) { ui.models.after(picker); renderMessages(); } });
  const id = new URLSearchParams(location.hash.slice(1)).get("c");
  if (id) await openConversation(id);
  else renderMessages();
  ui.app.dataset.ready = "true";
  ui.input.focus();
}

init();
