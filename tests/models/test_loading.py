"""Strict checkpoint loading: layouts, dtypes, and one clear error for each kind of broken checkpoint."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import build_hf_checkpoint, dense_config, moe_config, next_config
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


def test_a_sliding_window_switch_no_layer_uses_loads(tmp_path: Path, tiny_qwen3: Path) -> None:
    """Qwen3 configs carry use_sliding_window with max_window_layers at the layer count: no layer slides in
    transformers, so the model is the same (logits equal the plain config's); one where layers do slide is refused."""
    from qwenstack.errors import UnsupportedModelError

    plain = load_model(tiny_qwen3, dtype=torch.float32)
    switch = copy_checkpoint(tiny_qwen3, tmp_path / "switch")
    config = json.loads((switch / "config.json").read_text())
    layers = config["num_hidden_layers"]
    (switch / "config.json").write_text(json.dumps({**config, "use_sliding_window": True, "sliding_window": 64,
                                                    "max_window_layers": layers}))
    with torch.no_grad():
        torch.testing.assert_close(prompt_logits(load_model(switch, dtype=torch.float32), IDS),
                                   prompt_logits(plain, IDS))
    sliding = {k: v for k, v in config.items() if k != "layer_types"}  # transformers' explicit list would win
    last_slides = ["full_attention"] * (layers - 1) + ["sliding_attention"]
    for slides in ({"max_window_layers": 1}, {"layer_types": last_slides}):
        (switch / "config.json").write_text(json.dumps({**sliding, "use_sliding_window": True, "sliding_window": 64,
                                                        **slides}))
        with pytest.raises(UnsupportedModelError, match="use_sliding_window"):
            load_model(switch)


def test_a_moe_sliding_window_is_refused(tmp_path: Path, tiny_qwen3_moe: Path) -> None:
    """transformers' Qwen3-MoE slides every layer when use_sliding_window is on (it has no max_window_layers):
    we ran full attention, silently different past the window."""
    from qwenstack.errors import UnsupportedModelError

    switch = copy_checkpoint(tiny_qwen3_moe, tmp_path / "switch")
    config = json.loads((switch / "config.json").read_text())
    (switch / "config.json").write_text(json.dumps({**config, "use_sliding_window": True, "sliding_window": 64,
                                                    "max_window_layers": config["num_hidden_layers"]}))
    with pytest.raises(UnsupportedModelError, match="use_sliding_window"):
        load_model(switch)
    (switch / "config.json").write_text(json.dumps({**config, "use_sliding_window": True, "sliding_window": None}))
    load_model(switch)  # the switch with no window slides nothing


def test_rope_scaling_that_drops_a_rope_parameters_theta_is_refused(tmp_path: Path, tiny_qwen3: Path) -> None:
    """rope_scaling added to a rope_parameters config, naming no rope_theta: transformers drops rope_parameters'
    1e6 and runs its default 10000. Refused, naming the field, rather than silently running either."""
    edited = copy_checkpoint(tiny_qwen3, tmp_path / "edited")
    config = json.loads((edited / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="rope_parameters.rope_theta=1e"):
        load_model(edited)


def test_the_template_file_wins_over_tokenizer_config(tmp_path: Path, tiny_qwen3: Path) -> None:
    """As transformers reads them: chat_template.jinja beside a tokenizer_config.json that still holds an older
    template (a re-saved Qwen3-2507 checkpoint) is the template."""
    from qwenstack.tokenizer import Tokenizer

    saved = copy_checkpoint(tiny_qwen3, tmp_path / "resaved")
    newer = "{% for m in messages %}{{ m['content'] }}{% endfor %}<think>\n"
    (saved / "chat_template.jinja").write_text(newer)
    assert json.loads((saved / "tokenizer_config.json").read_text())["chat_template"] != newer
    assert Tokenizer.from_dir(saved).chat_template == newer


def test_a_causal_lm_saved_from_its_bare_backbone_loads(tmp_path: Path) -> None:
    """`embed_tokens.weight`, `layers.0...` beside `lm_head.weight` (no `model.` prefix), which transformers loads:
    the same model as the prefixed checkpoint."""
    source = build_hf_checkpoint(tmp_path / "untied", "qwen3", dense_config(tie_word_embeddings=False))
    bare = copy_checkpoint(source, tmp_path / "bare")
    rewrite_weights(bare, lambda state: state.update(
        {k.removeprefix("model."): state.pop(k) for k in [k for k in state if k.startswith("model.")]}))
    assert "embed_tokens.weight" in load_file(str(bare / "model.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(prompt_logits(load_model(bare, dtype=torch.float32), IDS),
                                   prompt_logits(load_model(source, dtype=torch.float32), IDS))


@pytest.mark.parametrize("model_type, config", [("qwen3_moe", moe_config()), ("qwen3_next", next_config())],
                         ids=["qwen3_moe", "qwen3_next"])
def test_experts_in_transformers_own_fused_layout(tmp_path: Path, model_type: str, config: dict) -> None:
    """save_pretrained(save_original_format=False) stores experts as transformers holds them: gate_up_proj [E, 2I, H].
    With hidden_size == 2 * moe_intermediate_size that stack is square and was read as the transposed Qwen3-VL-MoE
    layout (logits 3.5 off); down_proj [E, H, I], not square, says which layout the module has."""
    import transformers

    from checkpoints import _randomise_norms, _recentre_zero_centred_norms, load_hf

    assert config["hidden_size"] == 2 * config["moe_intermediate_size"]
    cls = {"qwen3_moe": transformers.Qwen3MoeForCausalLM, "qwen3_next": transformers.Qwen3NextForCausalLM}[model_type]
    cfg_cls = {"qwen3_moe": transformers.Qwen3MoeConfig, "qwen3_next": transformers.Qwen3NextConfig}[model_type]
    torch.manual_seed(0)
    model = cls(cfg_cls(**config))
    _randomise_norms(model, 0)
    if model_type == "qwen3_next":
        _recentre_zero_centred_norms(model)
    model.save_pretrained(tmp_path, save_original_format=False)
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in load_file(str(tmp_path / "model.safetensors")))
    with torch.no_grad():
        torch.testing.assert_close(prompt_logits(load_model(tmp_path, dtype=torch.float32), IDS),
                                   load_hf(tmp_path)(IDS).logits, atol=1e-4, rtol=0)
