// Microphone recording as a WAV file. MediaRecorder would give WebM/Opus in Chromium, which the server's
// decoder (libsndfile) does not read, so the samples are taken from Web Audio and written as 16-bit PCM WAV.

function wavBlob(chunks, rate) {
  const length = chunks.reduce((n, c) => n + c.length, 0);
  const view = new DataView(new ArrayBuffer(44 + 2 * length));
  const text = (offset, s) => { for (let i = 0; i < s.length; i++) view.setUint8(offset + i, s.charCodeAt(i)); };
  text(0, "RIFF"); view.setUint32(4, 36 + 2 * length, true); text(8, "WAVE");
  text(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, 2 * rate, true); view.setUint16(32, 2, true);
  view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, 2 * length, true);
  let offset = 44;
  for (const chunk of chunks) {
    for (const x of chunk) {
      view.setInt16(offset, Math.max(-1, Math.min(1, x)) * 0x7fff, true);
      offset += 2;
    }
  }
  return new Blob([view], { type: "audio/wav" });
}

// Starts recording from the default microphone. Resolves to {stop, cancel}: stop() resolves to
// {blob (audio/wav), seconds}; cancel() just releases the microphone.
export async function startRecording() {
  if (!navigator.mediaDevices?.getUserMedia) throw new Error("this browser cannot record audio here (a secure origin is needed)");
  const stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1 } });
  const context = new AudioContext();
  const source = context.createMediaStreamSource(stream);
  const processor = context.createScriptProcessor(4096, 1, 1);
  const chunks = [];
  processor.onaudioprocess = (e) => chunks.push(new Float32Array(e.inputBuffer.getChannelData(0)));
  source.connect(processor);
  processor.connect(context.destination);
  const release = async () => {
    processor.disconnect();
    source.disconnect();
    stream.getTracks().forEach((t) => t.stop());
    await context.close();
  };
  return {
    async stop() {
      await release();
      const samples = chunks.reduce((n, c) => n + c.length, 0);
      return { blob: wavBlob(chunks, context.sampleRate), seconds: samples / context.sampleRate };
    },
    cancel: release,
  };
}

export function blobDataURL(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}
