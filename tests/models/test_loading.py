"""Strict checkpoint loading: layouts, dtypes, and one clear error for each kind of broken checkpoint."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import build_hf_checkpoint, dense_config, moe_config
from qwenstack.errors import CheckpointError, ConfigError, ModelNotFoundError
from qwenstack.models.base import prompt_logits
from qwenstack.models.registry import load_model
from qwenstack.resolve import resolve_model

IDS = torch.tensor([[3, 9, 27, 81, 243, 100, 7]])


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_weights(path: Path, edit) -> None:
    state = load_file(str(path / "model.safetensors"))
    edit(state)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_sharded_checkpoint_loads_like_single_file(tmp_path: Path, tiny_qwen3: Path) -> None:
    sharded = build_hf_checkpoint(tmp_path / "sharded", "qwen3", dense_config(), max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) >= 2
    single = build_hf_checkpoint(tmp_path / "single", "qwen3", dense_config())
    torch.testing.assert_close(prompt_logits(load_model(sharded), IDS), prompt_logits(load_model(single), IDS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtype_choice(tiny_qwen3: Path, dtype: torch.dtype) -> None:
    model = load_model(tiny_qwen3, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert not any(p.is_meta for p in model.parameters())


def test_tied_checkpoint_has_no_lm_head_on_disk(tiny_qwen3: Path) -> None:
    assert "lm_head.weight" not in load_file(str(tiny_qwen3 / "model.safetensors"))
    model = load_model(tiny_qwen3)
    assert model.lm_head is None


def test_fused_transposed_expert_layout(tmp_path: Path, tiny_qwen3_moe: Path) -> None:
    """Experts stored fused and transposed (the Qwen3-VL-MoE layout) load to the same model."""
    fused = copy_checkpoint(tiny_qwen3_moe, tmp_path / "fused")
    config = json.loads((fused / "config.json").read_text())
    num_experts = config.get("num_experts") or config["num_local_experts"]

    def fuse(state: dict) -> None:
        for layer in range(config["num_hidden_layers"]):
            p = f"model.layers.{layer}.mlp.experts"
            gate = [state.pop(f"{p}.{e}.gate_proj.weight") for e in range(num_experts)]
            up = [state.pop(f"{p}.{e}.up_proj.weight") for e in range(num_experts)]
            down = [state.pop(f"{p}.{e}.down_proj.weight") for e in range(num_experts)]
            state[f"{p}.gate_up_proj"] = torch.stack([torch.cat([g, u]).t() for g, u in zip(gate, up)]).contiguous()
            state[f"{p}.down_proj"] = torch.stack([d.t() for d in down]).contiguous()

    rewrite_weights(fused, fuse)
    torch.testing.assert_close(prompt_logits(load_model(fused), IDS), prompt_logits(load_model(tiny_qwen3_moe), IDS))


def test_missing_tensor_is_named(tmp_path: Path, tiny_qwen3: Path) -> None:
    broken = copy_checkpoint(tiny_qwen3, tmp_path / "missing")
    rewrite_weights(broken, lambda s: s.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.down_proj\.weight'"):
        load_model(broken)


def test_missing_expert_is_named(tmp_path: Path, tiny_qwen3_moe: Path) -> None:
    broken = copy_checkpoint(tiny_qwen3_moe, tmp_path / "missing_expert")
    rewrite_weights(broken, lambda s: s.pop("model.layers.0.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.experts\.3\.up_proj\.weight"):
        load_model(broken)


def test_wrong_shape_is_named(tmp_path: Path, tiny_qwen3: Path) -> None:
    broken = copy_checkpoint(tiny_qwen3, tmp_path / "shape")

    def shrink(state: dict) -> None:
        state["model.layers.0.self_attn.k_proj.weight"] = state["model.layers.0.self_attn.k_proj.weight"][:-1].clone()

    rewrite_weights(broken, shrink)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \[31, 64\].*expects \[32, 64\]"):
        load_model(broken)


def test_unexpected_tensor_is_named(tmp_path: Path, tiny_qwen3: Path) -> None:
    broken = copy_checkpoint(tiny_qwen3, tmp_path / "extra")
    rewrite_weights(broken, lambda s: s.__setitem__("model.layers.9.mlp.up_proj.weight", torch.zeros(2, 2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.9\.mlp\.up_proj\.weight'"):
        load_model(broken)


def test_corrupt_config_json(tmp_path: Path, tiny_qwen3: Path) -> None:
    broken = copy_checkpoint(tiny_qwen3, tmp_path / "badjson")
    (broken / "config.json").write_text('{"model_type": "qwen3", "hidden_size": 64,')
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        load_model(broken)


def test_missing_config_field_is_named(tmp_path: Path, tiny_qwen3: Path) -> None:
    broken = copy_checkpoint(tiny_qwen3, tmp_path / "nofield")
    config = json.loads((broken / "config.json").read_text())
    del config["num_hidden_layers"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="missing the field 'num_hidden_layers'"):
        load_model(broken)


def test_truncated_shard(tmp_path: Path, tiny_qwen3: Path) -> None:
    broken = copy_checkpoint(tiny_qwen3, tmp_path / "truncated")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(broken)


def test_uncached_model_id_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelNotFoundError, match=r"not in the local Hugging Face cache.*huggingface-cli download Qwen/Qwen3-0\.6B"):
        resolve_model("Qwen/Qwen3-0.6B")


def test_local_directory_resolves(tiny_qwen3: Path) -> None:
    assert resolve_model(str(tiny_qwen3)) == tiny_qwen3
