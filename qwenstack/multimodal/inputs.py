"""Multimodal inputs as the engine carries them: preprocessed images with a content hash, the per-request
plan a model makes of them, the per-step batch handed to the model, and the LRU cache of encoder outputs.

Decisions:
- An image enters the engine preprocessed (pixel values and grid) with a content hash. The hash is the
  image's identity for the encoder cache and for the prefix cache. The server hashes the encoded bytes with
  the preprocessing settings (cheap, and the same bytes always give the same pixels); the Python API hashes
  the pixel values themselves when no hash is given.
- Where each image's placeholder tokens sit in the prompt and the prompt's 3-D rotary positions are worked
  out once per request by the model (`plan_multimodal`) and kept in the sequence's extras. The runner only
  slices them per step, so chunked prefill may split an image anywhere and a decode step costs nothing extra.
- Encoder outputs (the image embeddings and the DeepStack features) are cached by content hash under a byte
  budget, least recently used first out, so an image repeated in a conversation is encoded once.
- Audio clips (Qwen3-ASR, the audio half of Omni) travel the same way: log-mel features with a content
  hash, an AudioPlacement on their run of audio placeholders, encoder output cached as an EncodedImage with
  no DeepStack features. A model with 1-D rotary gives its plan equal rows for the three position streams.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Hashable

import torch


def pixel_hash(pixel_values: torch.Tensor, grid_thw: tuple[int, int, int]) -> str:
    """Content hash of preprocessed pixels: what the vision tower sees, so equal hashes encode equally."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(tuple(grid_thw)).encode())
    digest.update(str(pixel_values.dtype).encode())
    digest.update(pixel_values.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class VideoFrame:
    """Where a temporal group of a video sits: its index in the video and its time (the prompt's timestamp)."""

    index: int
    seconds: float


@dataclass(frozen=True, eq=False)
class ImageInput:
    """One preprocessed image: patches [t*h*w, C*T*P*P] in merge-block order and its (t, h, w) grid.

    A video enters as one ImageInput per temporal group (grid (1, h, w)) with `video_frame` set: it sits on a
    run of video placeholder tokens instead of image ones, and is otherwise encoded and placed as an image.
    """

    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int]
    content_hash: str
    video_frame: VideoFrame | None = None

    @classmethod
    def from_pixels(cls, pixel_values: torch.Tensor, grid_thw: tuple[int, int, int] | list[int] | torch.Tensor,
                    content_hash: str | None = None) -> "ImageInput":
        grid = tuple(int(g) for g in (grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else grid_thw))
        if len(grid) != 3:
            raise ValueError(f"grid_thw must be (t, h, w), got {grid}")
        t, h, w = grid
        if pixel_values.dim() != 2 or pixel_values.shape[0] != t * h * w:
            raise ValueError(f"pixel_values must have {t * h * w} rows for grid {grid}, got {list(pixel_values.shape)}")
        return cls(pixel_values, grid, content_hash or pixel_hash(pixel_values, grid))  # type: ignore[arg-type]

    def num_tokens(self, merge_size: int) -> int:
        t, h, w = self.grid_thw
        return t * h * w // (merge_size * merge_size)


def images_from_processed(processed: object, hashes: list[str] | None = None) -> list[ImageInput]:
    """Splits an ImageProcessor result (concatenated patches of several images) into ImageInputs."""
    grids = [tuple(int(v) for v in g) for g in processed.grid_thw.tolist()]  # type: ignore[attr-defined]
    sizes = [t * h * w for t, h, w in grids]
    chunks = processed.pixel_values.split(sizes)  # type: ignore[attr-defined]
    if hashes is not None and len(hashes) != len(grids):
        raise ValueError(f"{len(hashes)} hashes for {len(grids)} images")
    return [ImageInput.from_pixels(p, g, hashes[i] if hashes else None) for i, (p, g) in enumerate(zip(chunks, grids))]


def features_hash(features: torch.Tensor) -> str:
    """Content hash of an audio clip's log-mel features: what the audio encoder sees."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(b"audio" + repr(tuple(features.shape)).encode() + str(features.dtype).encode())
    digest.update(features.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True, eq=False)
class AudioInput:
    """One preprocessed audio clip: log-mel features [mel bins, frames] (every frame valid) and its duration."""

    features: torch.Tensor
    seconds: float
    content_hash: str

    @classmethod
    def from_features(cls, features: torch.Tensor, seconds: float, content_hash: str | None = None) -> "AudioInput":
        if features.dim() != 2 or features.shape[1] == 0:
            raise ValueError(f"audio features must be [mel bins, frames], got {list(features.shape)}")
        return cls(features, float(seconds), content_hash or features_hash(features))

    @property
    def num_frames(self) -> int:
        return self.features.shape[1]


@dataclass
class MultimodalInputs:
    """What a request brings besides its tokens. Images and audio clips each appear in the order of their
    placeholders."""

    images: list[ImageInput] = field(default_factory=list)
    audios: list[AudioInput] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.images) or bool(self.audios)


@dataclass(frozen=True)
class ImagePlacement:
    offset: int  # prompt index of the image's first placeholder token
    length: int  # placeholder tokens, which equals the image's embedding rows
    image: ImageInput

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class AudioPlacement:
    offset: int  # prompt index of the clip's first placeholder token
    length: int  # placeholder tokens: encoder output rows first_row..first_row+length-1 of the clip
    audio: AudioInput
    # A video's audio track (Qwen3-Omni's audio in video) sits in pieces between the video's frame groups:
    # each piece is rows first_row.. of the one clip, positioned from the video's start (in_video).
    first_row: int = 0
    in_video: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.length


def placed_input(placement: ImagePlacement | AudioPlacement) -> ImageInput | AudioInput:
    """The image or audio clip a placement puts in the prompt (both carry a content_hash)."""
    return placement.audio if isinstance(placement, AudioPlacement) else placement.image


def first_encoder_row(placement: ImagePlacement | AudioPlacement) -> int:
    """The row of its input's encoder output that the placement's first token takes."""
    return placement.first_row if isinstance(placement, AudioPlacement) else 0


class BlockExtraKeys:
    """Per KV block, the hashes of the images whose placeholders it holds (None for text-only blocks).

    The block manager mixes this into each block's prefix-cache hash, so two prompts whose placeholder tokens
    are identical but whose images differ never share KV.
    """

    def __init__(self, placements: list[ImagePlacement | AudioPlacement], block_size: int) -> None:
        keys: dict[int, tuple[str, ...]] = {}
        for p in placements:
            for b in range(p.offset // block_size, (p.end - 1) // block_size + 1):
                keys[b] = keys.get(b, ()) + (placed_input(p).content_hash,)
        self._keys = keys

    def __getitem__(self, block: int) -> Hashable:
        return self._keys.get(block)

    def __bool__(self) -> bool:
        return True


@dataclass
class MultimodalPlan:
    """A request's images placed in its prompt, and its 3-D rotary positions (M-RoPE).

    positions: [3, prompt_len] long (temporal, height, width). Generated token i (prompt index
    prompt_len + i) sits at prompt_len + i + rope_delta on all three axes, as transformers' rope_deltas.
    """

    placements: list[ImagePlacement | AudioPlacement]
    positions: torch.Tensor
    rope_delta: int
    _block_keys: dict[int, BlockExtraKeys] = field(default_factory=dict, repr=False)

    @property
    def prompt_len(self) -> int:
        return self.positions.shape[1]

    def positions_for(self, start: int, end: int) -> torch.Tensor:
        """[3, end - start] positions of tokens start..end-1 (prompt or generated)."""
        n = self.prompt_len
        parts = []
        if start < n:
            parts.append(self.positions[:, start:min(end, n)])
        if end > n:
            tail = torch.arange(max(start, n), end, dtype=torch.long) + self.rope_delta
            parts.append(tail.expand(3, -1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def block_keys(self, block_size: int) -> BlockExtraKeys:
        if block_size not in self._block_keys:
            self._block_keys[block_size] = BlockExtraKeys(self.placements, block_size)
        return self._block_keys[block_size]


@dataclass
class EncodedImage:
    """The vision tower's output for one image: embeddings [n, H] and DeepStack features [k, n, H]."""

    embeds: torch.Tensor
    deepstack: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.embeds, self.deepstack))


@dataclass
class MultimodalBatch:
    """Image rows of one packed forward pass: which rows are placeholders, and what goes there."""

    rows: torch.Tensor  # [M] long, rows of the packed batch, ascending
    embeds: torch.Tensor  # [M, H] replaces the token embeddings of those rows
    deepstack: torch.Tensor  # [k, M, H], feature j added to those rows after decoder layer j


@dataclass
class EncoderCacheStats:
    hits: int = 0  # images served from the cache
    misses: int = 0  # images that had to be encoded


class EncoderCache:
    """Encoder outputs by image content hash, least recently used evicted first beyond `capacity_bytes`.

    Entries used by the current step are kept by the caller (it holds references), so eviction here never
    loses work in flight; at worst an evicted image is encoded again by a later chunk. A lock guards the LRU
    order: Qwen3-Omni's speech thread reads the entries the engine thread wrote (audio/omni_speech.py).
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = max(0, capacity_bytes)
        self.entries: OrderedDict[str, EncodedImage] = OrderedDict()
        self.nbytes = 0
        self.stats = EncoderCacheStats()
        self.lock = threading.Lock()

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: str) -> EncodedImage | None:
        with self.lock:
            entry = self.entries.get(key)
            if entry is None:
                return None
            self.entries.move_to_end(key)
            return entry

    def put(self, key: str, value: EncodedImage) -> None:
        with self.lock:
            old = self.entries.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            if value.nbytes > self.capacity_bytes:
                return  # larger than the whole cache: used for this step only
            self.entries[key] = value
            self.nbytes += value.nbytes
            while self.nbytes > self.capacity_bytes:
                _, evicted = self.entries.popitem(last=False)
                self.nbytes -= evicted.nbytes

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
            self.nbytes = 0


__all__ = [
    "AudioInput", "AudioPlacement", "features_hash", "first_encoder_row", "placed_input", "BlockExtraKeys", "EncodedImage", "EncoderCache", "ImageInput", "ImagePlacement", "MultimodalBatch",
    "MultimodalInputs", "MultimodalPlan", "images_from_processed", "pixel_hash",
]
