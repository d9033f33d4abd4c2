// Voice mode for models that answer aloud (Qwen3-Omni: /v1/models capability "audio_output"): press Talk,
// speak, press Send; the recording goes to /v1/chat/completions as an input_audio part with
// modalities ["text", "audio"], and the answer streams back as delta.audio chunks (base64 pcm16, 24 kHz),
// each scheduled back to back in one AudioContext as it arrives, so the reply is heard while it is still
// being written; its transcript (delta.audio.transcript) shows beside it. The dialog keeps its own
// conversation: the user's recordings and the assistant's transcripts are sent back as the history.
import { apiFetch, httpErrorText } from "./api.js";
import { blobDataURL, startRecording } from "./recorder.js";
import { errorText, readSSE } from "./sse.js";
import { pcm16Samples, player } from "./playback.js";

const $ = (testid, root = document) => root.querySelector(`[data-testid="${testid}"]`);

export function setupVoice({ speakingModels }) {
  const panel = $("voice-panel");
  const open = $("voice-button");
  const models = $("voice-model", panel);
  const voices = $("voice-voice", panel);
  const talk = $("voice-talk", panel);
  const status = $("voice-status", panel);
  const log = $("voice-log", panel);
  let history = [];
  let recording = null;  // {stop, cancel} while the microphone is on
  let busy = null;  // AbortController of the answer being streamed

  const say = (text) => { status.textContent = text; };

  function refresh() {
    const cards = speakingModels();
    open.hidden = cards.length === 0;
    const keep = models.value;
    models.replaceChildren(...cards.map((c) => Object.assign(document.createElement("option"), { value: c.id, textContent: c.id })));
    if (cards.some((c) => c.id === keep)) models.value = keep;
    refreshVoices();
  }

  function refreshVoices() {
    const card = speakingModels().find((c) => c.id === models.value);
    const keep = voices.value;
    const names = card?.voices ?? [];
    voices.replaceChildren(...names.map((v) => Object.assign(document.createElement("option"), { value: v, textContent: v })));
    if (names.includes(keep)) voices.value = keep;
  }

  function turn(role, text) {
    const item = Object.assign(document.createElement("p"), { className: `voice-turn voice-${role}` });
    item.dataset.testid = role === "user" ? "voice-user-turn" : "voice-transcript";
    item.textContent = text;
    log.append(item);
    log.scrollTop = log.scrollHeight;
    return item;
  }

  async function answer(audioPart, out) {
    const message = { role: "user", content: [audioPart] };
    const body = {
      model: models.value, messages: [...history, message], stream: true,
      modalities: ["text", "audio"], audio: { voice: voices.value, format: "pcm16" },
    };
    busy = new AbortController();
    const transcript = turn("assistant", "");
    let text = "";
    let audioMs = 0;
    panel.dataset.audioMs = "0";
    panel.dataset.playedBeforeEnd = "false";  // "true" once text still arrives after the audio began to play
    try {
      const response = await apiFetch("v1/chat/completions", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal: busy.signal,
      });
      if (!response.ok) throw new Error(httpErrorText(response, await response.json().catch(() => null)));
      say("Answering…");
      await readSSE(response.body, (chunk) => {
        if (chunk.error) throw new Error(errorText(chunk.error));
        const audio = chunk.choices?.[0]?.delta?.audio;
        if (!audio) return;
        if (audio.data) {
          if (!audioMs) panel.dataset.audioState = out.context.state;  // "running": it plays now
          audioMs += 1000 * out.play(pcm16Samples(audio.data));
          panel.dataset.audioMs = String(Math.round(audioMs));
          say("Speaking…");
        }
        if (audio.transcript) {
          if (audioMs) panel.dataset.playedBeforeEnd = "true";  // heard while the answer is still being written
          text += audio.transcript;
          transcript.textContent = text;
        }
      });
      panel.dataset.streamEnded = "true";
      history = [...history, message, { role: "assistant", content: text }];
      setTimeout(() => { if (!busy) say("Done."); }, out.remaining() * 1000);
    } catch (e) {
      if (e.name !== "AbortError") say(`Error: ${e.message}`);
      transcript.remove();
    } finally {
      busy = null;
    }
  }

  async function toggle() {
    if (busy) { busy.abort(); say("Stopped."); return; }
    if (!recording) {
      try {
        recording = await startRecording();
      } catch (e) { say(`Could not record: ${e.message}`); return; }
      panel.dataset.streamEnded = "false";
      talk.textContent = "Send";
      talk.setAttribute("aria-pressed", "true");
      say("Listening…");
      return;
    }
    const out = player();  // made on the click, so the browser lets it play
    const { blob, seconds } = await recording.stop();
    recording = null;
    talk.textContent = "Talk";
    talk.setAttribute("aria-pressed", "false");
    turn("user", `You: ${seconds.toFixed(1)} s of audio`);
    say("Thinking…");
    const data = (await blobDataURL(blob)).split(",", 2)[1];
    await answer({ type: "input_audio", input_audio: { data, format: "wav" } }, out);
  }

  talk.addEventListener("click", toggle);
  models.addEventListener("change", () => { history = []; log.replaceChildren(); refreshVoices(); });
  open.addEventListener("click", () => { refresh(); panel.showModal(); });
  $("voice-close", panel).addEventListener("click", async () => {
    busy?.abort();
    await recording?.cancel();
    recording = null;
    talk.textContent = "Talk";
    talk.setAttribute("aria-pressed", "false");
    panel.close();
  });
  refresh();
  return { refresh };
}
