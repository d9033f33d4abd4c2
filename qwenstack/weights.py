"""Strict loading of Hugging Face safetensors checkpoints into qwenstack models.

Decisions:
- The model is built on the meta device, so no memory is spent on random initialisation. Each parameter is
  allocated once in the target dtype and filled straight from the files with plain reads: no memory map
  stays resident and no second copy of a shard is held, so peak memory stays near the model's size.
- What fills each parameter is declared by the model (`checkpoint_sources` on a module; identity
  otherwise), possibly in several layouts (per-expert or fused experts). The loader picks the layout the
  checkpoint has, then checks everything before reading a byte: every parameter fully covered, no tensor
  on disk left unused (except declared ignores), every shape right. Errors name the tensor.
- The safetensors header is read directly (8-byte length + JSON, the documented format) because we need
  each tensor's byte offsets to read it into preallocated memory; writing uses the safetensors library.
"""
from __future__ import annotations

import json
import logging
import math
import re
import struct
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from qwenstack.errors import CheckpointError

logger = logging.getLogger("qwenstack.loading")

# Buffers some exporters save beside the weights, which the model derives from its config (as vLLM skips them).
DERIVED_BUFFERS = (r".*rotary_emb\.(inv_freq|cos_cached|sin_cached)",)
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class Source:
    name: str  # tensor name in the checkpoint
    index: tuple[Any, ...] = ()  # where in the parameter it lands (ints and slices)
    transpose: bool = False  # stored with the last two dimensions swapped


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path} is not a safetensors file (too short)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > 100_000_000:
                raise CheckpointError(f"{path} is not a safetensors file (header length {header_len})")
            header = json.loads(f.read(header_len))
            size = f.seek(0, 2)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read the safetensors header of {path}: {exc}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not a JSON object)")
    tensors = {}
    data_start = 8 + header_len
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        info = _tensor_info(path, name, meta, data_start)
        if info.end > size:
            raise CheckpointError(f"{path} is truncated: tensor '{name}' ends at byte {info.end}, the file has "
                                  f"{size} (an interrupted download or copy? fetch the file again)")
        tensors[name] = info
    return tensors


def _tensor_info(path: Path, name: str, meta: Any, data_start: int) -> TensorInfo:
    """One header entry, checked as the safetensors library checks it: a known dtype, a shape of sizes, and
    data offsets spanning exactly shape x dtype bytes."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"tensor '{name}' in {path} has a malformed header entry: {meta!r}")
    dtype = SAFETENSORS_DTYPES.get(meta.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise CheckpointError(f"tensor '{name}' in {path} has unsupported dtype {meta.get('dtype')}")
    shape, offsets = meta.get("shape"), meta.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
            and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise CheckpointError(f"tensor '{name}' in {path} has a malformed header entry "
                              f"(shape {shape!r}, data_offsets {offsets!r})")
    begin, end = offsets
    nbytes = math.prod(shape) * dtype.itemsize
    if begin < 0 or end - begin != nbytes:
        raise CheckpointError(f"tensor '{name}' in {path} has data_offsets {offsets} for {nbytes} bytes of "
                              f"{meta['dtype']} {shape}: the file is damaged")
    return TensorInfo(name, path, dtype, tuple(shape), data_start + begin, data_start + end)


def checkpoint_tensors(model_dir: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint: single model.safetensors, an index of shards, or all *.safetensors."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _index_weight_map(index)
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shard files that are missing: {', '.join(missing)}")
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
        weight_map = {}
        if files and all(f.startswith("adapter_model") for f in files):
            files = []  # a LoRA adapter's weights are no model: said by _no_weights_message
    if not files:
        raise CheckpointError(_no_weights_message(model_dir))
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for name, info in read_safetensors_header(model_dir / file).items():
            if name in tensors:
                raise CheckpointError(f"tensor '{name}' appears in two shards: {tensors[name].file.name} and {file}")
            tensors[name] = info
    for name, file in weight_map.items():
        if name not in tensors:
            raise CheckpointError(f"the index maps tensor '{name}' to {file}, but that shard does not contain it")
    return _unwrapped(tensors)


# A state dict saved from a wrapper rather than the model: PEFT's PeftModel (a merged LoRA saved off the wrapper).
WRAPPER_PREFIXES = ("base_model.model.",)


def _unwrapped(tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """The tensors under the model's own names when every one carries a wrapper's prefix (as transformers'
    loader strips a base-model prefix); leftover adapter tensors (lora_A...) then fail as unexpected."""
    for prefix in WRAPPER_PREFIXES:
        if tensors and all(name.startswith(prefix) for name in tensors):
            return {name[len(prefix):]: info for name, info in tensors.items()}
    return tensors


def _no_weights_message(model_dir: Path) -> str:
    """Why a directory has no weights we read, and what to do: PyTorch pickles, a GGUF, a LoRA adapter."""
    from qwenstack.config import adapter_message

    found = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
    gguf = next((name for name in found if name.endswith(".gguf")), None)
    if gguf is not None:
        return f"{model_dir} has no safetensors weights but a GGUF file: pass the file itself ({model_dir / gguf})"
    adapter = adapter_message(model_dir)
    if adapter:
        return adapter
    if found:
        return (f"{model_dir} has only PyTorch pickle weights ({', '.join(found[:3])}), which qwenstack does not load "
                f"(unpickling can run code); convert them to safetensors once, e.g. with transformers: "
                f"AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir)")
    return f"no safetensors weights in {model_dir} (expected model.safetensors or model-*-of-*.safetensors shards)"


def _index_weight_map(index: Path) -> dict[str, str]:
    """model.safetensors.index.json's weight_map (tensor name -> shard file), or CheckpointError saying what is off."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise CheckpointError(f"{index} is not a valid safetensors index: it needs a 'weight_map' object "
                              "of tensor name -> shard file name")
    return weight_map


def parameter_sources(model: nn.Module) -> dict[str, list[list[Source]]]:
    """For every parameter, the layouts (lists of sources) that can fill it. Identity unless declared."""
    declared: dict[str, list[list[Source]]] = {}
    for prefix, module in model.named_modules():
        fn = getattr(module, "checkpoint_sources", None)
        if fn is not None:
            declared.update(fn(f"{prefix}." if prefix else ""))
    result = {}
    for name, _ in model.named_parameters():
        result[name] = declared.get(name, [[Source(name)]])
    return result


def _target_shape(param_shape: torch.Size, source: Source) -> tuple[int, ...]:
    shape = tuple(torch.empty(param_shape, device="meta")[source.index].shape)
    if source.transpose:
        shape = (*shape[:-2], shape[-1], shape[-2])
    return shape


def plan_load(model: nn.Module, tensors: dict[str, TensorInfo]) -> dict[str, list[Source]]:
    """Chooses a layout per parameter and checks coverage, leftovers and shapes. Raises CheckpointError."""
    params = dict(model.named_parameters())
    plan: dict[str, list[Source]] = {}
    missing: list[str] = []
    sources = parameter_sources(model)
    fitting = {name: [i for i, layout in enumerate(layouts) if _fits(layout, params[name].shape, tensors)]
               for name, layouts in sources.items()}
    # Layouts may share tensor names and differ only in orientation (fused experts stored transposed or not).
    # A square stack fits both ways (gate_up_proj [E, 2I, H] with H == 2I); a sibling in the same module that
    # fits one way only (down_proj [E, H, I] is then not square) says how the module was stored.
    settled = {name.rpartition(".")[0]: _transposed(sources[name][f[0]])
               for name, f in fitting.items() if len(f) == 1 and len(sources[name]) > 1}
    for name, layouts in sources.items():
        present = [sum(s.name in tensors for s in layout) for layout in layouts]
        orientation = settled.get(name.rpartition(".")[0])
        agrees = [orientation is None or _transposed(layout) == orientation for layout in layouts]
        # Among complete layouts, the first whose shapes fit (and agree with the module's siblings) wins.
        best = max(range(len(layouts)), key=lambda i: (present[i] == len(layouts[i]), i in fitting[name],
                                                       agrees[i], present[i], -i))
        layout = layouts[best]
        lacking = [s.name for s in layout if s.name not in tensors]
        if lacking:
            missing.extend(lacking)
        plan[name] = layout
    used = {s.name for layout in plan.values() for s in layout}
    ignored = [re.compile(p) for p in (*getattr(model, "ignored_checkpoint_patterns", ()), *DERIVED_BUFFERS)]
    unexpected = sorted(n for n in tensors if n not in used and not any(p.fullmatch(n) for p in ignored))
    if missing:
        # Names the architecture does not use beside missing ones are most often the same tensors renamed.
        instead = f"; it has instead {_listed(unexpected)}" if unexpected else ""
        raise CheckpointError(f"the checkpoint is missing tensor {_listed(missing)}{instead}")
    if unexpected:
        raise CheckpointError(f"the checkpoint has unexpected tensor {_listed(unexpected)}, "
                              f"which this architecture does not use")
    for name, layout in plan.items():
        for source in layout:
            want = _target_shape(params[name].shape, source)
            got = tensors[source.name].shape
            if tuple(got) != want:
                raise CheckpointError(
                    f"tensor '{source.name}' has shape {list(got)}, but the model expects {list(want)} "
                    f"(check config.json against the weights)"
                )
    return plan


def _fits(layout: list[Source], param_shape: torch.Size, tensors: dict[str, TensorInfo]) -> bool:
    """Whether every tensor of a layout is on disk with the shape the parameter needs from it."""
    return all(s.name in tensors and tuple(tensors[s.name].shape) == _target_shape(param_shape, s) for s in layout)


def _transposed(layout: list[Source]) -> bool:
    return any(s.transpose for s in layout)


def _listed(names: list[str], shown: int = 5) -> str:
    more = f" (and {len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(f"'{n}'" for n in names[:shown]) + more


def _backbone_prefixed(model: nn.Module, tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """A causal LM saved from its bare backbone (`embed_tokens.weight`, `layers.0...`, beside `lm_head.weight`)
    under the names the model has (`model.embed_tokens.weight`), as transformers' loader adds its base prefix."""
    names = {n for n, _ in model.named_parameters()}
    if not any(n.startswith("model.") for n in names) or any(t.startswith("model.") for t in tensors):
        return tensors
    prefixed = {(t if t.startswith("lm_head.") else f"model.{t}"): info for t, info in tensors.items()}
    return prefixed if "model.embed_tokens.weight" in prefixed and "model.embed_tokens.weight" in names else tensors


def sanitize_names(model: nn.Module, tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """Checkpoint names under the model's own names, through its `sanitize(name)` step when it has one
    (for checkpoints published in more than one layout). Two tensors landing on one name is an error."""
    tensors = _backbone_prefixed(model, tensors)
    sanitize = getattr(model, "sanitize", None)
    if sanitize is None:
        return tensors
    renamed: dict[str, TensorInfo] = {}
    for name, info in tensors.items():
        new = sanitize(name)
        if new in renamed:
            raise CheckpointError(f"tensors '{renamed[new].name}' and '{name}' both map to '{new}'")
        renamed[new] = info
    return renamed


def _read_tensor(f: Any, info: TensorInfo, out: torch.Tensor | None = None) -> torch.Tensor:
    """Reads one tensor's bytes, into `out` when it is a contiguous CPU tensor of the stored dtype."""
    if out is None:
        out = torch.empty(info.shape, dtype=info.dtype)
    f.seek(info.start)
    view = memoryview(out.view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
    if f.readinto(view) != info.end - info.start:
        raise CheckpointError(f"tensor '{info.name}' is truncated in {info.file.name}")
    return out


def load_weights(
    model: nn.Module, model_dir: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu",
    tensors: dict[str, TensorInfo] | None = None, skip: frozenset[str] = frozenset(),
) -> dict[str, list[Source]]:
    """Fills a meta-device model with the checkpoint's tensors, converting floats to `dtype`.

    tensors: the checkpoint's tensors when the caller has already read (and edited) them; skip: parameters
    planned and checked like the others but left on the meta device for the caller to fill (pre-quantized
    weights, see qwenstack.quantization.prequantized). Returns the plan (parameter -> its sources)."""
    tensors = sanitize_names(model, checkpoint_tensors(model_dir) if tensors is None else tensors)
    head = _differing_head(model, tensors)
    if head is not None:  # the checkpoint's own head, as transformers uses it: untie before planning
        owner, embedding = head
        owner.lm_head = nn.Linear(embedding.embedding_dim, embedding.num_embeddings, bias=False, device="meta")
        owner.args.tie_word_embeddings = False
    plan = plan_load(model, tensors)
    params = {name: p for name, p in model.named_parameters() if name not in skip}
    plan_to_read = {name: layout for name, layout in plan.items() if name not in skip}
    _check_dtypes(plan_to_read, tensors, params)
    device = torch.device(device)
    storage = {name: torch.empty(p.shape, dtype=dtype if p.dtype.is_floating_point else p.dtype, device=device)
               for name, p in params.items()}
    by_file: dict[Path, list[tuple[str, Source]]] = defaultdict(list)
    for name, layout in plan_to_read.items():
        for source in layout:
            by_file[tensors[source.name].file].append((name, source))
    for file, items in by_file.items():
        items.sort(key=lambda item: tensors[item[1].name].start)  # sequential reads
        with open(file, "rb") as f:
            for name, source in items:
                info = tensors[source.name]
                target = storage[name][source.index]
                direct = (device.type == "cpu" and not source.transpose and info.dtype == target.dtype
                          and target.is_contiguous())
                if direct:
                    _read_tensor(f, info, target)
                    continue
                data = _read_tensor(f, info)
                if source.transpose:
                    data = data.transpose(-1, -2)
                target.copy_(data)
    for name, tensor in storage.items():
        _set_parameter(model, name, tensor)
    _check_materialised(model)
    return plan


def _differing_head(model: nn.Module, tensors: dict[str, TensorInfo]) -> tuple[nn.Module, nn.Embedding] | None:
    """(the module, its embedding) where a tied model's checkpoint carries an lm_head.weight that is not its
    embedding: a fine-tune that trained its head and kept its base's tied config. transformers 5 then uses the
    stored head (and says so); tying would silently run another head. A copy equal to the embedding (some tied
    checkpoints carry one) changes nothing."""
    for prefix, owner in model.named_modules():
        if getattr(owner, "lm_head", True) is not None or \
                not getattr(getattr(owner, "args", None), "tie_word_embeddings", False):
            continue  # not a tied head's owner
        base = f"{prefix}." if prefix else ""
        found = next(((name, m) for name, m in owner.named_modules()
                      if name.endswith("embed_tokens") and isinstance(m, nn.Embedding)), None)
        head = tensors.get(f"{base}lm_head.weight")
        embedding = tensors.get(f"{base}{found[0]}.weight") if found is not None else None
        if found is None or head is None or embedding is None or head.shape != embedding.shape:
            return None
        with open(head.file, "rb") as f:
            stored_head = _read_tensor(f, head)
        with open(embedding.file, "rb") as f:
            stored_embedding = _read_tensor(f, embedding)
        if torch.equal(stored_head.to(stored_embedding.dtype), stored_embedding):
            return None
        logger.warning("config.json ties %s's lm_head to its embedding, but the checkpoint's %s differs from it: "
                       "using the stored head, as transformers does", type(owner).__name__, head.name)
        return owner, found[1]
    return None


def _check_dtypes(plan: dict[str, list[Source]], tensors: dict[str, TensorInfo],
                  params: dict[str, nn.Parameter]) -> None:
    """Float weights are converted to the model's dtype whatever their width; integer, bool or FP8 data in a
    float weight is a quantized checkpoint read as a plain one (its scales missing, or config.json's
    quantization_config lost), which would load as garbage."""
    for name, layout in plan.items():
        if not params[name].dtype.is_floating_point:
            continue
        for source in layout:
            info = tensors[source.name]
            stored = str(info.dtype).replace("torch.", "")
            if not info.dtype.is_floating_point:
                raise CheckpointError(f"tensor '{source.name}' in {info.file.name} is stored as {stored}, but "
                                      f"the model expects floating-point weights there")
            if info.dtype.itemsize == 1:
                raise CheckpointError(f"tensor '{source.name}' in {info.file.name} is stored as {stored} with no "
                                      f"scale: an FP8 checkpoint needs config.json's quantization_config "
                                      f"(quant_method fp8) and a weight_scale_inv beside each FP8 weight")


def load_tensors(model: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
    """Fills a meta-device model from in-memory tensors under checkpoint names (a GGUF file's, renamed), with
    the same checks as load_weights: every parameter covered, nothing left over, every shape right."""
    infos = {name: TensorInfo(name, Path(), t.dtype, tuple(t.shape), 0, 0) for name, t in state.items()}
    plan = plan_load(model, infos)
    for name, p in list(model.named_parameters()):
        storage = torch.empty(p.shape, dtype=dtype if p.dtype.is_floating_point else p.dtype, device=device)
        for source in plan[name]:
            data = state[source.name]
            storage[source.index].copy_(data.transpose(-1, -2) if source.transpose else data)
        _set_parameter(model, name, storage)
    _check_materialised(model)


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)


def _check_materialised(model: nn.Module) -> None:
    for name, buf in model.named_buffers():
        if buf.is_meta:
            raise CheckpointError(f"buffer '{name}' was never initialised (a bug in the model definition)")


def checkpoint_state_dict(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights under checkpoint names, in the first (canonical) layout of each parameter."""
    params = dict(model.named_parameters())
    for name, layouts in parameter_sources(model).items():
        for source in layouts[0]:
            t = params[name].detach()[source.index]
            if source.transpose:
                t = t.transpose(-1, -2)
            yield source.name, t.contiguous()


def save_checkpoint(model: nn.Module, out_dir: str | Path, config: dict[str, Any], dtype: torch.dtype | None = None,
                    max_shard_bytes: int | None = None) -> None:
    """Writes config.json and safetensors weights in the Hugging Face layout (sharded when asked)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {n: (t.to(dtype) if dtype is not None and t.is_floating_point() else t).clone()
             for n, t in checkpoint_state_dict(model)}
    if max_shard_bytes is None:
        save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
