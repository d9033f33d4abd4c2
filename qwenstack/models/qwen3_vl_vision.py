"""Qwen3-VL vision tower: ViT blocks, patch merger and DeepStack mergers, in plain PyTorch.

Decisions:
- Module and parameter names equal the checkpoint keys under `model.visual.`, so loading is the identity
  mapping (patch_embed.proj, pos_embed, blocks.{i}.*, merger.*, deepstack_merger_list.{k}.*). Nothing is
  stored as a buffer: the rotary frequencies are recomputed per call, so a model built on the meta device
  and loaded with assign=True has no unfilled state.
- Patch embedding: the checkpoint holds a Conv3d weight [D, C, T, P, P] whose stride equals its kernel, which
  is exactly a Linear over the flattened patch [C*T*P*P] (the layout the preprocessor emits). We keep the
  Conv3d module for the weight's name and shape and run it as F.linear, a single GEMM.
- Patches arrive in spatial-merge-block order (each merge x merge block of neighbouring patches is
  contiguous), so the merger's reshape to [N / merge^2, merge^2 * D] groups exactly one block per row. The
  learned position embeddings and rotary positions are generated in the same order.
- Per-image metadata (interpolated position embeddings, rotary cos/sin, attention segments) is built once
  per forward from grid_thw and shared by every block.
- Attention is bidirectional within each frame of each image and never crosses frames or images (the
  `cu_seqlens` of transformers). Consecutive segments of equal length (the frames of a video, images of one
  size) go to SDPA as one batch [B, H, L, hd], so a video is one call per block rather than one per frame;
  there is no block-diagonal mask, whose memory would grow with the square of all patches in the batch.
  4-D inputs keep CPU SDPA on its fused flash kernel (3-D ones take the unfused math path).
- Rotary runs on q and k together, in float32 like transformers, on the half-width tables (cos and sin
  repeat over the two halves of rotate_half): four passes over q and k instead of about fourteen.
- CPU, bfloat16 (the runner's prepare_cpu_linears calls prepare_for_cpu): the tower's products always have
  thousands of rows, so its linears go to oneDNN-packed weights with the bias and the MLPs' GELU fused
  into the GEMM (PackedLinear), not to the decode-oriented tile-packed form of the text decoder, which
  would unpack every matrix on every call. The float32 path, the one the parity tests check against
  transformers, keeps nn.Linear.
- Numerics follow transformers 5.24: position interpolation and rotary in float32, LayerNorm eps 1e-6
  (hard-coded there, absent from config.json), tanh-GELU in the block MLPs but exact GELU in the mergers.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qwenstack.errors import ConfigError
from qwenstack.models.attention import window_attention
from qwenstack.models.cpu_linear import PackedLinear, packs

# transformers hard-codes these; they are not in config.json.
LAYER_NORM_EPS = 1e-6
# The vision rotary base when vision_config has no rope_parameters (the released checkpoints have none);
# Qwen3-VL's original code hard-codes it too.
DEFAULT_VISION_ROPE_THETA = 10000.0

# config.json `hidden_act` -> F.gelu's `approximate` argument.
_GELU_APPROXIMATIONS = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}


@dataclass
class VisionArgs:
    """The `vision_config` object of a Qwen3-VL config.json; fields are named as there."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    num_position_embeddings: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    deepstack_visual_indexes: list[int]
    in_channels: int = 3
    hidden_act: str = "gelu_pytorch_tanh"
    rope_parameters: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "VisionArgs":
        """Builds the args from the vision_config dict; unknown keys are ignored, missing required ones raise."""
        fields = dataclasses.fields(cls)
        missing = [
            f.name
            for f in fields
            if f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
            and config.get(f.name) is None
        ]
        if missing:
            names = ", ".join(f"'{name}'" for name in missing)
            raise ConfigError(f"vision_config in config.json is missing {names}, required by the Qwen3-VL vision tower")
        known = {f.name for f in fields}
        args = cls(**{key: value for key, value in config.items() if key in known and value is not None})
        args.validate()
        return args

    def validate(self) -> None:
        for name in ("patch_size", "temporal_patch_size"):
            if not isinstance(getattr(self, name), int):
                raise ConfigError(f"vision_config.{name} must be an integer, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"vision_config.hidden_size ({self.hidden_size}) is not divisible by num_heads ({self.num_heads})"
            )
        if self.head_dim % 4:
            # The head dim is split in half for rotate_half, and each half again between the h and w axes.
            raise ConfigError(f"the vision head dim ({self.head_dim}) must be divisible by 4 for the 2-D rotary")
        side = self.num_grid_per_side
        if side * side != self.num_position_embeddings:
            raise ConfigError(
                f"vision_config.num_position_embeddings ({self.num_position_embeddings}) must be a square number: "
                "it is a square grid of learned position embeddings"
            )
        self.deepstack_visual_indexes = [int(i) for i in self.deepstack_visual_indexes]
        bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
        if bad or len(set(self.deepstack_visual_indexes)) != len(self.deepstack_visual_indexes):
            raise ConfigError(
                f"vision_config.deepstack_visual_indexes {self.deepstack_visual_indexes} must be distinct block "
                f"indexes in [0, {self.depth})"
            )
        if self.hidden_act not in _GELU_APPROXIMATIONS:
            raise ConfigError(
                f"vision_config.hidden_act '{self.hidden_act}' is not supported "
                f"(supported: {', '.join(_GELU_APPROXIMATIONS)})"
            )
        rope_type = (self.rope_parameters or {}).get("rope_type", "axial")
        if rope_type != "axial":
            raise ConfigError(f"the Qwen3-VL vision tower supports only axial rope, vision_config asks for '{rope_type}'")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rope_theta(self) -> float:
        return float((self.rope_parameters or {}).get("rope_theta", DEFAULT_VISION_ROPE_THETA))

    @property
    def num_grid_per_side(self) -> int:
        return round(self.num_position_embeddings**0.5)

    @property
    def patch_dim(self) -> int:
        """Length of one flattened input patch, C * T * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merged_hidden_size(self) -> int:
        """Width of one merge x merge block of patch features, the mergers' input."""
        return self.hidden_size * self.spatial_merge_size**2


class VisionPatchEmbed(nn.Module):
    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        kernel = (args.temporal_patch_size, args.patch_size, args.patch_size)
        # Held only for the checkpoint's name and [D, C, T, P, P] shape; forward runs it as a Linear.
        self.proj = nn.Conv3d(args.in_channels, args.hidden_size, kernel_size=kernel, stride=kernel, bias=True)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [N, C*T*P*P] -> [N, D]
        weight = self.proj.weight
        return F.linear(pixel_values.to(weight.dtype), weight.reshape(weight.shape[0], -1), self.proj.bias)


def apply_vision_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE over the whole head dim. x: [N, G, hd] (any strides); cos, sin: [N, hd / 2] float32,
    the angles of each half (rotate_half's two halves share them). Returns a new [N, G, hd] tensor of x's dtype."""
    # float32 like transformers: in bf16 the rotation would round every product.
    xf = x.float()
    half = xf.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1); out= rounds to x's dtype in the same pass
    torch.addcmul(x1 * c, x2, s, value=-1, out=out[..., :half])
    torch.addcmul(x2 * c, x1, s, out=out[..., half:])
    return out


def equal_length_runs(lengths: list[int]) -> list[tuple[int, int, int]]:
    """(start, length, count) of each run of consecutive equal segment lengths:
    [4, 4, 4, 9] -> [(0, 4, 3), (12, 9, 1)] (models/attention.py window_attention's windows)."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for length in lengths:
        if runs and runs[-1][1] == length:
            runs[-1] = (runs[-1][0], length, runs[-1][2] + 1)
        else:
            runs.append((start, length, 1))
        start += length
    return runs


class VisionAttention(nn.Module):
    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        self.num_heads = args.num_heads
        self.head_dim = args.head_dim
        self.qkv = nn.Linear(args.hidden_size, 3 * args.hidden_size, bias=True)
        self.proj = nn.Linear(args.hidden_size, args.hidden_size, bias=True)
        # The load-time preparation may swap in a native kernel (models/fast_paths.py).
        self.attend_windows = window_attention

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: list[tuple[int, int, int]]
    ) -> torch.Tensor:
        # x: [N, D]; segments: (start, length, count) runs of attention segments (equal_length_runs), covering N.
        n, heads, hd = x.shape[0], self.num_heads, self.head_dim
        qkv = self.qkv(x).view(n, 3, heads, hd)
        qk = apply_vision_rotary(qkv[:, :2].flatten(1, 2), cos, sin).view(n, 2, heads, hd)  # q and k in one pass
        # No mask: every patch of a frame sees every other patch of it.
        out = self.attend_windows(qk[:, 0], qk[:, 1], qkv[:, 2], segments)  # [N, H, hd]
        return self.proj(out.view(n, heads * hd))


class VisionMLP(nn.Module):
    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        self.linear_fc1 = nn.Linear(args.hidden_size, args.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(args.intermediate_size, args.hidden_size, bias=True)
        self.approximate = _GELU_APPROXIMATIONS[args.hidden_act]
        self.fc1_applies_gelu = False  # set by pack_for_cpu when the GELU is fused into linear_fc1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_fc1(x)
        return self.linear_fc2(h if self.fc1_applies_gelu else F.gelu(h, approximate=self.approximate))

    def pack_for_cpu(self) -> int:
        self.linear_fc1 = packed_with_gelu(self.linear_fc1, self.approximate)
        self.linear_fc2 = packed(self.linear_fc2)
        self.fc1_applies_gelu = True
        return 2


class VisionBlock(nn.Module):
    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(args.hidden_size, eps=LAYER_NORM_EPS)
        self.norm2 = nn.LayerNorm(args.hidden_size, eps=LAYER_NORM_EPS)
        self.attn = VisionAttention(args)
        self.mlp = VisionMLP(args)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: list[tuple[int, int]]
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class VisionPatchMerger(nn.Module):
    """Concatenates each merge x merge block of patch features and projects it to the LLM width.

    The final merger normalises each patch before concatenating (norm over D); the DeepStack mergers
    normalise the concatenation (norm over merge^2 * D), as in the checkpoint's norm shapes.
    """

    def __init__(self, args: VisionArgs, postshuffle_norm: bool) -> None:
        super().__init__()
        self.merged_hidden_size = args.merged_hidden_size
        self.postshuffle_norm = postshuffle_norm
        norm_dim = args.merged_hidden_size if postshuffle_norm else args.hidden_size
        self.norm = nn.LayerNorm(norm_dim, eps=LAYER_NORM_EPS)
        self.linear_fc1 = nn.Linear(args.merged_hidden_size, args.merged_hidden_size, bias=True)
        self.linear_fc2 = nn.Linear(args.merged_hidden_size, args.out_hidden_size, bias=True)
        self.fc1_applies_gelu = False  # set by pack_for_cpu when the GELU is fused into linear_fc1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, D] in merge-block order -> [N / merge^2, out_hidden]
        if self.postshuffle_norm:
            x = self.norm(x.reshape(-1, self.merged_hidden_size))
        else:
            x = self.norm(x).reshape(-1, self.merged_hidden_size)
        h = self.linear_fc1(x)
        return self.linear_fc2(h if self.fc1_applies_gelu else F.gelu(h))  # exact GELU (nn.GELU() in transformers)

    def pack_for_cpu(self) -> int:
        self.linear_fc1 = packed_with_gelu(self.linear_fc1, "none")
        self.linear_fc2 = packed(self.linear_fc2)
        self.fc1_applies_gelu = True
        return 2


def packed(linear: nn.Linear) -> PackedLinear:
    return PackedLinear(linear.weight, linear.bias)


def packed_with_gelu(linear: nn.Linear, approximate: str) -> PackedLinear:
    """The linear with F.gelu(..., approximate=approximate) fused after it (a oneDNN post-op)."""
    return PackedLinear(linear.weight, linear.bias, activation="gelu", algorithm=approximate)


def _corner_aligned_taps(size: int, side: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear taps resampling a `side`-long axis to `size` points with align_corners=True.

    Returns (low index [size], high index [size], weight of the high index [size] float32). The closed
    form index * (side - 1) / (size - 1) is the one transformers 5.24 uses; a single point sits on index 0.
    """
    src = torch.arange(size, dtype=torch.float32, device=device) * (side - 1) / max(size - 1, 1)
    low = src.floor()
    frac = src - low
    low = low.long()
    high = (low + 1).clamp(max=side - 1)  # at the last point frac is 0, so the clamped tap has no weight
    return low, high, frac


def _merge_block_order(grid: torch.Tensor, merge: int) -> torch.Tensor:
    """[h, w, ...] raster grid -> [h*w, ...] in the patch order of the preprocessor (merge blocks contiguous)."""
    h, w = grid.shape[:2]
    rest = grid.shape[2:]
    blocks = grid.reshape(h // merge, merge, w // merge, merge, *rest).transpose(1, 2)
    return blocks.reshape(h * w, *rest)


class Qwen3VLVisionModel(nn.Module):
    """(pixel_values [N, C*T*P*P], grid_thw [num_images, 3]) -> (embeds [N/m^2, out], deepstack list of same)."""

    checkpoint_prefix = "model.visual."

    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        self.args = args
        self.patch_embed = VisionPatchEmbed(args)
        self.pos_embed = nn.Embedding(args.num_position_embeddings, args.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(args) for _ in range(args.depth))
        self.merger = VisionPatchMerger(args, postshuffle_norm=False)
        self.deepstack_merger_list = nn.ModuleList(
            VisionPatchMerger(args, postshuffle_norm=True) for _ in args.deepstack_visual_indexes
        )
        # block index -> the DeepStack merger fed by that block's output
        self._deepstack_merger_of_block = {block: k for k, block in enumerate(args.deepstack_visual_indexes)}

    def parse_grid_thw(self, grid_thw: torch.Tensor, num_patches: int) -> list[tuple[int, int, int]]:
        """Validates grid_thw against the patch count and returns it as Python ints."""
        if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
            raise ValueError(f"grid_thw must have shape [num_images, 3], got {list(grid_thw.shape)}")
        merge = self.args.spatial_merge_size
        grids = [(int(t), int(h), int(w)) for t, h, w in grid_thw.tolist()]
        for t, h, w in grids:
            if t < 1 or h < merge or w < merge or h % merge or w % merge:
                raise ValueError(f"grid_thw entry {(t, h, w)} must be positive with h, w multiples of {merge}")
        total = sum(t * h * w for t, h, w in grids)
        if total != num_patches:
            raise ValueError(f"grid_thw describes {total} patches but pixel_values has {num_patches}")
        return grids

    def position_embeddings(self, grids: list[tuple[int, int, int]], device: torch.device) -> torch.Tensor:
        """The learned square table bilinearly resampled to each grid: [N, D] float32, merge-block order."""
        side = self.args.num_grid_per_side
        # float32 whatever the weight dtype: transformers multiplies the taps by float32 weights.
        table = self.pos_embed.weight.float().view(side, side, -1)  # [side, side, D]
        per_image = []
        for t, h, w in grids:
            h_low, h_high, h_frac = _corner_aligned_taps(h, side, device)
            w_low, w_high, w_frac = _corner_aligned_taps(w, side, device)
            hf = h_frac[:, None, None]  # [h, 1, 1]
            wf = w_frac[None, :, None]  # [1, w, 1]
            top, bottom = table[h_low], table[h_high]  # [h, side, D]
            grid = (
                top[:, w_low] * ((1 - hf) * (1 - wf))
                + top[:, w_high] * ((1 - hf) * wf)
                + bottom[:, w_low] * (hf * (1 - wf))
                + bottom[:, w_high] * (hf * wf)
            )  # [h, w, D]
            # Every frame of a video gets the same spatial embedding.
            per_image.append(_merge_block_order(grid, self.args.spatial_merge_size).repeat(t, 1))
        return torch.cat(per_image, dim=0)

    def rotary_cos_sin(self, grids: list[tuple[int, int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """2-D axial rotary: [N, hd / 2] float32 cos and sin of the angles [h-angles, w-angles], the angles of
        each half of the head dim (rotate_half's halves repeat them)."""
        quarter = self.args.head_dim // 2  # frequencies are spread over half the head dim, shared by h and w
        exponents = torch.arange(0, quarter, 2, dtype=torch.float32, device=device) / quarter
        inv_freq = 1.0 / (self.args.rope_theta**exponents)  # [hd / 4]
        merge = self.args.spatial_merge_size
        positions = []
        for t, h, w in grids:
            rows = torch.arange(h, device=device)[:, None].expand(h, w)
            cols = torch.arange(w, device=device)[None, :].expand(h, w)
            hw = torch.stack((rows, cols), dim=-1)  # [h, w, 2]
            positions.append(_merge_block_order(hw, merge).repeat(t, 1))
        pos = torch.cat(positions, dim=0).float()  # [N, 2]
        angles = (pos[:, :, None] * inv_freq).flatten(1)  # [N, hd/2]: h-angles then w-angles
        return angles.cos(), angles.sin()

    def prepare_for_cpu(self, form: str) -> int:
        """The runner's CPU preparation (models/cpu_linear.py): the linears of the blocks and mergers in the
        oneDNN-packed form with the MLPs' GELU fused, whatever `form` the text decoder takes (that choice
        is made on one-row products; the tower multiplies thousands of rows). Returns how many matrices
        changed; none where oneDNN cannot pack the weights' dtype (float32 keeps nn.Linear, so the parity
        checks see the plain path; float16 packs on CPUs with AVX512-FP16 only)."""
        if not packs(self.patch_embed.proj.weight.dtype):
            return 0
        count = 0
        for block in self.blocks:
            block.attn.qkv, block.attn.proj = packed(block.attn.qkv), packed(block.attn.proj)
            count += 2 + block.mlp.pack_for_cpu()
        for merger in (self.merger, *self.deepstack_merger_list):
            count += merger.pack_for_cpu()
        return count

    def forward(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        # pixel_values: [N, C*T*P*P]; grid_thw: [num_images, 3] (t, h, w) in patches
        if pixel_values.dim() != 2 or pixel_values.shape[1] != self.args.patch_dim:
            raise ValueError(
                f"pixel_values must have shape [num_patches, {self.args.patch_dim}], got {list(pixel_values.shape)}"
            )
        grids = self.parse_grid_thw(grid_thw, pixel_values.shape[0])
        device = pixel_values.device
        segments = equal_length_runs([h * w for t, h, w in grids for _ in range(t)])  # a segment per frame

        x = self.patch_embed(pixel_values)  # [N, D]
        x = x + self.position_embeddings(grids, device).to(x.dtype)
        cos, sin = self.rotary_cos_sin(grids, device)

        deepstack: list[torch.Tensor] = []
        for index, block in enumerate(self.blocks):
            x = block(x, cos, sin, segments)
            merger = self._deepstack_merger_of_block.get(index)
            if merger is not None:
                deepstack.append(self.deepstack_merger_list[merger](x))  # [N/m^2, out]
        return self.merger(x), deepstack


__all__ = ["VisionArgs", "Qwen3VLVisionModel", "apply_vision_rotary", "equal_length_runs"]
