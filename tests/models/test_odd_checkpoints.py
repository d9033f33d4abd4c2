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


def test_an_integral_float_count_loads(tmp_path: Path, tiny_qwen3: Path) -> None:
    """A count written 2.0 (some converters' json) is the count 2."""
    odd = copy_of(tiny_qwen3, tmp_path / "float")
    edit_config(odd, num_hidden_layers=2.0)
    assert len(load_model(odd).model.layers) == 2


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
