// One dense Qwen3 decoder layer's decode step in one native call: the ops models/fast_paths.py's FlatDecodeLoop
// calls for the layer, in the same order on the same tensors, so the result is bit-identical to that loop's (and
// to the layers'). Why: at one row, most of a small op's time was its call (Python, the dispatcher, boxed
// arguments): 28 layers of 10 calls each cost a few milliseconds of a Qwen3-0.6B step, where int8's weights
// read in ~15 (benchmarks/RESULTS.md, "One native call per decode layer").
//
//   decode_layer(x, delta, input_norm, post_norm, q_norm, k_norm, norm_eps, qk_eps, zero_centered,
//                qkv, qkv_scales, o, o_scales, gate_up, gate_up_scales, down, down_scales,
//                q_heads, kv_heads, cos, sin, kv_cache, slots, block_tables, context_lens, scale)
//     -> (x, mlp_out)
// - x [R, hidden]: the residual stream before the layer; delta: the previous layer's MLP output, added to x
//   first (add_rms_norm), or an empty tensor for the first layer (rms_norm of x alone);
// - each product's weights: tile-packed bfloat16 (linear_tiled's layout) with empty scales, tile-packed int8
//   (linear_tiled_int8's) with their scales [N], or int4 with its scales and zero points, tile-packed
//   (linear_tiled_int4's, [N / 16, K / group, 16, 2]) or in torch's CPU packing ([K / group, N, 2], for torch's
//   _weight_int4pack_mm_for_cpu, the op qwenstack's int4 linears call where the tiled int4 loop is not built);
// - the attention reads and writes the paged cache as paged_decode_attention and write_kv do.
// Returns the residual stream after the attention block and the MLP's output; the caller adds the last layer's.
//
// experts_swiglu (below): a MoE layer's quantized experts over their rows with the same products, one call.
//
// The functions are the op files' own: each file is compiled here a second time, inside its own namespace, with
// its op registrations left out (QWENSTACK_KERNEL_FUNCTIONS_ONLY), so there is one copy of each kernel's source.
// Everything those files include is included first, outside the namespaces, so their own includes add nothing.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Half.h>

#include "cpu_vec.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__)
#include "cpu_amx.h"
#endif

#define QWENSTACK_KERNEL_FUNCTIONS_ONLY
namespace norm_ops {
#include "rms_norm_cpu.cpp"
}
namespace linear_ops {
#include "linear_tiled_cpu.cpp"
}
namespace attention_ops {
#include "paged_attention_cpu.cpp"
}
namespace swiglu_ops {
#include "swiglu_cpu.cpp"
}
#undef QWENSTACK_KERNEL_FUNCTIONS_ONLY

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// x [R, K] times int4 weights in torch's CPU packing, through the dispatcher (x already in the scales' dtype,
// as the caller checked when it built the layer's arguments).
Tensor int4_product(const Tensor& x, const Tensor& packed, const Tensor& scale_zeros) {
  STD_TORCH_CHECK(scale_zeros.dim() == 3 && scale_zeros.size(0) > 0 && x.size(1) % scale_zeros.size(0) == 0,
                  "decode_layer: int4 scales and zero points must be [K / group, N, 2]");
  const int64_t group = x.size(1) / scale_zeros.size(0);
  std::array<StableIValue, 4> stack{torch::stable::detail::from(as_contiguous(x)), torch::stable::detail::from(packed),
                                    torch::stable::detail::from(group), torch::stable::detail::from(scale_zeros)};
  STABLE_TORCH_ERROR_CODE_CHECK(
      torch_call_dispatcher("aten::_weight_int4pack_mm_for_cpu", "", stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<Tensor>(stack[0]);
}

// x [R, K] times one linear's weights: tile-packed bfloat16 where scales is empty, tile-packed int8 with its
// scales [N], int4 (tile-packed, or in torch's packing) with its scales and zero points.
Tensor product(const Tensor& x, const Tensor& packed, const Tensor& scales) {
  if (scales.numel() == 0) return linear_ops::linear_tiled(x, packed);
  if (scales.dim() == 1) return linear_ops::linear_tiled_int8(x, packed, scales);
  if (packed.dim() == 4) return linear_ops::linear_tiled_int4(x, packed, scales);
  return int4_product(x, packed, scales);
}

// A view of `base`'s memory (which must outlive it) with these sizes and strides, from element `offset`.
// from_blob is one call into torch, where narrow or view go through the dispatcher with boxed arguments.
Tensor view_of(const Tensor& base, std::initializer_list<int64_t> sizes, std::initializer_list<int64_t> strides,
               int64_t offset) {
  char* data = static_cast<char*>(base.mutable_data_ptr()) + offset * base.element_size();
  return torch::stable::from_blob(data, sizes, strides, base.device(), base.scalar_type());
}

std::tuple<Tensor, Tensor> decode_layer(Tensor x, Tensor delta, Tensor input_norm, Tensor post_norm, Tensor q_norm,
                                        Tensor k_norm, double norm_eps, double qk_eps, bool zero_centered, Tensor qkv,
                                        Tensor qkv_scales, Tensor o, Tensor o_scales, Tensor gate_up,
                                        Tensor gate_up_scales, Tensor down, Tensor down_scales, int64_t q_heads,
                                        int64_t kv_heads, Tensor cos, Tensor sin, Tensor kv_cache, Tensor slots,
                                        Tensor block_tables, Tensor context_lens, double scale) {
  STD_TORCH_CHECK(x.dim() == 2, "decode_layer: x must be [rows, hidden]");
  STD_TORCH_CHECK(kv_cache.dim() == 5 && q_heads > 0 && kv_heads > 0,
                  "decode_layer: kv_cache must be [2, num_blocks, block_size, kv_heads, head_dim]");
  const int64_t R = x.size(0), D = kv_cache.size(4), width = (q_heads + 2 * kv_heads) * D;
  Tensor h;
  if (delta.numel() == 0) {
    h = norm_ops::rms_norm(x, input_norm, norm_eps, zero_centered);
  } else {
    std::tie(x, h) = norm_ops::add_rms_norm(x, delta, input_norm, norm_eps, zero_centered);
  }
  const Tensor fused = product(h, qkv, qkv_scales);
  STD_TORCH_CHECK(fused.size(1) == width, "decode_layer: the qkv product has ", fused.size(1),
                  " outputs, not (q_heads + 2 * kv_heads) * head_dim = ", width);
  const Tensor q_in = view_of(fused, {R, q_heads, D}, {width, D, 1}, 0);
  const Tensor k_in = view_of(fused, {R, kv_heads, D}, {width, D, 1}, q_heads * D);
  const Tensor v = view_of(fused, {R, kv_heads, D}, {width, D, 1}, (q_heads + kv_heads) * D);
  auto [q, k] = norm_ops::qk_norm_rope(q_in, k_in, q_norm, k_norm, cos, sin, qk_eps, zero_centered);
  attention_ops::write_kv(kv_cache, k, v, slots);
  const Tensor attended = attention_ops::paged_decode_attention(q, kv_cache, block_tables, context_lens, scale);
  const Tensor heads = view_of(attended, {R, q_heads * D}, {q_heads * D, 1}, 0);
  auto [residual, h2] = norm_ops::add_rms_norm(x, product(heads, o, o_scales), post_norm, norm_eps, zero_centered);
  const Tensor mlp_out = product(swiglu_ops::silu_mul(product(h2, gate_up, gate_up_scales)), down, down_scales);
  return {residual, mlp_out};
}

// stack[e] as a view of stack's memory (which must outlive it).
Tensor expert_view(const Tensor& stack, int64_t e) {
  const auto sizes = stack.sizes(), strides = stack.strides();
  const std::vector<int64_t> inner_sizes(sizes.begin() + 1, sizes.end());
  const std::vector<int64_t> inner_strides(strides.begin() + 1, strides.end());
  char* data = static_cast<char*>(stack.mutable_data_ptr()) + e * strides[0] * stack.element_size();
  return torch::stable::from_blob(data, inner_sizes, inner_strides, stack.device(), stack.scalar_type());
}

// Stacked quantized MoE experts (qwenstack.quantization.QuantExperts with tile-packed int8 or int4 stacks) over
// their rows in one call:
//   for each expert e with rows [o_e, o_e + counts[e]) of x (x sorted by expert):
//     out_e = product(silu_mul(product(x_e, gate_up[e])), down[e])
// with decode_layer's products and SwiGLU's activation, so each expert's rows are bit for bit what the loop over
// the experts with those ops gives. Why: each expert was four Python calls (two products, the split and the
// activation) beside products of 1-2 MB, ~0.4 ms a layer a token on the 30B-A3B shape: single-stream int4
// decode of its 4-layer cut ran 1.07-1.10x as fast in one call (benchmarks/RESULTS.md, "int4 in a tiled layout").
// Layout: x [R, H] bfloat16; counts [E] int64 (sum R); gate_up and down: stacks [E, ...] of one tile-packed form
// (decode_layer's), with their scales [E, N] (int8) or scales and zero points [E, N / 16, K / group, 16, 2] (int4).
Tensor experts_swiglu(Tensor x_in, Tensor counts_in, Tensor gate_up, Tensor gate_up_scales, Tensor down,
                      Tensor down_scales) {
  STD_TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == ScalarType::BFloat16,
                  "experts_swiglu: x must be bfloat16 [R, H]");
  STD_TORCH_CHECK(counts_in.dim() == 1 && counts_in.scalar_type() == ScalarType::Long,
                  "experts_swiglu: counts must be int64 [E]");
  const int64_t E = counts_in.size(0), R = x_in.size(0), H = x_in.size(1);
  STD_TORCH_CHECK(gate_up.dim() >= 2 && down.dim() >= 2 && gate_up.size(0) == E && down.size(0) == E &&
                      gate_up_scales.dim() >= 2 && down_scales.dim() >= 2 && gate_up_scales.size(0) == E &&
                      down_scales.size(0) == E,
                  "experts_swiglu: gate_up, down and their scales must be stacks of ", E, " experts");
  const Tensor x = as_contiguous(x_in);
  const Tensor counts_t = as_contiguous(counts_in);
  const int64_t* counts = static_cast<const int64_t*>(counts_t.const_data_ptr());
  int64_t total = 0;
  for (int64_t e = 0; e < E; ++e) {
    STD_TORCH_CHECK(counts[e] >= 0, "experts_swiglu: expert ", e, " has ", counts[e], " rows");
    total += counts[e];
  }
  STD_TORCH_CHECK(total == R, "experts_swiglu: counts add up to ", total, ", x has ", R, " rows");
  Tensor out = torch::stable::empty({R, H}, ScalarType::BFloat16, std::nullopt, x.device());
  const int64_t row_bytes = H * out.element_size();
  for (int64_t e = 0, first = 0; e < E; first += counts[e], ++e) {
    if (counts[e] == 0) continue;
    const Tensor rows = view_of(x, {counts[e], H}, {H, 1}, first * H);
    const Tensor h = product(rows, expert_view(gate_up, e), expert_view(gate_up_scales, e));
    const Tensor y = product(swiglu_ops::silu_mul(h), expert_view(down, e), expert_view(down_scales, e));
    STD_TORCH_CHECK(y.size(1) == H, "experts_swiglu: the down products have ", y.size(1), " outputs, x has ", H,
                    " columns");
    std::memcpy(static_cast<char*>(out.mutable_data_ptr()) + first * row_bytes, y.const_data_ptr(),
                counts[e] * row_bytes);
  }
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(qwenstack, m) {
  m.def("decode_layer(Tensor x, Tensor delta, Tensor input_norm, Tensor post_norm, Tensor q_norm, Tensor k_norm, "
        "float norm_eps, float qk_eps, bool zero_centered, Tensor qkv, Tensor qkv_scales, Tensor o, Tensor o_scales, "
        "Tensor gate_up, Tensor gate_up_scales, Tensor down, Tensor down_scales, int q_heads, int kv_heads, "
        "Tensor cos, Tensor sin, Tensor(a!) kv_cache, Tensor slots, Tensor block_tables, Tensor context_lens, "
        "float scale) -> (Tensor, Tensor)");
  m.def("experts_swiglu(Tensor x, Tensor counts, Tensor gate_up, Tensor gate_up_scales, Tensor down, "
        "Tensor down_scales) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(qwenstack, CPU, m) {
  m.impl("decode_layer", TORCH_BOX(&decode_layer));
  m.impl("experts_swiglu", TORCH_BOX(&experts_swiglu));
}
