// The chat page's MCP mode: with MCP servers enabled for a conversation, answers come from /v1/responses, where
// the server runs the tools itself; its events fold into the same answer shape the chat stream gives, plus the
// tool results, which the page saves as tool messages (shown as cards).
import { AnswerAccumulator, errorText } from "./sse.js";
import { DEFAULT_SETTINGS, openaiMessages } from "./request.js";

function inputContent(content) {
  if (!Array.isArray(content)) return content;
  return content.map((p) => {
    if (p.type === "text") return { type: "input_text", text: p.text };
    if (p.type === "image_url") return { type: "input_image", image_url: p.image_url.url };
    return p;  // input_audio has the same shape in both APIs
  });
}

// The stored conversation as Responses input items, with the enabled MCP servers as tools.
export function responsesBody(conv, model, servers) {
  const s = { ...DEFAULT_SETTINGS, ...conv.settings };
  const input = [];
  for (const m of openaiMessages(conv)) {
    if (m.role === "tool") {
      input.push({ type: "function_call_output", call_id: m.tool_call_id, output: m.content || "" });
    } else if (m.role === "assistant") {
      if (m.content) input.push({ role: "assistant", content: m.content });
      for (const c of m.tool_calls || []) {
        input.push({ type: "function_call", call_id: c.id, name: c.function.name, arguments: c.function.arguments || "" });
      }
    } else {
      input.push({ role: m.role, content: inputContent(m.content) });
    }
  }
  const body = {
    model, input, stream: true, store: false,
    tools: servers.map((name) => ({ type: "mcp", server_label: name, require_approval: "never" })),
  };
  if (s.enable_thinking === false) body.reasoning = { effort: "none" };
  if (s.temperature != null) body.temperature = s.temperature;
  if (s.top_p != null) body.top_p = s.top_p;
  if (s.max_tokens != null) body.max_output_tokens = s.max_tokens;
  return body;
}

function mcpErrorText(error) {
  if (typeof error === "string") return error;
  if (error?.message) return error.message;
  if (Array.isArray(error?.content)) return error.content.map((c) => c.text || "").join("\n");
  return JSON.stringify(error);
}

// Folds Responses stream events into an answer: reasoning, text, and every MCP call with its result.
export class ResponseEventAccumulator extends AnswerAccumulator {
  constructor(startedAt) {
    super(startedAt);
    this.results = [];         // {id, name, content}: one tool message per MCP call
    this.listingErrors = [];
  }

  apply(ev, now) {
    if (!ev || typeof ev !== "object") return;
    if (ev.type === "response.reasoning_text.delta") {
      this.reasoning += ev.delta;
      this._mark(now);
    } else if (ev.type === "response.output_text.delta") {
      this.content += ev.delta;
      if (this.contentAt === null) this.contentAt = now;
      this._mark(now);
    } else if (ev.type === "response.output_item.done" && ev.item?.type === "mcp_call") {
      const item = ev.item;
      this.toolCalls.push({ id: item.id, type: "function", function: { name: item.name, arguments: item.arguments || "" } });
      this.results.push({ id: item.id, name: item.name,
        content: item.error ? `Error: ${mcpErrorText(item.error)}` : (item.output ?? "") });
      this._mark(now);
    } else if (ev.type === "response.output_item.done" && ev.item?.type === "mcp_list_tools" && ev.item.error) {
      this.listingErrors.push(ev.item.error);
    } else if (ev.type === "response.completed" || ev.type === "response.incomplete") {
      const u = ev.response?.usage || {};
      this.usage = { completion_tokens: u.output_tokens, prompt_tokens: u.input_tokens,
        completion_tokens_details: { reasoning_tokens: u.output_tokens_details?.reasoning_tokens } };
      this.finishReason = ev.type === "response.completed" ? "stop" : "length";
    } else if (ev.type === "response.failed") {
      this.error = errorText(ev.response?.error) || "the response failed";
    } else if (ev.type === "error") {
      this.error = errorText(ev);
    }
  }

  // The messages to save: with MCP calls, the calling turn, one tool message per result, then the answer.
  messages(answer) {
    const notices = this.listingErrors.map((e) => `MCP: ${e}`);
    const last = notices.length && !answer.error ? { ...answer, error: notices.join("\n") } : answer;
    if (!this.results.length) return [last];
    return [
      { role: "assistant", model: answer.model, content: "", reasoning: answer.reasoning, tool_calls: this.toolCalls },
      ...this.results.map((r) => ({ role: "tool", tool_call_id: r.id, name: r.name, content: r.content })),
      { ...last, reasoning: null, tool_calls: null },
    ];
  }
}
