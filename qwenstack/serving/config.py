"""What a server runs: its address and key, the local models it loads (each with its own engine and a share
of the KV memory) and the remote routes it forwards. Plain data; `run_server` and `create_app` read it."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from qwenstack.engine.engine import DEFAULT_KV_CACHE_MEMORY
from qwenstack.imagegen.limits import ImageRequestLimits

API_KEY_ENV = "QWENSTACK_API_KEY"
REMOTE_KEY_ENV = "QWENSTACK_REMOTE_API_KEY"


def _env_api_key() -> str | None:
    return os.environ.get(API_KEY_ENV) or None


@dataclass
class ModelSpec:
    """One local model to load. `model` is a local directory or a Hugging Face id; None means the demo model."""

    model: str | None = None
    name: str | None = None  # the id clients send as `model`; defaults to the directory name or the hub id
    dtype: str | None = None
    device: str | None = None
    quantization: str | None = None
    max_model_len: int | None = None
    kv_cache_memory: int | None = None  # bytes; None: this model's equal share of ServerConfig.kv_cache_memory
    kv_cache_dtype: str = "auto"  # auto: the model's dtype; fp8 (= fp8_e5m2): float8 e5m2 (engine/runner.py)
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None  # None: engine.server_step_tokens of the model's device
    max_waiting: int = 1024  # beyond this, requests get 429 with Retry-After
    enable_prefix_caching: bool = True
    seed: int = 0
    speculative_tokens: int = 0  # --speculative-tokens K: drafts per step
    speculative_method: str = "mtp"  # mtp: Qwen3-Next's head (checkpoints with mtp.*); ngram: prompt lookup, any model
    prompt_lookup_min: int = 2  # ngram: the shortest and longest suffixes looked up
    prompt_lookup_max: int = 4
    tensor_parallel_size: int = 1  # ranks one engine's model is split over (qwenstack.distributed)
    expert_parallel: bool = False  # MoE experts spread over those ranks
    data_parallel_size: int = 1  # replicas behind the one name, routed by prefix (serving/replicas.py)
    distributed_executor_backend: str = "mp"  # mp (this machine) or ray (a Ray cluster)
    chat_template: str | None = None  # --chat-template's text, used instead of the checkpoint's template


@dataclass
class RemoteSpec:
    """A model name served by another OpenAI-compatible API (the seed's hybrid of open and proprietary)."""

    name: str
    base_url: str  # e.g. https://api.example.com/v1
    model: str | None = None  # the upstream's model id, when it differs from `name`
    api_key_env: str | None = None  # None: QWENSTACK_REMOTE_<NAME>_API_KEY, then QWENSTACK_REMOTE_API_KEY

    @property
    def upstream_model(self) -> str:
        return self.model or self.name

    def api_key(self) -> str | None:
        if self.api_key_env:
            return os.environ.get(self.api_key_env) or None
        specific = "QWENSTACK_REMOTE_" + re.sub(r"[^A-Za-z0-9]", "_", self.name).upper() + "_API_KEY"
        return os.environ.get(specific) or os.environ.get(REMOTE_KEY_ENV) or None


def parse_remote(text: str) -> RemoteSpec:
    """`NAME=BASE_URL` or `NAME=BASE_URL#UPSTREAM_MODEL` (a fragment is never part of an API base URL)."""
    name, sep, rest = text.partition("=")
    if not sep or not name.strip() or not rest.strip():
        raise ValueError(f"--remote expects NAME=BASE_URL (optionally #UPSTREAM_MODEL), got {text!r}")
    url, _, upstream = rest.strip().partition("#")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--remote {name}: the base URL must start with http:// or https://, got {url!r}")
    return RemoteSpec(name.strip(), url.rstrip("/"), upstream.strip() or None)


@dataclass
class TranslationSpec:
    """A live-translation pipeline (`--translate asr=DIR,llm=DIR,tts=DIR[,name=ID][,voice=V]`): the model id
    clients name on /v1/realtime/translations and the three checkpoints it runs."""

    asr: str
    llm: str
    tts: str
    name: str = "live-translate"
    voice: str | None = None  # the default voice; None: the TTS model's first speaker
    kv_cache_memory: int = 256 * 1024 * 1024  # bytes of KV for each of the ASR and the LLM


def parse_translate(text: str) -> TranslationSpec:
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not value.strip() or key not in ("asr", "llm", "tts", "name", "voice"):
            raise ValueError(f"--translate expects asr=DIR,llm=DIR,tts=DIR[,name=ID][,voice=V], got {part!r}")
        if key in fields:
            raise ValueError(f"--translate names {key}= twice")
        fields[key] = value.strip()
    missing = [k for k in ("asr", "llm", "tts") if k not in fields]
    if missing:
        raise ValueError(f"--translate needs {', '.join(k + '=' for k in missing)} (got {text!r})")
    return TranslationSpec(**fields)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # loopback unless asked: the API runs models on the owner's hardware
    port: int = 8000
    api_key: str | None = field(default_factory=_env_api_key)
    # Web pages that may call the API from a browser (CORS), besides those served from this machine's own
    # loopback names (serving/middleware.py LOCAL_ORIGINS, always allowed); "*" allows every origin.
    allowed_origins: list[str] = field(default_factory=list)
    models: list[ModelSpec] = field(default_factory=list)
    remote: list[RemoteSpec] = field(default_factory=list)
    kv_cache_memory: int = DEFAULT_KV_CACHE_MEMORY  # bytes for all local models together, split equally
    default_chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {"enable_thinking": False}
    allow_local_image_paths: bool = False  # file:// image URLs read from the server's disk only when set
    allow_remote_image_urls: bool = False  # http(s) image URLs fetched by the server only when set
    allow_private_image_urls: bool = False  # ... and then from loopback/private/link-local addresses too
    max_images_per_request: int = 8
    max_image_bytes: int = 20 * 1024 * 1024  # encoded size of one image
    max_image_pixels: int = 50_000_000  # width * height of one decoded image, before resizing
    max_videos_per_request: int = 2
    max_video_bytes: int = 64 * 1024 * 1024  # encoded size of one video
    max_video_seconds: float = 600.0  # duration of one video
    max_video_frames: int = 64  # frames sampled from one video (at the model's fps)
    max_audio_bytes: int = 25 * 1024 * 1024  # one encoded audio file or part (OpenAI's upload limit)
    max_audio_seconds: float = 20 * 60.0  # one decoded audio file or part
    # Spoken chat answers (Qwen3-Omni): at most max_speech_seconds, and once the text is complete at most
    # speech_seconds_per_token a spoken token plus speech_tail_seconds (audio/omni_speech.py SpeechLimits).
    max_speech_seconds: float = 300.0
    speech_seconds_per_token: float = 0.64
    speech_tail_seconds: float = 2.0
    enable_ui: bool = True  # the chat page at / and its store under /api/
    ui_db_path: str | None = None  # SQLite file of the chat page; None: the store's default
    retry_after_s: int = 1  # what 429/503 answers tell clients to wait
    max_request_body_bytes: int = 64 * 1024 * 1024  # larger bodies get 413 (the chat store has its own limit)
    # False: special tokens a client types inside message content (<|im_start|>, ...) stay plain text, so a
    # user cannot forge a system turn; True: they become control tokens (transformers' and vLLM's behaviour).
    special_tokens_in_content: bool = False
    remote_timeout_s: float = 600.0
    log_level: str = "info"
    # Qwen3Guard (qwenstack.serving.moderation): a Gen or a Stream checkpoint (told apart by config.json),
    # optionally a Stream one beside a Gen one; the policy as "[prompt.|answer.]LEVEL=ACTION,...".
    guard_model: str | None = None
    guard_stream_model: str | None = None
    guard_policy: str | None = None
    guard_fail_open: bool = False  # unknown verdicts flagged instead of blocked
    guard_stream_window: int = 0  # answer tokens that may reach the client from the first blocked token on
    # /v1/responses: stored responses (None: responses.db beside the chat store), MCP servers by name
    # (http(s) URLs, or stdio:COMMAND only with mcp_allow_stdio), and the MCP timeouts and tool-loop limit.
    responses_db_path: str | None = None
    mcp_servers: dict[str, str] = field(default_factory=dict)
    mcp_allow_stdio: bool = False
    mcp_timeout_s: float = 30.0
    mcp_max_steps: int = 8
    # Image generation (qwenstack.serving.image_api): a Qwen-Image diffusers pipeline beside the chat models.
    image_model: str | None = None  # a directory or hub id with model_index.json
    image_model_name: str | None = None
    image_device: str | None = None  # None: cuda when present, else cpu
    image_offload: str = "auto"  # auto, none, model, sequential (diffusers' CPU offloading on CUDA)
    image_max_queued: int = 4  # image jobs waiting behind the running one; beyond: 429 with Retry-After
    image_nice: int = 10  # the image worker's OS priority offset (chat requests come first)
    image_yield_s: float = 0.25  # most an image job waits per denoising step while chat requests run
    image_limits: ImageRequestLimits = field(default_factory=ImageRequestLimits)
    # Qwen3-TTS checkpoints served on /v1/audio/speech (qwenstack.serving.speech), and where cloned voices live.
    speech_models: list[str] = field(default_factory=list)
    voices_dir: str | None = None  # None: ~/.cache/qwenstack/voices
    # Live translation (qwenstack.serving.translations): pipelines by model id, and each session's bounds.
    translations: list[TranslationSpec] = field(default_factory=list)
    translation_max_sessions: int = 16  # beyond: the socket answers an error event and closes
    translation_idle_timeout_s: float = 30.0  # a session whose client sends nothing this long is closed
    translation_send_timeout_s: float = 10.0  # a client that takes longer to accept one event is dropped

    def kv_memory_for(self, spec: ModelSpec) -> int:
        if spec.kv_cache_memory is not None:
            return spec.kv_cache_memory
        explicit = sum(s.kv_cache_memory or 0 for s in self.models)
        shared = [s for s in self.models if s.kv_cache_memory is None]
        return max(0, self.kv_cache_memory - explicit) // max(1, len(shared))
