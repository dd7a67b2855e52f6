"""
data.py: manifests of (audio, transcript, ...) -> checked examples -> padded batches.

A manifest is a JSONL file, one utterance per line:

    {"audio": "clips/0001.wav", "text": "the meeting starts at nine"}
    {"audio": "/abs/0002.flac", "text": "...", "translation": "...", "tgt_lang": "de", "speaker": "s1", "duration": 3.2}
    {"audio": "p7.wav", "task": "qa", "text": "<passage transcript>", "question": "who ...?", "answer": "anna"}
    {"audio": "talks/ted_767.wav", "offset": 16.73, "duration": 3.5, "text": "...", "translation": "..."}

`audio` is relative to the manifest's folder (or absolute); `text` is the transcript (a QA line may
leave its passage transcript out). Optional: `task` (asr|st|qa), `translation` + `tgt_lang` (speech
translation), `question` + `answer` (spoken QA; the answer may be a list of gold answers),
`speaker`, `duration` (seconds). A line with `offset` (seconds) is a segment of a longer recording,
as in NeMo manifests: `duration` seconds from `offset` (to the end of the file without `duration`),
read without loading the rest of the file. Without `offset`, the whole file is the utterance and
`duration` is informational. Audio in any format and rate soundfile reads is mixed to mono and
resampled to 16 kHz with soxr. docs/data.md has the details.

    rows = read_manifest("train.jsonl")                  # checks every line, errors name file:line
    examples = task_examples(rows, "qa")                 # instruction + target per task
    loader = DataLoader(
        examples,
        batch_size=8,
        collate_fn=Collator(model.encoder.feature_extractor, model.tokenizer),
    )
"""

import json
import random
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

from common import UserError

SAMPLE_RATE = 16000

# The instruction of each fine-tuning task, written once (the paper's likely index-0 prompts for
# ASR/ST; its QA prompt is unknown: the authors' released code does not include it).
INSTRUCTIONS = {
    "asr": "Can you transcribe this audio?",
    "st": "Can you translate this audio from english to {language}?",
    "qa": "Answer the question about the audio in a few words. {question}",
}
LANGUAGES = {"de": "german", "fr": "french", "it": "italian", "es": "spanish", "en": "english"}


class ManifestError(UserError, ValueError):
    """A bad manifest line; the message names the manifest and the line."""


# -----------------------------------------------------------------------------
# Reading and checking a manifest


def load_audio(path, offset=None, duration=None):
    """Any soundfile-readable file, or a segment of it (offset and duration in seconds: soundfile
    seeks to the segment and reads only its samples) -> mono float32 numpy array at 16 kHz. Audio
    holding NaN or infinite samples is a UserError naming the file."""
    with sf.SoundFile(str(path)) as f:
        rate = f.samplerate
        if offset:
            f.seek(round(offset * rate))
        audio = f.read(
            -1 if duration is None else round(duration * rate), dtype="float32", always_2d=True
        )
    if not np.isfinite(audio).all():
        where = f" (the segment at {offset} s)" if offset is not None else ""
        raise UserError(f"{path}{where}: the audio holds NaN or infinite samples")
    audio = audio.mean(axis=1)  # mix to mono
    if rate != SAMPLE_RATE:
        audio = soxr.resample(audio, rate, SAMPLE_RATE)
    return np.ascontiguousarray(audio, dtype=np.float32)


def check_audio(path):
    """One recording given on the command line (evaluate.py --audio): at least one encoder frame
    long, else a UserError naming it. What soundfile cannot read is left to load_audio's message."""
    try:
        info = sf.info(str(path))
    except Exception:  # soundfile raises its own error types for unreadable files
        return
    if info.frames / info.samplerate < MIN_SECONDS:
        raise UserError(
            f"{path}: {info.frames / info.samplerate:.4f} s of audio, shorter than one encoder "
            f"frame ({MIN_SECONDS} s)"
        )


def load_row_audio(row):
    """A checked manifest row's audio: its segment (offset, duration) or, without `offset`, the
    whole file."""
    if "offset" in row:
        return load_audio(row["audio"], row["offset"], row["duration"])
    return load_audio(row["audio"])


# The shortest clip an encoder reads: HuBERT's conv stack needs 400 samples (25 ms) for one frame;
# shorter audio would reach the projector as no frame at all.
MIN_SECONDS = 400 / SAMPLE_RATE
# The longest transcript, translation, question or answer a line may hold, in characters (~1500
# words, minutes of speech): far past any clip the scripts keep, and well within the LLMs' context.
MAX_TEXT_CHARS = 8000
# A segment may end this much past the end of its file (times rounded to the millisecond); more is a
# bad line.
SEGMENT_SLACK = 0.001
# Sample formats that can hold NaN or infinite values; only these are scanned when a manifest is
# read (a full read of every file would make checking a large manifest as slow as an epoch).
FLOAT_SUBTYPES = {"FLOAT", "DOUBLE"}


def pieces(path, seconds, window, search=2.0):
    """A long recording as consecutive pieces of at most `window` seconds, [(offset, duration)],
    read one at a time (evaluate.py --audio). Each cut falls at the quietest 20 ms of the last
    `search` seconds before the window's end, found by reading only those seconds: a word cut in two
    would be lost to both pieces. A last sliver shorter than an encoder frame holds no word: left
    out."""
    search, hop = min(search, window / 4), SAMPLE_RATE // 50  # 20 ms frames
    found, start = [], 0.0
    while seconds - start > window:
        tail = load_audio(path, start + window - search, search)
        energy = (tail[: len(tail) // hop * hop].reshape(-1, hop) ** 2).mean(1)
        end = start + window - search + (int(energy.argmin()) + 0.5) * hop / SAMPLE_RATE
        found.append((start, end - start))
        start = end
    if seconds - start >= MIN_SECONDS:
        found.append((start, seconds - start))
    return found


def _seconds(row, field, positive):
    value = row[field]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ValueError(f"field '{field}' must be a number of seconds, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(
            f"field '{field}' must be {'> 0' if positive else '>= 0'} seconds, got {value}"
        )
    return float(value)


TASKS = ("asr", "st", "qa")  # the values of a line's `task`


def _task(row):
    """A line's `task`, one of TASKS. A spelling that differs only in case or surrounding spaces
    ("ASR ") is read as the task (read_manifest says so once): a typo must not drop the line from
    every task without a word. Anything else is a bad line."""
    task = row["task"]
    if not isinstance(task, str) or task.strip().lower() not in TASKS:
        raise ValueError(f"field 'task' must be one of {', '.join(TASKS)}, got {task!r}")
    return task.strip().lower()


def _check_row(row, root):
    """Return the row with `audio` resolved to an absolute path, or raise ValueError saying what is
    wrong."""
    if not isinstance(row, dict):
        raise ValueError("a line must be a JSON object")
    if "task" in row:
        row = {**row, "task": _task(row)}
    required = (
        ("audio",) if row.get("task") == "qa" else ("audio", "text")
    )  # a QA passage may have no transcript
    for field in required:
        if field not in row:
            raise ValueError(f"missing field '{field}'")
    for field in ("audio", "text", "translation", "tgt_lang", "question", "task", "speaker"):
        if field in row and not isinstance(row[field], str):
            raise ValueError(f"field '{field}' must be a string, got {type(row[field]).__name__}")
    if "text" in row and not row["text"].strip():
        raise ValueError("empty transcript ('text')")
    if "question" in row and not row["question"].strip():
        raise ValueError("empty question ('question')")
    answers = row.get("answer", "x")
    answers = [answers] if isinstance(answers, str) else answers
    if not (isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)):
        raise ValueError("field 'answer' must be a string or a non-empty list of strings")
    if not all(a.strip() for a in answers):
        raise ValueError("empty answer ('answer'): a QA line would be trained to answer nothing")
    if row.get("task") == "qa" and not ("question" in row and "answer" in row):
        raise ValueError("a QA line ('task': 'qa') needs 'question' and 'answer'")
    for field in ("text", "translation", "question", "answer"):  # all strings by now
        value = row.get(field, "")
        if sum(map(len, value if isinstance(value, list) else [value])) > MAX_TEXT_CHARS:
            raise ValueError(f"field '{field}' is longer than {MAX_TEXT_CHARS} characters")
    path = Path(row["audio"]) if Path(row["audio"]).is_absolute() else root / row["audio"]
    if not path.is_file():
        raise ValueError(f"audio file not found: {path}")
    try:
        info = sf.info(str(path))
    except Exception as e:  # soundfile raises its own error types for unreadable files
        raise ValueError(f"not a readable audio file: {path} ({e})") from None
    if info.frames == 0:
        raise ValueError(f"audio file is empty (0 samples): {path}")
    seconds = info.frames / info.samplerate
    stat = (
        path.stat()
    )  # the key of the frozen-encoder feature cache: this file (and segment), as it is now
    checked = {**row, "audio": str(path), "duration": seconds}
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    if "offset" in row:  # a segment of a longer recording
        offset = _seconds(row, "offset", positive=False)
        duration = (
            _seconds(row, "duration", positive=True) if "duration" in row else seconds - offset
        )
        if offset >= seconds:
            raise ValueError(
                f"the segment starts at {offset} s, after the end of its file ({seconds:.3f} s): "
                f"{path}"
            )
        if offset + duration > seconds + SEGMENT_SLACK:
            raise ValueError(
                f"the segment ends at {offset + duration:.3f} s, past the end of its file "
                f"({seconds:.3f} s): {path}"
            )
        duration = min(duration, seconds - offset)
        checked.update(offset=offset, duration=duration)
        key += f"@{offset}+{duration}"
    if checked["duration"] < MIN_SECONDS:
        raise ValueError(
            f"the audio lasts {checked['duration']:.4f} s, shorter than one encoder frame "
            f"({MIN_SECONDS} s): {path}"
        )
    if info.subtype in FLOAT_SUBTYPES:  # integer PCM, FLAC, MP3 and the like cannot hold NaN
        try:
            load_row_audio(checked)
        except UserError as e:
            raise ValueError(str(e)) from None
    return {**checked, "key": key}


def read_manifest(path, skip_bad=False, max_seconds=None, log=print, encoder_seconds=None):
    """Read and check every line of a JSONL manifest (UTF-8; a byte-order mark at the start, as
    Windows tools write it, is fine). A bad line raises ManifestError naming the file and line,
    unless skip_bad, which skips it and reports how many were skipped. Audio longer than max_seconds
    is skipped and counted; audio longer than encoder_seconds (what the encoder sees at most, e.g.
    Whisper's 30 s window) is a bad line. A manifest with no usable line says how many failed and
    why."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    rows, bad, too_long, respelled = [], [], 0, {}
    with open(path, "rb") as f:  # decoded line by line: a bad byte is a bad line, not a traceback
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                line = line.decode("utf-8-sig" if line_no == 1 else "utf-8")
                written = json.loads(line)
                row = _check_row(written, path.parent)
                kept = max_seconds is None or row["duration"] <= max_seconds
                if kept and encoder_seconds is not None and row["duration"] > encoder_seconds:
                    raise ValueError(
                        f"{row['duration']:.1f} s of audio, longer than the encoder's "
                        f"{encoder_seconds:g} s window: cut it into segments (offset, duration)"
                    )
            except ValueError as e:  # so are json.JSONDecodeError and UnicodeDecodeError
                if not skip_bad:
                    raise ManifestError(f"{path}:{line_no}: {e}") from None
                log(f"skipping {path}:{line_no}: {e}")
                bad.append(f"line {line_no}: {e}")
                continue
            if row.get("task") != written.get("task"):  # "ASR ": said once, below
                respelled.setdefault(written["task"], line_no)
            if max_seconds is not None and row["duration"] > max_seconds:
                too_long += 1
                continue
            rows.append(row)
    if respelled:
        log(f"{path}: read 'task' " + ", ".join(f"{t!r} (first on line {n}) as {_task({'task': t})!r}"
                                                for t, n in respelled.items()))  # fmt: skip
    if not rows:
        raise ManifestError(f"{path}: no usable lines" + _why_none(bad, too_long, max_seconds))
    if bad or too_long:
        log(
            f"{path}: kept {len(rows)} lines, skipped {len(bad)} bad and {too_long} longer than "
            f"{max_seconds} s"
        )
    return rows


def _why_none(bad, too_long, max_seconds, show=3):
    """' (all 5 lines failed: 4 bad, 1 longer than 45 s; line 1: ...; line 2: ...)' for an unusable
    manifest."""
    if not bad and not too_long:
        return " (it is empty)"
    parts = [f"{len(bad)} bad"] * bool(bad) + [f"{too_long} longer than {max_seconds} s"] * bool(
        too_long
    )
    first = "".join(f"; {reason}" for reason in bad[:show]) + ("; ..." if len(bad) > show else "")
    return f" (all {len(bad) + too_long} lines failed: {', '.join(parts)}{first})"


def need_transcripts(rows, use):
    """Raise ManifestError unless every row has a transcript (`text`), which `use` needs (a QA line
    may leave its passage transcript out)."""
    missing = [row["audio"] for row in rows if "text" not in row]
    if missing:
        raise ManifestError(
            f"{use} needs a transcript ('text') on every line; {len(missing)} lines have none "
            f"(the first: {missing[0]}). Give the converter the transcript column, or use a "
            "manifest that has them."
        )
    return rows


# -----------------------------------------------------------------------------
# Tasks: what the model hears, what it is asked, what it should answer


def task_examples(rows, task, qa_newline=False):
    """Rows -> examples with `instruction` and `target` for one task (asr|st|qa), or `mix`: every
    task that applies to each row, concatenated in the authors' order (ASR, ST, QA). qa_newline: a
    QA target ends in a newline, as the authors' (their decoding stops there)."""
    tasks = ("asr", "st", "qa") if task == "mix" else (task,)
    examples = [ex for t in tasks for row in rows if (ex := _example(row, t, qa_newline))]
    if not examples:
        raise ManifestError(
            f"no examples for task '{task}' in the manifest (st needs 'translation', qa needs "
            "'question' and 'answer')"
        )
    return examples


def _example(row, task, qa_newline=False):
    if task == "asr" and row.get("task", "asr") == "asr":
        return {
            **row,
            "task": "asr",
            "instruction": INSTRUCTIONS["asr"],
            "target": row["text"],
            "references": [row["text"]],
        }
    if task == "st" and "translation" in row:
        language = LANGUAGES.get(row.get("tgt_lang", "de"), row.get("tgt_lang", "de"))
        return {
            **row,
            "task": "st",
            "instruction": INSTRUCTIONS["st"].format(language=language),
            "target": row["translation"],
            "references": [row["translation"]],
        }
    if task == "qa" and "question" in row and "answer" in row:
        answers = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
        return {
            **row,
            "task": "qa",
            "instruction": INSTRUCTIONS["qa"].format(question=row["question"]),
            "target": answers[0] + ("\n" if qa_newline else ""),
            "references": answers,
        }
    return None


def frac_subset(examples, frac, seed=42, stratify=False):
    """A seeded random fraction of the examples, as the authors draw it (random.seed(42);
    random.sample over the whole concatenated mix). stratify=True draws the fraction from each task
    separately."""
    if not 0 < frac <= 1:
        raise ValueError(f"frac must be in (0, 1], got {frac}")
    if frac == 1:
        return list(examples)
    if stratify:
        tasks = sorted({ex["task"] for ex in examples})
        return [
            ex
            for t in tasks
            for ex in frac_subset([e for e in examples if e["task"] == t], frac, seed)
        ]
    rng = random.Random(seed)
    idx = rng.sample(range(len(examples)), max(1, int(frac * len(examples))))
    return [examples[i] for i in idx]


# -----------------------------------------------------------------------------
# Batching


class Collator:
    """Examples -> one padded batch: the encoder's own input features (raw waveform for
    HuBERT/wav2vec2, log-mel for Whisper) with a mask, and the transcript tokens as the paper's text
    side of the contrastive pair: transcript tokens only, no BOS, no chat template, no EOS."""

    def __init__(self, feature_extractor, tokenizer=None):
        self.feature_extractor, self.tokenizer = feature_extractor, tokenizer
        self.is_whisper = type(feature_extractor).__name__ == "WhisperFeatureExtractor"

    def __call__(self, examples):
        waves = [load_row_audio(ex) for ex in examples]
        if self.is_whisper:
            self.check_whisper_window(examples, waves)
            # Pad to the longest clip, not to Whisper's 30 s: the encoder runs on the true length.
            inputs = self.feature_extractor(
                waves, sampling_rate=SAMPLE_RATE, return_tensors="pt", padding="longest"
            ).input_features
            # A clip of n samples has n // hop log-mel frames (the extractor's own mask rounds up by
            # one).
            lengths = torch.tensor([len(w) // self.feature_extractor.hop_length for w in waves])
            input_mask = torch.arange(inputs.shape[-1])[None] < lengths[:, None]
        else:
            feats = self.feature_extractor(
                waves,
                sampling_rate=SAMPLE_RATE,
                return_tensors="pt",
                padding=True,
                return_attention_mask=True,
            )
            inputs, input_mask = feats.input_values, feats.attention_mask.bool()
        batch = {
            "speech_inputs": inputs,
            "speech_input_mask": input_mask,
            "keys": [ex["key"] for ex in examples],
            "examples": examples,
        }
        if self.tokenizer is not None:
            ids = [torch.tensor(self.text_ids(ex["text"]), dtype=torch.long) for ex in examples]
            lengths = torch.tensor([len(i) for i in ids])
            batch["text_ids"] = torch.nn.utils.rnn.pad_sequence(
                ids, batch_first=True, padding_value=self.tokenizer.pad_token_id or 0
            )
            batch["text_mask"] = torch.arange(int(lengths.max()))[None] < lengths[:, None]
        return batch

    def text_ids(self, text):
        """A transcript's tokens, read as text: '<|im_end|>' in it is characters, not the token."""
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids

    def check_whisper_window(self, examples, waves):
        """Whisper's encoder sees at most 30 s (its positions end there): a longer clip would be
        cut without a word, so it is refused, named."""
        limit = self.feature_extractor.n_samples
        for ex, wave in zip(examples, waves):
            if len(wave) > limit:
                raise UserError(
                    f"{ex['audio']}: {len(wave) / SAMPLE_RATE:.1f} s of audio, longer than the "
                    f"Whisper encoder's {limit // SAMPLE_RATE} s window: cut it into segments "
                    "('offset'/'duration') or keep it out with --max-audio-seconds 30"
                )


def to_device(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
