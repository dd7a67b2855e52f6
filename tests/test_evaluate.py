"""evaluate.py: the metrics on cases worked out by hand, generation that stops at the end-of-turn
token (or the cap, or the first newline), and the command line: a generation task, retrieval on a
stage-1 checkpoint, and the answer for one recording.

    PYTHONPATH=.:tests python3 -m pytest -q tests/test_evaluate.py
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from tiny import argv, pooled_pairs, write_manifest

import evaluate
from contrastive import cos_logits, retrieval_r1
from data import Collator, UserError, load_audio, read_manifest
from model import QFormerConfig, SpeechLLM

REPO = Path(__file__).resolve().parents[1]

# -----------------------------------------------------------------------------
# Metrics


def test_wer_corpus_and_mean_by_hand():
    refs = ["The cat sat on the mat.", "Hello, world!"]
    hyps = ["the cat sat on the mat", "hello word"]
    # utterance 1: 0 errors / 6 words (case and punctuation are normalised away); utterance 2: 1 / 2
    # corpus WER = (0 + 1) / (6 + 2) = 12.5 %; mean of per-utterance WERs = (0 + 50) / 2 = 25 %
    scores = evaluate.compute_metrics("asr", hyps, refs)
    assert scores["wer"] == pytest.approx(12.5) and scores["wer_mean"] == pytest.approx(25.0)
    # the authors' normalisation: all punctuation goes, so "Don't" == "dont"; an empty answer
    # deletes every word
    assert evaluate.compute_metrics("asr", ["dont  STOP"], ["Don't stop!"])["wer"] == 0
    assert evaluate.compute_metrics("asr", [""], ["a b c"])["wer"] == pytest.approx(100.0)
    assert evaluate.compute_metrics("asr", ["a b c d"], ["a b"])["wer"] == pytest.approx(
        100.0
    )  # 2 insertions / 2 words


def test_bleu_and_chrf_by_hand():
    hyps = ["Der Hund bellt laut.", "Guten Morgen"]
    refs = ["Der Hund bellt laut.", "Guten Abend"]
    # 13a tokens: "Der Hund bellt laut ." (5) + "Guten Morgen" (2): 7 hypothesis tokens, 7 reference
    # tokens, BP = 1. n-gram precisions: 1-gram 6/7, 2-gram 4/5, 3-gram 3/3, 4-gram 2/2 -> BLEU =
    # (6/7 * 4/5 * 1 * 1) ** (1/4)
    scores = evaluate.compute_metrics("st", hyps, refs)
    assert scores["bleu"] == pytest.approx(100 * (6 / 7 * 4 / 5) ** 0.25, abs=1e-6)
    assert (
        "nrefs:1" in scores["bleu_signature"]
        and "tok:13a" in scores["bleu_signature"]
        and "nc:6" in scores["chrf_signature"]
    )
    assert evaluate.compute_metrics("st", hyps, hyps)["chrf"] == pytest.approx(100.0)
    assert evaluate.compute_metrics("st", ["xyz"], ["abc"])["chrf"] == 0.0
    # two reference translations each: the second one makes "Guten Morgen" a perfect match
    two = evaluate.compute_metrics("st", hyps, [[r, h] for r, h in zip(refs, hyps)])
    assert two["bleu"] == pytest.approx(100.0) and "nrefs:2" in two["bleu_signature"]


def test_squad_em_and_f1_by_hand():
    assert (
        evaluate.squad_normalize("The  Bakery, at the END!") == "bakery at end"
    )  # case, punctuation, articles, spaces
    hyps = ["The bakery!", "two apples", "in Paris", "Anna"]
    refs = [["at the bakery", "bakery"], "two", ["Rome"], ["anna b", "ANNA"]]
    # 1: "bakery" == normalised second gold -> EM 1, F1 1
    # 2: {two, apples} vs {two}: 1 shared, precision 1/2, recall 1 -> F1 2/3; EM 0
    # 3: nothing shared -> 0, 0
    # 4: max over golds: "anna" vs "anna b" F1 = 2 * 1 * 1/2 / (1 + 1/2) = 2/3, vs "anna" 1 -> EM 1,
    # F1 1
    scores = evaluate.compute_metrics("qa", hyps, refs)
    assert scores["em"] == pytest.approx(100 * 2 / 4)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0 + 1) / 4)
    assert evaluate.squad_f1("a", "the") == 0.0  # both normalise to nothing: no shared token
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        evaluate.compute_metrics("qa", ["a", "b"], ["a"])


def test_unique_questions_pool_their_answers():
    rows = [
        {"audio": "p1.wav", "instruction": "Q: who?", "references": ["anna"]},
        {"audio": "p1.wav", "instruction": "Q: who?", "references": ["Anna", "anna"]},
        {"audio": "p2.wav", "instruction": "Q: who?", "references": ["ben"]},
    ]  # the same question, another passage
    merged = evaluate.unique_questions(rows)
    assert [m["references"] for m in merged] == [["anna", "Anna"], ["ben"]]


# -----------------------------------------------------------------------------
# Generation on a tiny model, steered token by token through a hook on its LM head


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    extra = {i: {"translation": f"satz {i}", "tgt_lang": "de"} for i in range(3)}
    extra.update(
        {
            i: {"task": "qa", "question": "who is it?", "answer": ["anna", "Anna"]}
            for i in range(3, 6)
        }
    )
    return write_manifest(tmp_path_factory.mktemp("data"), n=6, extra=extra)


@pytest.fixture(scope="module")
def model(paths):
    torch.manual_seed(0)
    return SpeechLLM(
        paths["llm"], paths["hubert"], QFormerConfig(dim=32, heads=4, layers=2, dropout=0.0)
    ).eval()


def steered(model, script):
    """Make the LLM's greedy choice follow `script` (token ids; the last one repeats) by adding a
    large bias to one logit per decoding step. Returns the hook handle."""
    step = {"n": 0}

    def hook(module, inputs, logits):
        target = script[min(step["n"], len(script) - 1)]
        step["n"] += 1
        logits = logits.clone()
        logits[..., target] += 1e4
        return logits

    return model.llm.lm_head.register_forward_hook(hook)


def test_generation_stops_at_end_of_turn_or_the_cap(model, manifest):
    rows = read_manifest(manifest)[:3]
    batch = Collator(model.encoder.feature_extractor)(
        rows
    )  # three lengths: left padding in one batch
    instructions = ["Can you transcribe this audio?"] * 3
    eot = model.prompt_ids(instructions[0])[2]
    tok = lambda s: model.tokenizer(s, add_special_tokens=False).input_ids[0]  # (byte tokens)

    handle = steered(model, [eot])
    try:
        # end-of-turn at once
        assert model.generate(batch, instructions, max_new_tokens=8) == ([""] * 3, ["end"] * 3)
    finally:
        handle.remove()
    handle = steered(model, [tok("a"), tok("b"), tok("c"), eot, tok("z")])
    try:
        # stops at end-of-turn, not at 8
        assert model.generate(batch, instructions, max_new_tokens=8)[0] == ["abc"] * 3
    finally:
        handle.remove()
    handle = steered(model, [tok("a")])
    try:
        # never ends: the cap
        assert model.generate(batch, instructions, max_new_tokens=5) == (["aaaaa"] * 3, ["cap"] * 3)
    finally:
        handle.remove()
    # evaluate.py keeps an answer's first line only, as the authors (stop string "\n")
    examples = [{**row, "instruction": instructions[0]} for row in rows]
    handle = steered(model, [tok("a"), tok("b"), tok("\n"), tok("c"), eot])
    try:
        assert evaluate.generate_answers(
            model, examples, 3, 8, torch.device("cpu"), torch.float32, progress=False
        ) == (["ab"] * 3, ["end"] * 3)
    finally:
        handle.remove()


def test_wer_median_and_exact_by_hand():
    scores = evaluate.compute_metrics(
        "asr", ["a b", "a x", "x y", "a b c"], ["a b", "a b", "a b", "a b c"]
    )
    assert scores["exact"] == pytest.approx(50.0)  # 2 of 4 without an error
    assert scores["wer_median"] == pytest.approx(
        25.0
    )  # per utterance 0, 50, 100, 0: median (0 + 50) / 2
    assert scores["wer_mean"] == pytest.approx(37.5)


# -----------------------------------------------------------------------------
# The command line


@pytest.fixture(scope="module")
def finetuned(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft")
    model.save_projector(out, step=1, stage="finetune", task="qa", init="none")
    return out


@pytest.fixture(scope="module")
def stage1(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre")
    model.save_projector(
        out, step=1, layers=[0, 5, 10]
    )  # what pretrain.py writes: no task, its layers
    return out


def test_cli_generation_task(finetuned, manifest, capsys):
    line = "--ckpt {ckpt} --data {data} --max-new-tokens 3 --device cpu"
    results = evaluate.main(argv(line, ckpt=finetuned, data=manifest))
    printed = capsys.readouterr().out
    saved = json.loads(
        (finetuned / "eval-qa.json").read_text()
    )  # the checkpoint's own task by default
    assert saved == json.loads(json.dumps(results["qa"]))
    assert saved["task"] == "qa" and saved["n"] == 3 and set(saved["metrics"]) == {"em", "f1"}
    assert (
        saved["outputs"][0]["references"] == ["anna", "Anna"]
        and "ref: anna | Anna" in printed
        and "hyp:" in printed
    )
    line = "--ckpt {ckpt} --data {data} --task st --max-new-tokens 3 --device cpu --out {out}"
    evaluate.main(argv(line, ckpt=finetuned, data=manifest, out=finetuned / "st.json"))
    st = json.loads((finetuned / "st.json").read_text())
    assert st["n"] == 3 and {"bleu", "chrf", "bleu_signature", "chrf_signature"} <= set(
        st["metrics"]
    )
    assert "bleu" in capsys.readouterr().out


def test_cli_all_tasks_of_a_mix_checkpoint(model, manifest, tmp_path, monkeypatch, capsys):
    model.save_projector(tmp_path, step=1, stage="finetune", task="mix", init="none")
    # instead of the demo's test splits
    # a mix -> all three tasks, each from the manifest's rows that have its fields
    evaluate.main(
        [
            "--ckpt",
            str(tmp_path),
            "--data",
            str(manifest),
            "--max-new-tokens",
            "2",
            "--device",
            "cpu",
        ]
    )
    saved = json.loads((tmp_path / "eval-all.json").read_text())
    assert {task: r["n"] for task, r in saved.items()} == {"asr": 3, "st": 3, "qa": 3}
    assert (
        "wer" in saved["asr"]["metrics"]
        and "bleu" in saved["st"]["metrics"]
        and "f1" in saved["qa"]["metrics"]
    )
    assert "summary:" in capsys.readouterr().out


def test_cli_retrieval_on_a_stage1_checkpoint(model, stage1, manifest):
    results = evaluate.main(
        ["--ckpt", str(stage1), "--data", str(manifest), "--device", "cpu", "--dtype", "float32"]
    )  # default task: retrieval; float32 as the recomputation below
    metrics = results["retrieval"]["metrics"]
    assert metrics["layers"] == [0, 5, 10] and metrics["chance"] == pytest.approx(100 / 6)
    text, speech = pooled_pairs(model, read_manifest(manifest), [0, 5, 10])
    assert metrics["r1"] == pytest.approx((100 * retrieval_r1(cos_logits(text, speech))).tolist())
    assert metrics["r1_centred"] == pytest.approx(
        (100 * retrieval_r1(cos_logits(text, speech, center=True))).tolist()
    )
    assert json.loads((stage1 / "eval-retrieval.json").read_text())["metrics"] == metrics


def test_cli_one_recording(model, finetuned, tmp_path):
    """`python evaluate.py --audio` on a 44.1 kHz stereo FLAC: the answer equals the in-process one
    on the same audio (resampled to 16 kHz mono by data.load_audio)."""
    t = np.arange(int(1.2 * 44100)) / 44100
    wave = np.stack([np.sin(2 * np.pi * 220 * t), np.sin(2 * np.pi * 330 * t)], axis=1) * 0.3
    sf.write(tmp_path / "clip.flac", wave.astype("float32"), 44100)
    assert len(load_audio(tmp_path / "clip.flac")) == math.floor(1.2 * 16000)
    line = (
        "evaluate.py --ckpt {ckpt} --audio {audio} --question 'Who is it?' --max-new-tokens 4"
        " --device cpu"
    )
    cmd = [sys.executable, *argv(line, ckpt=finetuned, audio=tmp_path / "clip.flac")]
    result = subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    args = evaluate.get_args(cmd[2:])
    expected = evaluate.answer_one(model, args, "qa", torch.device("cpu"), torch.float32)
    assert result.stdout.rstrip("\n") == expected.split("\n")[0].strip()
    with pytest.raises(UserError, match="needs --question"):
        evaluate.main(
            ["--ckpt", str(finetuned), "--audio", str(tmp_path / "clip.flac"), "--device", "cpu"]
        )


def test_one_recording_in_other_formats(finetuned, tmp_path, capsys):
    """--audio reads what soundfile reads (here an MP3 and an 8 kHz OGG); anything else is one clear
    error."""
    t = np.arange(int(1.0 * 22050)) / 22050
    sf.write(tmp_path / "clip.mp3", (0.3 * np.sin(2 * np.pi * 220 * t)).astype("float32"), 22050)
    sf.write(
        tmp_path / "clip.ogg", (0.3 * np.sin(2 * np.pi * 220 * t[::3])).astype("float32"), 7350
    )
    for name in ("clip.mp3", "clip.ogg"):
        line = "--ckpt {ckpt} --task asr --audio {audio} --max-new-tokens 3"
        answer = evaluate.main(argv(line, ckpt=finetuned, audio=tmp_path / name))
        assert (
            isinstance(answer, str)
            and capsys.readouterr().out.strip() == answer.split("\n")[0].strip()
        )
    (tmp_path / "clip.m4a").write_bytes(
        b"\0\0\0\x20ftypM4A " + bytes(64)
    )  # an AAC file's header: not readable
    with pytest.raises(UserError, match="not a readable audio file.*ffmpeg"):
        evaluate.main(
            ["--ckpt", str(finetuned), "--task", "asr", "--audio", str(tmp_path / "clip.m4a")]
        )
