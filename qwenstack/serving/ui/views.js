// How messages look: user bubbles, assistant answers (thinking, tool calls, Markdown, guard verdicts, errors,
// metrics) and tool results. Actions come in through `ctx`, so this module holds no state of its own.
import { copyButton, setMarkdown } from "./markdown.js";

export function h(tag, attrs = {}, ...children) {
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

function attachmentList(attachments) {
  if (!attachments || !attachments.length) return null;
  return h("div", { class: "attach-list" }, attachments.map((a) => (a.kind === "image"
    ? h("img", { src: a.data_url, alt: a.name || "image", testid: "message-attachment" })
    : h("audio", { src: a.data_url, controls: true, testid: "message-attachment" }))));
}

// An image the assistant made (an image model's answer), with a download link.
function imageResult(a) {
  return h("figure", { class: "image-result" },
    h("img", { src: a.data_url, alt: a.name || "image", testid: "image-result" }),
    h("figcaption", {}, h("a", { href: a.data_url, download: a.name || "image.png", class: "btn btn-small",
      testid: "image-download" }, "Download")));
}

// A running image job: a progress bar over the denoising steps and the latest preview.
function imageProgress(fraction, preview) {
  const percent = Math.round((fraction || 0) * 100);
  return h("div", { class: "image-progress", testid: "image-progress", "data-progress": String(fraction || 0) },
    h("progress", { max: "100", value: String(percent), "aria-label": "Image progress" }),
    h("span", { class: "muted" }, `Making the image… ${percent}%`),
    preview ? h("img", { src: preview, alt: "preview", class: "image-preview", testid: "image-preview" }) : null);
}

export function userView(m, index, ctx) {
  const root = h("article", { class: "msg msg-user", testid: "message", "data-role": "user", "data-id": m.id });
  if (ctx.editing === m.id) {
    const area = h("textarea", { testid: "edit-input", "aria-label": "Edit message" });
    area.value = m.content;
    const save = () => ctx.editAndResend(index, area.value);
    const cancel = () => ctx.setEditing(null);
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
    h("button", { type: "button", class: "btn btn-small", testid: "edit-button", disabled: ctx.streaming,
      onclick: () => ctx.setEditing(m.id) }, "Edit")));
  return root;
}

export function toolResultView(m) {
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

export function metricsText(metrics, finishReason) {
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
export function assistantView(m, { index = -1, last = false, tail = false, answered = new Set(), live = false } = {},
  ctx = {}) {
  const root = h("article", { class: "msg msg-assistant", testid: "message", "data-role": "assistant" });
  const thinking = h("details", { class: "thinking", testid: "thinking", hidden: true });
  const summary = h("summary", { testid: "thinking-toggle" });
  const thinkingBody = h("div", { class: "thinking-body md", testid: "thinking-content" });
  thinking.append(summary, thinkingBody);
  const tools = h("div", { class: "tool-calls" });
  const content = h("div", { class: "md content", testid: "message-content" });
  const notices = h("div", { class: "notices" });
  const media = h("div", { class: "image-results" });
  const meta = h("footer", { class: "msg-meta" });
  root.append(h("div", { class: "msg-role" }, m.model || "assistant"),
    h("div", { class: "msg-body" }, thinking, tools, content, media, notices), meta);

  const view = { root, userToggled: false, folded: false,
    shown: { reasoning: null, content: null, tools: null, media: null } };
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
    if (thinking.classList.contains("live")) summary.textContent = `Thinking… ${(seconds ?? 0).toFixed(1)} s`;
    else summary.textContent = seconds != null ? `Thought for ${seconds.toFixed(1)} s` : "Thoughts";
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
      const canAnswer = !isLive && tail && last;
      tools.replaceChildren(...calls.map((call) => toolCallCard(call, { canAnswer, answered }, ctx)));
    }
    const text = msg.content || "";
    if (text !== view.shown.content) { setMarkdown(content, text); view.shown.content = text; }
    const images = (msg.attachments || []).filter((a) => a.kind === "image");
    const working = isLive && msg.image_progress != null;
    const mediaKey = `${working ? msg.image_progress : ""}|${msg.image_preview || ""}|${images.length}`;
    if (mediaKey !== view.shown.media) {
      view.shown.media = mediaKey;
      media.replaceChildren(...[working ? imageProgress(msg.image_progress, msg.image_preview) : null,
        ...images.map(imageResult)].filter(Boolean));
    }
    content.classList.toggle("cursor", isLive && !working);
    const empty = !isLive && !text && !reasoning && !calls.length && !msg.error && !msg.guard && !images.length
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
    // The rendered text, not the Markdown source: no asterisks or fences read aloud.
    const speaker = text && ctx.speakButton ? ctx.speakButton(() => content.innerText || msg.content) : null;
    if (speaker) meta.append(speaker);
    if (last && index >= 0) {
      meta.append(h("button", { type: "button", class: "btn btn-small", testid: "regenerate-button",
        disabled: ctx.streaming, onclick: () => ctx.regenerate(index) }, "Regenerate"));
    }
  };
  view.update(m, live);
  return view;
}

function toolCallCard(call, { canAnswer, answered }, ctx) {
  const fn = call.function || {};
  const card = h("details", { class: "card", testid: "tool-call", open: true, "data-id": call.id || "" },
    h("summary", {}, h("span", { class: "tag" }, "Tool call"), h("code", {}, fn.name || "…")),
    h("pre", {}, prettyArguments(fn.arguments || "")));
  if (canAnswer && call.id && !answered.has(call.id)) {
    const area = h("textarea", { testid: "tool-result-input", placeholder: `Result of ${fn.name || "the call"}`,
      "aria-label": "Tool result" });
    card.append(h("div", { class: "tool-result-form" }, area,
      h("button", { type: "button", class: "btn btn-small", testid: "tool-result-submit",
        onclick: () => ctx.submitToolResult(call, area.value) }, "Send result")));
  }
  return card;
}
