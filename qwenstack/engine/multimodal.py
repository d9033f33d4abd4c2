"""The runner's multimodal part: per step, the 3-D positions of the batch and the image rows to inject.

Decisions:
- Each sequence carries its MultimodalPlan (computed once when the request is added). A step takes tokens
  start..end of it; the plan gives their positions, and every image whose placeholders overlap that range
  contributes the matching slice of its encoder output. A chunk may hold a whole image, part of one, or
  the tail of one image and the head of the next.
- The vision tower runs once per image: outputs are cached by content hash (EncoderCache), and the images
  a step still needs are encoded together in one call.
- Batches without images keep 1-D positions and no multimodal argument, so text requests on a
  vision-language model cost what they cost on a text model.
"""
from __future__ import annotations

import torch

from qwenstack.engine.sequence import Sequence
from qwenstack.multimodal.inputs import (
    AudioInput, EncodedImage, EncoderCache, MultimodalBatch, MultimodalPlan, first_encoder_row, placed_input,
)

DEFAULT_ENCODER_CACHE_MEMORY = 256 * 1024**2
PLAN_KEY = "multimodal"  # where a sequence's MultimodalPlan lives in Sequence.extras


def sequence_plan(seq: Sequence) -> MultimodalPlan | None:
    return seq.extras.get(PLAN_KEY)


class MultimodalStep:
    def __init__(self, model: object, cache_bytes: int = DEFAULT_ENCODER_CACHE_MEMORY) -> None:
        self.model = model
        self.cache = EncoderCache(cache_bytes)

    def prepare(self, seqs: list[Sequence], num_new_tokens: list[int],
                device: torch.device) -> tuple[torch.Tensor | None, MultimodalBatch | None]:
        """(positions [3, T] or None when no sequence of the batch has images, image rows or None)."""
        plans = [sequence_plan(s) for s in seqs]
        if all(p is None for p in plans):
            return None, None
        positions = []
        wanted: list[tuple[int, int, int, object]] = []  # (batch row, first image row, count, placement)
        row = 0
        for seq, n, plan in zip(seqs, num_new_tokens, plans):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            if plan is None:
                positions.append(torch.arange(start, end, dtype=torch.long).expand(3, -1))
            else:
                positions.append(plan.positions_for(start, end))
                for p in plan.placements:
                    lo, hi = max(start, p.offset), min(end, p.end)
                    if lo < hi:
                        wanted.append((row + lo - start, lo - p.offset + first_encoder_row(p), hi - lo, p))
            row += n
        pos = torch.cat(positions, dim=1).to(device)
        if not wanted:
            return pos, None
        encoded = self._encode([placed_input(w[3]) for w in wanted])  # type: ignore[arg-type]
        rows, embeds, deepstack = [], [], []
        for batch_row, first, count, placement in wanted:
            out = encoded[placed_input(placement).content_hash]  # type: ignore[arg-type]
            rows.append(torch.arange(batch_row, batch_row + count))
            embeds.append(out.embeds[first:first + count])
            deepstack.append(out.deepstack[:, first:first + count])
        return pos, MultimodalBatch(torch.cat(rows).to(device), torch.cat(embeds), torch.cat(deepstack, dim=1))

    def _encode(self, images: list) -> dict[str, EncodedImage]:
        """Encoder outputs by hash for these images: from the cache, or encoded now in one vision pass."""
        found: dict[str, EncodedImage] = {}
        missing = {}
        for image in images:
            key = image.content_hash
            if key in found or key in missing:
                continue
            hit = self.cache.get(key)
            if hit is not None:
                found[key] = hit
                self.cache.stats.hits += 1
            else:
                missing[key] = image
        if missing:
            self.cache.stats.misses += len(missing)
            audios = {k: v for k, v in missing.items() if isinstance(v, AudioInput)}
            images = {k: v for k, v in missing.items() if k not in audios}
            for batch, encode in ((images, "encode_images"), (audios, "encode_audio")):
                if batch:
                    for key, out in zip(batch, getattr(self.model, encode)(list(batch.values()))):
                        found[key] = out
                        self.cache.put(key, out)
        return found
