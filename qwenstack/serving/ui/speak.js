// Reading answers aloud: when the server serves a speech model (GET /v1/audio/voices lists voices), each
// answer gets a speaker button. It posts the answer to /v1/audio/speech as raw pcm (16-bit, 24 kHz) and
// plays every chunk as it arrives, scheduled back to back in one AudioContext, so speech starts after the
// first 80 ms frame rather than after the whole answer. One answer speaks at a time; clicking again stops.
import { apiFetch } from "./api.js";
import { player } from "./playback.js";
import { h } from "./views.js";

const RATE = 24000;
const voiceState = { voices: [], playing: null };  // playing: { button, abort, ctx }

export async function loadVoices() {
  try {
    const response = await apiFetch("v1/audio/voices");
    const data = response.ok ? await response.json() : { data: [] };
    voiceState.voices = Array.isArray(data?.data) ? data.data : [];
  } catch (e) {
    voiceState.voices = [];
  }
  return voiceState.voices;
}

// A <select> of "model / voice" entries for the top bar, or null when there is no speech model.
export function voicePicker() {
  if (!voiceState.voices.length) return null;
  const saved = localStorage.getItem("qwenstack.voice");
  const select = h("select", { class: "model-select", testid: "voice-select", "aria-label": "Voice" },
    ...voiceState.voices.map((v) => h("option", { value: `${v.model}\n${v.id}` }, `🔊 ${v.id}`)));
  if (saved && voiceState.voices.some((v) => `${v.model}\n${v.id}` === saved)) select.value = saved;
  select.addEventListener("change", () => localStorage.setItem("qwenstack.voice", select.value));
  voiceState.select = select;
  return select;
}

function chosenVoice() {
  const value = voiceState.select?.value || `${voiceState.voices[0].model}\n${voiceState.voices[0].id}`;
  const [model, voice] = value.split("\n");
  return { model, voice };
}

function stop() {
  const p = voiceState.playing;
  if (!p) return;
  voiceState.playing = null;
  p.abort.abort();
  p.ctx.close().catch(() => {});
  p.button.textContent = "Speak";
  p.button.dataset.state = "idle";
}

// Int16 little-endian bytes (possibly split mid-sample across chunks) -> Float32 samples.
function pcmDecoder() {
  let carry = new Uint8Array(0);
  return (bytes) => {
    const all = new Uint8Array(carry.length + bytes.length);
    all.set(carry); all.set(bytes, carry.length);
    const usable = all.length - (all.length % 2);
    carry = all.slice(usable);
    const view = new DataView(all.buffer, 0, usable);
    const out = new Float32Array(usable / 2);
    for (let i = 0; i < out.length; i++) out[i] = view.getInt16(2 * i, true) / 32768;
    return out;
  };
}

async function speak(button, text) {
  if (voiceState.playing?.button === button) { stop(); return; }
  stop();
  const speaker = player(RATE);
  const ctx = speaker.context;
  const abort = new AbortController();
  voiceState.playing = { button, abort, ctx };
  button.textContent = "Stop speaking";
  button.dataset.state = "loading";
  const { model, voice } = chosenVoice();
  try {
    const response = await apiFetch("v1/audio/speech", {
      method: "POST", headers: { "Content-Type": "application/json" }, signal: abort.signal,
      body: JSON.stringify({ model, voice, input: text, response_format: "pcm" }),
    });
    if (!response.ok) throw new Error((await response.json().catch(() => ({})))?.error?.message || response.statusText);
    const reader = response.body.getReader();
    const decode = pcmDecoder();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      const samples = decode(value);
      if (!samples.length) continue;
      speaker.play(samples);
      button.dataset.state = "playing";
    }
    // Leave the button in "Stop" until the scheduled audio has played out.
    setTimeout(() => { if (voiceState.playing?.button === button) stop(); },
      speaker.remaining() * 1000 + 50);
  } catch (e) {
    if (voiceState.playing?.button === button) {
      stop();
      if (e.name !== "AbortError") button.title = `Could not speak: ${e.message}`;
    }
  }
}

// The speaker button of one answer, or null when no speech model is served.
export function speakButton(getText) {
  if (!voiceState.voices.length) return null;
  const button = h("button", { type: "button", class: "btn btn-small", testid: "speak-button",
    title: "Read this answer aloud", "data-state": "idle" }, "Speak");
  button.addEventListener("click", () => speak(button, getText()));
  return button;
}
