"""`qwenstack serve [MODEL ...]`: the OpenAI-compatible server (qwenstack.serving.app) and the chat page.

The arguments become a `qwenstack.serving.config.ServerConfig` (one `ModelSpec` per MODEL, one `RemoteSpec`
per --remote) and `run_server` runs it. `serve_config_from_args` gives the same configuration as plain
values, so it can be tested and printed without importing torch's side of the server.
"""
from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING, Any

from qwenstack.commands import Command
from qwenstack.commands._common import (
    add_chat_template_option, add_model_options, chat_template_of, parse_bytes, positive_float, positive_int,
)

if TYPE_CHECKING:
    from qwenstack.serving.config import ServerConfig

log = logging.getLogger("qwenstack.serve")

EPILOG = """examples:
  qwenstack serve                                   # the bundled demo model on http://127.0.0.1:8000
  qwenstack serve Qwen/Qwen3-0.6B Qwen/Qwen3-1.7B --kv-cache-memory 4GiB
  qwenstack serve Qwen/Qwen3-8B --host 0.0.0.0 --api-key "$KEY" --remote qwen-max=https://example.com/v1
  qwenstack serve Qwen/Qwen3-8B --guard Qwen/Qwen3Guard-Gen-0.6B --guard-stream Qwen/Qwen3Guard-Stream-0.6B \
      --guard-policy controversial=block --guard-stream-window 4
  qwenstack serve Qwen/Qwen3-8B --image-model Qwen/Qwen-Image-Edit-2509   # + /v1/images/edits

Several models are served at once, each with its own engine and an equal share of --kv-cache-memory; a
request picks one by its `model` field. With no MODEL and no --remote, the bundled demo model is served.
The API key may also come from QWENSTACK_API_KEY; a remote's key from QWENSTACK_REMOTE_<NAME>_API_KEY or
QWENSTACK_REMOTE_API_KEY."""


def port_number(text: str) -> int:
    port = positive_int(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"port {port} is above 65535")
    return port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    add_model_arguments(parser, "serve")
    net = parser.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; 0.0.0.0 for all)")
    net.add_argument("--port", type=port_number, default=8000, help="port (default: 8000)")
    net.add_argument("--api-key", default=None,
                     help="require this bearer key on API requests (default: $QWENSTACK_API_KEY, else none)")
    net.add_argument("--allowed-origins", nargs="+", default=None, metavar="ORIGIN",
                     help="web pages allowed to call the API from a browser (CORS), e.g. https://chat.example.com, "
                          "or '*' for any; pages on localhost / 127.0.0.1 are always allowed")
    net.add_argument("--remote", action="append", default=[], metavar="NAME=BASE_URL[#UPSTREAM_MODEL]",
                     help="route requests for model NAME to another OpenAI-compatible API (repeatable)")
    net.add_argument("--remote-timeout", type=float, default=None, metavar="SECONDS",
                     help="timeout of requests to remotes (default: 600)")
    add_behaviour_arguments(parser)
    add_vllm_arguments(parser)


# vLLM's serve flags that a copied vLLM command carries and that qwenstack does by itself: accepted, so the command
# runs, with a line saying what qwenstack does instead (vllm_notes).
TOOL_CALL_PARSERS = ("hermes", "qwen3_coder", "qwen3_xml")
REASONING_PARSERS = ("qwen3", "deepseek_r1")


def add_vllm_arguments(parser: argparse.ArgumentParser) -> None:
    vllm = parser.add_argument_group("accepted from vLLM commands (qwenstack does these by itself)")
    vllm.add_argument("--enable-auto-tool-choice", action="store_true",
                      help="tool calls are always parsed for Qwen3 (Hermes JSON and Qwen3-Coder XML)")
    vllm.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS, default=None,
                      help="the parser is picked from the model's output itself")
    vllm.add_argument("--reasoning-parser", choices=REASONING_PARSERS, default=None,
                      help="<think> blocks are always parsed into reasoning_content")
    vllm.add_argument("--enable-reasoning", action="store_true", help="(vLLM's older flag) the same")
    vllm.add_argument("--trust-remote-code", action="store_true", help="no checkpoint code is ever run")
    vllm.add_argument("--gpu-memory-utilization", type=positive_float, default=None, metavar="FRACTION",
                      help="the KV cache is sized by --kv-cache-memory instead")
    vllm.add_argument("--speculative-config", type=speculative_config, default=None, metavar="JSON",
                      help='vLLM\'s speculative settings, e.g. {"method": "ngram", "num_speculative_tokens": 4}: '
                           "method ngram or mtp (qwen3_next_mtp), num_speculative_tokens, prompt_lookup_min/max")


SPECULATIVE_METHOD_NAMES = {"ngram": "ngram", "mtp": "mtp", "qwen3_next_mtp": "mtp"}
# Drafts a step when a method is named without --speculative-tokens: vLLM's Qwen3-Next recipe uses 2 MTP drafts;
# lookup drafts cost nothing to make (bench_lookup.py measured k = 4).
DEFAULT_DRAFTS = {"ngram": 4, "mtp": 2}


def speculative_config(text: str) -> dict[str, Any]:
    """vLLM's --speculative-config JSON as ModelSpec fields (speculative_tokens, speculative_method,
    prompt_lookup_min/max); other methods (a draft model, EAGLE, Medusa) are refused by name."""
    import json

    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--speculative-config is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise argparse.ArgumentTypeError("--speculative-config must be a JSON object")
    method = config.get("method", "ngram" if "prompt_lookup_max" in config else "mtp")
    if method not in SPECULATIVE_METHOD_NAMES:
        raise argparse.ArgumentTypeError(f"--speculative-config method {method!r} is not offered here (ngram, or "
                                         f"mtp / qwen3_next_mtp for Qwen3-Next's own head)")
    fields: dict[str, Any] = {"speculative_method": SPECULATIVE_METHOD_NAMES[method]}
    names = {"num_speculative_tokens": "speculative_tokens", "prompt_lookup_min": "prompt_lookup_min",
             "prompt_lookup_max": "prompt_lookup_max"}
    for key, field_name in names.items():
        value = config.get(key)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise argparse.ArgumentTypeError(f"--speculative-config {key} must be a positive integer")
            fields[field_name] = value
    if "speculative_tokens" not in fields:
        raise argparse.ArgumentTypeError("--speculative-config needs num_speculative_tokens")
    return fields


def vllm_notes(args: argparse.Namespace) -> list[str]:
    """One line for each vLLM flag given, saying what qwenstack does instead."""
    notes = []
    if args.enable_auto_tool_choice or args.tool_call_parser:
        notes.append("--enable-auto-tool-choice/--tool-call-parser: qwenstack parses Qwen3's tool calls (Hermes "
                     "JSON and Qwen3-Coder XML) for every request with tools; nothing to turn on")
    if args.reasoning_parser or args.enable_reasoning:
        notes.append("--reasoning-parser: qwenstack always parses <think> blocks into reasoning_content")
    if args.trust_remote_code:
        notes.append("--trust-remote-code: qwenstack implements each architecture natively and never runs "
                     "checkpoint code")
    if args.gpu_memory_utilization is not None:
        notes.append(f"--gpu-memory-utilization {args.gpu_memory_utilization}: ignored; the KV cache takes "
                     f"--kv-cache-memory (default 2GiB)")
    return notes


def add_model_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    """The models and how they run: what `serve` and `run-batch` share (`verb` says which, in the help)."""
    parser.add_argument("models", nargs="*", metavar="MODEL",
                        help=f"model ids, directories, .gguf files or Ollama names (qwen3:0.6b) to {verb} "
                             "(default: the bundled demo model)")
    parser.add_argument("--served-model-name", action="append", default=[], metavar="NAME",
                        help="the name clients use for the i-th MODEL (repeatable; default: its id or directory name)")
    add_model_options(parser)
    add_chat_template_option(parser)
    eng = parser.add_argument_group("engine")
    eng.add_argument("--max-num-seqs", type=positive_int, default=None, help="most requests running at once, per model")
    eng.add_argument("--max-num-batched-tokens", type=positive_int, default=None,
                     help="most tokens in one step (default: 512 on CPU, 2048 on GPU; run-batch: 2048)")
    eng.add_argument("--max-waiting", type=positive_int, default=None,
                     help="most requests waiting per model; beyond it requests are refused with Retry-After")
    eng.add_argument("--no-prefix-caching", action="store_true", help="turn the prefix cache off")
    eng.add_argument("--seed", type=int, default=None, help="seed of the engines' samplers")
    eng.add_argument("--speculative-tokens", type=positive_int, default=None, metavar="K",
                     help="draft K tokens per step (speculative decoding; with only --speculative-method: 4 for "
                          "ngram, 2 for mtp)")
    eng.add_argument("--speculative-method", choices=("mtp", "ngram"), default=None,
                     help="where drafts come from: mtp, Qwen3-Next's own head (the default), or ngram, prompt "
                          "lookup in the sequence's own tokens (any model; pays off where answers quote the prompt)")
    par = parser.add_argument_group("parallelism")
    par.add_argument("--tensor-parallel-size", "-tp", type=positive_int, default=None, metavar="N",
                     help="split each model over N worker processes (attention heads, MLP, vocabulary)")
    par.add_argument("--expert-parallel", action="store_true",
                     help="spread MoE experts over the tensor-parallel ranks instead of splitting each expert")
    par.add_argument("--data-parallel-size", "-dp", type=positive_int, default=None, metavar="N",
                     help="serve N replicas of each model behind one name, routed by prompt prefix")
    par.add_argument("--distributed-executor-backend", choices=("mp", "ray"), default=None,
                     help="start tensor-parallel workers on this machine (mp, default) or in a Ray cluster (ray)")


def add_no_think_option(parser: Any) -> None:
    parser.add_argument("--no-think", action="store_true",
                        help="thinking off unless a request turns it on (default: on, as Qwen3 does)")


def add_behaviour_arguments(parser: argparse.ArgumentParser) -> None:
    app = parser.add_argument_group("behaviour")
    add_no_think_option(app)
    app.add_argument("--guard", default=None, metavar="GUARD_MODEL",
                     help="moderate requests and replies with this Qwen3Guard model (Gen or Stream)")
    app.add_argument("--guard-stream", default=None, metavar="GUARD_STREAM_MODEL",
                     help="also moderate streamed answers token by token with this Qwen3Guard-Stream model")
    app.add_argument("--guard-policy", default=None, metavar="SPEC",
                     help="[prompt.|answer.]LEVEL=ACTION,... over the defaults: Safe allow, Controversial flag, "
                          "Unsafe block, unknown block (ACTION: allow, flag or block)")
    app.add_argument("--guard-fail-open", action="store_true",
                     help="flag answers and prompts the guard could not judge instead of blocking them")
    app.add_argument("--guard-stream-window", type=int, default=None, metavar="TOKENS",
                     help="answer tokens that may still be streamed from the first blocked token on (default: 0)")
    app.add_argument("--tts", action="append", default=[], metavar="TTS_MODEL_DIR",
                     help="also serve this Qwen3-TTS checkpoint on /v1/audio/speech (repeatable)")
    app.add_argument("--voices-dir", default=None, metavar="DIR",
                     help="where voices cloned through /v1/audio/voices are kept (default: ~/.cache/qwenstack/voices)")
    app.add_argument("--max-speech-seconds", type=positive_float, default=None, metavar="S",
                     help="longest spoken chat answer (Qwen3-Omni, modalities text+audio; default: 300)")
    app.add_argument("--translate", action="append", default=[], metavar="asr=DIR,llm=DIR,tts=DIR[,name=ID][,voice=V]",
                     help="serve a live-translation pipeline on /v1/realtime/translations?model=ID "
                          "(default ID: live-translate; repeatable)")
    app.add_argument("--no-ui", action="store_true", help="serve the API only, without the chat page at /")
    app.add_argument("--ui-db", default=None, metavar="PATH", help="SQLite file where the chat page keeps chats")
    app.add_argument("--allow-local-image-paths", action="store_true",
                     help="let requests name images and videos by file:// path on this machine")
    app.add_argument("--allow-remote-image-urls", action="store_true",
                     help="let requests name images by http(s) URL, which this server then fetches")
    app.add_argument("--mcp", action="append", default=[], metavar="NAME=URL",
                     help="pre-register an MCP server for /v1/responses (repeatable): an http(s) URL, or "
                          "stdio:COMMAND with --mcp-allow-stdio; requests name it by server_label")
    app.add_argument("--mcp-allow-stdio", action="store_true",
                     help="allow --mcp stdio:COMMAND servers (the server starts those commands)")
    app.add_argument("--allow-private-image-urls", action="store_true",
                     help="with --allow-remote-image-urls, also fetch from loopback, private and link-local addresses")
    app.add_argument("--max-request-body", type=parse_bytes, default=None, metavar="SIZE",
                     help="largest request body accepted, e.g. 16MiB (default: 64MiB); larger ones get 413")
    app.add_argument("--special-tokens-in-content", action="store_true",
                     help="let special tokens typed in message content (<|im_start|>, ...) act as control tokens "
                          "(default: they stay plain text, so a user cannot forge a system turn)")
    app.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    img = parser.add_argument_group("images (needs diffusers: pip install 'qwenstack[image]')")
    img.add_argument("--image-model", default=None, metavar="PATH_OR_ID",
                     help="also serve /v1/images/edits or /v1/images/generations with this Qwen-Image pipeline "
                          "(Qwen-Image-Edit-2509, Qwen-Image-Edit or Qwen-Image; chosen from its model_index.json)")
    img.add_argument("--image-model-name", default=None, metavar="NAME", help="the name clients use for it")
    img.add_argument("--image-offload", default=None, choices=("auto", "none", "model", "sequential"),
                     help="diffusers' CPU offloading on CUDA (default: auto, when the weights do not fit)")
    img.add_argument("--image-max-queued", type=positive_int, default=None,
                     help="image jobs that may wait behind the running one (default: 4; beyond: 429)")


def serve_config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """ServerConfig's keyword arguments as plain values: `models` and `remote` are lists of dicts of
    ModelSpec's and RemoteSpec's fields. Options left unset are left out, so the server's defaults apply."""
    from qwenstack.serving.config import parse_remote  # the server's own NAME=URL#MODEL syntax

    names = list(args.served_model_name)
    if len(names) > max(len(args.models), 1):
        raise ValueError(f"{len(names)} --served-model-name for {len(args.models) or 'no'} MODEL arguments")
    remotes = [vars(parse_remote(text)) for text in args.remote]
    per_model: dict[str, Any] = {
        "dtype": None if args.dtype == "auto" else args.dtype,
        "device": args.device,
        "quantization": args.quantization,
        "max_model_len": args.max_model_len,
        "kv_cache_dtype": args.kv_cache_dtype,
    }
    optional = {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                "max_waiting": args.max_waiting, "seed": args.seed, "speculative_tokens": args.speculative_tokens,
                "speculative_method": args.speculative_method,
                **(args.speculative_config or {}),
                "tensor_parallel_size": args.tensor_parallel_size, "data_parallel_size": args.data_parallel_size,
                "distributed_executor_backend": args.distributed_executor_backend}
    per_model.update({k: v for k, v in optional.items() if v is not None})
    if "speculative_method" in per_model and "speculative_tokens" not in per_model:
        per_model["speculative_tokens"] = DEFAULT_DRAFTS[per_model["speculative_method"]]
    if args.chat_template is not None:
        per_model["chat_template"] = chat_template_of(args)
    if args.no_prefix_caching:
        per_model["enable_prefix_caching"] = False
    if args.expert_parallel:
        per_model["expert_parallel"] = True
    # No MODEL: the demo model (model=None; qwenstack.llm.load announces it), unless only remotes are served.
    models: list[str | None] = list(args.models) or ([] if remotes else [None])
    specs = [{"model": m, "name": names[i] if i < len(names) else None, **per_model} for i, m in enumerate(models)]
    clash = sorted({s["name"] or s["model"] for s in specs} & {r["name"] for r in remotes})
    if clash:
        raise ValueError(f"'{clash[0]}' is both a local model and a --remote")
    config: dict[str, Any] = {"host": args.host, "port": args.port, "models": specs, "remote": remotes,
                              "enable_ui": not args.no_ui, "allow_local_image_paths": args.allow_local_image_paths,
                              "allow_remote_image_urls": args.allow_remote_image_urls,
                              "allow_private_image_urls": args.allow_private_image_urls,
                              "special_tokens_in_content": args.special_tokens_in_content,
                              "log_level": args.log_level}
    optional = {"api_key": args.api_key, "allowed_origins": args.allowed_origins,
                "kv_cache_memory": args.kv_cache_memory, "ui_db_path": args.ui_db,
                "remote_timeout_s": args.remote_timeout, "guard_model": args.guard,
                "guard_stream_model": args.guard_stream, "guard_policy": args.guard_policy,
                "guard_stream_window": args.guard_stream_window, "image_model": args.image_model,
                "image_model_name": args.image_model_name, "image_offload": args.image_offload,
                "image_max_queued": args.image_max_queued,
                "speech_models": args.tts or None, "voices_dir": args.voices_dir,
                "max_speech_seconds": args.max_speech_seconds,
                "max_request_body_bytes": args.max_request_body}
    config.update({k: v for k, v in optional.items() if v is not None})
    if args.translate:
        from qwenstack.serving.config import parse_translate

        config["translations"] = [vars(parse_translate(text)) for text in args.translate]
    if args.no_think:
        config["default_chat_template_kwargs"] = {"enable_thinking": False}
    if args.mcp or args.mcp_allow_stdio:
        from qwenstack.serving.responses.mcp_tools import check_registered, parse_mcp

        config["mcp_servers"] = dict(parse_mcp(text) for text in args.mcp)
        config["mcp_allow_stdio"] = args.mcp_allow_stdio
        check_registered(config["mcp_servers"], args.mcp_allow_stdio)
    if args.guard_fail_open:
        config["guard_fail_open"] = True
    if (args.guard_policy or args.guard_fail_open or args.guard_stream_window is not None) \
            and not (args.guard or args.guard_stream):
        raise ValueError("--guard-policy, --guard-fail-open and --guard-stream-window need --guard or --guard-stream")
    if args.guard_stream_window is not None and args.guard_stream_window < 0:
        raise ValueError("--guard-stream-window must be >= 0")
    if (args.image_model_name or args.image_offload or args.image_max_queued) and not args.image_model:
        raise ValueError("--image-model-name, --image-offload and --image-max-queued need --image-model")
    if args.guard_policy:
        from qwenstack.guard.verdict import GuardPolicy  # torch-free: a bad policy is reported before loading

        GuardPolicy.parse(args.guard_policy)
    return config


def server_config(values: dict[str, Any]) -> "ServerConfig":
    """Builds the ServerConfig; an option this server does not implement yet is a clear error."""
    from qwenstack.errors import QwenstackError
    from qwenstack.serving.config import ModelSpec, RemoteSpec, ServerConfig, TranslationSpec

    values = dict(values)
    flags = {"speculative_tokens": "--speculative-tokens", "guard_model": "--guard"}
    try:
        models = [ModelSpec(**m) for m in values.pop("models")]
        remote = [RemoteSpec(**r) for r in values.pop("remote")]
        translations = [TranslationSpec(**t) for t in values.pop("translations", [])]
        return ServerConfig(models=models, remote=remote, translations=translations, **values)
    except TypeError as exc:
        missing = [flag for key, flag in flags.items() if f"'{key}'" in str(exc)]
        if missing:
            raise QwenstackError(f"{missing[0]} is not supported by this version of the server yet") from None
        raise


def run(args: argparse.Namespace) -> int:
    config = server_config(serve_config_from_args(args))
    from qwenstack.serving.app import run_server

    for note in vllm_notes(args):
        log.warning(note)
    # Where it listens and when each model is ready: said on the terminal as vLLM and Ollama say them.
    server_log = logging.getLogger("qwenstack.server")
    server_log.setLevel(min(server_log.getEffectiveLevel(), logging.INFO))
    run_server(config)
    return 0


COMMANDS = [Command("serve", "Serve models over an OpenAI-compatible API, with the chat page at /", add_arguments,
                    run, order=10)]
