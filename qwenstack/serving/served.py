"""The local models a server answers for: each a tokenizer plus its own AsyncEngine, and the registry that
loads them in the background so /health can say 503 while they load.

Decisions:
- One engine (and one KV pool) per model: a request for one model never waits behind another's batch.
- Loading runs in a thread started when the app starts, not before: the HTTP port answers at once
  (503 + Retry-After on /health and on requests for a model still loading), as llama.cpp does.
- Sampling defaults come from the checkpoint's generation_config.json (qwenstack/generation_config.py).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import jinja2

from qwenstack.chat_template import compile_template
from qwenstack.engine.async_engine import AsyncEngine
from qwenstack.engine.engine import EngineConfig, LLMEngine, server_step_tokens
from qwenstack.generation_config import generation_defaults
from qwenstack.pooling_config import PoolingConfig
from qwenstack.resolve import served_name
from qwenstack.serving.config import ModelSpec, ServerConfig
from qwenstack.serving.errors import APIError
from qwenstack.serving.markers import SpecialTokenText
from qwenstack.tokenizer import Tokenizer, TooManyTokens, longest_token_chars

log = logging.getLogger("qwenstack.server")



@dataclass
class ServedModel:
    name: str
    engine: AsyncEngine
    tokenizer: Tokenizer
    max_model_len: int
    hf_config: dict[str, Any] = field(default_factory=dict)
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))
    owned_by: str = "qwenstack"
    image_processor: Any = None  # ImageProcessor of a vision-language model (preprocessor_config.json)
    video_processor: Any = None  # VideoProcessor of a model that takes video (serving/videos.py)
    asr: Any = None  # AsrPrompter of a model with an audio encoder (serving/audio.py)
    speech_stage: Any = None  # a Qwen3-Omni model's batched Talker loop (audio/omni_speech.py talker_stage)
    pooling: PoolingConfig = field(default_factory=PoolingConfig)  # how /v1/embeddings pools (pooling_config.py)
    embedding_only: bool = False  # an embedding model (Qwen3-Embedding) or a classifier: no generation
    labels: tuple[str, ...] | None = None  # a sequence classifier's (POST /classify); None for other models

    def check_generates(self) -> None:
        """400 for a generation request (chat, completions) to an embedding model or a classifier, naming what
        it does answer."""
        if self.labels is not None:
            rerank = ", POST /v1/rerank and /score" if len(self.labels) == 1 else ""
            raise APIError(400, f"'{self.name}' is a sequence-classification model: it answers POST /classify"
                                f"{rerank} and /v1/embeddings, not chat or completions", param="model",
                           code="model_not_generative")
        if self.embedding_only:
            raise APIError(400, f"'{self.name}' is an embedding model: it answers POST /v1/embeddings, not chat or "
                                f"completions", param="model", code="model_not_generative")

    @cached_property
    def special_token_text(self) -> SpecialTokenText:
        return SpecialTokenText(self.tokenizer)

    @cached_property
    def max_token_chars(self) -> int:
        """The most characters one token stands for (tokenizer.longest_token_chars), computed once."""
        return longest_token_chars(self.tokenizer)

    def warm_up(self) -> None:
        """Builds what the first chat request would otherwise build while every other request waits on the
        GIL: the chat template's compiled form, the special tokens' plain spellings (a copy of the tokenizer)
        and the longest token (~70 ms for the demo model's 4k vocabulary, far more for Qwen3's 151k)."""
        _ = self.special_token_text, self.max_token_chars
        if self.tokenizer.chat_template is not None:
            try:
                compile_template(self.tokenizer.chat_template)
            except jinja2.TemplateError as exc:  # each chat request reports it (a 400); said once here too
                log.warning("the chat template of %s does not compile (%s): chat requests will be refused; "
                            "give a working one with --chat-template", self.name, exc)

    def check_text_fits(self, text: str, param: str) -> None:
        """400 for a text that cannot fit the context whatever its tokens, without tokenizing it: a megabyte
        prompt is refused at the cost of len(), not of seconds of tokenizer time. (The factor 4 leaves room
        for normalizers that compose characters before tokenizing.)"""
        if len(text) > self.max_model_len * self.max_token_chars * 4:
            least = len(text) // (self.max_token_chars * 4)
            raise APIError(400, f"the prompt has at least {least} tokens, but this model's maximum context length "
                                f"is {self.max_model_len} tokens", param=param, code="context_length_exceeded")

    @property
    def prompt_token_limit(self) -> int:
        return self.max_model_len - 1  # the engine needs room for one generated token

    def too_long(self, tokens: int, param: str) -> APIError:
        return APIError(400, f"the prompt has {tokens} tokens, but this model's maximum context length is "
                             f"{self.max_model_len} tokens", param=param, code="context_length_exceeded")

    def encode_prompt(self, text: str, param: str) -> list[int]:
        """The prompt's token ids, or 400 for a prompt that cannot fit: from its length when that is certain
        (no tokenizing), else from the tokenizer's count, before the ids become a Python list."""
        self.check_text_fits(text, param)
        try:
            return self.tokenizer.encode(text, max_tokens=self.prompt_token_limit)
        except TooManyTokens as exc:
            raise self.too_long(exc.count, param) from None

    def check_ids_fit(self, ids: list[Any], param: str) -> None:
        """400 for a prompt of more token ids than the context holds (the engine says so too, but only after
        decoding them)."""
        if len(ids) > self.prompt_token_limit:
            raise self.too_long(len(ids), param)

    def check_token_ids(self, ids: list[int], param: str) -> None:
        """400 unless every id is in the vocabulary (before anything decodes them)."""
        vocab = self.engine.engine.vocab_size
        if not ids or (min(ids) >= 0 and max(ids) < vocab):  # C-speed scans; the culprit is looked for only if any
            return
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary (0..{vocab - 1})", param=param)

    @property
    def capabilities(self) -> list[str]:
        if self.labels is not None:
            return ["classification", "embedding"]
        if self.embedding_only:
            return ["embedding"]
        caps = ["chat", "completion"]
        thinker = self.hf_config.get("thinker_config") or {}
        if "vision_config" in self.hf_config or "vision_config" in thinker:
            caps.append("vision")
        if "audio_config" in self.hf_config or "audio_config" in thinker:
            caps.append("audio")
        if self.speech_stage is not None:
            caps.append("audio_output")  # answers aloud (modalities ["text", "audio"]): the page's voice mode
        return caps

    @property
    def voices(self) -> list[str] | None:
        """The voices a spoken answer may ask for (Qwen3-Omni's Talker speakers); None for other models."""
        if self.speech_stage is None:
            return None
        return self.speech_stage.engine.model.args.talker.voices


def serving_config(hf_config: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """Qwen3-Omni nests its multimodal fields under thinker_config; the serving layer reads them at the top
    (images, audio, video)."""
    thinker = hf_config.get("thinker_config")
    if hf_config.get("model_type") != "qwen3_omni_moe" or not isinstance(thinker, dict):
        return hf_config
    keys = ("vision_config", "audio_config", "image_token_id", "audio_token_id", "vision_start_token_id",
            "video_token_id")
    flat = {**hf_config, **{k: thinker[k] for k in keys if k in thinker}}
    if "vision_end_token_id" not in flat:  # absent from transformers' Thinker config: the tokenizer knows it
        flat["vision_end_token_id"] = thinker.get("vision_end_token_id", tokenizer.token_to_id("<|vision_end|>"))
    return flat


# Talker KV positions of a served Omni model: each spoken answer reserves its prompt plus its frame limit
# (max_speech_seconds / 0.08 s), so 16K holds four 5-minute answers at once, or many short ones; the rest wait.
# About 320 MB in bf16 for the released Talker (20 layers, 2 KV heads of 128).
TALKER_KV_POSITIONS = 16384


def build_served_model(name: str, model: Any, tokenizer: Tokenizer, engine_config: EngineConfig,
                       hf_config: dict[str, Any] | None = None, model_dir: Path | None = None,
                       replicas: list[LLMEngine] | None = None) -> ServedModel:
    """An engine around already-loaded weights (tests use this directly with tiny checkpoints). replicas:
    engines already built (data-parallel replicas, or one tensor-parallel engine) in place of one made here."""
    from qwenstack.serving.audio import asr_prompter_for
    from qwenstack.serving.images import image_processor_for
    from qwenstack.serving.videos import video_processor_for

    hf_config = serving_config(hf_config or {}, tokenizer)
    processor = image_processor_for(hf_config or {}, model_dir)  # before the engine thread starts
    video = video_processor_for(hf_config or {}, model_dir)
    asr = asr_prompter_for(model, tokenizer, model_dir)
    engines = replicas or [LLMEngine(model, tokenizer, tokenizer.eos_token_ids, engine_config)]
    engine = engines[0]
    served_engine: Any = AsyncEngine(engine, name=name)
    if len(engines) > 1:
        from qwenstack.serving.replicas import ReplicatedEngine

        served_engine = ReplicatedEngine([served_engine] + [AsyncEngine(e, name=f"{name}-dp{i}")
                                                            for i, e in enumerate(engines[1:], start=1)],
                                         engine.config.block_size)
    stage = None
    if getattr(model, "has_talker", False):
        from qwenstack.audio.omni_speech import talker_stage

        stage = talker_stage(model, TALKER_KV_POSITIONS)
    served = ServedModel(name, served_engine, tokenizer, engine.max_model_len, dict(hf_config or {}),
                         generation_defaults(model_dir), image_processor=processor, video_processor=video, asr=asr,
                         speech_stage=stage, embedding_only=engine.embedding_only, labels=engine.labels,
                         pooling=PoolingConfig.for_model(model_dir, engine.embedding_only and engine.labels is None))
    served.warm_up()
    return served


def load_served_model(spec: ModelSpec, kv_cache_memory: int) -> ServedModel:
    from qwenstack.distributed.config import ParallelConfig
    from qwenstack.loading import default_device, load

    parallel = ParallelConfig(spec.tensor_parallel_size, spec.expert_parallel, spec.data_parallel_size,
                              spec.distributed_executor_backend)
    config = EngineConfig(
        block_size=spec.block_size, kv_cache_memory=kv_cache_memory, kv_cache_dtype=spec.kv_cache_dtype,
        max_model_len=spec.max_model_len, max_num_seqs=spec.max_num_seqs,
        max_num_batched_tokens=spec.max_num_batched_tokens or server_step_tokens(spec.device or default_device()),
        max_waiting=spec.max_waiting, enable_prefix_caching=spec.enable_prefix_caching, seed=spec.seed,
        speculative_tokens=spec.speculative_tokens, speculative_method=spec.speculative_method,
        prompt_lookup_min=spec.prompt_lookup_min, prompt_lookup_max=spec.prompt_lookup_max,
    )
    replicas: list[LLMEngine] | None = None
    if not parallel.is_distributed and parallel.data_parallel_size == 1:
        loaded = load(spec.model, dtype=spec.dtype, device=spec.device, quantization=spec.quantization,
                      speculative=spec.speculative_tokens > 0 and spec.speculative_method == "mtp")
    else:
        replicas = []
        for _ in range(parallel.data_parallel_size):  # each replica: its own weights, KV pool and (TP) workers
            loaded, engine = _parallel_engine(spec, parallel, config)
            replicas.append(engine)
    if spec.chat_template is not None:
        loaded.tokenizer.chat_template = spec.chat_template
    return build_served_model(expected_name(spec), loaded.model, loaded.tokenizer, config, loaded.config,
                              loaded.path, replicas=replicas)


def _parallel_engine(spec: ModelSpec, parallel: Any, config: EngineConfig) -> tuple[Any, LLMEngine]:
    """One replica: on this process alone, or as the driver of its tensor-parallel ranks."""
    from qwenstack.loading import default_device, load
    from qwenstack.resolve import resolve_model

    if not parallel.is_distributed:
        loaded = load(spec.model, dtype=spec.dtype, device=spec.device, quantization=spec.quantization)
        return loaded, LLMEngine(loaded.model, loaded.tokenizer, loaded.tokenizer.eos_token_ids, config)
    from qwenstack.distributed.executor import start_parallel
    from qwenstack.distributed.worker import ModelSource

    path = str(resolve_model(spec.model)) if spec.model is not None else None
    if path is None:
        from qwenstack.loading import DEMO_MODEL_DIR

        path = str(DEMO_MODEL_DIR)
    source = ModelSource(path, spec.dtype, spec.quantization, spec.device or default_device())
    loaded, executor = start_parallel(source, parallel)
    return loaded, LLMEngine(loaded.model, loaded.tokenizer, loaded.tokenizer.eos_token_ids, config,
                             runner_factory=executor.make_runner)


Loader = Callable[[ModelSpec, int], ServedModel]


def kv_capacity(served: ServedModel) -> str:
    """The KV pool as vLLM's start-up log gives it: the tokens it holds, in which dtype, and how many sequences of
    max_model_len that makes ("" for an embedding model, which keeps no cache)."""
    if served.embedding_only:
        return ""
    engine = served.engine.engine
    tokens = engine.block_manager.num_blocks * engine.block_manager.block_size
    dtype = str(engine.runner.kv_dtype).removeprefix("torch.")
    return f"KV cache: {tokens:,} tokens in {dtype}, {tokens / max(served.max_model_len, 1):.1f}x max_model_len"


def expected_name(spec: ModelSpec) -> str:
    """The name a spec will be served under, known before loading (what `llm.load` will call it)."""
    if spec.name:
        return spec.name
    if spec.model is None:
        from qwenstack.loading import DEMO_MODEL_DIR

        return DEMO_MODEL_DIR.name
    path = Path(spec.model).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path.stem  # as qwenstack.from_gguf.served_name
    return served_name(spec.model)


class ModelRegistry:
    """Served models by name, and the state of the background load."""

    def __init__(self, models: list[ServedModel], retry_after_s: int = 1) -> None:
        self.models: dict[str, ServedModel] = {}
        self.loading: list[str] = []  # names (or model ids) still being loaded
        self.failed: str | None = None
        self.retry_after_s = retry_after_s
        # name -> capabilities of the app's models held elsewhere (speech, images, guard): set by the app
        self.other_models: Callable[[], dict[str, list[str]]] = dict
        self.loader: threading.Thread | None = None  # the background load, while config.models load
        self._shut_down: set[str] = set()
        self._lock = threading.Lock()
        for m in models:
            self._add(m)

    def _add(self, model: ServedModel) -> None:
        if model.name in self.models:
            raise ValueError(f"two models are served under the same name '{model.name}'")
        self.models[model.name] = model

    def resolve(self, name: str | None) -> ServedModel:
        """`get`, where a request may leave out the model when exactly one is served (vLLM's /tokenize)."""
        if name is None:
            if len(self.models) != 1:
                raise APIError(400, f"name the model ('model' field): {len(self.models)} are served here",
                               param="model", code="model_required")
            return next(iter(self.models.values()))
        return self.get(name)

    @property
    def ready(self) -> bool:
        return not self.loading and self.failed is None

    def get(self, name: str) -> ServedModel:
        model = self.models.get(name)
        if model is not None:
            return model
        if name in self.loading:
            raise APIError(503, f"model '{name}' is still loading", code="model_loading",
                           headers={"Retry-After": str(self.retry_after_s)})
        known = ", ".join(sorted(self.models)) or "none loaded yet"
        kind = self.other_models().get(name)
        if kind is not None:  # OpenAI's 404 for a model of the wrong kind says what it is
            raise APIError(404, f"the model '{name}' is a {'/'.join(kind) or 'different'} model: it does not serve "
                           f"this request (the language models served here: {known})", param="model",
                           code="model_not_found")
        raise APIError(404, f"the model '{name}' does not exist (served here: {known})", param="model",
                       code="model_not_found")

    def start_loading(self, config: ServerConfig, loader: Loader,
                      on_error: Callable[[BaseException], None] | None = None) -> threading.Thread | None:
        specs = list(config.models)
        if not specs:
            return None
        self.loading = [expected_name(s) for s in specs]

        def run() -> None:
            for spec, label in zip(specs, list(self.loading)):
                try:
                    model = loader(spec, config.kv_memory_for(spec))
                    with self._lock:
                        self._add(model)
                        self.loading.remove(label)
                    capacity = kv_capacity(model)
                    log.info("model '%s' ready (max_model_len=%d%s)", model.name, model.max_model_len,
                             f"; {capacity}" if capacity else "")
                except BaseException as exc:  # report it on /health and to the runner; never kill the app
                    # the traceback only with --debug: the message names the problem (a missing tensor, say)
                    log.error("loading model %s failed: %s", label, exc, exc_info=log.isEnabledFor(logging.DEBUG))
                    self.failed = f"loading model {label} failed: {exc}"
                    if on_error is not None:
                        on_error(exc)
                    return

        thread = threading.Thread(target=run, name="qwenstack-model-loader", daemon=True)
        thread.start()
        self.loader = thread
        return thread

    def shutdown(self) -> None:
        """Stops the engines of the models loaded so far (again after a late load: each engine once)."""
        for name, model in list(self.models.items()):
            if name not in self._shut_down:
                self._shut_down.add(name)
                model.engine.shutdown()
