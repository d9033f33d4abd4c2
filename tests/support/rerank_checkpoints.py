"""Tiny random Qwen3-Reranker checkpoints: a plain Qwen3ForCausalLM (the released rerankers are nothing else),
with a tokenizer that has the tokens "yes" and "no" (the tiny BPE's corpus lacks them) and learned the
reranking prompt's words, so a pair's prompt stays short; and transformers' reference scores, computed as the
Qwen3-Reranker model card's "Transformers Usage" does (its strings written out here, not imported)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from checkpoints import CORPUS, TINY_VOCAB, build_hf_checkpoint, dense_config
from tokenizer_training import save_tokenizer, train_bpe

# The model card's strings, verbatim.
CARD_PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
               "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
CARD_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
CARD_TASK = "Given a web search query, retrieve relevant passages that answer the query"
RERANK_CORPUS = [CARD_PREFIX + f"<Instruct>: {CARD_TASK}\n<Query>: capital of France\n<Document>: Paris"
                 + CARD_SUFFIX + "yes", "yes\nno\nyes\nno"]


@lru_cache(maxsize=1)
def reranker_tokenizer() -> Any:
    return train_bpe(CORPUS * 4 + RERANK_CORPUS * 8, TINY_VOCAB)


def build_reranker_checkpoint(out_dir: Path, seed: int = 0, **overrides: Any) -> Path:
    build_hf_checkpoint(out_dir, "qwen3", dense_config(**overrides), seed=seed, with_tokenizer=False)
    save_tokenizer(reranker_tokenizer(), out_dir)
    return out_dir


def card_format_instruction(instruction: str | None, query: str, doc: str) -> str:
    if instruction is None:
        instruction = CARD_TASK
    return "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}".format(
        instruction=instruction, query=query, doc=doc)


def hf_rerank(model_dir: Path, query: str, documents: list[str], instruction: str | None = None
              ) -> tuple[list[float], list[int]]:
    """The card's scores (P(yes) at the last position, softmax over the "no" and "yes" logits) with transformers'
    AutoTokenizer and AutoModelForCausalLM, one pair at a time (no padding to get wrong), and each prompt's
    length."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    token_false_id = tokenizer.convert_tokens_to_ids("no")
    token_true_id = tokenizer.convert_tokens_to_ids("yes")
    prefix_tokens = tokenizer.encode(CARD_PREFIX, add_special_tokens=False)
    suffix_tokens = tokenizer.encode(CARD_SUFFIX, add_special_tokens=False)
    scores, lengths = [], []
    with torch.inference_mode():
        for doc in documents:
            pair = tokenizer([card_format_instruction(instruction, query, doc)], padding=False,
                             return_attention_mask=False)["input_ids"][0]
            ids = prefix_tokens + pair + suffix_tokens
            logits = model(torch.tensor([ids])).logits[:, -1, :]
            both = torch.stack([logits[:, token_false_id], logits[:, token_true_id]], dim=1)
            scores.append(torch.nn.functional.log_softmax(both, dim=1)[:, 1].exp().item())
            lengths.append(len(ids))
    return scores, lengths
