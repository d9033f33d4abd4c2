"""Sequence classifiers (Qwen3ForSequenceClassification, Qwen3MoeForSequenceClassification): logits equal to
transformers' on tiny random checkpoints saved by save_pretrained, its pooling at the last non-pad token, how a
checkpoint is recognised, the offline LLM.classify and LLM.score, and what a classifier refuses."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from classifier_checkpoints import SENTIMENT, build_classifier_checkpoint, convert_reranker, hf_classifier_logits
from rerank_checkpoints import build_reranker_checkpoint, hf_rerank
from qwenstack.errors import RequestError, UnsupportedModelError
from qwenstack.llm import LLM
from qwenstack.models.qwen3 import classifier_labels
from qwenstack.models.registry import checkpoint_task, load_model
from qwenstack.weights import checkpoint_tensors

PAD = 0  # dense_config's pad_token_id
PROMPTS = [[5, 6, 7, 8], [9, 10, 11, PAD, PAD], [12], [PAD, 13, 14], [PAD, PAD]]


@pytest.fixture(scope="module", params=["qwen3", "qwen3_moe"])
def classifier(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_classifier_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=3)


@pytest.fixture(scope="module")
def reranker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_reranker_checkpoint(tmp_path_factory.mktemp("reranker"), seed=11)


def test_logits_match_transformers_with_its_pad_pooling(classifier: Path) -> None:
    llm = LLM(str(classifier), dtype="float32")
    assert llm.labels == SENTIMENT
    got = llm.engine.classify(PROMPTS)
    want = hf_classifier_logits(classifier, PROMPTS)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # The pads after a text change nothing; transformers pools all-pad prompts at position 0.
    torch.testing.assert_close(got[1], llm.engine.classify([[9, 10, 11]])[0], atol=1e-5, rtol=0)
    assert not torch.allclose(got[0], got[2], atol=1e-2)  # different texts, different logits: the test has teeth


def test_llm_classify_gives_vllms_shape_with_softmax_probabilities(classifier: Path) -> None:
    llm = LLM(str(classifier), dtype="float32")
    outs = llm.classify(["hello world", [5, 6, 7, 8], {"prompt_token_ids": [12]}])
    want = hf_classifier_logits(classifier, [llm.tokenizer.encode("hello world"), [5, 6, 7, 8], [12]]).softmax(-1)
    torch.testing.assert_close(torch.tensor([o.outputs.probs for o in outs]), want, atol=1e-5, rtol=1e-4)
    assert [o.outputs.num_classes for o in outs] == [3, 3, 3] and outs[1].prompt_token_ids == [5, 6, 7, 8]
    assert llm.classify([]) == []


def test_a_converted_reranker_scores_as_the_original(reranker: Path, tmp_path: Path) -> None:
    converted = convert_reranker(reranker, tmp_path / "seq-cls")
    docs = ["Paris is the capital of France.", "2 + 2 = 4", "Berlin is the capital of Germany."]
    want, _ = hf_rerank(reranker, "capital of France", docs)
    llm = LLM(str(converted), dtype="float32")
    assert llm.labels == ("LABEL_0",)
    got = [o.outputs.score for o in llm.score("capital of France", docs)]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=0)
    probs = llm.classify(["capital of France"])[0].outputs.probs  # one label: sigmoid, as vLLM's classify
    assert len(probs) == 1 and 0 < probs[0] < 1


def test_a_classifier_of_several_labels_cannot_rerank_nor_generate(classifier: Path) -> None:
    llm = LLM(str(classifier), dtype="float32")
    with pytest.raises(RequestError, match="classifier of 3 labels"):
        llm.score("q", ["d"])
    with pytest.raises(RequestError, match="sequence-classification model"):
        llm.generate("hello")
    assert llm.embed("hello")[0].outputs.hidden_size == 64  # the backbone's last token, as a chat model's


def test_a_causal_model_cannot_classify(tiny_qwen3: Path) -> None:
    with pytest.raises(RequestError, match="no classification head"):
        LLM(str(tiny_qwen3), dtype="float32").classify("hello")


def test_the_checkpoint_says_it_is_a_classifier(classifier: Path, tmp_path: Path) -> None:
    tensors = checkpoint_tensors(classifier)
    config = json.loads((classifier / "config.json").read_text())
    assert checkpoint_task(classifier, config, tensors) == "classify"
    # Either sign suffices: the architectures' name, or the score tensor.
    assert checkpoint_task(classifier, {**config, "architectures": None}, tensors) == "classify"
    assert checkpoint_task(classifier, config, [n for n in tensors if n != "score.weight"]) == "classify"
    with pytest.raises(UnsupportedModelError, match="sequence-classification checkpoints of model_type 'qwen3_next'"):
        from qwenstack.models.registry import model_class
        model_class({"model_type": "qwen3_next"}, "classify")


def test_a_missing_score_tensor_is_named(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    out = build_classifier_checkpoint(tmp_path / "c", seed=1)
    weights = load_file(out / "model.safetensors")
    del weights["score.weight"]
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Exception, match="score.weight"):
        load_model(out, dtype="float32")


def test_int8_keeps_the_score_head_whole(classifier: Path) -> None:
    llm = LLM(str(classifier), dtype="float32", quantization="int8")
    assert type(llm.engine.model.score).__name__ != "QuantLinear"  # type: ignore[attr-defined]
    assert type(llm.engine.model.model.layers[0].self_attn.o_proj).__name__ == "QuantLinear"  # type: ignore


@pytest.mark.parametrize("config, labels", [
    ({"id2label": {"1": "b", "0": "a", "10": "k", "2": "c"}}, ("a", "b", "c", "k")),  # ids, not string order
    ({"num_labels": 1}, ("LABEL_0",)),
    ({}, ("LABEL_0", "LABEL_1")),  # transformers' default of two
])
def test_labels_in_id_order(config: dict, labels: tuple[str, ...]) -> None:
    assert classifier_labels(config) == labels


def test_tensor_parallelism_refuses_a_classifier_at_load(classifier: Path) -> None:
    from qwenstack.distributed.group import ParallelGroup
    from qwenstack.distributed.shard import shard_model

    with pytest.raises(UnsupportedModelError, match="classification models are not supported with tensor"):
        shard_model(load_model(classifier, dtype="float32"), ParallelGroup(rank=0, world_size=2))


def test_chat_refuses_a_classifier_before_its_prompt(classifier: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import sys

    from qwenstack.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert main(["chat", str(classifier)]) == 1
    assert "is a sequence-classification model" in capsys.readouterr().err
