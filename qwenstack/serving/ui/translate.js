// The live translation view: the microphone -> /v1/realtime/translations (OpenAI's translation events),
// both transcripts scrolling as they are committed (the revisable tails in grey), the translated speech
// played as it arrives, and the lag the server measured for each translated sentence.
import { apiSocket } from "./api.js";
import { pcm16Samples, player } from "./playback.js";

const $ = (testid, root = document) => root.querySelector(`[data-testid="${testid}"]`);
const RATE = 24000;  // what translation sessions take and give
const CHUNK = RATE / 5;  // 200 ms, the engine frame OpenAI recommends appending

function base64PCM16(samples) {
  const bytes = new Uint8Array(samples.length * 2);
  const view = new DataView(bytes.buffer);
  samples.forEach((s, i) => view.setInt16(2 * i, Math.max(-1, Math.min(1, s)) * 32767, true));
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

export function setupTranslation({ pipelines }) {
  const panel = $("translate-panel");
  const open = $("translate-button");
  const models = $("translate-model", panel);
  const language = $("translate-language", panel);
  const start = $("translate-start", panel);
  const status = $("translate-status", panel);
  const lag = $("translate-lag", panel);
  const source = $("translate-source", panel);
  const output = $("translate-output", panel);
  let live = null;  // {ws, context, stop()} while running

  const say = (text) => { status.textContent = text; };

  function refresh() {
    const ids = pipelines();
    open.hidden = ids.length === 0;
    const keep = models.value;
    models.replaceChildren(...ids.map((id) => Object.assign(document.createElement("option"), { value: id, textContent: id })));
    if (ids.includes(keep)) models.value = keep;
  }

  // Committed text and the tentative tail, kept apart so the tail can be replaced.
  function transcript(el) {
    const done = document.createElement("span");
    const tail = Object.assign(document.createElement("span"), { className: "tentative" });
    el.replaceChildren(done, tail);
    return (delta, tentative) => {
      done.textContent += delta;
      tail.textContent = tentative ? (done.textContent ? " " : "") + tentative : "";
      el.scrollTop = el.scrollHeight;
    };
  }

  async function begin() {
    const context = new AudioContext({ sampleRate: RATE });
    const stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1 } });
    const ws = apiSocket(`v1/realtime/translations?model=${encodeURIComponent(models.value)}`);
    const heard = transcript(source);
    const said = transcript(output);
    const speaker = player(RATE, context);
    let audioMs = 0;
    panel.dataset.audioMs = "0";
    const mic = context.createMediaStreamSource(stream);
    const processor = context.createScriptProcessor(4096, 1, 1);
    let pending = [];
    let pendingLength = 0;
    processor.onaudioprocess = (e) => {
      if (ws.readyState !== WebSocket.OPEN || live?.closing) return;
      const block = new Float32Array(e.inputBuffer.getChannelData(0));
      pending.push(block);
      pendingLength += block.length;
      while (pendingLength >= CHUNK) {
        const all = new Float32Array(pendingLength);
        let at = 0;
        for (const b of pending) { all.set(b, at); at += b.length; }
        ws.send(JSON.stringify({ type: "session.input_audio_buffer.append", audio: base64PCM16(all.subarray(0, CHUNK)) }));
        pending = [all.subarray(CHUNK)];
        pendingLength = pending[0].length;
      }
    };
    const release = async () => {
      processor.disconnect();
      mic.disconnect();
      stream.getTracks().forEach((t) => t.stop());
    };
    ws.onopen = () => {
      ws.send(JSON.stringify({ type: "session.update", session: { audio: { output: { language: language.value } } } }));
      mic.connect(processor);
      processor.connect(context.destination);
      say("Listening…");
    };
    ws.onmessage = (message) => {
      const event = JSON.parse(message.data);
      if (event.type === "session.input_transcript.delta") heard(event.delta, event.tentative);
      else if (event.type === "session.output_transcript.delta") said(event.delta, event.tentative);
      else if (event.type === "session.output_audio.delta") {
        audioMs += 1000 * speaker.play(pcm16Samples(event.delta), event.sample_rate || RATE);
        panel.dataset.audioMs = String(Math.round(audioMs));
        if (event.lag_ms) lag.textContent = `${(event.lag_ms / 1000).toFixed(1)} s`;
      } else if (event.type === "error") say(`Error: ${event.error?.message ?? "unknown"}`);
      else if (event.type === "session.closed") say("Done.");
    };
    ws.onclose = async () => {
      await release();
      if (!status.textContent.startsWith("Error")) say("Done.");
      live = null;
      start.textContent = "Start";
      start.setAttribute("aria-pressed", "false");
    };
    live = {
      ws,
      closing: false,
      async stop() {
        this.closing = true;
        await release();
        if (ws.readyState === WebSocket.OPEN) {
          say("Finishing…");
          ws.send(JSON.stringify({ type: "session.close" }));
        }
      },
    };
    start.textContent = "Stop";
    start.setAttribute("aria-pressed", "true");
  }

  start.addEventListener("click", async () => {
    if (live) return live.stop();
    try {
      await begin();
    } catch (e) {
      say(`Could not start: ${e.message}`);
    }
  });
  language.addEventListener("change", () => {  // the target may change mid-session
    if (live?.ws.readyState === WebSocket.OPEN) {
      live.ws.send(JSON.stringify({ type: "session.update", session: { audio: { output: { language: language.value } } } }));
    }
  });
  open.addEventListener("click", () => { refresh(); panel.showModal(); });
  $("translate-close", panel).addEventListener("click", async () => { await live?.stop(); panel.close(); });
  refresh();
  return { refresh };
}
