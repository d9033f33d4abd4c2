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
from qwenstack.engine.outputs import RequestOutput, ScoringOutput, ScoringRequestOutput
from qwenstack.engine.params import SamplingParams
from qwenstack.generation_config import generation_defaults
from qwenstack.loading import DEMO_MODEL_DIR, DEMO_NOTICE, LoadedModel, default_device, load  # noqa: F401 (re-exported)
from qwenstack.pooling_config import PoolingConfig
from qwenstack.tokenizer import longest_token_chars


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
        **engine_options: Any,
    ) -> None:
        self.loaded = load(model, dtype=dtype, device=device, quantization=quantization,
                           speculative=engine_options.get("speculative_tokens", 0) > 0
                           and engine_options.get("speculative_method", "mtp") == "mtp")
        config = EngineConfig(max_model_len=max_model_len, enable_prefix_caching=enable_prefix_caching, **engine_options)
        if kv_cache_memory is not None:
            config.kv_cache_memory = kv_cache_memory
        self.tokenizer = self.loaded.tokenizer
        # What generate() and chat() use without SamplingParams: the checkpoint's generation_config.json
        # (do_sample false is greedy, as in transformers), as vLLM's get_default_sampling_params.
        self.default_sampling_params = SamplingParams(**generation_defaults(self.loaded.path))
        self.engine = LLMEngine(self.loaded.model, self.tokenizer, self.tokenizer.eos_token_ids, config)
        self.pooling = PoolingConfig.for_model(self.loaded.path, self.engine.embedding_only)  # as the server

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[list[int]] | list[int],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Prompts as strings or token-id lists; one SamplingParams for all or one per prompt."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        token_prompts = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        if sampling_params is None:
            params: list[SamplingParams] = [self.default_sampling_params for _ in token_prompts]
        elif isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(token_prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(token_prompts):
                raise ValueError("give one SamplingParams for all prompts or exactly one per prompt")
        outputs = self.engine.generate_all(token_prompts, params)
        for out, p in zip(outputs, prompts):
            out.prompt = p if isinstance(p, str) else None
        return outputs

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | None = None,
        *,
        tools: list[dict[str, Any]] | None = None,
        enable_thinking: bool = True,
        **template_kwargs: Any,
    ) -> list[RequestOutput]:
        """Messages as the server takes them: content a string or a list of parts, including images
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,..." or a local path}}) for a
        vision-language model. Stop strings act on the answer, not on the think block."""
        from qwenstack.chat_inputs import ChatModelView, has_media, render_media_chat
        from qwenstack.serving.chat import thinking_phase

        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts, token_prompts, inputs = [], [], []
        view = ChatModelView(self.loaded.name, self.tokenizer, self.loaded.config, self.loaded.path)
        for c in conversations:
            kwargs = {"enable_thinking": enable_thinking, **template_kwargs}
            if has_media(c):  # type: ignore[arg-type]
                prompt, ids, mm = render_media_chat(view, c, tools=tools, **kwargs)  # type: ignore[arg-type]
            else:
                prompt = self.tokenizer.apply_chat_template(c, tools=tools, add_generation_prompt=True,  # type: ignore[arg-type]
                                                            **kwargs)
                ids, mm = self.tokenizer.encode(prompt), None
            prompts.append(prompt)
            token_prompts.append(ids)
            inputs.append(mm)
        base = sampling_params or self.default_sampling_params
        params = [dataclasses.replace(base, logits_processors=list(base.logits_processors),
                                      reasoning=thinking_phase(p, enable_thinking).markers()) for p in prompts]
        outputs = self.engine.generate_all(token_prompts, params, inputs)
        for out, p in zip(outputs, prompts):
            out.prompt = p
        return outputs

    def embed(self, inputs: str | Sequence[str] | Sequence[list[int]] | list[int], *, dimensions: int | None = None,
              prompt_name: str | None = None) -> torch.Tensor:
        """Embeddings [len(inputs), dimensions or hidden] (float32) of texts or token-id lists, as POST
        /v1/embeddings computes them: the last token's final hidden state (texts encoded with the tokenizer's
        special tokens and the model's end token), the first `dimensions` values, L2-normalized where the model
        normalizes. `prompt_name` puts one of the checkpoint's named instructions (e.g. "query") before each
        text. Raises RequestError for an empty input, one longer than the context, or an unknown prompt_name."""
        from qwenstack.errors import RequestError

        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
            inputs = [inputs]  # type: ignore[list-item]
        prefix = self.pooling.instruction(prompt_name)
        prompts = [self.pooling.with_end_token(self.tokenizer.encode(prefix + p, add_special_tokens=True),
                                               self.tokenizer) if isinstance(p, str) else list(p) for p in inputs]
        if dimensions is not None and not 0 < dimensions <= self.loaded.model.args.hidden_size:
            raise RequestError(f"dimensions must be 1..{self.loaded.model.args.hidden_size}, got {dimensions}")
        return matryoshka(self.engine.embed(prompts), dimensions, self.pooling.normalize)

    @functools.cached_property
    def _longest_token_chars(self) -> int:  # a scan of the whole vocabulary: once, not per score() call
        return longest_token_chars(self.tokenizer)

    def score(self, queries: str | Sequence[str], documents: str | Sequence[str], *,
              instruction: str | None = None) -> list[ScoringRequestOutput]:
        """Qwen3-Reranker relevance, as POST /score computes it (qwenstack/reranking.py): P(yes) of each
        (query, document) pair, one query against every document or queries and documents one to one (vLLM's
        LLM.score pairing and output shape: `[o.outputs.score for o in llm.score(q, docs)]`). `instruction`
        replaces the default task line. Raises RequestError for lists of different lengths, a pair longer than
        the context, or a model that cannot judge (an embedding model, a vocabulary without "yes"/"no")."""
        from qwenstack.errors import RequestError
        from qwenstack.reranking import PairPrompts, PromptTooLong, no_yes_ids, pairs_of

        try:
            pairs = pairs_of(queries if isinstance(queries, str) else list(queries),
                             documents if isinstance(documents, str) else list(documents))
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        token_ids = no_yes_ids(self.tokenizer)
        if token_ids is None:
            raise RequestError("this model cannot rerank: its vocabulary has no 'yes' and 'no' tokens to judge with")
        try:
            prompts = PairPrompts(self.tokenizer, self.engine.max_model_len, instruction,
                                  self._longest_token_chars).all(pairs)
        except PromptTooLong as exc:
            which = "a query's" if exc.pair is None else f"pair {exc.pair}'s"
            raise RequestError(f"{which} reranking prompt has {exc} tokens, but this model's maximum context "
                               f"length is {self.engine.max_model_len} tokens") from None
        scores = self.engine.last_token_logits(prompts, token_ids).softmax(dim=-1)[:, 1].tolist() if prompts else []
        return [ScoringRequestOutput(f"score-{i}", ids, ScoringOutput(value))
                for i, (ids, value) in enumerate(zip(prompts, scores))]
