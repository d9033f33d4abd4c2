"""Qwen3-Embedding against transformers on tiny random checkpoints in the released layout (Qwen3Model's tensors,
no `model.` prefix, no lm_head): last-token embeddings of a packed batch, how the loader tells an embedding
checkpoint from a chat one, what a malformed one says, and what the engine gives an embedding model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import build_hf_checkpoint, dense_config
from embedding_checkpoints import build_embedding_checkpoint, hf_embeddings
from qwenstack.engine.embed import last_token_states, matryoshka, pass_groups
from qwenstack.engine.engine import EngineConfig, LLMEngine
from qwenstack.engine.params import SamplingParams
from qwenstack.errors import CheckpointError, RequestError, UnsupportedModelError
from qwenstack.models.qwen3 import Qwen3ForCausalLM
from qwenstack.models.qwen3_embedding import Qwen3EmbeddingModel
from qwenstack.models.registry import load_model
from qwenstack.pooling_config import PoolingConfig
from qwenstack.tokenizer import Tokenizer

PROMPTS = [[5, 17, 33, 2, 101, 7, 8], [300, 4], list(range(9, 40)), [42]]


@pytest.fixture(scope="module")
def embedding_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_embedding_checkpoint(tmp_path_factory.mktemp("qwen3-embedding"), seed=3)


def embeddings(model: torch.nn.Module, prompts: list[list[int]], max_tokens_per_pass: int = 2048) -> torch.Tensor:
    return matryoshka(last_token_states(model, prompts, max_tokens_per_pass), None, True)


@pytest.mark.parametrize("max_tokens_per_pass", [2048, 8])  # one packed pass; several (the long prompt alone)
def test_embeddings_match_transformers(embedding_dir: Path, max_tokens_per_pass: int) -> None:
    ours = load_model(embedding_dir, dtype=torch.float32)
    assert isinstance(ours, Qwen3EmbeddingModel)
    got = embeddings(ours, PROMPTS, max_tokens_per_pass)
    want = hf_embeddings(embedding_dir, PROMPTS)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(PROMPTS)))


def test_causal_lm_layout_of_the_backbone_loads_the_same(embedding_dir: Path, tmp_path: Path) -> None:
    """A backbone saved inside Qwen3ForCausalLM (`model.`-prefixed, a copy of the embedding as lm_head) with the
    sentence-transformers files: sanitize maps the names, the head goes unused."""
    for f in embedding_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_bytes((embedding_dir / "1_Pooling" / "config.json").read_bytes())
    state = load_file(str(embedding_dir / "model.safetensors"))
    prefixed = {f"model.{name}": t for name, t in state.items()}
    save_file({**prefixed, "lm_head.weight": state["embed_tokens.weight"].clone()}, str(tmp_path / "model.safetensors"))
    ours = load_model(tmp_path, dtype=torch.float32)
    assert isinstance(ours, Qwen3EmbeddingModel)
    torch.testing.assert_close(embeddings(ours, PROMPTS), hf_embeddings(embedding_dir, PROMPTS), atol=1e-4, rtol=0)


def test_a_bare_backbone_is_an_embedding_model_without_sentence_transformers_files(tmp_path: Path) -> None:
    path = build_embedding_checkpoint(tmp_path, seed=4, sentence_transformers=False, appends_end=False)
    assert isinstance(load_model(path, dtype=torch.float32), Qwen3EmbeddingModel)
    assert PoolingConfig.for_embedding_checkpoint(path) == PoolingConfig(normalize=True, end_token="<|endoftext|>")


def test_a_chat_checkpoint_stays_a_causal_lm(tiny_qwen3: Path) -> None:
    """Tied, so no lm_head on disk either: its `model.` prefix says it is not a bare backbone."""
    assert json.loads((tiny_qwen3 / "config.json").read_text())["tie_word_embeddings"]
    assert isinstance(load_model(tiny_qwen3, dtype=torch.float32), Qwen3ForCausalLM)


def test_a_missing_tensor_is_named_as_the_checkpoint_names_it(embedding_dir: Path, tmp_path: Path) -> None:
    for f in embedding_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    state = load_file(str(embedding_dir / "model.safetensors"))
    del state["norm.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'norm\.weight'"):
        load_model(tmp_path, dtype=torch.float32)


def test_pooling_config_comes_from_the_sentence_transformers_files(embedding_dir: Path, tmp_path: Path) -> None:
    pooling = PoolingConfig.for_embedding_checkpoint(embedding_dir)
    assert pooling.normalize and pooling.end_token == "<|endoftext|>"
    assert pooling.prompts["query"].startswith("Instruct: Given a web search query")
    # Another pooling mode is refused by name rather than served as last-token.
    (tmp_path / "modules.json").write_bytes((embedding_dir / "modules.json").read_bytes())
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    with pytest.raises(UnsupportedModelError, match="mean_tokens"):
        PoolingConfig.for_embedding_checkpoint(tmp_path)


def test_the_tokenizer_appends_the_end_token(embedding_dir: Path) -> None:
    tok = Tokenizer.from_dir(embedding_dir)
    assert tok.encode("hello world", add_special_tokens=True)[-1] == tok.token_to_id("<|endoftext|>")


def test_an_embedding_engine_has_a_minimal_pool_and_refuses_generation(embedding_dir: Path) -> None:
    model = load_model(embedding_dir, dtype=torch.float32)
    tok = Tokenizer.from_dir(embedding_dir)
    engine = LLMEngine(model, tok, tok.eos_token_ids, EngineConfig(block_size=4, kv_cache_memory=2**24))
    assert engine.block_manager.num_blocks == 2  # not the 16 MiB asked for
    assert engine.max_model_len == dense_config()["max_position_embeddings"]  # not capped by the pool's 8 tokens
    with pytest.raises(RequestError, match="embedding model"):
        engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=2))
    torch.testing.assert_close(matryoshka(engine.embed(PROMPTS), None, True), hf_embeddings(embedding_dir, PROMPTS),
                               atol=1e-4, rtol=0)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.embed([[1, 2, 10**6]])
    with pytest.raises(RequestError, match="empty"):
        engine.embed([[1], []])


def test_a_chat_engine_embeds_between_steps(tmp_path: Path) -> None:
    """A chat model's embedding is its final hidden state at the last token, normalized (Ollama's)."""
    path = build_hf_checkpoint(tmp_path, "qwen3", dense_config(), seed=2)
    model = load_model(path, dtype=torch.float32)
    tok = Tokenizer.from_dir(path)
    engine = LLMEngine(model, tok, tok.eos_token_ids, EngineConfig(block_size=4, kv_cache_memory=2**22))
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        want = torch.stack([ref.model(torch.tensor([p])).last_hidden_state[0, -1] for p in PROMPTS])
    got = matryoshka(engine.embed(PROMPTS), None, True)
    torch.testing.assert_close(got, torch.nn.functional.normalize(want, dim=-1), atol=1e-4, rtol=0)


def test_pass_groups_keep_order_and_budget() -> None:
    assert pass_groups([3, 4, 2, 9, 1], 8) == [[0, 1], [2], [3], [4]]
    assert pass_groups([1, 1, 1], 8) == [[0, 1, 2]]


def test_matryoshka_truncates_then_renormalizes() -> None:
    states = torch.tensor([[3.0, 4.0, 12.0]])
    torch.testing.assert_close(matryoshka(states, 2, True), torch.tensor([[0.6, 0.8]]))
    torch.testing.assert_close(matryoshka(states, None, False), states)


def test_embedding_needs_a_runner_that_runs_alone(embedding_dir: Path) -> None:
    """Tensor-parallel ranks run only what a step broadcasts: an embedding pass there is refused, not hung."""
    model = load_model(embedding_dir, dtype=torch.float32)
    tok = Tokenizer.from_dir(embedding_dir)
    engine = LLMEngine(model, tok, tok.eos_token_ids, EngineConfig(block_size=4))
    engine.runner.can_embed = False  # type: ignore[misc]  # as DistributedRunner says
    with pytest.raises(RequestError, match="tensor parallelism"):
        engine.embed(PROMPTS)


def test_data_parallel_replicas_embed_in_turn(embedding_dir: Path) -> None:
    import asyncio

    from qwenstack.engine.async_engine import AsyncEngine
    from qwenstack.serving.replicas import ReplicatedEngine

    tok = Tokenizer.from_dir(embedding_dir)
    replicas = [AsyncEngine(LLMEngine(load_model(embedding_dir, dtype=torch.float32), tok, tok.eos_token_ids,
                                      EngineConfig(block_size=4)), name=f"dp{i}") for i in range(2)]
    replicated = ReplicatedEngine(replicas, block_size=4)
    try:
        async def twice() -> list[torch.Tensor]:
            return list(await asyncio.gather(replicated.embed(PROMPTS), replicated.embed(PROMPTS)))

        results = asyncio.run(twice())
    finally:
        replicated.shutdown()
    want = hf_embeddings(embedding_dir, PROMPTS)
    for states in results:
        torch.testing.assert_close(matryoshka(states, None, True), want, atol=1e-4, rtol=0)


def test_the_offline_api_embeds_as_the_server_does(embedding_dir: Path) -> None:
    """LLM.embed: texts with the tokenizer's end token and the checkpoint's named prompt, token ids as given,
    Matryoshka dimensions; the vectors are transformers' (last token, normalized), in vLLM's output shape."""
    from qwenstack.llm import LLM

    llm = LLM(embedding_dir, dtype="float32")
    tokenizer = Tokenizer.from_dir(embedding_dir)

    def vectors(outputs: list) -> torch.Tensor:
        return torch.tensor([o.outputs.embedding for o in outputs])

    texts = ["hello world", "the capital of France"]
    want = hf_embeddings(embedding_dir, [tokenizer.encode(t, add_special_tokens=True) for t in texts])
    outputs = llm.embed(texts)
    torch.testing.assert_close(vectors(outputs), want, atol=1e-4, rtol=0)
    assert [o.request_id for o in outputs] == ["embed-0", "embed-1"] and all(o.finished for o in outputs)
    assert outputs[1].prompt_token_ids == llm.pooling.with_end_token(tokenizer.encode(texts[1], True), tokenizer)
    assert outputs[0].outputs.hidden_size == want.shape[1]
    torch.testing.assert_close(vectors(llm.embed(PROMPTS[1])), hf_embeddings(embedding_dir, PROMPTS[1:2]),
                               atol=1e-4, rtol=0)
    assert llm.embed(PROMPTS[1])[0].prompt_token_ids == PROMPTS[1]  # token ids go in as given
    query = llm.pooling.prompts["query"]
    torch.testing.assert_close(vectors(llm.embed(texts[0], prompt_name="query")),
                               hf_embeddings(embedding_dir, [tokenizer.encode(query + texts[0], True)]),
                               atol=1e-4, rtol=0)
    short = llm.embed(texts, dimensions=8)
    assert {o.outputs.hidden_size for o in short} == {8}
    torch.testing.assert_close(vectors(short), torch.nn.functional.normalize(want[:, :8], dim=-1), atol=1e-4, rtol=0)
    assert llm.embed([]) == []
    for bad in (dict(dimensions=0), dict(prompt_name="nope")):
        with pytest.raises(RequestError):
            llm.embed(texts, **bad)
    with pytest.raises(RequestError):
        llm.embed([[]])
