// The transcription view: an audio file or a recording -> POST /v1/audio/transcriptions, the transcript
// streamed in as `transcript.text.delta` events (text), or the srt / vtt subtitles when asked for.
import { apiFetch } from "./api.js";
import { errorText, readSSE } from "./sse.js";
import { startRecording } from "./recorder.js";

const $ = (testid, root = document) => root.querySelector(`[data-testid="${testid}"]`);

export function setupTranscription({ audioModels, selectedModel }) {
  const panel = $("transcribe-panel");
  const open = $("transcribe-button");
  const models = $("transcribe-model", panel);
  const file = $("transcribe-file", panel);
  const record = $("transcribe-record", panel);
  const language = $("transcribe-language", panel);
  const format = $("transcribe-format", panel);
  const start = $("transcribe-start", panel);
  const output = $("transcript-output", panel);
  const status = $("transcribe-status", panel);
  let recorded = null;  // {blob, seconds} of the last recording
  let recording = null;
  let busy = false;

  const say = (text) => { status.textContent = text; };

  function refresh() {
    const ids = audioModels();
    open.hidden = ids.length === 0;
    const keep = models.value;
    models.replaceChildren(...ids.map((id) => Object.assign(document.createElement("option"), { value: id, textContent: id })));
    const preferred = ids.includes(keep) ? keep : ids.includes(selectedModel()) ? selectedModel() : ids[0];
    if (preferred) models.value = preferred;
  }

  async function toggleRecording() {
    if (recording) {
      recorded = await recording.stop();
      recording = null;
      record.textContent = "Record";
      record.setAttribute("aria-pressed", "false");
      file.value = "";
      say(`Recorded ${recorded.seconds.toFixed(1)} s.`);
      return;
    }
    try {
      recording = await startRecording();
    } catch (e) {
      say(`Cannot record: ${e.message}`);
      return;
    }
    record.textContent = "Stop recording";
    record.setAttribute("aria-pressed", "true");
    say("Recording…");
  }

  async function transcribe() {
    if (busy) return;
    const audio = file.files[0] || recorded?.blob;
    if (!audio) { say("Choose an audio file or record one first."); return; }
    const form = new FormData();
    form.append("file", audio, file.files[0]?.name || "recording.wav");
    form.append("model", models.value);
    const fmt = format.value;
    form.append("response_format", fmt);
    if (language.value.trim()) form.append("language", language.value.trim());
    const streamed = fmt === "text";
    if (streamed) form.append("stream", "true");
    busy = true;
    start.disabled = true;
    output.textContent = "";
    say("Transcribing…");
    try {
      const response = await apiFetch("v1/audio/transcriptions", { method: "POST", body: form });
      if (!response.ok) {
        let body = null;
        try { body = await response.json(); } catch (e) { /* not JSON */ }
        throw new Error(body?.error?.message || `HTTP ${response.status}`);
      }
      if (streamed) {
        await readSSE(response.body, (event) => {
          if (event.error) throw new Error(errorText(event.error));
          if (event.type === "transcript.text.delta") output.textContent += event.delta;
          if (event.type === "transcript.text.done") {
            output.textContent = event.text;
            const seconds = event.usage?.seconds;
            say(seconds ? `Done: ${seconds.toFixed(1)} s of audio.` : "Done.");
          }
        });
      } else {
        output.textContent = await response.text();
        say("Done.");
      }
    } catch (e) {
      say(`Transcription failed: ${e.message}`);
    } finally {
      busy = false;
      start.disabled = false;
    }
  }

  open.addEventListener("click", () => { refresh(); panel.showModal(); });
  $("transcribe-close", panel).addEventListener("click", async () => {
    if (recording) { await recording.cancel(); recording = null; record.textContent = "Record"; }
    panel.close();
  });
  $("transcribe-copy", panel).addEventListener("click", () => navigator.clipboard?.writeText(output.textContent));
  file.addEventListener("change", () => { if (file.files[0]) { recorded = null; say(file.files[0].name); } });
  record.addEventListener("click", toggleRecording);
  start.addEventListener("click", transcribe);
  return { refresh };
}
