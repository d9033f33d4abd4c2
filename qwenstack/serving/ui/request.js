// What the page sends to /v1/chat/completions: the stored conversation as OpenAI messages, plus the
// conversation's settings as request fields.

export const DEFAULT_SETTINGS = Object.freeze({
  system_prompt: "", temperature: null, top_p: null, max_tokens: null, thinking_budget: null, enable_thinking: true,
});

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
export function openaiMessages(conv) {
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

export function requestBody(conv, model) {
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
