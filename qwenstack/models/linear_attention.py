"""Gated DeltaNet kernels for Qwen3-Next's linear-attention layers, in plain PyTorch.

The caller (model layer, engine) owns the recurrent and conv states and passes them in; every function
returns the new state rather than writing into its argument, except the two *_decode_in_place forms, which
update the slots of the engine's state pools they name (a decode step then reads and writes each state once).

Decisions:
- Shapes follow transformers' `torch_chunk_gated_delta_rule` (token-major, batch first):
  q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g, beta [B, T, Hv]; state [B, Hv, Dk, Dv].
  Hv may be a multiple of Hk (Qwen3-Next 80B: 16 key heads, 32 value heads); value head h reads
  key head h // (Hv // Hk), the order in which `in_proj_qkvz` groups its heads.
- All math runs in fp32 whatever the input dtype; the output comes back in q's dtype and the final
  state stays fp32, because the state accumulates over the whole sequence and bf16 would drift.
- q and k are L2-normalised as x * rsqrt(sum(x^2) + 1e-6) (the FLA/transformers formula, eps inside
  the root; not F.normalize, which clamps the norm instead), then q is scaled by Dk^-0.5:
  multiplied in the chunked form, divided by sqrt(Dk) in the recurrent one, as in transformers
  (the two round differently in the last bit; we keep each form bit-identical to its reference).
- The chunked form pads the sequence to a multiple of `chunk_size` with zeros. A padded token has
  beta = 0 and k = 0, so it writes nothing, and g = 0, so it does not decay the state: the final
  state is exact and the padded outputs are dropped.
- The intra-chunk delta-rule recursion is the UT transform: one unit-lower-triangular solve per
  chunk (torch.linalg.solve_triangular), with both right-hand sides solved in one call.
- causal_conv1d keeps the last K-1 *raw* (pre-conv) inputs as its state, zeros at the start of a
  sequence. transformers' cache keeps K columns; the oldest is never read. Running a sequence in
  pieces therefore reads exactly the same window for every output position as running it at once.
  Not bit-identical on CPU: conv1d's accumulation order and SiLU's vectorised-vs-scalar tail both
  depend on the tensor length, so a split can move the last bit (about 3e-8 in fp32).
- Variable length: the engine packs sequences token-major into [T_total, ...] with cumulative
  offsets cu_seqlens [B + 1] (cu_seqlens[0] = 0, cu_seqlens[-1] = T_total), the vLLM/FLA
  convention; the *_varlen helpers loop over the sequences and take/return one state per sequence
  ([B, Hv, Dk, Dv] and [B, C, K-1]), so the engine can gather and scatter its state slots around them.
"""

import torch
import torch.nn.functional as F

L2NORM_EPS = 1e-6


def scale_rows(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x [..., D] * s[..., None] as one [rows, D] by [rows, 1] multiply, the same products: on the chunked
    rule's 5-D tensors ([B, H, N, C, D]) the broadcast form ran its inner loop across rows, 4.6 ms a call
    against ~0.7 for [1, 32, 16, 64, 128] on 2 threads."""
    return (x.reshape(-1, x.shape[-1]) * s.reshape(-1, 1)).view(x.shape)


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    # eps goes inside the rsqrt to match FLA/transformers bit for bit
    return scale_rows(x, torch.rsqrt((x * x).sum(dim=-1) + eps))


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor) -> None:
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"q and k must be [B, T, Hk, Dk] and equal, got {tuple(q.shape)} and {tuple(k.shape)}")
    B, T, Hk, _ = k.shape
    if v.dim() != 4 or v.shape[:2] != (B, T) or v.shape[2] % Hk != 0:
        raise ValueError(f"v must be [B, T, Hv, Dv] with Hv a multiple of Hk={Hk}, got {tuple(v.shape)}")
    if g.shape != v.shape[:3] or beta.shape != v.shape[:3]:
        expected = tuple(v.shape[:3])
        raise ValueError(f"g and beta must be [B, T, Hv] = {expected}, got {tuple(g.shape)} and {tuple(beta.shape)}")


def _prepare(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, use_qk_l2norm: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-major inputs -> fp32 head-major [B, Hv, T, D] (g, beta: [B, Hv, T]), q and k normalised.

    q is left unscaled: each form applies Dk^-0.5 the way its transformers twin does (see below).
    """
    _check_shapes(q, k, v, g, beta)
    group = v.shape[2] // k.shape[2]
    if group > 1:
        q = q.repeat_interleave(group, dim=2)
        k = k.repeat_interleave(group, dim=2)
    q, k, v, g, beta = (x.transpose(1, 2).float().contiguous() for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    return q, k, v, g, beta


def _initial_state(
    initial_state: torch.Tensor | None, B: int, H: int, Dk: int, Dv: int, device: torch.device
) -> torch.Tensor:
    if initial_state is None:
        return torch.zeros(B, H, Dk, Dv, dtype=torch.float32, device=device)
    if initial_state.shape != (B, H, Dk, Dv):
        raise ValueError(f"initial_state must be [B, Hv, Dk, Dv] = {(B, H, Dk, Dv)}, got {tuple(initial_state.shape)}")
    return initial_state.to(device=device, dtype=torch.float32)


def chunk_gated_delta_rule(
    q: torch.Tensor,  # [B, T, Hk, Dk]
    k: torch.Tensor,  # [B, T, Hk, Dk]
    v: torch.Tensor,  # [B, T, Hv, Dv]
    g: torch.Tensor,  # [B, T, Hv], log of the per-token state decay, <= 0
    beta: torch.Tensor,  # [B, T, Hv], write strength in (0, 1)
    initial_state: torch.Tensor | None = None,  # [B, Hv, Dk, Dv]
    chunk_size: int = 64,
    use_qk_l2norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated delta rule over a whole sequence, chunk by chunk (prefill).

    Per token: S <- exp(g) S; S <- S + k (beta (v - S^T k))^T; o = S^T q.
    Returns (out [B, T, Hv, Dv] in q's dtype, final_state [B, Hv, Dk, Dv] fp32).
    """
    out_dtype = q.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta, use_qk_l2norm)
    B, H, T, Dk = k.shape
    Dv = v.shape[-1]
    q = q * Dk**-0.5  # multiply, as transformers' chunked form does
    state = _initial_state(initial_state, B, H, Dk, Dv, v.device)
    if T == 0:  # an empty piece of a sequence: nothing to read or write
        return v.transpose(1, 2).to(out_dtype), state

    C = chunk_size
    pad = (-T) % C
    if pad:
        # zero padding is inert: beta = 0 and k = 0 write nothing, g = 0 decays nothing
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    N = (T + pad) // C
    q, k, v = (x.view(B, H, N, C, -1) for x in (q, k, v))  # [B, H, N, C, D]
    g, beta = g.view(B, H, N, C), beta.view(B, H, N, C)

    # log_decay[..., i] = log of the decay from the start of the chunk through token i
    log_decay = g.cumsum(dim=-1)  # [B, H, N, C]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # decay[..., i, j] = exp(log_decay_i - log_decay_j) for j <= i. Mask before exp: above the
    # diagonal the difference is positive and can overflow to inf (inf * 0 = nan later).
    decay = (log_decay.unsqueeze(-1) - log_decay.unsqueeze(-2)).masked_fill(~causal, float("-inf")).exp()

    # Within a chunk starting from state S0 the written values u_i = beta_i (v_i - S_{i-1}^T k_i) satisfy
    # (I + L) u = beta v - (beta exp(log_decay) k) S0, with L_ij = beta_i decay_ij k_i.k_j for j < i.
    # Solving once for both right-hand sides gives u = u_local - w S0 for any S0.
    k_beta = scale_rows(k, beta)
    lower = (k_beta @ k.transpose(-1, -2)) * decay  # diagonal ignored: the solve takes it as 1
    # (I + L)^-1 from a solve against the identity (C right-hand sides), then two products: transformers'
    # form (it inverts by forward substitution), and a quarter of the solve on the Dv + Dk columns.
    eye = torch.eye(C, dtype=lower.dtype, device=lower.device).expand_as(lower)
    inverse = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
    u_local = inverse @ scale_rows(v, beta)  # [B, H, N, C, Dv]
    w = inverse @ scale_rows(k_beta, log_decay.exp())  # [B, H, N, C, Dk]

    attn = (q @ k.transpose(-1, -2)) * decay  # [B, H, N, C, C], causal including the diagonal
    q_from_start = scale_rows(q, log_decay.exp())  # reads S0, decayed up to token i
    k_to_end = scale_rows(k, (log_decay[..., -1:] - log_decay).exp())  # writes, decayed to the chunk end
    chunk_decay = log_decay[..., -1].exp()[..., None, None]  # [B, H, N, 1, 1]

    out = torch.empty_like(v)  # [B, H, N, C, Dv]
    for n in range(N):
        u = u_local[:, :, n] - w[:, :, n] @ state  # [B, H, C, Dv]
        out[:, :, n] = q_from_start[:, :, n] @ state + attn[:, :, n] @ u
        state = state * chunk_decay[:, :, n] + k_to_end[:, :, n].transpose(-1, -2) @ u

    out = out.view(B, H, N * C, Dv)[:, :, :T]
    return out.transpose(1, 2).contiguous().to(out_dtype), state


def recurrent_gated_delta_rule(
    q: torch.Tensor,  # [B, T, Hk, Dk]
    k: torch.Tensor,  # [B, T, Hk, Dk]
    v: torch.Tensor,  # [B, T, Hv, Dv]
    g: torch.Tensor,  # [B, T, Hv]
    beta: torch.Tensor,  # [B, T, Hv]
    initial_state: torch.Tensor | None = None,  # [B, Hv, Dk, Dv]
    use_qk_l2norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated delta rule one token at a time (decode, T = 1 in practice; correct for any T).

    Returns (out [B, T, Hv, Dv] in q's dtype, final_state [B, Hv, Dk, Dv] fp32).
    """
    out_dtype = q.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta, use_qk_l2norm)
    B, H, T, Dk = k.shape
    Dv = v.shape[-1]
    # divide, as transformers' recurrent form does: differs from * Dk**-0.5 in the last bit, and
    # matching it keeps decode bit-identical to the reference
    q = q / Dk**0.5
    state = _initial_state(initial_state, B, H, Dk, Dv, v.device)

    decay = g.exp()[..., None, None]  # [B, H, T, 1, 1]
    out = torch.empty_like(v)  # [B, H, T, Dv]
    for t in range(T):
        state = state * decay[:, :, t]
        k_t = k[:, :, t].unsqueeze(-1)  # [B, H, Dk, 1]
        predicted = (state * k_t).sum(dim=-2)  # S^T k: [B, H, Dv]
        delta = (v[:, :, t] - predicted) * beta[:, :, t, None]
        state = state + k_t * delta.unsqueeze(-2)
        out[:, :, t] = (state * q[:, :, t].unsqueeze(-1)).sum(dim=-2)
    return out.transpose(1, 2).contiguous().to(out_dtype), state


def slot_states(pool: torch.Tensor, slots: torch.Tensor, fresh: torch.Tensor | None) -> torch.Tensor:
    """pool[slots] (a copy), zero for the fresh sequences: masked_fill, not a product, since a reused slot may
    hold inf/nan."""
    states = pool.index_select(0, slots)
    if fresh is None:
        return states
    return states.masked_fill(fresh.view(-1, *([1] * (pool.dim() - 1))), 0)


def conv_decode_in_place(
    x: torch.Tensor,  # [B, C]: one new input per sequence
    weight: torch.Tensor,  # [C, 1, K]
    conv_state: torch.Tensor,  # [S, C, K-1]: every slot's last K-1 inputs
    slots: torch.Tensor,  # [B] long, distinct
    fresh: torch.Tensor | None,  # [B] bool: sequences whose window starts at zero
) -> torch.Tensor:
    """causal_conv1d for one token of every sequence, its slot updated in place; returns y [B, C] in x's dtype.

    The reference form (gather, causal_conv1d, scatter); models/fast_paths.py swaps in one native call.
    """
    y, new_state = causal_conv1d(x.unsqueeze(-1), weight, slot_states(conv_state, slots, fresh))
    conv_state.index_copy_(0, slots, new_state.to(conv_state.dtype))
    return y.squeeze(-1)


def recurrent_decode_in_place(
    q: torch.Tensor,  # [B, Hk, Dk]: one new token per sequence
    k: torch.Tensor,  # [B, Hk, Dk]
    v: torch.Tensor,  # [B, Hv, Dv]
    g: torch.Tensor,  # [B, Hv]
    beta: torch.Tensor,  # [B, Hv]
    state: torch.Tensor,  # [S, Hv, Dk, Dv]: every slot's state
    slots: torch.Tensor,  # [B] long, distinct: sequence b's state is state[slots[b]]
    fresh: torch.Tensor | None,  # [B] bool: sequences whose state starts at zero (a reused slot is not read)
) -> torch.Tensor:
    """One decode step of every sequence, its slot updated in place; returns out [B, Hv, Dv] in q's dtype.

    The reference form (gather, recurrent_gated_delta_rule, scatter); models/fast_paths.py swaps in one native
    call that reads and writes each state once.
    """
    initial = slot_states(state, slots, fresh)
    out, final = recurrent_gated_delta_rule(
        q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), g.unsqueeze(1), beta.unsqueeze(1), initial
    )
    state.index_copy_(0, slots, final.to(state.dtype))
    return out.squeeze(1)


def causal_conv1d(
    x: torch.Tensor,  # [B, C, T] or [C, T]
    weight: torch.Tensor,  # [C, 1, K], as stored in the checkpoint
    conv_state: torch.Tensor | None = None,  # [B, C, K-1] or [C, K-1]: the previous K-1 inputs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv1d (no bias) followed by SiLU, continuing from conv_state.

    Returns (y like x, new_conv_state [.., C, K-1] in x's dtype: the last K-1 inputs seen).
    Splitting a sequence into calls changes no input window, only the last bit here and there
    (on CPU conv1d's accumulation order and SiLU's vector-vs-scalar tail depend on the length).
    """
    unbatched = x.dim() == 2
    if unbatched:
        x = x.unsqueeze(0)
        conv_state = None if conv_state is None else conv_state.unsqueeze(0)
    B, C, T = x.shape
    K = weight.shape[-1]
    if weight.shape != (C, 1, K):
        raise ValueError(f"weight must be [C, 1, K] with C={C}, got {tuple(weight.shape)}")
    if conv_state is None:
        conv_state = x.new_zeros(B, C, K - 1)
    elif conv_state.shape != (B, C, K - 1):
        raise ValueError(f"conv_state must be [B, C, K-1] = {(B, C, K - 1)}, got {tuple(conv_state.shape)}")

    window = torch.cat([conv_state.to(x.dtype), x], dim=-1)  # [B, C, K-1+T]
    # slice by start index: [..., -(K-1):] would keep everything when K == 1
    new_state = window[..., window.shape[-1] - (K - 1) :].contiguous()
    if T == 0:  # conv1d rejects an input shorter than the kernel
        y = x
    else:
        # conv and SiLU in the weight's dtype, then back to x's dtype, as transformers does
        y = F.silu(F.conv1d(window.to(weight.dtype), weight, groups=C)).to(x.dtype)  # [B, C, T]
    if unbatched:
        return y.squeeze(0), new_state.squeeze(0)
    return y, new_state


def sequence_offsets(cu_seqlens: torch.Tensor | list[int], total: int) -> list[int]:
    """cu_seqlens as a list, checked: rising from 0 to `total` tokens."""
    offsets = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != total or any(a > b for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to {total} (total tokens), got {offsets}")
    return offsets


def chunk_gated_delta_rule_varlen(
    q: torch.Tensor,  # [T, Hk, Dk], sequences packed back to back
    k: torch.Tensor,  # [T, Hk, Dk]
    v: torch.Tensor,  # [T, Hv, Dv]
    g: torch.Tensor,  # [T, Hv]
    beta: torch.Tensor,  # [T, Hv]
    cu_seqlens: torch.Tensor | list[int],  # [B + 1] offsets into T
    initial_state: torch.Tensor | None = None,  # [B, Hv, Dk, Dv]; None: every sequence starts at zero
    chunk_size: int = 64,
    use_qk_l2norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """chunk_gated_delta_rule for each packed sequence on its own (chunks never cross sequences).

    Returns (out [T, Hv, Dv] in q's dtype, final_state [B, Hv, Dk, Dv] fp32). A zero-length
    sequence keeps its initial state.
    """
    offsets = sequence_offsets(cu_seqlens, q.shape[0])
    B, Hv, Dk, Dv = len(offsets) - 1, v.shape[1], k.shape[-1], v.shape[-1]
    states = _initial_state(initial_state, B, Hv, Dk, Dv, v.device)
    out = v.new_empty(v.shape[0], Hv, Dv, dtype=q.dtype)
    final = []
    for i, (start, end) in enumerate(zip(offsets, offsets[1:])):
        part = (x[start:end].unsqueeze(0) for x in (q, k, v, g, beta))
        o, s = chunk_gated_delta_rule(*part, initial_state=states[i : i + 1], chunk_size=chunk_size,
                                      use_qk_l2norm=use_qk_l2norm)
        out[start:end] = o[0]
        final.append(s)
    return out, torch.cat(final)


def causal_conv1d_varlen(
    x: torch.Tensor,  # [T, C], sequences packed back to back (token-major like the projections)
    weight: torch.Tensor,  # [C, 1, K]
    cu_seqlens: torch.Tensor | list[int],  # [B + 1]
    conv_state: torch.Tensor | None = None,  # [B, C, K-1]; None: every sequence starts at zero
) -> tuple[torch.Tensor, torch.Tensor]:
    """causal_conv1d for each packed sequence on its own, so no window reaches into a neighbour.

    Returns (y [T, C], new_conv_state [B, C, K-1]).
    """
    offsets = sequence_offsets(cu_seqlens, x.shape[0])
    B, C, K = len(offsets) - 1, x.shape[1], weight.shape[-1]
    if conv_state is None:
        conv_state = x.new_zeros(B, C, K - 1)
    y = torch.empty_like(x)
    states = []
    for i, (start, end) in enumerate(zip(offsets, offsets[1:])):
        y_i, s = causal_conv1d(x[start:end].T, weight, conv_state[i])  # [C, L]
        y[start:end] = y_i.T
        states.append(s)
    return y, torch.stack(states)
