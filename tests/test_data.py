"""data.py: manifest checking (bad lines name the file and line), audio conversion, tasks, subsets, batches."""

import numpy as np
import pytest
import soundfile as sf
import torch
from tiny import write_manifest

from data import Collator, ManifestError, frac_subset, load_audio, read_manifest, task_examples


def test_good_manifest_resolves_relative_paths(tmp_path):
    rows = read_manifest(write_manifest(tmp_path, n=3))
    assert len(rows) == 3
    assert all(r["audio"].startswith(str(tmp_path)) and r["duration"] > 0 for r in rows)
    assert len({r["key"] for r in rows}) == 3  # the feature-cache key: file, size, mtime


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "Expecting property name"),
        ('["a list"]', "must be a JSON object"),
        ('{"text": "hi"}', "missing field 'audio'"),
        ('{"audio": "audio/u0_0.wav", "text": ""}', "empty transcript"),
        ('{"audio": "audio/u0_0.wav", "text": 3}', "'text' must be a string"),
        ('{"audio": "nope.wav", "text": "hi"}', "audio file not found"),
        ('{"audio": "notaudio.wav", "text": "hi"}', "not a readable audio file"),
        ('{"audio": "empty.wav", "text": "hi"}', "audio file is empty"),
        ('{"audio": "audio/u0_0.wav", "text": "hi", "answer": 5}', "'answer' must be a string"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, line, message):
    path = write_manifest(tmp_path, n=2)
    (tmp_path / "notaudio.wav").write_text("this is not audio")
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype="float32"), 16000)
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(ManifestError, match=f"{path}:3: .*{message}"):
        read_manifest(path)
    logged = []
    rows = read_manifest(path, skip_bad=True, log=logged.append)  # --skip-bad: skipped and counted
    assert len(rows) == 2 and "skipped 1 bad" in logged[-1]


def test_long_audio_is_skipped_and_counted(tmp_path):
    logged = []
    rows = read_manifest(write_manifest(tmp_path, n=6), max_seconds=1.0, log=logged.append)
    assert 0 < len(rows) < 6 and all(r["duration"] <= 1.0 for r in rows)
    assert "longer than 1.0 s" in logged[-1]


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_audio_is_converted_to_mono_16k(tmp_path, rate):
    t = np.arange(rate) / rate
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 440 * t)], 1).astype("float32")
    sf.write(tmp_path / "x.flac", stereo, rate)
    audio = load_audio(tmp_path / "x.flac")
    assert audio.dtype == np.float32 and audio.ndim == 1 and abs(len(audio) - 16000) <= 1
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * 16000 / len(audio) - 440) < 2  # the tone survives resampling


def test_tasks_and_mix(tmp_path):
    extra = {
        0: {"translation": "hallo", "tgt_lang": "de"},
        1: {"task": "qa", "question": "who?", "answer": ["anna", "Anna"]},
    }
    rows = read_manifest(write_manifest(tmp_path, n=3, extra=extra))
    asr, st, qa = (task_examples(rows, t) for t in ("asr", "st", "qa"))
    assert len(asr) == 2 and len(st) == 1 and len(qa) == 1  # a QA passage is not an ASR example
    assert st[0]["target"] == "hallo" and "german" in st[0]["instruction"]
    assert qa[0]["target"] == "anna" and qa[0]["references"] == ["anna", "Anna"] and "who?" in qa[0]["instruction"]
    assert [e["task"] for e in task_examples(rows, "mix")] == ["asr", "asr", "st", "qa"]
    with pytest.raises(ManifestError, match="no examples for task 'qa'"):
        task_examples(rows[2:], "qa")


def test_frac_subset_is_seeded_and_sized():
    items = [{"task": "asr" if i % 4 else "qa", "i": i} for i in range(200)]
    a, b = frac_subset(items, 0.1), frac_subset(items, 0.1)
    assert a == b and len(a) == 20
    assert frac_subset(items, 0.1, seed=1) != a
    strat = frac_subset(items, 0.1, stratify=True)
    assert sum(e["task"] == "qa" for e in strat) == 5 and len(strat) == 20
    assert frac_subset(items, 1.0) == items


def test_collator_text_side_is_transcript_tokens_only(tmp_path):
    from transformers import AutoFeatureExtractor, AutoTokenizer

    from demokit.tiny import build_tiny_hubert, build_tiny_llm

    tok = AutoTokenizer.from_pretrained(build_tiny_llm(tmp_path / "llm"))
    fe = AutoFeatureExtractor.from_pretrained(build_tiny_hubert(tmp_path / "enc"))
    rows = read_manifest(write_manifest(tmp_path, n=3))
    batch = Collator(fe, tok)(rows)
    for i, row in enumerate(rows):
        ids = batch["text_ids"][i][batch["text_mask"][i]].tolist()
        assert ids == tok(row["text"], add_special_tokens=False).input_ids
        assert tok.bos_token_id not in ids and tok.eos_token_id not in ids
        assert batch["speech_input_mask"][i].sum() == len(load_audio(row["audio"]))
    assert batch["speech_inputs"].dtype == torch.float32
