"""Qwen3-TTS parity with the official qwen-tts 0.1.1 package (fixtures from scripts/tts_reference/), the
exact streaming codec, and the batched speech engine."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tts_checkpoints as recipe
from qwenstack.models.attention import AttentionBatch
from qwenstack.tts.engine import SpeechEngine, SpeechParams, SpeechRequest
from qwenstack.tts.loader import TTSModel, load_tts

GREEDY = dict(temperature=0, subtalker_temperature=0, max_frames=23)  # the fixtures ran max_new_tokens=24


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for kind in recipe.KINDS:
        path = tmp_path_factory.mktemp(kind)
        hashes = recipe.build_checkpoint(kind, path)
        rec = recipe.load_recipe(kind)
        # The rebuilt weights are the ones the reference outputs came from.
        assert hashes == {"model": rec["model"]["sha256"], "speech_tokenizer": rec["speech_tokenizer"]["sha256"]}
        out[kind] = path
    return out


def fixture(kind: str) -> dict[str, np.ndarray]:
    return dict(np.load(recipe.FIXTURES / f"{kind}.npz"))


def prompt_cases(tts: TTSModel, kind: str, f: dict[str, np.ndarray]) -> dict[str, dict]:
    ids = f["text_ids"].tolist()
    m = tts.model
    if kind == "custom_voice":
        return {"stream_english_vivian": dict(text_ids=ids, language="english", speaker="vivian"),
                "full_auto_eric": dict(text_ids=ids, language="auto", speaker="eric", non_streaming_text=True),
                "full_chinese_vivian": dict(text_ids=ids, language="chinese", speaker="vivian",
                                            non_streaming_text=True)}
    if kind == "voice_design":
        instruct = f["instruct_ids"].tolist()
        return {"design_english": dict(text_ids=ids, language="english", instruct_ids=instruct,
                                       non_streaming_text=True),
                "design_auto_stream": dict(text_ids=ids, language="auto", instruct_ids=instruct)}
    embedding = torch.from_numpy(f["speaker_embedding"])
    assert m.speaker_encoder is not None
    codes = torch.from_numpy(f["encode_codes"])
    ref = f["ref_ids"].tolist()
    return {"xvector_english": dict(text_ids=ids, language="english", speaker_embedding=embedding),
            "icl_english": dict(text_ids=ids, language="english", speaker_embedding=embedding, ref_ids=ref,
                                ref_codes=codes),
            "icl_auto_full": dict(text_ids=ids, language="auto", speaker_embedding=embedding, ref_ids=ref,
                                  ref_codes=codes, non_streaming_text=True)}


@pytest.mark.parametrize("kind", recipe.KINDS)
def test_prefill_logits_and_greedy_codes_match_qwen_tts(checkpoints: dict[str, Path], kind: str) -> None:
    tts = load_tts(checkpoints[kind])
    f = fixture(kind)
    cases = prompt_cases(tts, kind, f)
    requests = []
    for tag, case in cases.items():
        prompt = tts.model.build_prompt(**case)
        n = prompt.prefill.shape[0]
        with torch.inference_mode():
            hidden = tts.model.talker(prompt.prefill, torch.arange(n), AttentionBatch.for_prompts([n]), None)
            logits = tts.model.talker.compute_logits(hidden)[-4:]
        torch.testing.assert_close(logits, torch.from_numpy(f[f"{tag}_logits"]), atol=1e-4, rtol=0)
        requests.append(SpeechRequest(tag, prompt, SpeechParams(**GREEDY)))
    # All cases of a kind in one batch: continuous batching over paged KV gives each its own greedy codes.
    engine = SpeechEngine(tts.model, tts.codec.decoder, kv_blocks=32, block_size=4)
    out = engine.generate(requests)
    for tag in cases:
        frames = torch.cat([c.frames for c in out[tag] if c.frames.numel()])
        assert torch.equal(frames, torch.from_numpy(f[f"{tag}_codes"])), tag
        assert out[tag][-1].finished


def test_speaker_embedding_matches_qwen_tts(checkpoints: dict[str, Path]) -> None:
    tts = load_tts(checkpoints["base"])
    assert tts.model.speaker_encoder is not None
    embedding = tts.model.speaker_encoder.embed(torch.from_numpy(recipe.reference_clip()))
    torch.testing.assert_close(embedding, torch.from_numpy(fixture("base")["speaker_embedding"]), atol=1e-4, rtol=1e-4)


def test_codec_decode_matches_qwen_tts(checkpoints: dict[str, Path]) -> None:
    f = fixture("base")
    codes = torch.from_numpy(f["decode_codes"])
    exact = torch.from_numpy(f["decode_wave64"])  # qwen-tts's decoder run in float64
    wave64 = load_tts(checkpoints["base"], dtype=torch.float64).codec.decoder.decode(codes)
    assert wave64.shape == (8 * 1920,)
    assert (wave64.double() - exact).abs().max() < 1e-5
    # float32: this tiny codec's random gains lift rounding to ~1e-5 (qwen-tts's own float32 decode is
    # 1.06e-5 from its float64 one), so the float32 decode is held to the exact wave within twice that.
    reference32_error = (torch.from_numpy(f["decode_wave"]).double() - exact).abs().max()
    wave32 = load_tts(checkpoints["base"]).codec.decoder.decode(codes)
    assert (wave32.double() - exact).abs().max() < 2 * reference32_error


@pytest.mark.parametrize("chunk", [1, 4, 25])
def test_streamed_decode_equals_full_decode(checkpoints: dict[str, Path], chunk: int) -> None:
    # float32, the serving dtype. Every frame is computed on the codec's grid of 4-frame blocks with the same
    # tensor shapes however the frames were pushed, so the stream equals the full decode (bit for bit on
    # this CPU); before the grid, kernels chosen by window length left ~1.5e-5 of float32 rounding.
    # 27 frames: the last block is partial, and chunk 25 leaves in two pushes that straddle blocks.
    tts = load_tts(checkpoints["base"])
    codes = torch.randint(0, recipe.CODEBOOK, (27, recipe.GROUPS), generator=torch.Generator().manual_seed(chunk))
    decoder = tts.codec.decoder
    full = decoder.decode(codes)
    stream = decoder.stream()
    streamed = torch.cat([stream.push(codes[i:i + chunk]) for i in range(0, len(codes), chunk)])
    assert streamed.dtype == full.dtype == torch.float32
    assert streamed.shape == full.shape == (27 * 1920,)
    assert (streamed - full).abs().max() < 1e-5


def test_streaming_needs_its_conv_context(checkpoints: dict[str, Path]) -> None:
    tts = load_tts(checkpoints["base"], dtype=torch.float64)
    decoder = tts.codec.decoder
    codes = torch.randint(0, recipe.CODEBOOK, (30, recipe.GROUPS), generator=torch.Generator().manual_seed(0))
    stream = decoder.stream()
    stream.conv_context = 1  # fewer frames than the conv stack's receptive field
    streamed = torch.cat([stream.push(codes[i:i + 4]) for i in range(0, 30, 4)])
    assert (streamed - decoder.decode(codes)).abs().max() > 1e-3


def test_seeded_sampling_is_reproducible_in_any_batch(checkpoints: dict[str, Path]) -> None:
    tts = load_tts(checkpoints["custom_voice"])
    ids = fixture("custom_voice")["text_ids"].tolist()

    def run(batch: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
        engine = SpeechEngine(tts.model, tts.codec.decoder, kv_blocks=64, block_size=4)
        reqs = [SpeechRequest(rid, tts.model.build_prompt(ids, "english", "vivian"),
                              SpeechParams(seed=seed, max_frames=12)) for rid, seed in batch]
        out = engine.generate(reqs)
        return {rid: torch.cat([c.samples for c in chunks]) for rid, chunks in out.items()}

    alone = run([("x", 7)])
    together = run([("y", 8), ("x", 7), ("z", 9)])
    assert torch.equal(alone["x"], together["x"])
    assert not torch.equal(together["x"], together["y"])


def test_codec_encode_matches_qwen_tts(checkpoints: dict[str, Path]) -> None:
    tts = load_tts(checkpoints["base"])
    codes = tts.codec.encode(torch.from_numpy(recipe.reference_clip()))
    assert torch.equal(codes, torch.from_numpy(fixture("base")["encode_codes"]))


def test_streamed_request_equals_a_non_streamed_request(checkpoints: dict[str, Path]) -> None:
    # float32 through the engine: the same seeded request streamed in chunks of 1, 4 and 25 frames and
    # non-streamed (one chunk at the end, one decode of all its frames) gives the same waveform.
    tts = load_tts(checkpoints["custom_voice"])
    ids = fixture("custom_voice")["text_ids"].tolist()

    def run(first: int, every: int) -> list:
        engine = SpeechEngine(tts.model, tts.codec.decoder, kv_blocks=32, block_size=4)
        params = SpeechParams(seed=5, max_frames=30, first_chunk_frames=first, chunk_frames=every)
        return engine.generate([SpeechRequest("r", tts.model.build_prompt(ids, "english", "vivian"), params)])["r"]

    whole = run(10**6, 10**6)
    frames = torch.cat([c.frames for c in whole if c.frames.numel()])
    assert len([c for c in whole if c.samples.numel()]) == 1
    full = torch.cat([c.samples for c in whole])
    assert full.shape == (frames.shape[0] * 1920,)
    for chunk in (1, 4, 25):
        out = run(chunk, chunk)
        assert torch.equal(torch.cat([c.frames for c in out if c.frames.numel()]), frames)
        assert len([c for c in out if c.samples.numel()]) == -(-frames.shape[0] // chunk)
        streamed = torch.cat([c.samples for c in out])
        assert streamed.shape == full.shape
        assert (streamed - full).abs().max() < 1e-5, chunk


def test_requests_join_and_leave_a_running_batch(checkpoints: dict[str, Path]) -> None:
    # Continuous batching: "late" joins after 3 engine steps (its prefill packed with the others' decode
    # rows), "short" leaves early (max_frames) and "gone" is aborted mid-way; each finished request's
    # frames and audio equal running it alone with the same seed.
    tts = load_tts(checkpoints["custom_voice"])
    ids = fixture("custom_voice")["text_ids"].tolist()
    frames = {"long": 10, "short": 5, "late": 6, "gone": 10}
    seeds = {"long": 1, "short": 2, "late": 3, "gone": 4}

    def request(rid: str) -> SpeechRequest:
        speaker = "eric" if rid == "late" else "vivian"
        return SpeechRequest(rid, tts.model.build_prompt(ids, "english", speaker),
                             SpeechParams(seed=seeds[rid], max_frames=frames[rid]))

    def audio(chunks: list) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.cat([c.frames for c in chunks if c.frames.numel()]), torch.cat([c.samples for c in chunks]))

    engine = SpeechEngine(tts.model, tts.codec.decoder, kv_blocks=64, block_size=4)
    out: dict[str, list] = {rid: [] for rid in frames}
    for rid in ("long", "short", "gone"):
        engine.add(request(rid))
    steps = 0
    while engine.has_work():
        if steps == 3:
            engine.add(request("late"))
            engine.abort("gone")
        if steps == 4:  # late decodes beside long and short; gone has left
            assert {r.request_id for r in engine.running} == {"long", "short", "late"}
        for chunk in engine.step():
            out[chunk.request_id].append(chunk)
        steps += 1
    assert out["short"][-1].finished and out["long"][-1].finished and out["late"][-1].finished
    assert not any(c.finished for c in out["gone"])
    for rid in ("long", "short", "late"):
        alone = SpeechEngine(tts.model, tts.codec.decoder, kv_blocks=64, block_size=4).generate([request(rid)])[rid]
        got, want = audio(out[rid]), audio(alone)
        assert got[0].shape[0] == frames[rid]
        assert torch.equal(got[0], want[0]), rid
        assert (got[1] - want[1]).abs().max() < 1e-5, rid
