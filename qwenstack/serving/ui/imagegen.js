// Image models on the chat page: a model whose /v1/models capabilities include "image_edit" edits the images
// attached to the last user message (POST /v1/images/edits, multipart), one with "image_generation" makes an
// image from the text (POST /v1/images/generations). Both stream: progress after every denoising step, a
// preview now and then, the finished image last.
import { apiFetch, httpErrorText } from "./api.js";
import { errorText, readSSE } from "./sse.js";

export const IMAGE_CAPABILITIES = { image_edit: "edit", image_generation: "generate" };
const PARTIAL_IMAGES = 2;

// "edit", "generate" or null for a model's capability set.
export function imageTask(caps) {
  for (const [cap, task] of Object.entries(IMAGE_CAPABILITIES)) if (caps.has(cap)) return task;
  return null;
}

async function dataUrlBlob(url) { return (await fetch(url)).blob(); }

async function requestFor(task, model, prompt, attachments) {
  if (task === "generate") {
    return { path: "v1/images/generations", init: { headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model, prompt, stream: true, partial_images: PARTIAL_IMAGES }) } };
  }
  const form = new FormData();
  form.append("model", model);
  form.append("prompt", prompt);
  form.append("stream", "true");
  form.append("partial_images", String(PARTIAL_IMAGES));
  for (const a of attachments.filter((x) => x.kind === "image")) {
    form.append("image[]", await dataUrlBlob(a.data_url), a.name || "image.png");
  }
  return { path: "v1/images/edits", init: { body: form } };  // the browser sets the multipart boundary
}

// Runs one job. onUpdate({progress, preview}) after each event; returns {attachments, error}.
export async function runImageJob({ task, model, prompt, attachments, signal, onUpdate }) {
  const { path, init } = await requestFor(task, model, prompt, attachments);
  const res = await apiFetch(path, { method: "POST", ...init, signal });
  if (!res.ok) {
    const data = await res.json().catch(() => null);
    return { attachments: [], error: httpErrorText(res, data) };
  }
  const images = [];
  let error = null;
  await readSSE(res.body, (obj) => {
    if (obj.error) { error = errorText(obj.error); return; }
    const kind = (obj.type || "").split(".").pop();
    const mime = `image/${obj.output_format || "png"}`;
    if (kind === "progress") onUpdate({ progress: obj.progress });
    else if (kind === "partial_image") onUpdate({ preview: `data:${mime};base64,${obj.b64_json}` });
    else if (kind === "completed") {
      const ext = obj.output_format === "jpeg" ? "jpg" : (obj.output_format || "png");
      images.push({ kind: "image", name: `${task === "edit" ? "edited" : "image"}-${images.length + 1}.${ext}`,
        mime, data_url: `data:${mime};base64,${obj.b64_json}` });
      onUpdate({ progress: 1, preview: null });
    }
  });
  return { attachments: images, error };
}
