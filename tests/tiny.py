"""Small helpers the tests share: tiny random models saved to a temp folder, and synthetic
manifests."""

import json
from pathlib import Path

import numpy as np
import soundfile as sf

from demokit.tiny import build_tiny_hubert, build_tiny_llm, build_tiny_whisper

WORDS = (
    "anna ben carla david eva frank meets calls visits at nine ten noon in paris rome oslo on "
    "monday friday"
).split()


# the flags of a quick run with the tiny models (paths fixture), the paper's recipe, no feature cache
TINY = (
    "--llm {llm} --encoder {hubert} --qformer-dim 32 --qformer-heads 4 --qformer-layers 2 "
    "--device cpu --dtype float32 --batch-size 4 --no-cache-features"
)


def tiny_models(folder):
    """Build the tiny LLM and encoders with their tokenizer / feature extractors into `folder`
    once."""
    folder = Path(folder)
    paths = {"llm": folder / "llm", "hubert": folder / "hubert", "whisper": folder / "whisper"}
    for name, build in (
        ("llm", build_tiny_llm),
        ("hubert", build_tiny_hubert),
        ("whisper", build_tiny_whisper),
    ):
        if not (paths[name] / "config.json").exists():
            build(paths[name])
    return {k: str(v) for k, v in paths.items()}


def write_manifest(folder, n=8, seed=0, rate=16000, name="train.jsonl", extra=None):
    """n utterances of distinct noise-like 'speech' (a different tone mix per utterance) with
    distinct transcripts, so a projector can learn to tell them apart. Returns the manifest path."""
    folder = Path(folder)
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        seconds = rng.uniform(0.6, 1.6)
        t = np.arange(int(seconds * rate)) / rate
        freqs = rng.uniform(100, 3000, size=3)
        wave = sum(np.sin(2 * np.pi * f * t) for f in freqs) / 3 + 0.05 * rng.standard_normal(
            len(t)
        )
        sf.write(folder / "audio" / f"u{seed}_{i}.wav", wave.astype("float32"), rate)
        text = " ".join(rng.choice(WORDS, size=rng.integers(3, 7)))
        row = {"audio": f"audio/u{seed}_{i}.wav", "text": f"{i} {text}"}
        row.update((extra or {}).get(i, {}))
        lines.append(json.dumps(row))
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def pooled_pairs(model, rows, layers, batch_size=16):
    """SpeechLLM.pooled_pairs over manifest rows, collated in batches as pretrain.py and evaluate.py
    do."""
    from data import Collator

    collate = Collator(model.encoder.feature_extractor, model.tokenizer)
    return model.pooled_pairs(
        (collate(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)), layers
    )


def argv(line, **values):
    """A command line written as one string, its {fields} filled in:
    argv("--out {out}", out=path)."""
    import shlex

    return shlex.split(line.format(**{k: str(v) for k, v in values.items()}))
