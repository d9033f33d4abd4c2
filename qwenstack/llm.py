"""The offline Python API, familiar to vLLM users:

    llm = LLM("Qwen/Qwen3-0.6B")            # or a local directory; no argument: the bundled demo model
    llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=16))
    llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=64), enable_thinking=False)
    LLM("Qwen/Qwen3-Embedding-0.6B").embed(["What is the capital of China?"], prompt_name="query")
    LLM("Qwen/Qwen3-Reranker-0.6B").score("What is the capital of China?", ["Beijing is ...", "Gravity ..."])
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Sequence

import torch

from qwenstack.engine.embed import matryoshka
from qwenstack.engine.engine import EngineConfig, LLMEngine
from qwenstack.engine.outputs import (ClassificationOutput, ClassificationRequestOutput, EmbeddingOutput,
                                      EmbeddingRequestOutput, RequestOutput, ScoringOutput, ScoringRequestOutput)
from qwenstack.engine.params import SamplingParams
from qwenstack.errors import RequestError
from qwenstack.generation_config import generation_defaults
from qwenstack.loading import DEMO_MODEL_DIR, DEMO_NOTICE, LoadedModel, default_device, load  # noqa: F401 (re-exported)
from qwenstack.pooling_config import PoolingConfig
from qwenstack.tokenizer import Tokenizer, longest_token_chars


PromptInput = str | list[int] | dict[str, Any]


def prompt_items(prompts: PromptInput | Sequence[PromptInput]) -> list[str | list[int]]:
    """The prompts as texts and token-id lists: one prompt or a list of them, each a string, a list of token ids,
    or vLLM's TextPrompt / TokensPrompt dicts ({"prompt": text} / {"prompt_token_ids": ids})."""
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]  # type: ignore[list-item]
    items: list[str | list[int]] = []
    for i, p in enumerate(prompts):  # type: ignore[union-attr]
        if isinstance(p, dict):
            unknown = set(p) - {"prompt", "prompt_token_ids"}
            if unknown or len(p) != 1:
                raise RequestError(f"prompt {i}: a prompt dict has one key, 'prompt' (text) or 'prompt_token_ids' "
                                   f"(vLLM's TextPrompt / TokensPrompt), got {sorted(p)}")
            p = p.get("prompt", p.get("prompt_token_ids"))
        if isinstance(p, str):
            items.append(p)
        elif isinstance(p, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            items.append(list(p))
        else:
            raise RequestError(f"prompt {i} must be a string, a list of token ids or a prompt dict, got "
                               f"{type(p).__name__}")
    return items


class LLM:
    def __init__(
        self,
        model: str | Path | None = None,
        *,
        dtype: str | torch.dtype | None = None,
        device: str | None = None,
        max_model_len: int | None = None,
        kv_cache_memory: int | None = None,
        enable_prefix_caching: bool = True,
        quantization: str | None = None,
        tokenizer: str | Path | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float | None = None,
        trust_remote_code: bool = False,
        enforce_eager: bool = False,
        **engine_options: Any,
    ) -> None:
        """vLLM's constructor options are taken: dtype "auto" is bfloat16; gpu_memory_utilization,
        trust_remote_code and enforce_eager change nothing here (the KV cache takes kv_cache_memory bytes, every
        architecture is native code, nothing is captured); tensor_parallel_size above 1 and a tokenizer other
        than the checkpoint's are refused, since this API runs one process on the checkpoint's own tokenizer."""
        if tensor_parallel_size != 1:
            raise ValueError("the offline LLM runs in one process: for tensor parallelism serve the model with "
                             f"`qwenstack serve MODEL -tp {tensor_parallel_size}`")
        if tokenizer is not None and str(tokenizer) != str(model):
            raise ValueError("a tokenizer apart from the checkpoint's is not supported: its own is used")
        if max_model_len is not None and max_model_len < 1:
            raise ValueError(f"max_model_len must be at least 1, got {max_model_len}")
        self.loaded = load(model, dtype=dtype, device=device, quantization=quantization,
                           speculative=engine_options.get("speculative_tokens", 0) > 0
                           and engine_options.get("speculative_method", "mtp") == "mtp")
        config = EngineConfig(max_model_len=max_model_len, enable_prefix_caching=enable_prefix_caching,
                              **engine_options)
        if kv_cache_memory is not None:
            config.kv_cache_memory = kv_cache_memory
        self.tokenizer = self.loaded.tokenizer
        # What generate() and chat() use without SamplingParams: the checkpoint's generation_config.json
        # (do_sample false is greedy, as in transformers), as vLLM's get_default_sampling_params.
        self.default_sampling_params = SamplingParams(**generation_defaults(self.loaded.path))
        self.engine = LLMEngine(self.loaded.model, self.tokenizer, self.tokenizer.eos_token_ids, config)
        # As the server: a classifier's embeddings are its backbone's last token, like a chat model's.
        embedding_checkpoint = self.engine.embedding_only and self.engine.labels is None
        self.pooling = PoolingConfig.for_model(self.loaded.path, embedding_checkpoint)

    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """The checkpoint's generation_config.json as SamplingParams (what generate() and chat() use without)."""
        return dataclasses.replace(self.default_sampling_params)

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,  # vLLM's; accepted, no progress bar is drawn
    ) -> list[RequestOutput]:
        """Prompts as strings, token-id lists or vLLM's dicts ({"prompt": text} or {"prompt_token_ids": ids});
        one SamplingParams for all or one per prompt."""
        items = prompt_items(prompts)
        token_prompts = [self.tokenizer.encode(p) if isinstance(p, str) else p for p in items]
        params = self._within_context(token_prompts, self._params_for(sampling_params, len(token_prompts)))
        outputs = self.engine.generate_all(token_prompts, params)
        for out, p in zip(outputs, items):
            out.prompt = p if isinstance(p, str) else self.tokenizer.decode(p)
        return outputs

    def _within_context(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[SamplingParams]:
        """max_tokens cut to the room each prompt leaves in the context, as vLLM's offline LLM stops a sequence
        at max_model_len ("length"); the server answers a 400 instead, as OpenAI's API does. A prompt that fills
        the context alone is still refused by the engine."""
        out = []
        for prompt, p in zip(prompts, params):
            room = self.engine.max_model_len - len(prompt)
            fits = p.max_tokens is None or room < 1 or p.max_tokens <= room
            out.append(p if fits else dataclasses.replace(p, max_tokens=room, min_tokens=min(p.min_tokens, room),
                                                          logits_processors=list(p.logits_processors)))
        return out

    def _params_for(self, sampling_params: SamplingParams | Sequence[SamplingParams] | None,
                    count: int) -> list[SamplingParams]:
        """One SamplingParams per prompt: the checkpoint's defaults, one for all, or one each."""
        if sampling_params is None:
            return [self.default_sampling_params] * count
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * count
        params = list(sampling_params)
        if len(params) != count or not all(isinstance(p, SamplingParams) for p in params):
            raise RequestError("give one SamplingParams for all prompts or exactly one per prompt")
        return params

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,  # vLLM's; accepted, no progress bar is drawn
        *,
        tools: list[dict[str, Any]] | None = None,
        enable_thinking: bool | None = None,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        **template_kwargs: Any,
    ) -> list[RequestOutput]:
        """One conversation or a list of them, messages as the server takes them: content a string or a list of
        parts, including images ({"type": "image_url", "image_url": {"url": "data:image/png;base64,..." or a
        local path}}) for a vision-language model. vLLM's keywords: chat_template (a template's source),
        chat_template_kwargs (e.g. {"enable_thinking": False}; `enable_thinking=` says the same),
        add_generation_prompt, continue_final_message (go on writing the last assistant message). Stop strings
        act on the answer, not on the think block."""
        from qwenstack.chat_inputs import ChatModelView, has_media, render_media_chat
        from qwenstack.chat_template import cut_after_final_message
        from qwenstack.serving.chat import thinking_phase

        if isinstance(messages, (str, dict)) or not all(isinstance(c, (list, dict)) for c in messages):
            raise RequestError("messages must be a conversation (a list of {'role', 'content'} dicts) or a list of "
                               "conversations")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        kwargs = {**(chat_template_kwargs or {}), **template_kwargs}
        if enable_thinking is not None:
            kwargs["enable_thinking"] = enable_thinking
        kwargs.setdefault("enable_thinking", True)
        if chat_template is not None:
            kwargs["chat_template"] = chat_template
        add_generation_prompt = add_generation_prompt and not continue_final_message
        prompts, token_prompts, inputs = [], [], []
        view = ChatModelView(self.loaded.name, self.tokenizer, self.loaded.config, self.loaded.path)
        for c in conversations:
            if has_media(c):  # type: ignore[arg-type]
                if continue_final_message:
                    raise RequestError("continue_final_message is not supported with images or video")
                prompt, ids, mm = render_media_chat(view, c, tools=tools,  # type: ignore[arg-type]
                                                    add_generation_prompt=add_generation_prompt, **kwargs)
            else:
                prompt = self.tokenizer.apply_chat_template(c, tools=tools,  # type: ignore[arg-type]
                                                            add_generation_prompt=add_generation_prompt, **kwargs)
                if continue_final_message:
                    last = c[-1] if c else {}  # type: ignore[index]
                    cut = cut_after_final_message(prompt, last.get("content")) if last.get("role") == "assistant" \
                        else None
                    if cut is None:
                        raise RequestError("continue_final_message needs the last message to be the assistant's, "
                                           "with text to continue")
                    prompt = cut
                ids, mm = self.tokenizer.encode(prompt), None
            prompts.append(prompt)
            token_prompts.append(ids)
            inputs.append(mm)
        bases = self._params_for(sampling_params, len(prompts))
        params = [dataclasses.replace(base, logits_processors=list(base.logits_processors),
                                      reasoning=thinking_phase(p, kwargs["enable_thinking"],
                                                               continue_final_message).markers())
                  for base, p in zip(bases, prompts)]
        outputs = self.engine.generate_all(token_prompts, self._within_context(token_prompts, params), inputs)
        for out, p in zip(outputs, prompts):
            out.prompt = p
        return outputs

    def embed(self, inputs: PromptInput | Sequence[PromptInput], use_tqdm: bool = True, *,
              dimensions: int | None = None, prompt_name: str | None = None) -> list[EmbeddingRequestOutput]:
        """Embeddings of texts or token-id lists as POST /v1/embeddings computes them, in vLLM's shape
        (`[o.outputs.embedding for o in llm.embed(texts)]`, float32 values as lists): the last token's final
        hidden state (texts encoded with the tokenizer's special tokens and the model's end token), the first
        `dimensions` values, L2-normalized where the model normalizes. `prompt_name` puts one of the
        checkpoint's named instructions (e.g. "query") before each text. Raises RequestError for an empty
        input, one longer than the context, or an unknown prompt_name."""
        prefix = self.pooling.instruction(prompt_name)
        prompts = [self.pooling.with_end_token(self.tokenizer.encode(prefix + p, add_special_tokens=True),
                                               self.tokenizer) if isinstance(p, str) else p
                   for p in prompt_items(inputs)]
        hidden = self.loaded.model.args.hidden_size
        if dimensions is not None and not 0 < dimensions <= hidden:
            raise RequestError(f"dimensions must be 1..{hidden}, got {dimensions}")
        if not prompts:
            return []
        vectors = matryoshka(self.engine.embed(prompts), dimensions, self.pooling.normalize).tolist()
        return [EmbeddingRequestOutput(f"embed-{i}", ids, EmbeddingOutput(row))
                for i, (ids, row) in enumerate(zip(prompts, vectors))]

    @functools.cached_property
    def _longest_token_chars(self) -> int:  # a scan of the whole vocabulary: once, not per score() call
        return longest_token_chars(self.tokenizer)

    def score(self, queries: str | Sequence[str], documents: str | Sequence[str], use_tqdm: bool = True, *,
              instruction: str | None = None) -> list[ScoringRequestOutput]:
        """Qwen3-Reranker relevance, as POST /score computes it (qwenstack/reranking.py): P(yes) of each
        (query, document) pair, one query against every document or queries and documents one to one (vLLM's
        LLM.score pairing and output shape: `[o.outputs.score for o in llm.score(q, docs)]`). `instruction`
        replaces the default task line. Raises RequestError for lists of different lengths, a pair longer than
        the context, or a model that cannot judge (an embedding model, a vocabulary without "yes"/"no", a
        classifier of more than one label). A one-label classifier (a Qwen3-Reranker as
        Qwen3ForSequenceClassification) scores the same prompts by sigmoid of its label."""
        from qwenstack.reranking import CannotRerank, PairPrompts, PromptTooLong, pairs_of, relevance, scoring_head

        try:
            pairs = pairs_of(queries if isinstance(queries, str) else list(queries),
                             documents if isinstance(documents, str) else list(documents))
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        try:
            token_ids = scoring_head(self.engine.labels, self.engine.embedding_only, self.tokenizer)
        except CannotRerank as exc:
            raise RequestError(f"this model {exc}") from None
        try:
            prompts = PairPrompts(self.tokenizer, self.engine.max_model_len, instruction,
                                  self._longest_token_chars).all(pairs)
        except PromptTooLong as exc:
            which = "a query's" if exc.pair is None else f"pair {exc.pair}'s"
            raise RequestError(f"{which} reranking prompt has {exc} tokens, but this model's maximum context "
                               f"length is {self.engine.max_model_len} tokens") from None
        if not prompts:
            return []
        scores = relevance(self.engine.classify(prompts) if token_ids is None
                           else self.engine.last_token_logits(prompts, token_ids))
        return [ScoringRequestOutput(f"score-{i}", ids, ScoringOutput(value))
                for i, (ids, value) in enumerate(zip(prompts, scores))]

    def classify(self, inputs: PromptInput | Sequence[PromptInput], use_tqdm: bool = True
                 ) -> list[ClassificationRequestOutput]:
        """A sequence classifier's label probabilities of texts or token-id lists, as POST /classify computes
        them (vLLM's LLM.classify shape: `out.outputs.probs`, in the order of `self.labels`). Texts are encoded
        with the tokenizer's special tokens and nothing appended. Raises RequestError for a model without a
        classification head, an empty input or one longer than the context."""
        from qwenstack.reranking import label_probabilities

        prompts = [self.tokenizer.encode(p, add_special_tokens=True) if isinstance(p, str) else list(p)
                   for p in prompt_items(inputs)]
        self.engine.check_classifying(prompts)
        probs = label_probabilities(self.engine.classify(prompts)).tolist() if prompts else []
        return [ClassificationRequestOutput(f"classify-{i}", ids, ClassificationOutput(row))
                for i, (ids, row) in enumerate(zip(prompts, probs))]

    @property
    def labels(self) -> tuple[str, ...] | None:
        """A sequence classifier's label names, in the order of classify's probabilities; None for other models."""
        return self.engine.labels
