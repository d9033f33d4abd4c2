"""Qwen3-Next's multi-token-prediction (MTP) head, the draft model of its speculative decoding.

Checkpoint keys (transformers ignores them; vLLM's `qwen3_next_mtp.py` is the reference for their use):
`mtp.fc.weight [H, 2H]`, `mtp.pre_fc_norm_embedding.weight`, `mtp.pre_fc_norm_hidden.weight`,
`mtp.layers.0.*` (one decoder layer, always full attention, MLP chosen like main layer 0's: the sparse MoE
with its shared expert on the released models) and `mtp.norm.weight`. The embeddings and the lm_head are the
main model's.

    h = fc(cat[norm_e(embed(t_{j+1})), norm_h(h_j)]) -> layer -> norm  (-> the main model's lm_head)

At position j the head reads the main model's final (normed) hidden state h_j, the one its lm_head maps to
the logits of t_{j+1}, together with the token t_{j+1} itself, and predicts t_{j+2}. Chained drafting feeds
its own output hidden state back in place of h_j. All four norms are zero-centred, as the main model's.

The head's attention layer keeps keys and values for every position like any attention layer (the engine
gives it a paged KV tensor of its own, sharing the sequence's block table), so drafting one more token costs
one token through one layer.

Loading is strict and opt-in: `load_mtp_head` attaches the head as `model.mtp` only when speculative decoding
asks for it (a checkpoint without `mtp.*` tensors is then an error that says so); otherwise the main model's
loader keeps ignoring `mtp.*`.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from qwenstack.errors import CheckpointError
from qwenstack.models.attention import AttentionBatch
from qwenstack.models.base import KVCacheSpec
from qwenstack.models.layers import RMSNorm
from qwenstack.models.qwen3_next import HybridDecoderLayer, Qwen3NextArgs, Qwen3NextForCausalLM

MTP_PREFIX = "mtp."


class MTPHead(nn.Module):
    def __init__(self, args: Qwen3NextArgs) -> None:
        super().__init__()
        h, eps = args.hidden_size, args.rms_norm_eps
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.pre_fc_norm_embedding = RMSNorm(h, eps, zero_centered=True)
        self.pre_fc_norm_hidden = RMSNorm(h, eps, zero_centered=True)
        # The layer is full attention whatever layer_types[0] says: build it from args that say so.
        full = copy.copy(args)
        full.layer_types = ["full_attention"] * args.num_hidden_layers
        self.layers = nn.ModuleList([HybridDecoderLayer(full, 0)])
        self.norm = RMSNorm(h, eps, zero_centered=True)
        self.args = args

    def forward(
        self,
        embeds: torch.Tensor,  # [T, H]: the main model's embeddings of t_{j+1}
        hidden: torch.Tensor,  # [T, H]: the main model's final hidden state at j (or the head's own, chained)
        positions: torch.Tensor,  # [T]: j
        batch: AttentionBatch,
        kv_cache: torch.Tensor | None,  # the head's own paged KV [2, blocks, block_size, kv_heads, head_dim]
    ) -> torch.Tensor:  # [T, H], normed: the main model's compute_logits maps it to draft logits
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden)], dim=-1))
        for layer in self.layers:
            x = layer(x, positions, batch, kv_cache, None)  # a full-attention layer reads no state index
        return self.norm(x)

    def kv_cache_spec(self) -> KVCacheSpec:
        a = self.args
        assert a.num_key_value_heads is not None and a.head_dim is not None
        return KVCacheSpec(len(self.layers), a.num_key_value_heads, a.head_dim)


class _Holder(nn.Module):
    """Gives the head its checkpoint names (mtp.*) for the strict loader, which then ignores the rest."""

    ignored_checkpoint_patterns = (r"(?!mtp\.).*",)

    def __init__(self, head: MTPHead) -> None:
        super().__init__()
        self.mtp = head


def load_mtp_head(model: nn.Module, model_dir: str | Path, dtype: torch.dtype,
                  device: torch.device | str = "cpu") -> MTPHead:
    """Builds the MTP head of a loaded Qwen3-Next model from its checkpoint, attaches it as `model.mtp`."""
    from qwenstack.weights import checkpoint_tensors, load_weights

    if not isinstance(model, Qwen3NextForCausalLM):
        raise CheckpointError(f"speculative decoding uses a multi-token-prediction head, which only Qwen3-Next "
                              f"checkpoints carry; this model is {type(model).__name__} (prompt lookup drafts "
                              f"for any model: speculative method ngram)")
    if not any(name.startswith(MTP_PREFIX) for name in checkpoint_tensors(model_dir)):
        raise CheckpointError(f"speculative decoding needs the checkpoint's multi-token-prediction head (mtp.* "
                              f"tensors), and {model_dir} has none")
    with torch.device("meta"):
        holder = _Holder(MTPHead(model.args))
    load_weights(holder, model_dir, dtype, device)  # strict: every mtp.* parameter, no unknown mtp.* tensor
    head = holder.mtp.eval()
    model.mtp = head
    return head


def mtp_checkpoint_tensors(head: MTPHead) -> dict[str, torch.Tensor]:
    """The head's weights under their checkpoint names (mtp.*), e.g. to write a test checkpoint."""
    from qwenstack.weights import checkpoint_state_dict

    return dict(checkpoint_state_dict(_Holder(head)))


__all__ = ["MTPHead", "load_mtp_head", "mtp_checkpoint_tensors"]
