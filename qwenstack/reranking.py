"""Qwen3-Reranker's prompts: one (query, document) pair -> the token ids whose next-token "yes" / "no" logits
judge it. Shared by the server's /v1/rerank and /score (serving/rerank.py) and the offline LLM.score.

    prompts = PairPrompts(tokenizer, max_model_len, instruction=None, max_token_chars=longest_token_chars(tokenizer))
    ids = prompts.ids(query, document)            # raises PromptTooLong
    all_ids = prompts.all(pairs)                  # raises PromptTooLong naming the pair, or the query alone
    yes_no = no_yes_ids(tokenizer)                # ["no", "yes"] ids, or None
    head = scoring_head(labels, embedding_only, tokenizer)   # those ids, or None for a one-label classifier
    scores = relevance(logits)                    # P(yes) of each pair from its pass's logits

The method is the Qwen3-Reranker model card's ("Transformers Usage") and vLLM's
examples/offline_inference/qwen3_reranker.py: system "Judge whether the Document meets ...", user
`<Instruct>: {instruction}\\n<Query>: {query}\\n<Document>: {doc}`, then the assistant turn opened with an empty
think block; the score is softmax([logit "no", logit "yes"]) at the last position, i.e. P(yes). A Qwen3-Reranker
converted to Qwen3ForSequenceClassification (one label, its row lm_head["yes"] - lm_head["no"]: vLLM's "seq-cls"
checkpoints) gets the same prompts, and sigmoid of its label's logit is the same P(yes); a one-label classifier
is taken as such a reranker, the only kind published. The pair text is
tokenized apart from the fixed prefix and suffix, as the card's process_inputs does. A query that already starts
with `<|im_start|>` was formatted by the client (vLLM's own Qwen3 rerank client sends it so): the prompt is then
the query's tokens and the document's, nothing added.
"""
from __future__ import annotations

import torch

from qwenstack.markup import TURN_START
from qwenstack.tokenizer import Tokenizer, TooManyTokens

DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
SYSTEM = ('Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
          'Note that the answer can only be "yes" or "no".')
PREFIX = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


class PromptTooLong(Exception):
    """A pair's prompt over the context; its message: how many tokens it has (or at least has). `pair`: which
    pair of a list (PairPrompts.all), None when a query alone, without any document, is too long."""

    def __init__(self, tokens: str, pair: int | None = None) -> None:
        super().__init__(tokens)
        self.pair = pair


class CannotRerank(Exception):
    """Why a model cannot score pairs; the message reads after the model's name ("'m' is an embedding ...")."""


def scoring_head(labels: tuple[str, ...] | None, embedding_only: bool, tokenizer: Tokenizer) -> list[int] | None:
    """What scores a pair's prompt: None for a one-label sequence classifier (its label's logit), else the
    ids of "no" and "yes" in the language-model head. CannotRerank for another classifier, an embedding
    model (no head) or a vocabulary without "yes" and "no"."""
    if labels is not None:
        if len(labels) == 1:
            return None
        raise CannotRerank(f"is a classifier of {len(labels)} labels ({', '.join(labels[:4])}): reranking needs "
                           f"one relevance label (a Qwen3-Reranker as Qwen3ForSequenceClassification); POST "
                           f"/classify gives its labels' probabilities")
    if embedding_only:
        raise CannotRerank("is an embedding model: it has no language-model head to judge yes or no with; "
                           "rerank with a Qwen3-Reranker checkpoint")
    ids = no_yes_ids(tokenizer)
    if ids is None:
        raise CannotRerank("cannot rerank: its vocabulary has no 'yes' and 'no' tokens to judge with")
    return ids


def relevance(logits: torch.Tensor) -> list[float]:
    """Each pair's P(yes) from its pass: [N, 2] logits of "no" and "yes" by softmax, [N, 1] a one-label
    classifier's logit by sigmoid (the same number: softmax([n, y])[1] = sigmoid(y - n))."""
    return label_probabilities(logits)[:, -1].tolist()


def label_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """A classifier's label probabilities [N, labels] from its logits, as vLLM's /classify and transformers'
    text-classification pipeline give them: softmax over the labels, sigmoid for a lone label."""
    return logits.sigmoid() if logits.shape[-1] == 1 else logits.softmax(dim=-1)


def pair_text(instruction: str, query: str, document: str) -> str:
    """The user turn's text of one pair (the card's format_instruction)."""
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"


def no_yes_ids(tokenizer: Tokenizer) -> list[int] | None:
    """The ids of the tokens "no" and "yes" (the card's convert_tokens_to_ids), or None when the vocabulary
    lacks one."""
    ids = [tokenizer.token_to_id("no"), tokenizer.token_to_id("yes")]
    return None if None in ids else ids  # type: ignore[return-value]


class PairPrompts:
    """Builds pairs' prompt ids for one tokenizer, context and instruction."""

    def __init__(self, tokenizer: Tokenizer, max_model_len: int, instruction: str | None,
                 max_token_chars: int) -> None:
        """max_token_chars: tokenizer.longest_token_chars(tokenizer), which callers compute once and keep."""
        self.tokenizer, self.limit = tokenizer, max_model_len
        self.instruction = DEFAULT_INSTRUCTION if instruction is None else instruction
        self.max_token_chars = max_token_chars
        self.prefix, self.suffix = tokenizer.encode(PREFIX), tokenizer.encode(SUFFIX)

    def ids(self, query: str, document: str) -> list[int]:
        """The pair's prompt; PromptTooLong when it cannot fit the context."""
        tok, limit = self.tokenizer, self.limit
        formatted = query.startswith(TURN_START)
        text = query + document if formatted else pair_text(self.instruction, query, document)
        if len(text) > limit * self.max_token_chars * 4:  # certain without tokenizing
            raise PromptTooLong(f"at least {len(text) // (self.max_token_chars * 4)}")
        room = limit if formatted else limit - len(self.prefix) - len(self.suffix)
        try:
            ids = (tok.encode(query, max_tokens=room) + tok.encode(document, max_tokens=room) if formatted
                   else self.prefix + tok.encode(text, max_tokens=room) + self.suffix)
        except TooManyTokens as exc:
            raise PromptTooLong(f"at least {exc.count}") from None
        if len(ids) > limit:
            raise PromptTooLong(str(len(ids)))
        return ids

    def all(self, pairs: list[tuple[str, str]]) -> list[list[int]]:
        """Each pair's prompt ids. PromptTooLong names the pair, or (pair None) a query that is too long with no
        document at all, checked first so the query is blamed rather than its first document."""
        for query in dict.fromkeys(q for q, _ in pairs):
            try:
                self.ids(query, "")
            except PromptTooLong as exc:
                raise PromptTooLong(str(exc), None) from None
        out = []
        for i, (query, document) in enumerate(pairs):
            try:
                out.append(self.ids(query, document))
            except PromptTooLong as exc:
                raise PromptTooLong(str(exc), i) from None
        return out


def pairs_of(queries: str | list[str], documents: str | list[str]) -> list[tuple[str, str]]:
    """vLLM's score pairing: one query against each document, or queries and documents one to one. Raises
    ValueError for lists of different lengths."""
    query_list = [queries] if isinstance(queries, str) else list(queries)
    document_list = [documents] if isinstance(documents, str) else list(documents)
    if len(query_list) == 1:
        query_list = query_list * len(document_list)
    if len(query_list) != len(document_list):
        raise ValueError(f"{len(query_list)} queries and {len(document_list)} documents: give one query for all, "
                         f"or one per document")
    return list(zip(query_list, document_list))
