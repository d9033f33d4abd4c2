"""GGUF files (written from tiny checkpoints with the gguf package's writer, llama.cpp's layout) load with
their config, weights and tokenizer, decode like the Hugging Face original, and are served; Ollama's
store is searched by name, read-only."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import openai
import pytest
import torch
from tokenizers import Regex, decoders, normalizers, pre_tokenizers, trainers
from tokenizers import AddedToken
from tokenizers import Tokenizer as RustTokenizer

from checkpoints import CORPUS, build_hf_checkpoint, dense_config, hf_greedy, load_hf, moe_config
from greedy_agreement import assert_greedy_agrees
from gguf_checkpoints import write_gguf
from server_utils import BackgroundServer
from qwenstack.errors import ModelNotFoundError, UnsupportedModelError
from qwenstack.from_gguf.model import load_gguf, read_gguf
from qwenstack.from_gguf.tokenizer import QWEN2_PATTERN, tokenizer_from_metadata
from qwenstack.engine.reference import greedy_generate
from qwenstack.llm import DEMO_MODEL_DIR, LLM
from qwenstack.models.base import prompt_logits
from qwenstack.models.registry import load_model
from qwenstack.quantization import QuantExperts, QuantLinear
from qwenstack.quantization.formats import Int4Weight, Int8Weight
from qwenstack.tokenizer import Tokenizer
from tokenizer_training import ADDED_TOKENS, SPECIAL_TOKENS, save_tokenizer

PROMPTS = [[5, 17, 33, 2, 101, 7, 8], [300, 4], [42]]
NEW_TOKENS = 24
# Q4_0 (gguf's quantizer) moves the next-token distribution of these random models by a mean KL of 3.7e-2 to
# 4.2e-2 nats per position from the original: its own loss, which our int4 keeps exactly, adding none.
Q4_KL_BOUND = 0.12
MULTILINGUAL = [
    "The quick brown fox jumps over the lazy dog.", "Où est la bibliothèque ? Ça va très bien, merci !",
    "Größenwahnsinnige Straßenbahn-Fahrer äßen Brötchen.", "你好，世界！今天天气很好。", "こんにちは、世界。カタカナとひらがな。",
    "안녕하세요 세계", "مرحبا بالعالم", "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "नमस्ते दुनिया", "Γειά σου Κόσμε", "emoji 🚀✨👍🏽 and flags 🇫🇷", "def f(x):\n\treturn x ** 2  # square\n",
    "   leading spaces, trailing   ", "numbers 1234567890 3.14159 1e-9", "line\r\nbreaks\n\n\nand tabs\t\t.",
    "<|im_start|>user\nhi<|im_end|>\n<think>\nhmm\n</think>", "cafe\u0301 vs café (NFD vs NFC)", "",
]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-src")
    # bfloat16, as Qwen's releases are: an F32 or BF16 file then holds exactly the original weights.
    return {"qwen3": build_hf_checkpoint(root / "dense", "qwen3", dense_config(), seed=1, dtype=torch.bfloat16),
            "qwen3_moe": build_hf_checkpoint(root / "moe", "qwen3_moe", moe_config(), seed=1, dtype=torch.bfloat16)}


@torch.inference_mode()
@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
@pytest.mark.parametrize("file_type", ["F32", "BF16"])
def test_greedy_tokens_match_the_original(arch: str, file_type: str, sources: dict[str, Path], tmp_path: Path) -> None:
    src = sources[arch]
    path = write_gguf(src, tmp_path / f"tiny-{file_type}.gguf", file_type)
    model, tokenizer, config, said = load_gguf(path, dtype=torch.float32)
    assert file_type in said and "requantized" not in said
    assert config["tie_word_embeddings"] == (arch == "qwen3")
    assert greedy_generate(model, PROMPTS, NEW_TOKENS) == hf_greedy(load_hf(src), PROMPTS, NEW_TOKENS)
    ids = torch.tensor([PROMPTS[0]])  # the same weights: the same logits as our loader reading the safetensors
    assert torch.equal(prompt_logits(model, ids), prompt_logits(load_model(src, torch.float32), ids))


@torch.inference_mode()
def test_q8_0_runs_as_int8_with_the_same_greedy_tokens(tmp_path: Path) -> None:
    # A trained model (the bundled demo), whose next tokens are decided, not the near-ties of random weights.
    path = write_gguf(DEMO_MODEL_DIR, tmp_path / "demo-Q8_0.gguf", "Q8_0")
    model, tokenizer, _, said = load_gguf(path, dtype=torch.float32)
    assert "Q8_0" in said and "int8" in said
    assert all(isinstance(m.quantized, Int8Weight) for m in model.modules() if isinstance(m, QuantLinear))
    assert isinstance(model.lm_head, QuantLinear)  # token_embd was Q8_0: the tied output matrix is int8 too
    prompts = [tokenizer.encode(t) for t in ("ROMEO:\nWhat light", "First Citizen:\nBefore we proceed", "KING")]
    assert greedy_generate(model, prompts, 32) == hf_greedy(load_hf(DEMO_MODEL_DIR), prompts, 32)


def mean_kl(ref: torch.nn.Module, other: torch.nn.Module) -> float:
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    p, q = (torch.log_softmax(prompt_logits(m, ids), -1) for m in (ref, other))
    return (p.exp() * (p - q)).sum(-1).mean().item()


@torch.inference_mode()
def test_q8_0_moe_gives_the_original_greedy_tokens(sources: dict[str, Path], tmp_path: Path) -> None:
    path = write_gguf(sources["qwen3_moe"], tmp_path / "moe-Q8_0.gguf", "Q8_0")
    model, *_ = load_gguf(path, dtype=torch.float32)
    exact = load_model(sources["qwen3_moe"], torch.float32)
    kl = mean_kl(exact, model)
    print(f"Q8_0 MoE: KL {kl:.1e} nats/position")  # the int8 KL bound of test_quantization.py
    assert 0 < kl < 5e-3
    hf = load_hf(sources["qwen3_moe"])
    want = hf_greedy(hf, PROMPTS, NEW_TOKENS)
    got = greedy_generate(model, PROMPTS, NEW_TOKENS)
    decided = assert_greedy_agrees(lambda ids: hf(ids).logits[0], exact, model, PROMPTS, want, got)
    print(f"Q8_0 MoE: {decided}/{NEW_TOKENS * len(PROMPTS)} greedy choices clear of a near tie and routed alike")
    assert decided >= NEW_TOKENS * len(PROMPTS) // 4


@torch.inference_mode()
@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_q4_0_runs_as_our_int4_code_for_code(arch: str, sources: dict[str, Path], tmp_path: Path) -> None:
    path = write_gguf(sources[arch], tmp_path / "tiny-Q4_0.gguf", "Q4_0")  # gguf's own Q4_0 quantizer
    model, _, _, said = load_gguf(path, dtype=torch.float32)
    assert "Q4_0 layers kept code for code as our int4-g32" in said and "requantized" not in said
    as_stored = load_gguf(path, dtype=torch.float32, quantize=False)[0]  # the file's weights, dequantized by gguf
    layers = dict(m for m in model.named_modules() if isinstance(m[1], (QuantLinear, QuantExperts)))
    assert len(layers) == (4 if arch == "qwen3" else 3) * 2 + 1  # qkv, o, gate_up, down | experts; lm_head
    for name, module in layers.items():
        if name == "lm_head" and arch == "qwen3":  # tied: the embedding's codes
            pairs = [(module.quantized, as_stored.model.embed_tokens.weight)]
        elif isinstance(module, QuantLinear):
            pairs = [(module.quantized, as_stored.get_submodule(name).weight)]
        else:
            pairs = [(getattr(module, s), getattr(as_stored.get_submodule(name), s)) for s in ("gate_up_proj", "down_proj")]
        for weight, want in pairs:
            assert isinstance(weight, Int4Weight) and weight.use_kernel and weight.group_size == 32
            got = torch.stack([weight.dequantize(e) for e in range(want.shape[0])]) if want.dim() == 3 else weight.dequantize()
            assert torch.equal(got, want), name  # the same weights, bit for bit
    ids = torch.tensor([PROMPTS[0]])
    torch.testing.assert_close(prompt_logits(model, ids), prompt_logits(as_stored, ids), atol=1e-4, rtol=0)
    kl = mean_kl(load_model(sources[arch], torch.float32), model)
    print(f"Q4_0 {arch}: KL {kl:.1e} nats/position from the original (Q4_0's own loss)")
    assert 0 < kl < Q4_KL_BOUND


@torch.inference_mode()
def test_f16_file_gives_the_original_greedy_tokens(sources: dict[str, Path], tmp_path: Path) -> None:
    path = write_gguf(sources["qwen3"], tmp_path / "tiny-F16.gguf", "F16")
    model, _, _, said = load_gguf(path, dtype=torch.float32)
    assert "F16" in said and "requantized" not in said
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert greedy_generate(model, PROMPTS, NEW_TOKENS) == hf_greedy(load_hf(sources["qwen3"]), PROMPTS, NEW_TOKENS)
    ids = torch.tensor([PROMPTS[0]])  # bfloat16 weights in float16: exact except the few below its normal range
    torch.testing.assert_close(prompt_logits(model, ids), prompt_logits(load_model(sources["qwen3"], torch.float32), ids),
                               atol=1e-4, rtol=0)


def qwen2_style_checkpoint_tokenizer(out_dir: Path) -> Path:
    """A tokenizer built like Qwen2/3's tokenizer.json: NFC, Qwen2's split pattern, byte-level BPE."""
    tok = RustTokenizer(__import__("tokenizers").models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4 + MULTILINGUAL * 2, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    save_tokenizer(tok, out_dir)
    return out_dir


def write_tokenizer_only_gguf(hf_dir: Path, out: Path) -> Path:
    import gguf

    from gguf_checkpoints import write_tokenizer_metadata

    writer = gguf.GGUFWriter(str(out), "qwen3")
    write_tokenizer_metadata(writer, hf_dir)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.mark.parametrize("style", ["qwen2", "gpt-2"])
def test_tokenizer_round_trips_like_the_hf_tokenizer(style: str, sources: dict[str, Path], tmp_path: Path) -> None:
    import transformers

    hf_dir = qwen2_style_checkpoint_tokenizer(tmp_path / "tok") if style == "qwen2" else sources["qwen3"]
    gguf = read_gguf(write_tokenizer_only_gguf(hf_dir, tmp_path / "tok.gguf"))
    assert gguf.meta["tokenizer.ggml.pre"] == style
    ours = tokenizer_from_metadata(gguf.meta)
    hf = transformers.AutoTokenizer.from_pretrained(hf_dir)
    for text in MULTILINGUAL:
        ids = hf.encode(text, add_special_tokens=False)
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == hf.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), text
    original = Tokenizer.from_dir(hf_dir)
    assert ours.chat_template == original.chat_template
    assert ours.special_tokens == original.special_tokens
    messages = [{"role": "user", "content": "héllo 你好"}]
    assert ours.apply_chat_template(messages) == original.apply_chat_template(messages)


def fake_ollama_store(root: Path, name: str, tag: str, gguf_file: Path) -> Path:
    data = gguf_file.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (root / "blobs").mkdir(parents=True)
    (root / "blobs" / digest.replace(":", "-")).write_bytes(data)
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "layers": [{"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "0" * 64},
                           {"mediaType": "application/vnd.ollama.image.model", "digest": digest, "size": len(data)}]}
    folder = root / "manifests" / "registry.ollama.ai" / "library" / name
    folder.mkdir(parents=True)
    (folder / tag).write_text(json.dumps(manifest))
    return root


def test_serve_a_gguf_file_and_an_ollama_model(sources: dict[str, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from qwenstack.serving.app import create_app
    from qwenstack.serving.config import ModelSpec, ServerConfig
    from qwenstack.serving.served import expected_name, load_served_model

    gguf_file = write_gguf(sources["qwen3"], tmp_path / "tiny-q3.gguf", "Q8_0")
    store = fake_ollama_store(tmp_path / "ollama", "tinyqwen", "q8", gguf_file)
    before = sorted((p.relative_to(store), p.stat().st_mtime_ns) for p in store.rglob("*"))
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    specs = [ModelSpec(model=str(gguf_file), block_size=4), ModelSpec(model="tinyqwen:q8", block_size=4)]
    assert [expected_name(s) for s in specs] == ["tiny-q3", "tinyqwen:q8"]
    models = [load_served_model(s, 2**22) for s in specs]
    with BackgroundServer(create_app(models, ServerConfig(ui_db_path=":memory:"))) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x")
        assert sorted(m.id for m in client.models.list().data) == ["tiny-q3", "tinyqwen:q8"]
        answers = [client.completions.create(model=name, prompt="The quick brown", max_tokens=6, temperature=0)
                   .choices[0].text for name in ("tiny-q3", "tinyqwen:q8")]
        assert answers[0] == answers[1] and answers[0]
    assert sorted((p.relative_to(store), p.stat().st_mtime_ns) for p in store.rglob("*")) == before  # read-only
    with pytest.raises(ModelNotFoundError, match="ollama pull tinyqwen:missing"):
        LLM("tinyqwen:missing")
    # A name without its tag is latest, as in Ollama; the store not having that tag says which it has.
    with pytest.raises(ModelNotFoundError, match=r"'tinyqwen' \(tag latest\) .* the store has it as tinyqwen:q8"):
        LLM("tinyqwen")


def test_unsupported_files_are_refused_by_name(tmp_path: Path, sources: dict[str, Path]) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    writer.add_block_count(1)
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        step()
    with pytest.raises(UnsupportedModelError, match="architecture 'llama'"):
        LLM(str(tmp_path / "llama.gguf"))
    meta = dict(read_gguf(write_tokenizer_only_gguf(sources["qwen3"], tmp_path / "t.gguf")).meta)
    meta["tokenizer.ggml.pre"] = "llama-bpe"
    with pytest.raises(UnsupportedModelError, match="llama-bpe"):
        tokenizer_from_metadata(meta)
    (tmp_path / "not.gguf").write_bytes(b"nope")
    with pytest.raises(ModelNotFoundError, match="not a GGUF file"):
        LLM(str(tmp_path / "not.gguf"))


def test_low_bit_types_off_a_linear_grid_go_to_int8() -> None:
    """int4-g32 only for the types whose values it holds closely; Q3_K, the IQ codebooks, ternary and MXFP4 lost
    7-15% of their weights' accuracy re-rounded to it (0/36 to 20/36 greedy tokens against the file's own weights
    on a tiny model), so they become int8 as the 5-to-8-bit types do."""
    from gguf import GGMLQuantizationType as T

    from qwenstack.from_gguf.model import type_class

    assert [type_class(t) for t in (T.Q4_0, T.Q4_1, T.Q4_K, T.Q2_K)] == ["int4"] * 4
    assert {type_class(t) for t in (T.Q3_K, T.IQ4_NL, T.IQ4_XS, T.MXFP4, T.TQ2_0, T.Q5_K, T.Q6_K, T.Q8_0)} == {"int8"}
    assert {type_class(t) for t in (T.F32, T.F16, T.BF16)} == {"float"}


def write_gguf_with(hf_dir: Path, out: Path, monkeypatch: pytest.MonkeyPatch, name: str, type_name: str) -> Path:
    """A GGUF with one tensor stored as `type_name` (F64 as values; other types as zero blocks)."""
    import gguf
    import numpy as np

    original = gguf.GGUFWriter.add_tensor

    def add_tensor(self, tensor_name, array, raw_shape=None, raw_dtype=None):  # noqa: ANN001
        if tensor_name == name:
            raw_dtype = gguf.GGMLQuantizationType[type_name]
            if type_name == "F64":
                array = array.astype(np.float64)
            else:
                block, size = gguf.GGML_QUANT_SIZES[raw_dtype]
                array = np.zeros((array.shape[0], array.shape[1] // block * size), dtype=np.uint8)
        return original(self, tensor_name, array, raw_shape=raw_shape, raw_dtype=raw_dtype)

    with monkeypatch.context() as patch:
        patch.setattr(gguf.GGUFWriter, "add_tensor", add_tensor)
        return write_gguf(hf_dir, out)


@torch.inference_mode()
def test_f64_tensors_load_and_unreadable_types_are_named(sources: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """F64 (llama.cpp reads it) loads; a type gguf cannot dequantize (Q8_1, an activation type) was a
    NotImplementedError traceback, and is now the tensor and its type by name."""
    f64 = write_gguf_with(sources["qwen3"], tmp_path / "f64.gguf", monkeypatch, "output_norm.weight", "F64")
    reference = load_gguf(write_gguf(sources["qwen3"], tmp_path / "f32.gguf"), torch.float32)[0]
    torch.testing.assert_close(prompt_logits(load_gguf(f64, torch.float32)[0], torch.tensor([PROMPTS[0]])),
                               prompt_logits(reference, torch.tensor([PROMPTS[0]])))
    q8_1 = write_gguf_with(sources["qwen3"], tmp_path / "q8_1.gguf", monkeypatch, "blk.0.ffn_up.weight", "Q8_1")
    with pytest.raises(UnsupportedModelError, match=r"q8_1.gguf: tensor 'blk.0.ffn_up.weight' is stored as Q8_1"):
        LLM(str(q8_1), device="cpu")


def test_broken_metadata_is_named(sources: dict[str, Path], tmp_path: Path) -> None:
    """A tokenizer without merges loaded and spelled every word letter by letter (llama.cpp refuses the file); no
    token list was a KeyError; a count of the wrong type or a zero head count was a ValueError/ZeroDivisionError."""
    from qwenstack.errors import CheckpointError
    from qwenstack.from_gguf.model import config_from_metadata

    gguf = read_gguf(write_gguf(sources["qwen3"], tmp_path / "m.gguf"))
    for key in ("tokenizer.ggml.merges", "tokenizer.ggml.tokens"):
        meta = {k: v for k, v in gguf.meta.items() if k != key}
        with pytest.raises(CheckpointError, match=f"m.gguf has no '{key}'"):
            tokenizer_from_metadata(meta, "m.gguf")
    with pytest.raises(CheckpointError, match="m.gguf has no tokenizer"):
        tokenizer_from_metadata({k: v for k, v in gguf.meta.items() if not k.startswith("tokenizer.")}, "m.gguf")
    for key, value in (("qwen3.block_count", "two"), ("qwen3.attention.head_count", 0)):
        gguf.meta[key], original = value, gguf.meta[key]
        with pytest.raises(CheckpointError, match=r"m.gguf has malformed 'qwen3.\*' metadata"):
            config_from_metadata(gguf)
        gguf.meta[key] = original
