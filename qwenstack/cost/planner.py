"""What a Qwen3 model needs and how fast it decodes here, from config.json alone (`qwenstack plan`).

    source = find_config("Qwen/Qwen3-235B-A22B")          # a dir, a config file, the HF cache, or the table
    plan = make_plan(source, context=262144, concurrency=1, quantization="int8", bandwidth=cpu_bandwidth())
    print(format_plan(plan))  # format_plan: qwenstack.cost.report

Decisions:
- Counts come from the model qwenstack would load, built on the meta device (no memory, no weights): the
  same modules the loader fills, so a new architecture is counted correctly the day it can be loaded.
  The Qwen3-Next multi-token-prediction head (`mtp.*`, ignored by the loader) is not counted.
- Active parameters: everything except the experts a token does not use (top_k of num_experts per MoE
  layer); the embedding table and the lm_head are counted in both, as model cards do.
- Bytes per format: the quantizable matrices (every nn.Linear, the lm_head, the experts) take the
  format's size with its scales, exactly as qwenstack.quantization stores them (int8 + per-channel
  scales; int4 codes + group scale/zero; fp8 + float32 scales); everything else (embedding, norms,
  router, conv) stays in the activation dtype. A tied lm_head, when quantized, is a second copy.
- Bytes read per decode token: the active weights except the embedding table (a row lookup), plus the
  KV cache of the sequence at the given context (full-attention layers only), plus for Qwen3-Next the
  fixed linear-attention state (conv state + recurrent state [Hv, Dk, Dv] in float32 per linear layer).
- Speed: bound = stream read bandwidth / bytes per token; expected = the same bytes at each format's
  measured decode-kernel rate (qwenstack.cost.bandwidth), plus the step overhead measured on this CPU for the
  model's depth, MoE layers and active experts (qwenstack.cost.step_overhead; Qwen3-Next's linear-attention
  layers counted as dense ones). On a GPU the expected figure is the bound (no overhead is measured).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qwenstack.cost.bandwidth import Bandwidth
from qwenstack.errors import ConfigError, ModelNotFoundError
from qwenstack.cost.known_configs import HYPOTHETICAL, known_config
from qwenstack.models.moe import Experts

FORMATS = ("bfloat16", "float32", "fp8", "int8", "int4")
_FLOAT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass
class ConfigSource:
    config: dict[str, Any]
    name: str
    origin: str  # where the config came from, in words
    model_dir: Path | None = None  # a local folder that may hold the weights
    note: str | None = None  # e.g. the hypothetical-model notice

    @property
    def has_weights(self) -> bool:
        return self.model_dir is not None and any(self.model_dir.glob("*.safetensors"))


def find_config(model: str) -> ConfigSource:
    """A config file, a model folder, a model id in the Hugging Face cache, or a published name."""
    path = Path(model).expanduser()
    if path.is_file():
        return ConfigSource(_read_json(path), path.parent.name if path.name == "config.json" else path.stem,
                            f"config file {path}", path.parent if path.name == "config.json" else None)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path} has no config.json")
        return ConfigSource(_read_json(path / "config.json"), path.resolve().name, f"folder {path}", path)
    cached = _cached_config(model) if model.count("/") == 1 else None
    if cached is not None:
        return ConfigSource(_read_json(cached), model, f"Hugging Face cache ({cached.parent})", cached.parent)
    known = known_config(model)
    if known is not None:
        key, config = known
        return ConfigSource(config, model, "qwenstack's table of published configs (qwenstack/cost/known_configs.py)",
                            note=HYPOTHETICAL.get(key))
    raise ModelNotFoundError(
        f"'{model}' is not a config file, a model folder, a model id in the local Hugging Face cache, or a "
        f"published Qwen3 name (e.g. Qwen/Qwen3-235B-A22B, qwen3-1t-hypothetical)")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ConfigError(f"{path} is not a model config.json (no model_type)")
    return config


def _cached_config(model_id: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        from qwenstack.resolve import hub_cache_dir

        found = try_to_load_from_cache(model_id, "config.json", cache_dir=hub_cache_dir())
    except Exception:  # noqa: BLE001 - an unreadable cache is the same as no cache here
        return None
    return Path(found) if isinstance(found, str) else None


# --- counting -----------------------------------------------------------------------------------------

@dataclass
class Matrix:
    """A group of same-shaped weight matrices: `count` of [rows, cols], `active` of them used per token."""

    name: str
    rows: int
    cols: int
    count: float  # matrices held (experts: num_experts per layer)
    active: float  # matrices a decode token reads
    quantizable: bool
    lookup_only: bool = False  # the embedding table: read by rows, never as a whole


@dataclass
class ParamCounts:
    total: int
    active: int
    embedding: int
    lm_head: int  # 0 when tied
    breakdown: dict[str, int] = field(default_factory=dict)  # part -> parameters (total)


def model_matrices(config: dict[str, Any]) -> list[Matrix]:
    """Every weight of the model qwenstack would build for this config, grouped, from a meta-device build."""
    from qwenstack.models.registry import build_model

    model = build_model(config, "meta")
    args = model.args
    share = args.num_experts_per_tok / args.num_experts if getattr(args, "num_experts", 0) else 1.0
    found: list[Matrix] = []
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            if isinstance(module, Experts):  # [E, rows, cols]
                e, rows, cols = p.shape
                found.append(Matrix(full, rows, cols, e, e * share, True))
            elif isinstance(module, nn.Embedding):
                found.append(Matrix(full, p.shape[0], p.shape[1], 1, 0, False, lookup_only=True))
            elif isinstance(module, nn.Linear) and pname == "weight":
                found.append(Matrix(full, p.shape[0], p.shape[1], 1, 1, True))
            else:  # norms, router, conv, biases, gates' vectors: read whole, kept in full precision
                found.append(Matrix(full, p.numel(), 1, 1, 1, False))
    if getattr(model, "lm_head", 0) is None:  # tied: the embedding is also the lm_head, read whole
        embed = next(m for m in found if m.lookup_only)
        found.append(Matrix("lm_head (tied)", embed.rows, embed.cols, 0, 1, True))
    return found


def _part(name: str) -> str:
    for key, label in (("embed_tokens", "embedding"), ("lm_head", "lm_head"), ("linear_attn", "linear_attention"),
                       ("self_attn", "attention"), (".experts.", "experts"), ("shared_expert", "shared_expert"),
                       ("mlp.gate.", "router"), ("mlp.", "mlp"), ("norm", "norms")):
        if key in name + ".":
            return label
    return "other"


def count_parameters(config: dict[str, Any]) -> ParamCounts:
    matrices = model_matrices(config)
    breakdown: dict[str, int] = {}
    for m in matrices:
        part = _part(m.name)
        breakdown[part] = breakdown.get(part, 0) + int(m.rows * m.cols * m.count)
    total = sum(int(m.rows * m.cols * m.count) for m in matrices)
    # Active: the experts a token uses, and everything else, the embedding table included.
    active = sum(int(m.rows * m.cols * (m.active if ".experts." in m.name + "." else m.count)) for m in matrices)
    return ParamCounts(total, active, breakdown.get("embedding", 0), breakdown.get("lm_head", 0), breakdown)


def matrix_bytes(rows: int, cols: int, fmt: str, act_bytes: int) -> float:
    """Bytes of one [rows, cols] weight in a format, as qwenstack.quantization stores it (scales included)."""
    if fmt in _FLOAT_BYTES:
        return rows * cols * _FLOAT_BYTES[fmt]
    if fmt == "int8":
        return rows * cols + rows * act_bytes
    if fmt == "fp8":
        return rows * cols + rows * 4
    if fmt.startswith("int4"):
        from qwenstack.quantization import parse_method

        group = parse_method(fmt).group_size or 128
        while group >= 32 and cols % group:
            group //= 2
        if group < 32 or cols % group:  # left in full precision by quantize_model
            return rows * cols * act_bytes
        return rows * cols / 2 + (cols // group) * rows * 2 * act_bytes
    raise ValueError(f"unknown weight format '{fmt}' (use {', '.join(FORMATS)}, or int4-g32 ...)")


@dataclass
class WeightBytes:
    fmt: str
    memory: float  # bytes held
    read_per_token: float  # bytes a decode step reads


def weight_bytes(matrices: list[Matrix], fmt: str, act_dtype: str = "bfloat16") -> WeightBytes:
    act = _FLOAT_BYTES[act_dtype]
    quantized = fmt not in _FLOAT_BYTES
    memory = read = 0.0
    for m in matrices:
        if not quantized:
            size = m.rows * m.cols * _FLOAT_BYTES[fmt]
        elif m.quantizable:
            size = matrix_bytes(m.rows, m.cols, fmt, act)
        else:
            size = m.rows * m.cols * act
        if m.count == 0:  # a tied lm_head: a quantized copy is held; unquantized, the embedding serves
            memory += size if quantized else 0
            read += size * m.active
            continue
        memory += size * m.count
        read += size * m.active
    return WeightBytes(fmt, memory, read)


# --- the plan -----------------------------------------------------------------------------------------

@dataclass
class MachineMemory:
    ram_total: int
    ram_available: int
    gpus: list[dict[str, Any]] = field(default_factory=list)  # name, total, free (bytes)


def machine_memory() -> MachineMemory:
    total = available = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, value = line.split(":", 1)
            if key == "MemTotal":
                total = int(value.split()[0]) * 1024
            elif key == "MemAvailable":
                available = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, gpu_total = torch.cuda.mem_get_info(i)
            gpus.append({"name": torch.cuda.get_device_name(i), "total": gpu_total, "free": free})
    return MachineMemory(total, available or total, gpus)


@dataclass
class SpeedEstimate:
    context: int
    bytes_per_token: float
    bound_tok_s: float
    expected_tok_s: float


@dataclass
class Plan:
    name: str
    model_type: str
    origin: str
    note: str | None
    params: ParamCounts
    act_dtype: str
    quantization: str  # the weight format planned for (bfloat16 when none)
    weights: dict[str, WeightBytes]  # every format, for the table
    kv_bytes_per_token: int
    state_bytes_per_sequence: int  # linear-attention state (Qwen3-Next); 0 otherwise
    context: int
    concurrency: int
    max_position_embeddings: int
    memory: MachineMemory
    bandwidth: Bandwidth | None
    gpu_bandwidth: Bandwidth | None
    speeds: list[SpeedEstimate] = field(default_factory=list)
    gpu_speeds: list[SpeedEstimate] = field(default_factory=list)
    measured_tok_s: float | None = None
    measured_context: int | None = None
    kv_dtype: str = "bfloat16"  # the KV cache's element type

    @property
    def kv_bytes(self) -> int:
        return self.kv_bytes_per_token * self.context * self.concurrency

    @property
    def needed_bytes(self) -> float:
        return self.weights[self.quantization].memory + self.kv_bytes + self.state_bytes_per_sequence * self.concurrency

    def fits_ram(self) -> bool:
        return self.needed_bytes <= self.memory.ram_total

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record.update(kind="plan", kv_bytes=self.kv_bytes, needed_bytes=self.needed_bytes, fits_ram=self.fits_ram())
        return record



def _speeds(weights: WeightBytes, fmt: str, act_dtype: str, kv_per_token: int, state: int, contexts: list[int],
            bandwidth: Bandwidth, overhead_s: float = 0.0, columns: int | None = None) -> list[SpeedEstimate]:
    out = []
    for ctx in contexts:
        cache_bytes = kv_per_token * ctx + state
        total = weights.read_per_token + cache_bytes
        # Expected: weights at the format's kernel rate; KV, state and full-precision extras at the stream
        # rate; plus the step's fixed overhead (measured on this machine, CPU only).
        # No kernel reads faster than the machine streams memory: a kernel rate above the stream rate means
        # the stream figure was taken in a slower moment, and must not lift "expected" above the bound.
        rate = min(bandwidth.rate(fmt, columns), bandwidth.stream)
        seconds = weights.read_per_token / rate + cache_bytes / bandwidth.stream + overhead_s
        bound = bandwidth.stream / total
        out.append(SpeedEstimate(ctx, total, bound, min(1.0 / seconds, bound)))
    return out


def make_plan(source: ConfigSource, context: int | None = None, concurrency: int = 1, quantization: str | None = None,
              act_dtype: str = "bfloat16", bandwidth: Bandwidth | None = None, gpu: Bandwidth | None = None,
              memory: MachineMemory | None = None, short_context: int = 16, kv_cache_dtype: str = "auto") -> Plan:
    """kv_cache_dtype: --kv-cache-dtype's name (engine/runner.py's kv_cache_dtype): fp8 halves the KV cache."""
    from qwenstack.engine.runner import kv_cache_dtype as kv_dtype_of
    from qwenstack.models.registry import build_model

    config = source.config
    fmt = _format_name(quantization, act_dtype)
    matrices = model_matrices(config)
    formats = list(dict.fromkeys([*FORMATS, fmt]))
    weights = {f: weight_bytes(matrices, f, act_dtype) for f in formats}
    model = build_model(config, "meta")
    dtype = getattr(torch, act_dtype)
    kv_dtype = kv_dtype_of(kv_cache_dtype, dtype)
    kv_per_token = model.kv_cache_spec().bytes_per_token(kv_dtype)
    state = model.state_bytes_per_slot(dtype) if hasattr(model, "state_bytes_per_slot") else 0
    max_pos = int(config.get("max_position_embeddings") or 0)
    context = context or max_pos
    contexts = sorted({min(short_context, context), context})
    plan = Plan(source.name, config["model_type"], source.origin, source.note, count_parameters(config), act_dtype, fmt,
                weights, kv_per_token, state, context, concurrency, max_pos, memory or machine_memory(), bandwidth, gpu,
                kv_dtype=str(kv_dtype).removeprefix("torch."))
    if bandwidth is not None:
        layers = int(config.get("num_hidden_layers") or 0)
        sparse = [m for m in model.modules() if isinstance(m, Experts)]
        experts = int(config.get("num_experts_per_tok") or 0) + (1 if config.get("shared_expert_intermediate_size") else 0)
        overhead = bandwidth.step_overhead(layers, len(sparse), experts if sparse else 0)
        # Most weight bytes sit in matrices whose rows are hidden_size long (q/k/v, gate/up, lm_head).
        columns = int(config.get("hidden_size") or 0) or None
        plan.speeds = _speeds(weights[fmt], fmt, act_dtype, kv_per_token, state, contexts, bandwidth, overhead,
                              columns)
    if gpu is not None:
        plan.gpu_speeds = _speeds(weights[fmt], "stream", act_dtype, kv_per_token, state, contexts, gpu)
    return plan


def _format_name(quantization: str | None, act_dtype: str) -> str:
    if not quantization or quantization == "none":
        return act_dtype
    if quantization in _FLOAT_BYTES:
        return quantization
    from qwenstack.quantization import parse_method

    return parse_method(quantization).name


def measure_decode(model_dir: Path, quantization: str | None, act_dtype: str = "bfloat16",
                   new_tokens: int = 16, prompt_len: int = 8) -> tuple[float, int]:
    """(tokens/s, context at the end) of a short single-stream greedy decode with the engine."""
    from qwenstack.models.registry import load_model
    from qwenstack.cost.step_overhead import decode_step_times

    model = load_model(model_dir, dtype=getattr(torch, act_dtype))
    if quantization and quantization not in _FLOAT_BYTES:
        from qwenstack.quantization import quantize_model

        quantize_model(model, quantization)
    prompt = [(7 * i + 3) % model.args.vocab_size for i in range(prompt_len)]
    steps = decode_step_times(model, prompt, new_tokens)
    return len(steps) / sum(steps), prompt_len + new_tokens
