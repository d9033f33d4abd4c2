"""Native CPU kernels, compiled from the C++ next to this package the first time they are needed: paged
attention for decode and prefix prefill and the KV write (paged_attention_cpu.cpp), linear layers for a few
activation rows (linear_cpu.cpp) and for tile-packed weights (linear_tiled_cpu.cpp), RMSNorm, residual add +
RMSNorm and QK-norm + rotary (rms_norm_cpu.cpp), SwiGLU's activation (swiglu_cpu.cpp), Gated DeltaNet's
decode step, conv and recurrence (gated_delta_cpu.cpp), attention within whole segments of tokens
(dense_attention_cpu.cpp: a vision tower's frames), a dense decoder layer's decode step in one call, from the
other files' functions (decode_layer_cpu.cpp), each row's k largest logits for the sampler (sampling_cpu.cpp),
and a probe of the machine's read rate (memory_cpu.cpp). Every op has a torch reference that the callers fall
back on.

- build.py: the CPU's instruction-set level and one extension per .cpp file (a file that fails to compile
  disables only its own ops); `kernels_disabled` (QWENSTACK_DISABLE_KERNELS=1) forces the torch path.
- ops.py: the op wrappers and their fallback contract.
- layouts.py: the tile-packed weight layouts the linear kernels read.
"""
from qwenstack.kernels import build
from qwenstack.kernels.build import ISA_LEVELS, build_all, isa_level, kernels_disabled, native_op
from qwenstack.kernels.layouts import (
    INT4_COLUMNS, INT8_TILE_K, INT8_TILE_MAX_K, TILE_K, TILE_N, can_tile, can_tile_int4, can_tile_int8, pack_tiles,
    pack_scale_zeros_int4, pack_tiles_int4, pack_tiles_int8, tiled_rows, unpack_scale_zeros_int4, unpack_tiles,
    unpack_tiles_int4, unpack_tiles_int8,
)
from qwenstack.kernels.ops import (
    LINEAR_WEIGHT_DTYPES, add_rms_norm, conv_decode, experts_swiglu, gated_delta_chunked, gated_delta_decode, has_amx,
    int4_tiles_preferred, int8_tiles_preferred, linear_rows, linear_rows_available, linear_tiled, linear_tiled_int4,
    linear_tiled_int8, logsumexp_rows, moe_max_rows, moe_tiled, paged_decode_attention, paged_decode_available,
    paged_prefix_attention, qk_norm_rope, rms_norm, segment_attention, silu_mul, softmax_draw_rows, stream_sum,
    top_k_rows, use_paged_decode, vector_loop_max_rows, write_kv,
)

__all__ = [
    "build", "build_all", "ISA_LEVELS", "isa_level", "kernels_disabled", "native_op",
    "INT4_COLUMNS", "INT8_TILE_K", "INT8_TILE_MAX_K", "TILE_K", "TILE_N", "can_tile", "can_tile_int4", "can_tile_int8",
    "pack_scale_zeros_int4", "pack_tiles", "pack_tiles_int4", "pack_tiles_int8", "tiled_rows",
    "unpack_scale_zeros_int4", "unpack_tiles", "unpack_tiles_int4", "unpack_tiles_int8",
    "LINEAR_WEIGHT_DTYPES", "has_amx", "int4_tiles_preferred", "int8_tiles_preferred", "linear_rows",
    "linear_rows_available",
    "linear_tiled", "linear_tiled_int4", "linear_tiled_int8", "paged_decode_attention", "paged_decode_available",
    "paged_prefix_attention", "qk_norm_rope", "rms_norm", "stream_sum", "use_paged_decode", "add_rms_norm",
    "segment_attention", "silu_mul", "write_kv", "conv_decode", "experts_swiglu", "gated_delta_chunked",
    "gated_delta_decode", "moe_tiled", "top_k_rows", "softmax_draw_rows", "logsumexp_rows",
    "moe_max_rows", "vector_loop_max_rows",
]
