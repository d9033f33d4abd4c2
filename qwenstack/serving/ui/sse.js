// OpenAI-style streaming for the chat page: reading `data:` frames from a fetch body, and folding chunks
// into one answer. EventSource cannot POST, hence fetch + ReadableStream.

// Calls onData(parsedJson) for each `data:` frame until `data: [DONE]` or the end of the body.
export async function readSSE(body, onData) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  const frame = (text) => {
    const data = text.split("\n")
      .filter((line) => line.startsWith("data:"))
      .map((line) => line.slice(line[5] === " " ? 6 : 5))
      .join("\n");
    if (!data) return false;  // comments (": ping"), event:/id: lines alone
    if (data.trim() === "[DONE]") return true;
    let parsed;
    try { parsed = JSON.parse(data); } catch (e) {
      throw new Error(`the server sent a stream frame that is not JSON: ${data.slice(0, 200)}`);
    }
    onData(parsed);
    return false;
  };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      // Hold back a trailing CR: its LF may arrive in the next read, and CRLF must not count twice.
      let held = "";
      if (buffer.endsWith("\r")) { held = "\r"; buffer = buffer.slice(0, -1); }
      buffer = buffer.replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const text = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (frame(text)) return;
      }
      buffer += held;
    }
    buffer += decoder.decode();
    if (buffer.trim()) frame(buffer.replace(/\r\n?/g, "\n"));
  } finally {
    reader.cancel().catch(() => {});
  }
}

export function errorText(error) {
  if (!error) return "";
  if (typeof error === "string") return error;
  if (typeof error.message === "string" && error.message) return error.message;
  if (typeof error.detail === "string") return error.detail;
  return JSON.stringify(error);
}

// Folds chat.completion.chunk objects (or one non-streamed chat.completion) into one assistant answer.
export class AnswerAccumulator {
  constructor(startedAt) {
    this.startedAt = startedAt;
    this.content = "";
    this.reasoning = "";
    this.toolCalls = [];
    this.finishReason = null;
    this.usage = null;
    this.guard = null;
    this.error = null;
    this.firstTokenAt = null;   // first reasoning, content or tool-call delta
    this.contentAt = null;      // first answer text: the thinking section folds here
    this.lastTokenAt = null;
    this.pieces = 0;            // deltas with text, the token estimate when the server sends no usage
  }

  _mark(now) {
    if (this.firstTokenAt === null) this.firstTokenAt = now;
    this.lastTokenAt = now;
    this.pieces += 1;
  }

  apply(obj, now) {
    if (!obj || typeof obj !== "object") return;
    if (obj.error) this.error = errorText(obj.error);
    if (obj.qwenstack_guard) this.guard = obj.qwenstack_guard;
    if (obj.usage) this.usage = obj.usage;
    const choices = Array.isArray(obj.choices) ? obj.choices : [];
    for (const choice of choices) {
      if ((choice.index ?? 0) !== 0) continue;
      if (choice.qwenstack_guard) this.guard = choice.qwenstack_guard;
      const delta = choice.delta || choice.message || {};
      const reasoning = delta.reasoning_content ?? delta.reasoning;
      if (typeof reasoning === "string" && reasoning) {
        this.reasoning += reasoning;
        this._mark(now);
      }
      if (typeof delta.content === "string" && delta.content) {
        this.content += delta.content;
        if (this.contentAt === null) this.contentAt = now;
        this._mark(now);
      }
      if (Array.isArray(delta.tool_calls)) {
        delta.tool_calls.forEach((call, i) => {
          const at = Number.isInteger(call.index) ? call.index : i;
          const slot = this.toolCalls[at] ||
            (this.toolCalls[at] = { id: "", type: "function", function: { name: "", arguments: "" } });
          if (call.id) slot.id = call.id;
          const fn = call.function || {};
          if (fn.name) slot.function.name += fn.name;
          if (typeof fn.arguments === "string") slot.function.arguments += fn.arguments;
          else if (fn.arguments && typeof fn.arguments === "object") slot.function.arguments += JSON.stringify(fn.arguments);
        });
        if (this.contentAt === null) this.contentAt = now;
        this._mark(now);
      }
      if (choice.finish_reason) this.finishReason = choice.finish_reason;
    }
  }

  // Time to first token and decode speed; tokens come from usage.completion_tokens when the server sent it.
  metrics(endedAt) {
    const out = {};
    if (this.firstTokenAt !== null) out.ttft_s = round((this.firstTokenAt - this.startedAt) / 1000, 3);
    out.elapsed_s = round((endedAt - this.startedAt) / 1000, 3);
    const usage = this.usage || {};
    let tokens = Number.isInteger(usage.completion_tokens) ? usage.completion_tokens : null;
    if (tokens === null && this.pieces > 0) { tokens = this.pieces; out.estimated = true; }
    if (tokens !== null) out.completion_tokens = tokens;
    if (Number.isInteger(usage.prompt_tokens)) out.prompt_tokens = usage.prompt_tokens;
    const reasoningTokens = usage.completion_tokens_details?.reasoning_tokens ?? usage.reasoning_tokens;
    if (Number.isInteger(reasoningTokens)) out.reasoning_tokens = reasoningTokens;
    // Decode speed: the tokens after the first, over the time since the first arrived.
    const end = this.lastTokenAt ?? endedAt;
    if (tokens !== null && tokens > 1 && this.firstTokenAt !== null && end > this.firstTokenAt) {
      out.tokens_per_s = round((tokens - 1) / ((end - this.firstTokenAt) / 1000), 2);
    }
    return out;
  }
}

function round(x, digits) {
  const f = 10 ** digits;
  return Math.round(x * f) / f;
}
