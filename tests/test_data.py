"""data.py: manifest checking (bad lines name the file and line), audio conversion, tasks, subsets,
batches."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from tiny import write_manifest

import data
from data import (
    Collator,
    ManifestError,
    UserError,
    frac_subset,
    load_audio,
    load_row_audio,
    need_transcripts,
    read_manifest,
    task_examples,
)


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
        (
            '{"audio": "long.wav", "text": "hi", "offset": 5.5, "duration": 1.0}',
            "ends at 6.500 s, past the end",
        ),
        (
            '{"audio": "long.wav", "text": "hi", "offset": 7.0, "duration": 1.0}',
            "starts at 7.0 s, after the end",
        ),
        (
            '{"audio": "long.wav", "text": "hi", "offset": -1, "duration": 1.0}',
            "'offset' must be >= 0 seconds",
        ),
        (
            '{"audio": "long.wav", "text": "hi", "offset": "2", "duration": 1.0}',
            "'offset' must be a number",
        ),
        (
            '{"audio": "long.wav", "text": "hi", "offset": 1, "duration": 0}',
            "'duration' must be > 0 seconds",
        ),
        ('{"audio": "nan.wav", "text": "hi"}', "nan.wav: the audio holds NaN or infinite samples"),
        ('{"audio": "inf.wav", "text": "hi"}', "inf.wav: the audio holds NaN or infinite samples"),
        (
            '{"audio": "audio/u0_0.wav", "task": "qa", "question": "who?"}',
            "needs 'question' and 'answer'",
        ),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, line, message):
    path = write_manifest(tmp_path, n=2)
    (tmp_path / "notaudio.wav").write_text("this is not audio")
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype="float32"), 16000)
    sf.write(tmp_path / "long.wav", np.zeros(6 * 8000, dtype="float32"), 8000)  # 6 s
    for name, value in (("nan", np.nan), ("inf", np.inf)):
        wave = np.zeros(1600, dtype="float32")
        wave[800] = value
        sf.write(
            tmp_path / f"{name}.wav", wave, 16000, subtype="FLOAT"
        )  # only float samples can hold NaN
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
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 440 * t)], 1).astype(
        "float32"
    )
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
    assert (
        qa[0]["target"] == "anna"
        and qa[0]["references"] == ["anna", "Anna"]
        and "who?" in qa[0]["instruction"]
    )
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


# -----------------------------------------------------------------------------
# Segments of a long recording (offset + duration, as MuST-C's talks)


def long_recording(path, seconds=6, rate=16000):
    """A recording whose second k is a tone of 200 * (k + 1) Hz, so a segment's samples say where
    they came from."""
    t = np.arange(rate) / rate
    wave = np.concatenate(
        [0.5 * np.sin(2 * np.pi * 200 * (k + 1) * t) for k in range(seconds)]
    ).astype("float32")
    sf.write(path, wave, rate)
    return wave


@pytest.mark.parametrize("rate", [16000, 48000])
def test_segments_read_their_own_samples_only(tmp_path, monkeypatch, rate):
    long_recording(tmp_path / "talk.wav", rate=rate)
    lines = [
        {"audio": "talk.wav", "offset": 1.0, "duration": 1.0, "text": "second one"},
        {"audio": "talk.wav", "offset": 3.25, "duration": 1.5, "text": "second three"},
        {
            "audio": "talk.wav",
            "offset": 5.0,
            "text": "to the end",
        },  # no duration: to the end of the file
        {
            "audio": "talk.wav",
            "offset": 5.5,
            "duration": 0.5005,
            "text": "rounded",
        },  # within SEGMENT_SLACK
        {"audio": "talk.wav", "text": "the whole talk"},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    rows = read_manifest(manifest)
    spans = [(r.get("offset"), r["duration"]) for r in rows]
    assert spans == [(1.0, 1.0), (3.25, 1.5), (5.0, 1.0), (5.5, 0.5), (None, 6.0)]
    assert (
        len({r["key"] for r in rows}) == 5
    )  # the feature cache tells the segments of one file apart

    frames_read = []
    real = data.sf.SoundFile

    class Spy(real):
        def read(self, frames=-1, *args, **kwargs):
            out = super().read(frames, *args, **kwargs)
            frames_read.append(len(out))
            return out

    monkeypatch.setattr(data.sf, "SoundFile", Spy)
    second_three = load_row_audio(rows[1])
    assert frames_read == [
        int(1.5 * rate)
    ]  # only the segment's samples were read, not the 6 s talk
    if rate == 16000:  # the same samples as the whole file's, sliced
        np.testing.assert_array_equal(second_three, load_audio(tmp_path / "talk.wav")[52000:76000])
    assert len(second_three) == 24000
    peak = lambda a, lo, hi: np.argmax(np.abs(np.fft.rfft(a[lo:hi]))) * 16000 / (hi - lo)
    assert (
        abs(peak(second_three, 0, 12000) - 800) < 5
        and abs(peak(second_three, 12000, 24000) - 1000) < 5
    )
    assert len(load_row_audio(rows[2])) == 16000 and len(load_row_audio(rows[4])) == 6 * 16000

    from transformers import Wav2Vec2FeatureExtractor

    batch = Collator(Wav2Vec2FeatureExtractor(return_attention_mask=True))(rows[:3])
    assert batch["speech_input_mask"].sum(1).tolist() == [16000, 24000, 16000]


def test_load_audio_refuses_nan(tmp_path):
    wave = np.zeros(3 * 16000, dtype="float32")
    wave[2 * 16000 + 5] = np.nan  # in the third second only
    sf.write(tmp_path / "x.wav", wave, 16000, subtype="FLOAT")
    assert (
        len(load_audio(tmp_path / "x.wav", offset=0.0, duration=2.0)) == 32000
    )  # the clean part reads
    with pytest.raises(UserError, match=r"x.wav \(the segment at 1.5 s\): the audio holds NaN"):
        load_audio(tmp_path / "x.wav", offset=1.5, duration=1.0)


# -----------------------------------------------------------------------------
# Manifests from other tools


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = write_manifest(tmp_path, n=2)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # what Windows tools write
    assert len(read_manifest(path)) == 2


def test_a_manifest_whose_lines_all_fail_says_why(tmp_path):
    path = write_manifest(tmp_path, n=1)
    good = path.read_text()
    bad = ['{"audio": "nope%d.wav", "text": "hi"}' % i for i in range(4)] + ["{not json"]
    path.write_text("\n".join(bad) + "\n" + good)
    with pytest.raises(ManifestError) as e:
        read_manifest(path, skip_bad=True, max_seconds=0.1, log=lambda *_: None)
    message = str(e.value)
    assert (
        "no usable lines (all 6 lines failed: 5 bad, 1 longer than 0.1 s; line 1: audio file not "
        "found" in message
    )
    assert (
        "line 2: audio file not found" in message
        and "line 3:" in message
        and "line 4:" not in message
    )
    assert message.endswith("; ...)")
    path.write_text("\n\n")
    with pytest.raises(ManifestError, match="no usable lines \\(it is empty\\)"):
        read_manifest(path)


def test_a_qa_line_may_leave_its_transcript_out(tmp_path):
    path = write_manifest(
        tmp_path, n=2, extra={1: {"task": "qa", "question": "who?", "answer": "anna"}}
    )
    lines = path.read_text().splitlines()
    row = json.loads(lines[1])
    del row["text"]
    path.write_text(lines[0] + "\n" + json.dumps(row) + "\n")
    rows = read_manifest(path)
    assert task_examples(rows, "qa")[0]["target"] == "anna"
    with pytest.raises(ManifestError, match="pretraining needs a transcript .* 1 lines have none"):
        need_transcripts(rows, "pretraining")


def test_audio_longer_than_the_encoder_window_is_a_bad_line(tmp_path):
    """Whisper's encoder sees 30 s at most: a longer clip is a bad line naming the limit (never cut
    silently), skipped with --skip-bad; --max-audio-seconds below it skips first, as before."""
    rate = 16000
    for name, seconds in (("long.wav", 31.0), ("short.wav", 2.0)):
        sf.write(
            tmp_path / name,
            np.random.default_rng(0).standard_normal(int(seconds * rate)) * 0.1,
            rate,
        )
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"audio": "short.wav", "text": "a"}\n{"audio": "long.wav", "text": "b"}\n')
    with pytest.raises(
        UserError, match=r"m.jsonl:2: 31.0 s of audio, longer than the encoder's 30 s"
    ):
        read_manifest(manifest, encoder_seconds=30.0)
    assert (
        len(read_manifest(manifest, skip_bad=True, log=lambda _: None, encoder_seconds=30.0)) == 1
    )
    assert (
        len(read_manifest(manifest, max_seconds=20, log=lambda _: None, encoder_seconds=30.0)) == 1
    )
    assert len(read_manifest(manifest)) == 2  # an encoder without a window (HuBERT) reads it whole
