// Streamed speech in the page: base64 pcm16 chunks decoded to samples, and a player that schedules chunks
// back to back in one AudioContext from the moment the first arrives (voice mode, live translation).
const RATE = 24000;

export function pcm16Samples(b64) {
  const raw = atob(b64);
  const out = new Float32Array(raw.length >> 1);
  for (let i = 0; i < out.length; i++) {
    const v = raw.charCodeAt(2 * i) | (raw.charCodeAt(2 * i + 1) << 8);
    out[i] = (v >= 0x8000 ? v - 0x10000 : v) / 32768;
  }
  return out;
}

// Plays chunks back to back from the moment the first arrives.
// Pass `context` to play into one the caller already has (live translation records from it too).
export function player(rate = RATE, context = new AudioContext({ sampleRate: rate })) {
  let at = 0;
  return {
    context,
    play(samples, sampleRate = rate) {  // returns the chunk's duration in seconds
      const buffer = context.createBuffer(1, samples.length, sampleRate);
      buffer.copyToChannel(samples, 0);
      const node = context.createBufferSource();
      node.buffer = buffer;
      node.connect(context.destination);
      at = Math.max(at, context.currentTime);
      node.start(at);
      at += buffer.duration;
      return buffer.duration;
    },
    remaining: () => Math.max(0, at - context.currentTime),
  };
}
