"""extras/decoding.py: the length caps that follow the audio, the loop guard, --seen-in, each
against a hand-worked case or a steered model.

    python -m pytest -q tests/extras/test_decoding.py
"""

import json

import pytest
import torch
from test_evaluate import steered
from tiny import argv, write_manifest

import evaluate
from data import Collator, read_manifest
from extras import decoding
from model import QFormerConfig, SpeechLLM
from scripts import toplines


@pytest.fixture(scope="module")
def model(paths):
    torch.manual_seed(0)
    cfg = QFormerConfig(dim=32, heads=4, layers=2, dropout=0.0)
    return SpeechLLM(paths["llm"], paths["hubert"], cfg).eval()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("data"), n=3)


def generate(model, batch, instructions, caps, loop_repeats=0):
    """Greedy answers with extras/decoding.Stops, as decoding.generate_answers decodes them."""
    caps = caps if isinstance(caps, list) else [caps] * len(instructions)
    stops = decoding.Stops(caps, loop_repeats, model.prompt_ids(instructions[0])[2])
    return model.generate(batch, instructions, max(caps), stops)


def test_seen_word_recall_by_hand():
    """--seen-in: "frog" (1 of 5 reference words) never occurs in training; the seen words come out
    right 4 of 4, the unseen one 0 of 1 (case and punctuation normalised as for the WER); then
    "sings" deleted, "frog" right."""
    seen = {"the", "sings", "dog", "a", "song"}
    result = decoding.seen_word_recall(
        ["the dog sings", "A song."], ["The frog sings!", "a song"], seen
    )
    assert result["unseen_words"] == pytest.approx(100 / 5)
    assert result["recall_seen"] == pytest.approx(100 * 4 / 4)
    assert result["recall_unseen"] == 0.0
    result = decoding.seen_word_recall(["the frog"], ["the frog sings"], seen)
    assert result["recall_seen"] == pytest.approx(50.0) and result["recall_unseen"] == 100.0


def test_a_looping_model_stops_at_the_guard_and_keeps_one_copy(model, manifest):
    rows = read_manifest(manifest)[:3]
    batch = Collator(model.encoder.feature_extractor)(rows)
    instructions = ["Can you transcribe this audio?"] * 3
    tok = lambda s: model.tokenizer(s, add_special_tokens=False).input_ids[0]  # (byte tokens)
    loop = [tok("x"), tok("a"), tok("b"), tok("c")] + [
        tok("a"),
        tok("b"),
        tok("c"),
    ] * 20  # "xabcabcabc..."
    handle = steered(model, loop)
    try:
        texts, why = generate(model, batch, instructions, 40, loop_repeats=3)
        assert texts == ["xabc"] * 3 and why == ["loop"] * 3  # stopped after 3 copies, one kept
    finally:
        handle.remove()
    handle = steered(model, loop)
    try:  # the guard off (the authors): it runs to the cap
        texts, why = generate(model, batch, instructions, 13, loop_repeats=0)
        assert texts == ["xabcabcabcabc"] * 3 and why == ["cap"] * 3
    finally:
        handle.remove()
    handle = steered(model, [tok("a")])
    try:  # one cap per utterance: each answer stops at its own
        texts, why = generate(model, batch, instructions, [2, 5, 3])
        assert texts == ["aa", "aaaaa", "aaa"] and why == ["cap"] * 3
    finally:
        handle.remove()
    eot = model.prompt_ids(instructions[0])[2]
    handle = steered(model, [tok("a"), tok("b"), eot])
    try:
        assert generate(model, batch, instructions, 8, loop_repeats=3) == (["ab"] * 3, ["end"] * 3)
    finally:
        handle.remove()


def test_loop_period_by_hand():
    assert decoding.loop_period([1, 2, 3, 2, 3, 2, 3], repeats=3, max_period=12) == 2
    assert decoding.loop_period([5, 5, 5], repeats=3, max_period=12) == 1
    assert decoding.loop_period([1, 2, 3, 2, 3], repeats=3, max_period=12) == 0  # only two copies
    assert (
        decoding.loop_period([1, 2, 1, 2, 1, 2], repeats=3, max_period=1) == 0
    )  # period longer than allowed


def test_answer_cap_follows_the_audio():
    assert decoding.answer_cap("asr", 3.0) == 16 + 24
    assert decoding.answer_cap("st", 2.01) == 33  # ceil(16 + 16.08)
    assert decoding.answer_cap("qa", 30.0) == 32  # a short answer, whatever the passage's length
    assert decoding.answer_cap("asr", 3.0, 200) == 200  # a fixed cap (the authors')


def test_cli_text_topline_reads_the_transcript(paths, manifest, tmp_path):
    """scripts/toplines.py --read transcript: no checkpoint; the LLM gets each transcript's token
    embeddings where the speech would be, and answers the same as generate_from on those
    embeddings."""
    out = tmp_path / "topline.json"
    line = (
        "--read transcript --task asr --llm {llm} --encoder {hubert} --data {data}"
        " --max-new-tokens 3 --device cpu --out {out}"
    )
    toplines.main(argv(line, **paths, data=manifest, out=out))
    saved = json.loads(out.read_text())
    assert (
        saved["n"] == 3
        and "wer" in saved["metrics"]
        and sum(saved["decoding"]["stopped"].values()) == 3
    )  # the ASR rows
    model = SpeechLLM(paths["llm"], paths["hubert"]).eval()
    rows = read_manifest(manifest)[:3]
    heard, mask = decoding.embed_texts(model, [r["text"] for r in rows], torch.device("cpu"))
    instructions = ["Can you transcribe this audio?"] * len(rows)
    stops = decoding.Stops([3] * len(rows), 3, model.prompt_ids(instructions[0])[2])
    expected, _ = model.generate_from(heard, mask, instructions, 3, stops)
    assert [o["hypothesis"] for o in saved["outputs"]] == [
        e.split("\n")[0].strip() for e in expected
    ]
    with pytest.raises(SystemExit):  # a checkpoint is required
        evaluate.main(["--task", "asr", "--data", str(manifest)])
