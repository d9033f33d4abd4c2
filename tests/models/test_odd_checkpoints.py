"""Broken and odd checkpoint directories: each broken one is refused with a qwenstack error naming the file, tensor
or field at fault (never a TypeError or KeyError from deep inside), and the odd ones transformers loads do load."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwenstack.errors import CheckpointError, ConfigError
from qwenstack.models.base import prompt_logits
from qwenstack.models.registry import load_model

IDS = torch.tensor([[3, 9, 27, 81, 243, 100, 7]])


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(path: Path, **changes: Any) -> None:
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def edit_weights(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    state = load_file(str(path / "model.safetensors"))
    edit(state)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def safetensors_bytes(header: Any, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("changes, message", [
    ({"num_hidden_layers": "2"}, r"field 'num_hidden_layers' must be an integer, found \"2\""),
    ({"num_hidden_layers": 0}, r"field 'num_hidden_layers' must be at least 1, found 0"),
    ({"hidden_size": -64}, r"field 'hidden_size' must be at least 1"),
    ({"num_hidden_layers": 2.5}, r"'num_hidden_layers' must be an integer, found 2.5"),
    ({"intermediate_size": None}, r"config.json has null for the field 'intermediate_size'"),
    ({"max_position_embeddings": None}, r"null for the field 'max_position_embeddings'"),
    ({"rms_norm_eps": "1e-6"}, r"field 'rms_norm_eps' must be a number"),
    ({"tie_word_embeddings": "false"}, r"field 'tie_word_embeddings' must be true or false, found \"false\""),
    ({"rope_parameters": [10000.0]}, r"field 'rope_parameters' must be an object"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": "abc"}}, r"rope settings .* wrong type"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, r"rope_type 'yarn' needs a factor"),
    ({"num_key_value_heads": 3}, r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"),
    ({"head_dim": ..., "num_attention_heads": 6, "num_key_value_heads": 2},
     r"no head_dim, and hidden_size \(64\) is not a multiple of num_attention_heads \(6\)"),
])
def test_a_config_value_of_the_wrong_type_or_range_is_named(tmp_path: Path, tiny_qwen3: Path, changes: dict,
                                                            message: str) -> None:
    """These failed deep in model construction (TypeError: 'str' object cannot be interpreted as an integer)
    or, for tie_word_embeddings "false", loaded as true."""
    broken = copy_of(tiny_qwen3, tmp_path / "broken")
    edit_config(broken, **changes)
    with pytest.raises(ConfigError, match=message):
        load_model(broken)


@pytest.mark.parametrize("changes, message", [
    ({"decoder_sparse_step": 0}, r"field 'decoder_sparse_step' must be at least 1, found 0"),
    ({"mlp_only_layers": "0"}, r"field 'mlp_only_layers' must be a list of layer numbers, found \"0\""),
    ({"num_experts_per_tok": 10}, r"num_experts_per_tok \(10\) is more than num_experts \(8\)"),
])
def test_a_moe_config_value_out_of_its_range_is_named(tmp_path: Path, tiny_qwen3_moe: Path, changes: dict,
                                                      message: str) -> None:
    """These failed with a ZeroDivisionError or a TypeError at load, or (too many experts a token) loaded and
    failed every request."""
    broken = copy_of(tiny_qwen3_moe, tmp_path / "broken")
    edit_config(broken, **changes)
    with pytest.raises(ConfigError, match=message):
        load_model(broken)


def test_a_tied_config_with_a_trained_head_of_its_own_runs_that_head(tmp_path: Path, tiny_qwen3: Path) -> None:
    """A fine-tune that trained its lm_head but kept its base's tie_word_embeddings: transformers 5 runs the stored
    head, and so does qwenstack now (it ran the embedding, every logit off); a stored copy of the embedding keeps
    the model tied."""
    assert json.loads((tiny_qwen3 / "config.json").read_text())["tie_word_embeddings"] is True
    trained = copy_of(tiny_qwen3, tmp_path / "trained")
    edit_weights(trained, lambda s: s.update({"lm_head.weight": torch.randn_like(s["model.embed_tokens.weight"])}))
    untied = copy_of(trained, tmp_path / "untied")
    edit_config(untied, tie_word_embeddings=False)
    model = load_model(trained, torch.float32)
    assert model.lm_head is not None and not model.args.tie_word_embeddings
    with torch.no_grad():
        torch.testing.assert_close(prompt_logits(model, IDS), prompt_logits(load_model(untied, torch.float32), IDS))
    copied = copy_of(tiny_qwen3, tmp_path / "copied")
    edit_weights(copied, lambda s: s.update({"lm_head.weight": s["model.embed_tokens.weight"].clone()}))
    assert load_model(copied, torch.float32).lm_head is None


def test_saved_rotary_buffers_are_skipped(tmp_path: Path, tiny_qwen3: Path) -> None:
    """Older exporters save rotary_emb.inv_freq beside the weights; the model derives it from its config."""
    buffers = copy_of(tiny_qwen3, tmp_path / "buffers")
    edit_weights(buffers, lambda s: s.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(8)
                                             for i in range(2)}))
    with torch.no_grad():
        torch.testing.assert_close(prompt_logits(load_model(buffers, torch.float32), IDS),
                                   prompt_logits(load_model(tiny_qwen3, torch.float32), IDS))


def test_an_integral_float_count_loads(tmp_path: Path, tiny_qwen3: Path) -> None:
    """A count written 2.0 (some converters' json) is the count 2."""
    odd = copy_of(tiny_qwen3, tmp_path / "float")
    edit_config(odd, num_hidden_layers=2.0)
    assert len(load_model(odd).model.layers) == 2


@pytest.mark.parametrize("content, message", [
    (safetensors_bytes([1, 2]), r"not a safetensors file \(its header is not a JSON object\)"),
    (safetensors_bytes({"a": "x"}), r"tensor 'a' in .* malformed header entry"),
    (safetensors_bytes({"a": {"dtype": "F32", "shape": [1]}}), r"tensor 'a' in .* malformed header entry"),
    (safetensors_bytes({"a": {"dtype": "F32", "shape": None, "data_offsets": [0, 4]}}, b"\0" * 4),
     r"tensor 'a' in .* malformed header entry \(shape None"),
    (safetensors_bytes({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4),
     r"tensor 'a' .* data_offsets \[0, 4\] for 16 bytes of F32 \[4\]: the file is damaged"),
    (safetensors_bytes({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
     r"model.safetensors is truncated: tensor 'a' ends at byte"),
])
def test_a_malformed_safetensors_header_is_named(tmp_path: Path, tiny_qwen3: Path, content: bytes,
                                                 message: str) -> None:
    broken = copy_of(tiny_qwen3, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_model(broken)


@pytest.mark.parametrize("index", ["[]", '{"weight_map": []}', '{"weight_map": {"model.norm.weight": 1}}'])
def test_a_malformed_index_is_named(tmp_path: Path, tiny_qwen3: Path, index: str) -> None:
    broken = copy_of(tiny_qwen3, tmp_path / "broken")
    (broken / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json is not a valid safetensors index"):
        load_model(broken)


@pytest.mark.parametrize("dtype, message", [
    (torch.int64, r"'model.norm.weight' in model.safetensors is stored as int64, but the model expects floating"),
    (torch.bool, r"'model.norm.weight' in model.safetensors is stored as bool"),
    (torch.float8_e4m3fn, r"'model.norm.weight' .* float8_e4m3fn with no scale: .* quantization_config"),
])
def test_weights_that_are_not_plain_floats_are_refused(tmp_path: Path, tiny_qwen3: Path, dtype: torch.dtype,
                                                       message: str) -> None:
    """Integer or FP8 data read into a float weight loaded as garbage (a quantized checkpoint without its config)."""
    broken = copy_of(tiny_qwen3, tmp_path / "broken")
    edit_weights(broken, lambda s: s.__setitem__("model.norm.weight", s["model.norm.weight"].to(dtype)))
    with pytest.raises(CheckpointError, match=message):
        load_model(broken)


def test_float64_weights_load_converted(tmp_path: Path, tiny_qwen3: Path) -> None:
    wide = copy_of(tiny_qwen3, tmp_path / "f64")
    edit_weights(wide, lambda s: s.__setitem__("model.norm.weight", s["model.norm.weight"].double()))
    with torch.no_grad():
        torch.testing.assert_close(prompt_logits(load_model(wide, torch.float32), IDS),
                                   prompt_logits(load_model(tiny_qwen3, torch.float32), IDS))


def test_pickle_only_weights_say_how_to_convert(tmp_path: Path, tiny_qwen3: Path) -> None:
    """pytorch_model.bin alone: not unpickled (it can run code); the error says so and how to convert."""
    pickled = copy_of(tiny_qwen3, tmp_path / "bin")
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"only PyTorch pickle weights \(pytorch_model.bin\).*save_pretrained"):
        load_model(pickled)


def test_a_lora_adapter_directory_is_named_as_one(tmp_path: Path) -> None:
    from qwenstack.llm import LLM

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "Qwen/Qwen3-0.6B",
                                                             "peft_type": "LORA", "r": 8}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 64)},
              str(adapter / "adapter_model.safetensors"))
    with pytest.raises(ConfigError, match=r"is a LoRA adapter for Qwen/Qwen3-0.6B .*merge"):
        LLM(str(adapter), device="cpu")


def test_a_directory_holding_a_gguf_points_at_the_file(tmp_path: Path, tiny_qwen3: Path) -> None:
    folder = copy_of(tiny_qwen3, tmp_path / "gguf-dir")
    (folder / "model.safetensors").unlink()
    (folder / "Qwen3-0.6B-Q8_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match=r"a GGUF file: pass the file itself .*Qwen3-0.6B-Q8_0.gguf"):
        load_model(folder)


def test_a_peft_wrapped_state_dict_loads(tmp_path: Path, tiny_qwen3: Path) -> None:
    """Saved off PEFT's wrapper (base_model.model.model.layers...): the prefix goes, as transformers strips a
    base-model prefix; before, the wrapped names made it look like a bare embedding backbone."""
    wrapped = copy_of(tiny_qwen3, tmp_path / "peft")
    edit_weights(wrapped, lambda s: s.update({f"base_model.model.{k}": s.pop(k) for k in list(s)}))
    model = load_model(wrapped, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(prompt_logits(model, IDS), prompt_logits(load_model(tiny_qwen3, torch.float32), IDS))


def test_renamed_tensors_show_what_the_checkpoint_has_instead(tmp_path: Path, tiny_qwen3: Path) -> None:
    renamed = copy_of(tiny_qwen3, tmp_path / "renamed")
    edit_weights(renamed, lambda s: s.update({k.replace("model.", "model.language_model.", 1): s.pop(k)
                                              for k in list(s)}))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.embed_tokens.weight'.*; it has instead "
                                              r"'model.language_model.embed_tokens.weight'"):
        load_model(renamed)


@pytest.mark.parametrize("defaults, message", [
    ({"temperature": -1}, r"temperature must be >= 0, got -1"),
    ({"top_p": 2.0}, r"top_p must be in \(0, 1\], got 2.0"),
    ({"top_k": -5}, r"top_k must be >= 0"),
])
def test_a_sampling_default_no_request_can_use_names_generation_config(tmp_path: Path, tiny_qwen3: Path,
                                                                       defaults: dict, message: str) -> None:
    """Was a RequestError naming only the parameter (offline), and a 400 for every request that left it out
    (served): the value comes from generation_config.json, so the error names that file, at load."""
    from qwenstack.llm import LLM

    odd = copy_of(tiny_qwen3, tmp_path / "gen")
    (odd / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, **defaults}))
    with pytest.raises(ConfigError, match=r"generation_config.json sets a sampling default no request can use: "
                                          + message):
        LLM(str(odd), device="cpu")
