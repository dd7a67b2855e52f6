"""prepare_data.py: each converter on a tiny fake copy of the layout people download, built here
(seconds of generated audio, no download); the manifests it writes pass data.read_manifest and read
the right samples.

    python -m pytest -q tests/test_prepare_data.py
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data import UserError, load_row_audio, read_manifest, task_examples
from scripts import prepare_data


def tone(seconds, freq, rate=16000):
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype("float32")


def peak_hz(audio, rate=16000):
    return np.argmax(np.abs(np.fft.rfft(audio))) * rate / len(audio)


def lines(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


# -----------------------------------------------------------------------------
# MuST-C


def fake_mustc(root, tgt, split, segments, talks):
    """root/en-<tgt>/data/<split>/{wav/<talk>.wav, txt/<split>.{yaml,en,<tgt>}}. segments: (talk,
    offset, duration, english, translation); talks: {talk: its audio}."""
    folder = root / f"en-{tgt}" / "data" / split
    (folder / "wav").mkdir(parents=True)
    (folder / "txt").mkdir()
    for talk, audio in talks.items():
        sf.write(folder / "wav" / f"{talk}.wav", audio, 16000)
    yaml = "".join(
        f"- {{duration: {d:.6f}, offset: {o:.6f}, rW: 3, uW: 0, speaker_id: spk.{t[4:]}, wav: "
        f"{t}.wav}}\n"
        for t, o, d, _, _ in segments
    )
    (folder / "txt" / f"{split}.yaml").write_text(yaml)
    (folder / "txt" / f"{split}.en").write_text(
        "".join(s[3] + "\n" for s in segments), encoding="utf-8"
    )
    (folder / "txt" / f"{split}.{tgt}").write_text(
        "".join(s[4] + "\n" for s in segments), encoding="utf-8"
    )


@pytest.fixture(scope="module")
def mustc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("MUST-C")
    # talk 1: 6 s, second k a tone of 300 * (k + 1) Hz; talk 2: 3 s of 2000 Hz
    talk1 = np.concatenate([tone(1, 300 * (k + 1)) for k in range(6)])
    talks = {"ted_1": talk1, "ted_2": tone(3, 2000)}
    de = [
        ("ted_1", 0.0, 2.0, "Hello there.", "Hallo zusammen."),
        ("ted_1", 2.0, 1.0, "(Laughter)", "(Lachen)"),
        ("ted_1", 3.0, 0.5, "Short.", "Kurz."),  # under 1 s: the mix leaves it out
        (
            "ted_1",
            4.0,
            2.2,
            "Runs a little past the end.",
            "Etwas zu lang\u2028 mit U+2028.",
        ),  # cut at 6 s
        ("ted_2", 0.0, 1.5, "Second talk.", ""),  # an empty translation: left out
        ("ted_2", 1.5, 9.0, "Far past the end.", "Viel zu lang."),  # left out
        ("ted_2", 1.5, 1.5, "The end of talk two.", "Das Ende."),
    ]
    fake_mustc(root, "de", "train", de, talks)
    fake_mustc(root, "de", "dev", de[:2], {"ted_1": talk1})
    fake_mustc(root, "de", "tst-COMMON", de[:3], {"ted_1": talk1})
    other = [
        ("ted_1", 0.0, 2.0, "Hello there.", "Bonjour."),
        ("ted_1", 2.0, 1.0, "(Laughter)", "(Rires)"),
    ]
    for tgt in ("fr", "it", "es"):
        for split in ("train", "dev", "tst-COMMON"):
            fake_mustc(root, tgt, split, other, {"ted_1": talk1})
    return root


def test_mustc_segments_of_every_pair_and_split(mustc_root, tmp_path, capsys):
    out = tmp_path / "out"
    prepare_data.main(["mustc", str(mustc_root), "--out", str(out)])
    names = sorted(p.name for p in out.glob("*.jsonl"))
    assert names == [
        f"mustc_en-{t}_{s}.jsonl"
        for t in ("de", "es", "fr", "it")
        for s in ("dev", "train", "tst-COMMON")
    ]
    printed = capsys.readouterr().out
    assert (
        "left out 2 (1 empty transcript or translation, 1 segment ending more than 0.5 s past "
        "its talk)" in printed
    )
    assert "1 segments ended up to 0.5 s past their talk's audio: cut at its end" in printed

    rows = read_manifest(out / "mustc_en-de_train.jsonl")
    assert [r["text"] for r in rows] == [
        "Hello there.",
        "(Laughter)",
        "Short.",
        "Runs a little past the end.",
        "The end of talk two.",
    ]
    assert (
        rows[3]["translation"] == "Etwas zu lang\u2028 mit U+2028."
    )  # split at \n only: the lines stay aligned
    assert (
        rows[4]["translation"] == "Das Ende."
        and rows[4]["tgt_lang"] == "de"
        and rows[4]["speaker"] == "spk.2"
    )
    assert [(r["offset"], r["duration"]) for r in rows[:4]] == [
        (0.0, 2.0),
        (2.0, 1.0),
        (3.0, 0.5),
        (4.0, 2.0),
    ]
    assert Path(rows[0]["audio"]).is_absolute()  # the corpus stays where it was downloaded
    laughter = load_row_audio(rows[1])  # the segment 2-3 s of talk 1: its third second, 900 Hz
    assert len(laughter) == 16000 and abs(peak_hz(laughter) - 900) < 5
    assert lines(out / "mustc_en-fr_train.jsonl")[1]["translation"] == "(Rires)"


def test_mustc_misaligned_text_is_an_error(mustc_root, tmp_path):
    root = tmp_path / "copy"
    fake_mustc(
        root,
        "it",
        "train",
        [("ted_1", 0.0, 1.0, "a", "b"), ("ted_1", 1.0, 1.0, "c", "d")],
        {"ted_1": tone(2, 440)},
    )
    (root / "en-it/data/train/txt/train.it").write_text("only one line\n")
    with pytest.raises(
        UserError, match="2 segments in train.yaml but 2 lines in train.en and 1 in train.it"
    ):
        prepare_data.main(["mustc", str(root), "--out", str(tmp_path / "out")])
    with pytest.raises(UserError, match="no en-es here"):
        prepare_data.main(["mustc", str(root), "--pairs", "es", "--out", str(tmp_path / "out")])


# -----------------------------------------------------------------------------
# Spoken-SQuAD


def squad_json(paragraphs):
    """SQuAD format: one article; paragraphs: (context, [(question, [answers])])."""
    return {
        "data": [
            {
                "title": "t",
                "paragraphs": [
                    {
                        "context": context,
                        "qas": [
                            {
                                "id": f"q{i}{j}",
                                "question": q,
                                "answers": [{"answer_start": 0, "text": a} for a in answers],
                            }
                            for j, (q, answers) in enumerate(qas)
                        ],
                    }
                    for i, (context, qas) in enumerate(paragraphs)
                ],
            }
        ]
    }


@pytest.fixture(scope="module")
def squad_root(tmp_path_factory):
    """As Spoken-SQuAD unpacks: the JSON files, and Spoken-SQuAD_audio/{train_wav,dev_wav}/ with one
    24 kHz wav per sentence (<article>_<paragraph>_<sentence>.wav); the test audio here as one file
    per passage."""
    root = tmp_path_factory.mktemp("Spoken-SQuAD")
    train = [
        (
            "anna went home. she slept.",
            [("Where did Anna go?", ["home", "home", "her home"]), ("Who slept?", ["she"])],
        ),
        ("ben came.", [("Who came?", ["ben"])]),
        ("no audio for this one.", [("What?", ["this"])]),
    ]
    (root / "spoken_train-v1.1.json").write_text(json.dumps(squad_json(train)))
    (root / "spoken_test-v1.1.json").write_text(json.dumps(squad_json(train[:1])))
    audio = root / "Spoken-SQuAD_audio"
    (audio / "train_wav").mkdir(parents=True)
    (audio / "dev_wav").mkdir()
    for k, freq in enumerate(
        [500, 700, 900]
    ):  # passage 0_0 in three sentences, k = 0, 1, 2 (10 sorts before 2)
        sf.write(audio / "train_wav" / f"0_0_{[0, 2, 10][k]}.wav", tone(0.5, freq, 24000), 24000)
    sf.write(audio / "train_wav" / "0_1_0.wav", tone(1.2, 1200, 24000), 24000)
    sf.write(audio / "dev_wav" / "0_0.wav", tone(1.5, 600, 24000), 24000)
    return root


def test_spoken_squad_joins_sentences_into_passages(squad_root, tmp_path, capsys):
    out = tmp_path / "out"
    prepare_data.main(["spoken-squad", str(squad_root), "--out", str(out)])
    assert "left out 1 (1 passage audio missing)" in capsys.readouterr().out
    rows = read_manifest(out / "spoken_squad_train.jsonl")
    assert [(r["question"], r["answer"], r["passage"]) for r in rows] == [
        ("Where did Anna go?", ["home", "her home"], "0_0"),  # the gold answers, each once
        ("Who slept?", ["she"], "0_0"),
        ("Who came?", ["ben"], "0_1"),
    ]
    assert rows[0]["text"] == "anna went home. she slept." and rows[0]["task"] == "qa"
    joined = out / "audio/spoken_squad/train/0_0.flac"
    assert rows[0]["audio"] == str(joined) and rows[1]["audio"] == str(
        joined
    )  # written once per passage
    assert (
        lines(out / "spoken_squad_train.jsonl")[0]["audio"] == "audio/spoken_squad/train/0_0.flac"
    )  # relative
    passage = load_row_audio(rows[0])
    assert len(passage) == 24000  # 3 x 0.5 s at 16 kHz
    assert [round(peak_hz(passage[i * 8000 : (i + 1) * 8000]), -2) for i in range(3)] == [
        500,
        700,
        900,
    ]
    assert rows[2]["audio"].endswith(
        "train_wav/0_1_0.wav"
    )  # a one-sentence passage is read in place
    test = read_manifest(out / "spoken_squad_test.jsonl")
    assert len(test) == 2 and test[0]["audio"].endswith(
        "dev_wav/0_0.wav"
    )  # a passage file as it is
    examples = task_examples(rows, "qa")
    assert examples[0]["target"] == "home" and examples[0]["references"] == ["home", "her home"]

    mtime = joined.stat().st_mtime_ns
    prepare_data.main(["spoken-squad", str(squad_root), "--out", str(out)])
    assert joined.stat().st_mtime_ns == mtime  # not written again


def test_spoken_squad_nested_zip_says_unzip(tmp_path):
    (tmp_path / "spoken_train-v1.1.json").write_text(json.dumps(squad_json([])))
    (tmp_path / "Spoken-SQuAD_audio").mkdir()
    (tmp_path / "Spoken-SQuAD_audio" / "train_wav.zip").write_bytes(b"PK")
    with pytest.raises(UserError, match=r"no train_wav/ folder .* unzip .*train_wav.zip"):
        prepare_data.main(["spoken-squad", str(tmp_path), "--out", str(tmp_path / "out")])


# -----------------------------------------------------------------------------
# LibriSpeech


def test_librispeech(tmp_path, capsys):
    chapter = tmp_path / "LibriSpeech" / "dev-clean" / "84" / "121123"
    chapter.mkdir(parents=True)
    sf.write(chapter / "84-121123-0000.flac", tone(1.0, 440), 16000)
    sf.write(chapter / "84-121123-0001.flac", tone(0.5, 880), 16000)
    (chapter / "84-121123.trans.txt").write_text(
        "84-121123-0000 GO DO YOU HEAR\n84-121123-0001 BUT IN LESS THAN FIVE MINUTES\n"
        "84-121123-0002 NO AUDIO\n"
    )
    (tmp_path / "LibriSpeech" / "SPEAKERS.TXT").write_text("; not a split\n")
    out = tmp_path / "out"
    prepare_data.main(["librispeech", str(tmp_path), "--out", str(out), "--lowercase"])
    assert "left out 1 (1 audio file missing)" in capsys.readouterr().out
    rows = read_manifest(out / "librispeech_dev-clean.jsonl")
    assert [(r["text"], r["speaker"], r["duration"]) for r in rows] == [
        ("go do you hear", "84", 1.0),
        ("but in less than five minutes", "84", 0.5),
    ]


# -----------------------------------------------------------------------------
# Hugging Face datasets (an optional dependency: requirements-dev.txt installs it for these tests)


def wav_bytes(seconds, freq, path):
    sf.write(path, tone(seconds, freq), 16000)
    return Path(path).read_bytes()


def test_hf_authors_mustc_parquet_and_saved_dataset(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    # the authors' layout: <src>-<tgt>/<split>.parquet with sentence, translation, audio (bytes),
    # duration
    clips = [wav_bytes(1.0 + i / 2, 300 * (i + 1), tmp_path / f"c{i}.wav") for i in range(3)]
    for tgt, translations in (("de", ["eins", "zwei", "drei"]), ("fr", ["un", "deux", ""])):
        ds = datasets.Dataset.from_dict(
            {
                "audio": [{"bytes": b, "path": None} for b in clips],
                "sentence": ["one", "two", "three"],
                "translation": translations,
                "duration": [1.0, 1.5, 2.0],
            }
        ).cast_column("audio", datasets.Audio())
        (tmp_path / f"en-{tgt}").mkdir()
        ds.to_parquet(tmp_path / f"en-{tgt}" / "train.parquet")
    out = tmp_path / "out"
    for tgt in ("de", "fr"):
        prepare_data.main(
            [
                "hf",
                str(tmp_path / f"en-{tgt}" / "train.parquet"),
                "--preset",
                "mustc",
                "--out",
                str(out),
            ]
        )
    assert "left out 1 (1 empty translation)" in capsys.readouterr().out
    de = read_manifest(out / "mustc_en-de_train.jsonl")
    assert [(r["text"], r["translation"], r["tgt_lang"], r["duration"]) for r in de] == [
        ("one", "eins", "de", 1.0),
        ("two", "zwei", "de", 1.5),
        ("three", "drei", "de", 2.0),
    ]
    assert abs(peak_hz(load_row_audio(de[1])) - 600) < 5
    assert len(list((out / "audio").rglob("*.wav"))) == 3  # each clip written once, for both pairs
    fr = read_manifest(out / "mustc_en-fr_train.jsonl")
    assert [r["audio"] for r in fr] == [r["audio"] for r in de[:2]]

    # a save_to_disk folder with two splits, audio kept as paths: read in place; column names as
    # flags
    paths = [str(tmp_path / f"c{i}.wav") for i in range(3)]
    split = lambda i: datasets.Dataset.from_dict({"wav": paths[i:], "words": ["a", "b", "c"][i:]})
    saved = datasets.DatasetDict({"train": split(0), "test": split(1)})
    saved.save_to_disk(str(tmp_path / "saved"))
    flags = ["--audio-column", "wav", "--text-column", "words", "--out", str(out)]
    with pytest.raises(UserError, match="holds the splits train, test: pick one with --split"):
        prepare_data.main(["hf", str(tmp_path / "saved"), *flags])
    prepare_data.main(["hf", str(tmp_path / "saved"), "--split", "test", *flags])
    rows = read_manifest(out / "saved_test.jsonl")
    assert [(Path(r["audio"]).name, r["text"]) for r in rows] == [("c1.wav", "b"), ("c2.wav", "c")]
    with pytest.raises(UserError, match="no column 'sentence'"):
        prepare_data.main(
            [
                "hf",
                str(tmp_path / "saved"),
                "--split",
                "test",
                "--text-column",
                "sentence",
                *flags[:2],
                "--out",
                str(out),
            ]
        )


def test_hf_authors_spoken_squad_parquet(tmp_path):
    datasets = pytest.importorskip("datasets")
    clip = wav_bytes(2.0, 440, tmp_path / "p.wav")
    ds = datasets.Dataset.from_dict(
        {
            "audio": [{"bytes": clip, "path": "p.wav"}] * 2,
            "question": [
                "Who came?\n<audio>",
                "When?",
            ],  # the authors' questions carry an <audio> placeholder
            "answer": ["ben", "at nine"],
            "duration": [2.0, 2.0],
        }
    ).cast_column("audio", datasets.Audio())
    ds.to_parquet(tmp_path / "spoken_squad_test.parquet")
    out = tmp_path / "out"
    prepare_data.main(
        [
            "hf",
            str(tmp_path / "spoken_squad_test.parquet"),
            "--preset",
            "spoken-squad",
            "--out",
            str(out),
        ]
    )
    rows = read_manifest(out / "spoken_squad_test.jsonl")  # QA lines without a passage transcript
    assert [(r["task"], r["question"], r["answer"], "text" in r) for r in rows] == [
        ("qa", "Who came?", "ben", False),
        ("qa", "When?", "at nine", False),
    ]
    assert [e["instruction"].endswith("Who came?") for e in task_examples(rows, "qa")] == [
        True,
        False,
    ]
    squad_style = {
        "text": ["the team", "the team", "team"],
        "answer_start": [0, 0, 4],
    }  # the hub's SQuAD layout
    assert prepare_data.hf_answers(squad_style) == ["the team", "team"]


# -----------------------------------------------------------------------------
# The paper's mix


def test_mix_writes_the_papers_selection_in_compare_layout(
    mustc_root, squad_root, tmp_path, capsys
):
    out = tmp_path / "paper"
    prepare_data.main(["mustc", str(mustc_root), "--out", str(out)])
    prepare_data.main(["spoken-squad", str(squad_root), "--out", str(out)])
    prepare_data.main(["mix", str(out), "--st-langs", "fr", "--qa-dev-passages", "1"])
    printed = capsys.readouterr().out
    assert "not written" not in printed, printed
    sentences = read_manifest(out / "sentences_train.jsonl")
    assert [r["text"] for r in sentences] == [
        "Hello there.",
        "(Laughter)",
        "Runs a little past the end.",
        "The end of talk two.",
    ]
    st = read_manifest(out / "st_train.jsonl")
    assert [(r["task"], r["tgt_lang"]) for r in st] == [("st", "fr"), ("st", "fr")]
    assert (
        len(read_manifest(out / "sentences_test.jsonl")) == 2
        and len(read_manifest(out / "st-fr_test.jsonl")) == 2
    )
    qa_train, qa_dev = read_manifest(out / "qa_train.jsonl"), read_manifest(out / "qa_dev.jsonl")
    assert {r["passage"] for r in qa_train}.isdisjoint(r["passage"] for r in qa_dev) and len(
        qa_dev
    ) >= 1
    assert len(qa_train) + len(qa_dev) == 3 and len(read_manifest(out / "qa_test.jsonl")) == 2
    for name in ("sentences", "qa"):  # what compare.py --corpus reads
        assert all((out / f"{name}_{split}.jsonl").exists() for split in ("train", "dev", "test"))

    # finetune.py --task mix --data sentences_train st_train qa_train: ASR (en-de), ST (de, then
    # fr), QA
    rows = [
        r
        for name in ("sentences_train", "st_train", "qa_train")
        for r in read_manifest(out / f"{name}.jsonl")
    ]
    mix = task_examples(rows, "mix")
    assert [e["task"] for e in mix] == ["asr"] * 4 + ["st"] * 6 + ["qa"] * len(qa_train)
    assert [e.get("tgt_lang") for e in mix if e["task"] == "st"] == ["de"] * 4 + ["fr"] * 2


# -----------------------------------------------------------------------------
# docs/paper-setup.md: its commands, from the downloads to evaluate.py, on the fake layouts (tiny
# models, one step each)


def test_the_paper_setup_commands_run_on_the_converters_outputs(
    mustc_root, squad_root, paths, tmp_path
):
    import evaluate
    import finetune
    import pretrain

    data, runs = tmp_path / "data" / "paper", tmp_path / "runs"
    prepare_data.main(["mustc", str(mustc_root), "--out", str(data)])
    prepare_data.main(["spoken-squad", str(squad_root), "--out", str(data)])
    prepare_data.main(["mix", str(data), "--qa-dev-passages", "1"])
    doc = (Path(__file__).resolve().parents[1] / "docs" / "paper-setup.md").read_text()
    section = doc[doc.index("## 2. Stage 1") : doc.index("The variants of stage 1")]
    named = set(re.findall(r"data/paper/([\w.${}-]+\.jsonl)", section))
    files = {n.replace("${tgt}", tgt) for n in named for tgt in ("de", "fr", "it", "es")}
    assert len(files) == 12 and all((data / name).exists() for name in files), sorted(files)

    tiny = [
        "--llm",
        paths["llm"],
        "--encoder",
        paths["hubert"],
        "--device",
        "cpu",
        "--max-steps",
        "1",
    ]
    tiny += [
        "--qformer-dim",
        "32",
        "--qformer-heads",
        "4",
        "--qformer-layers",
        "2",
        "--batch-size",
        "2",
    ]
    pretrain.main(
        [*tiny, "--no-cache-features", "--data", str(data / "sentences_train.jsonl")]
        + ["--dev-data", str(data / "sentences_dev.jsonl"), "--out", str(runs / "contr-cos-all")]
    )
    finetune.main(
        [
            *tiny[4:8],
            "--task",
            "mix",
            "--frac",
            "0.1",
            "--no-cache-features",
            "--init",
            str(runs / "contr-cos-all"),
        ]
        + ["--out", str(runs / "ft"), "--batch-size", "1", "--grad-accum", "1", "--data"]
        + [str(data / f) for f in ("sentences_train.jsonl", "st_train.jsonl", "qa_train.jsonl")]
        + ["--dev-data"]
        + [str(data / f) for f in ("sentences_dev.jsonl", "st_dev.jsonl", "qa_dev.jsonl")]
    )
    scored = [
        ("asr", "sentences_test"),
        *(("st", f"st-{t}_test") for t in ("de", "fr", "it", "es")),
        ("qa", "qa_test"),
    ]
    for task, name in scored:
        out = runs / "ft" / f"eval-{name}.json"
        evaluate.main(
            ["--ckpt", str(runs / "ft"), "--task", task, "--data", str(data / f"{name}.jsonl")]
            + ["--device", "cpu", "--max-new-tokens", "2", "--out", str(out)]
        )
        assert json.loads(out.read_text())["metrics"], name


def test_a_user_error_is_one_line(tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    argv = ["-m", "scripts.prepare_data", "mustc", str(tmp_path), "--out", str(tmp_path / "out")]
    result = subprocess.run(
        [sys.executable, *argv], cwd=repo, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        == f"prepare_data.py: error: {tmp_path}: no MuST-C language pair here "
        + ("(expected folders like en-de/data/train/wav)")
    )
