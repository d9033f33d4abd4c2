"""Image generation and editing with the Qwen-Image diffusion pipelines, run through `diffusers`.

We serve the pipelines rather than reimplement them (a 20B MMDiT, the Qwen2.5-VL text encoder, a VAE):
the work here is what is around them on one machine.

- pipelines.py: a checkpoint -> the right diffusers pipeline, chosen by `_class_name` in model_index.json,
  on CUDA when present (with offloading when memory is short), else on CPU.
- compat.py: the one workaround transformers needs to load the pipelines' processor without torchvision.
- jobs.py: what one request asks for (`ImageJob`), how it runs (`run_job`: one pipeline call per image,
  progress after every denoising step, previews, cancellation between steps) and its events.
- queue.py: a bounded queue with its own worker thread, so image jobs never stall the chat engines.

`diffusers` is an optional dependency (`pip install 'qwenstack[image]'`), imported only when an image
model is loaded.
"""
