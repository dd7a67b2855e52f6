r"""
prepare_data.py: the corpora as people download them -> data.py's JSONL manifests, one command each.

    # every en-<tgt> pair and split found
    python -m scripts.prepare_data mustc /data/MUST-C --out data/paper

    python -m scripts.prepare_data spoken-squad /data/Spoken-SQuAD --out data/paper
    python -m scripts.prepare_data librispeech /data/LibriSpeech --out data/libri --lowercase

    # the authors' data
    python -m scripts.prepare_data hf /data/authors/en-de/train.parquet --preset mustc \
        --out data/paper
    python -m scripts.prepare_data hf /data/authors/spoken_squad_train.parquet \
        --preset spoken-squad --out data/paper

    python -m scripts.prepare_data hf /data/my_saved_dataset --split test --text-column sentence \
        --out data/mine

    # the paper's selection, in the layout compare.py and the README use
    python -m scripts.prepare_data mix data/paper

What each writes (into --out):

    mustc          mustc_en-<tgt>_<split>.jsonl: one line per segment of a talk (offset + duration
                   into the talk's wav), transcript, translation, tgt_lang, speaker. Splits as
                   MuST-C names them (train, dev, tst-COMMON, tst-HE).
    spoken-squad   spoken_squad_{train,test}.jsonl: one QA line per question, the passage's audio,
                   its ASR transcript, the question and the gold answers. Passages kept as one file
                   per sentence are joined into one file per passage, written once under
                   <out>/audio/spoken_squad/.
    librispeech    librispeech_<split>.jsonl: one line per utterance.
    hf             <name>.jsonl from any Hugging Face `datasets` dataset with an audio column (a
                   save_to_disk folder, or parquet / arrow / json / csv files): audio kept as bytes
                   is written out once (as it is, named by its hash, under <out>/audio/); audio kept
                   as paths is read in place. --preset mustc / spoken-squad: the authors' column
                   names (<src>-<tgt>/<split>.parquet with sentence, translation, audio, duration;
                   spoken_squad_<split>.parquet with question, answer, audio), and the names that
                   `mix` reads (mustc_en-de_train, spoken_squad_test, ...).
    mix            from the manifests above, the paper's fine-tuning mix and test sets (durations
                   1-45 s for MuST-C, 1-150 s for Spoken-SQuAD train, 1-100 s for its test, >= 1 s
                   for the MuST-C tests):
                   sentences_{train,dev,test}.jsonl  MuST-C en-de: transcript + German translation
                                                     (ASR, ST, stage 1)
                   st_{train,dev}.jsonl              MuST-C en-fr, en-it, en-es as ST-only lines
                                                     ("task": "st")
                   st-<tgt>_test.jsonl               each pair's test set, ST only (de, fr, it, es)
                   qa_{train,dev,test}.jsonl         Spoken-SQuAD (dev: passages held out from
                                                     train)

Every converter counts and reports what it left out, and why. docs/paper-setup.md has the commands
from the downloads to evaluate.py; docs/data.md the manifest fields and the quirks of each layout.

Sections: writing manifests | MuST-C | Spoken-SQuAD | LibriSpeech | Hugging Face datasets | the
paper's mix | the command line.
"""

import argparse
import hashlib
import json
import os
import random
import re
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

import common
from data import UserError

# -----------------------------------------------------------------------------
# Writing manifests


def audio_ref(path, out):
    """A manifest's `audio` field: relative to the manifest's folder when the file lies inside it
    (the audio a converter wrote), else absolute (the corpus stays where it was downloaded)."""
    path = Path(path).resolve()
    out = Path(out).resolve()
    return str(path.relative_to(out)) if path.is_relative_to(out) else str(path)


@contextmanager
def reading(path, where=""):
    """Whatever goes wrong reading one input file (bad bytes, bad YAML / JSON / parquet, a missing
    field, unreadable audio) is the input's fault: one line naming the file (and where in it)."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # yaml, json, soundfile and pyarrow each raise their own types
        why = " ".join(str(e).split())[:200]
        raise UserError(f"{path}{where}: cannot be read: {type(e).__name__}: {why}") from None


WRITTEN = []  # the lines each manifest got: main says so when nothing was written


def write_manifest(path, rows):
    """Write rows as JSONL, atomically (a temporary file, then rename): a killed run leaves no half
    manifest."""
    rows = list(rows)
    WRITTEN.append(len(rows))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def report(path, n, skipped):
    """'wrote 2301 lines to out/x.jsonl; left out 3 (2 empty translation, 1 audio file missing)'."""
    line = f"wrote {n} lines to {path}"
    if skipped:
        line += (
            f"; left out {sum(skipped.values())} ("
            + ", ".join(f"{k} {why}" for why, k in skipped.items())
            + ")"
        )
    print(line, flush=True)


def read_text_lines(path):
    """The lines of a text file, split at '\\n' only: str.splitlines() also breaks at U+2028,
    U+0085, form feeds and the like (and a file opened in text mode at a lone '\\r'); one such
    character inside a line of TED text would shift every later line against its segment."""
    lines = Path(path).read_bytes().decode("utf-8-sig").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r").strip() for line in lines]


# -----------------------------------------------------------------------------
# MuST-C: <root>/en-<tgt>/data/<split>/wav/<talk>.wav, one recording per talk, and txt/<split>.yaml
# (one {wav, offset, duration, speaker_id} per segment) line-aligned with txt/<split>.en and
# txt/<split>.<tgt>

MAX_OVERRUN = (
    0.5  # seconds: a segment that ends past its talk's audio by this much or less is cut at the end
)


def mustc_pairs(root, targets):
    """The en-<tgt> folders under root (or root itself, or one level down, as the archives
    unpack)."""
    root = Path(root)
    found = (
        [root]
        if (root / "data").is_dir()
        else sorted(root.glob("en-*")) + sorted(root.glob("*/en-*"))
    )
    pairs = {
        p.name.split("-", 1)[1]: p
        for p in found
        if re.fullmatch(r"en-\w+", p.name) and (p / "data").is_dir()
    }
    if not pairs:
        raise UserError(
            f"{root}: no MuST-C language pair here (expected folders like en-de/data/train/wav)"
        )
    missing = [t for t in targets or () if t not in pairs]
    if missing:
        raise UserError(
            f"{root}: no en-{missing[0]} here (found: {', '.join('en-' + t for t in pairs)})"
        )
    return {t: p for t, p in pairs.items() if not targets or t in targets}


def read_segments(path):
    """MuST-C's segment YAML: a list of one-line mappings, one per segment (~230k in en-de's train
    split). PyYAML's C loader when it has one: the pure-Python loader is many times slower."""
    import yaml  # PyYAML, a dependency of transformers

    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def mustc_split(pair_dir, tgt, split, out):
    """The manifest rows of one split of one pair, the Counter of segments left out (by reason), and
    how many segments were cut at the end of their talk."""
    txt = pair_dir / "data" / split / "txt"
    with reading(txt / f"{split}.yaml"):
        segments = read_segments(txt / f"{split}.yaml")
        assert isinstance(segments, list), "not a list of segments"
    with reading(txt / f"{split}.en"):
        english = read_text_lines(txt / f"{split}.en")
    with reading(txt / f"{split}.{tgt}"):
        target = read_text_lines(txt / f"{split}.{tgt}")
    if not len(segments) == len(english) == len(target):
        raise UserError(
            f"{txt}: {len(segments)} segments in {split}.yaml but {len(english)} lines in "
            f"{split}.en and {len(target)} in {split}.{tgt}: the files must be line-aligned"
        )
    talk_seconds, rows, skipped, cut = {}, [], Counter(), 0
    for n, (seg, text, translation) in enumerate(zip(segments, english, target), 1):
        with reading(txt / f"{split}.yaml", f": segment {n}"):
            wav = pair_dir / "data" / split / "wav" / seg["wav"]
            offset, duration = float(seg["offset"]), float(seg["duration"])
        if wav not in talk_seconds:
            with reading(wav):
                talk_seconds[wav] = sf.info(str(wav)).duration if wav.is_file() else None
        seconds = talk_seconds[wav]
        if seconds is None:
            skipped["audio file missing"] += 1
        elif not text or not translation:
            skipped["empty transcript or translation"] += 1
        elif duration <= 0 or offset < 0 or offset >= seconds:
            skipped["segment outside its talk"] += 1
        elif offset + duration > seconds + MAX_OVERRUN:
            skipped[f"segment ending more than {MAX_OVERRUN} s past its talk"] += 1
        else:
            if (
                offset + duration > seconds
            ):  # ends a little past the audio: cut at the end of the talk
                cut += 1
                duration = seconds - offset
            row = {
                "audio": audio_ref(wav, out),
                "offset": round(offset, 6),
                "duration": round(duration, 6),
            }
            row.update(
                text=text,
                translation=translation,
                tgt_lang=tgt,
                speaker=str(seg.get("speaker_id", "")),
            )
            rows.append(row)
    return rows, skipped, cut


def convert_mustc(args):
    for tgt, pair_dir in mustc_pairs(args.root, args.pairs).items():
        splits = sorted({p.parent.parent.name for p in (pair_dir / "data").glob("*/txt/*.yaml")})
        for split in splits if not args.splits else [s for s in splits if s in args.splits]:
            rows, skipped, cut = mustc_split(pair_dir, tgt, split, args.out)
            report(
                write_manifest(Path(args.out) / f"mustc_en-{tgt}_{split}.jsonl", rows),
                len(rows),
                skipped,
            )
            if cut:
                print(
                    f"  {cut} segments ended up to {MAX_OVERRUN} s past their talk's audio: cut "
                    "at its end"
                )


# -----------------------------------------------------------------------------
# Spoken-SQuAD: spoken_{train,test}-v1.1.json (SQuAD format: data[a].paragraphs[b] = {context, qas};
# the context is the ASR transcript of the spoken passage), and the audio from
# Spoken-SQuAD_audio.zip, whose train_wav.zip and dev_wav.zip (the test set's audio) hold one wav
# per sentence, <a>_<b>_<k>.wav

SPOKEN_SQUAD = {
    "train": ("spoken_train-v1.1.json", "train_wav"),
    "test": ("spoken_test-v1.1.json", "dev_wav"),
}


def find_one(root, name):
    """root/name, or the one match one or two folders down (the archives nest their folders), else
    None."""
    for pattern in (name, f"*/{name}", f"*/*/{name}"):
        matches = sorted(Path(root).glob(pattern))
        if matches:
            return matches[0]
    return None


def passage_audio_index(audio_dir):
    """(a, b) -> the passage's audio: its own file <a>_<b>.wav, or its sentence files
    <a>_<b>_<k>.wav in the order of k. One listing of the folder (it holds a file per sentence; a
    glob per passage would list it again for every passage)."""
    index = {}
    for name in os.listdir(audio_dir):
        m = re.fullmatch(r"(\d+)_(\d+)(?:_(\d+))?\.(wav|flac)", name)
        if m:
            a, b, k = int(m[1]), int(m[2]), -1 if m[3] is None else int(m[3])
            index.setdefault((a, b), []).append((k, Path(audio_dir) / name))
    return {key: [path for _, path in sorted(files)] for key, files in index.items()}


def passage_file(files, target):
    """One file for the passage: the file itself, or its sentences joined (in order, at their own
    rate) and written once as FLAC to `target` (to a temporary name first: a killed run leaves no
    half file)."""
    if len(files) == 1:
        return files[0]
    if not target.exists():
        parts = [sf.read(str(f), dtype="float32", always_2d=True) for f in files]
        rates = {rate for _, rate in parts}
        if len(rates) > 1:
            raise UserError(
                f"{files[0].parent}: the sentences of one passage have different rates: "
                f"{sorted(rates)}"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        sf.write(
            str(tmp), np.concatenate([audio for audio, _ in parts]), rates.pop(), format="FLAC"
        )
        os.replace(tmp, target)
    return target


def unique(texts):
    """The distinct non-empty strings, in their first order."""
    return list(dict.fromkeys(t.strip() for t in texts if t and t.strip()))


def convert_spoken_squad(args):
    root, out = Path(args.root), Path(args.out)
    for split, (json_name, audio_name) in SPOKEN_SQUAD.items():
        source = find_one(root, json_name)
        audio_dir = find_one(root, audio_name)
        if source is None:
            print(f"{root}: no {json_name}, no {split} split")
            continue
        if audio_dir is None or not audio_dir.is_dir():
            zipped = find_one(root, audio_name + ".zip")
            hint = (
                f"unzip {zipped} (Spoken-SQuAD_audio.zip holds one zip per split)"
                if zipped
                else "download it"
            )
            raise UserError(f"{root}: no {audio_name}/ folder with the {split} audio: {hint}")
        index = passage_audio_index(audio_dir)
        with reading(source):
            rows, skipped = squad_rows(source, index, split, out)
        report(write_manifest(out / f"spoken_squad_{split}.jsonl", rows), len(rows), skipped)


def squad_rows(source, index, split, out):
    """The QA lines of one Spoken-SQuAD split."""
    articles = json.loads(source.read_text(encoding="utf-8-sig"))["data"]
    rows, skipped = [], Counter()
    for a, article in enumerate(tqdm(articles, desc=f"spoken-squad {split}")):
        for b, paragraph in enumerate(article["paragraphs"]):
            files = index.get((a, b))
            if not files:
                skipped["passage audio missing"] += len(paragraph["qas"])
                continue
            audio = passage_file(files, out / "audio" / "spoken_squad" / split / f"{a}_{b}.flac")
            seconds = sf.info(str(audio)).duration
            for qa in paragraph["qas"]:
                answers = unique(answer["text"] for answer in qa["answers"])
                if not answers or not qa["question"].strip():
                    skipped["no question or no answer"] += 1
                    continue
                row = {"audio": audio_ref(audio, out), "task": "qa"}
                row.update({"text": context} if (context := paragraph["context"].strip()) else {})
                row.update(
                    question=qa["question"].strip(), answer=answers, duration=round(seconds, 3)
                )
                row.update(id=qa["id"], passage=f"{a}_{b}")
                rows.append(row)
    return rows, skipped


# -----------------------------------------------------------------------------
# LibriSpeech: <root>/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<n>.flac, with
# <speaker>-<chapter>.trans.txt (one "<id> <TRANSCRIPT>" per line, upper case, no punctuation)


def convert_librispeech(args):
    root, out = Path(args.root), Path(args.out)
    if (root / "LibriSpeech").is_dir():  # the archives unpack into LibriSpeech/
        root = root / "LibriSpeech"
    if not root.is_dir():
        raise UserError(f"{root}: not a folder (give the LibriSpeech download's folder)")
    splits = sorted(
        d for d in root.iterdir() if d.is_dir() and next(d.glob("*/*/*.trans.txt"), None)
    )
    if not splits:
        raise UserError(
            f"{root}: no LibriSpeech split here (expected <split>/<speaker>/<chapter>/*.trans.txt)"
        )
    for split in splits if not args.splits else [s for s in splits if s.name in args.splits]:
        rows, skipped = [], Counter()
        for trans in tqdm(sorted(split.glob("*/*/*.trans.txt")), desc=f"librispeech {split.name}"):
            with reading(trans):
                lines = read_text_lines(trans)
            for line in lines:
                utt, _, text = line.partition(" ")
                flac = trans.parent / f"{utt}.flac"
                if not flac.is_file():
                    skipped["audio file missing"] += 1
                elif not text.strip():
                    skipped["empty transcript"] += 1
                else:
                    text = text.strip().lower() if args.lowercase else text.strip()
                    row = {
                        "audio": audio_ref(flac, out),
                        "text": text,
                        "speaker": utt.split("-")[0],
                    }
                    with reading(flac):
                        seconds = sf.info(str(flac)).duration
                    rows.append({**row, "duration": round(seconds, 3)})
        report(write_manifest(out / f"librispeech_{split.name}.jsonl", rows), len(rows), skipped)


# -----------------------------------------------------------------------------
# Hugging Face datasets: any dataset with an audio column

HF_PRESETS = {  # the authors' column names (scripts/data_configs in their repository)
    "mustc": dict(text_column="sentence", translation_column="translation"),
    "spoken-squad": dict(question_column="question", answer_column="answer"),
}
HF_BUILDERS = {
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
}


def open_hf_dataset(paths, split):
    """(rows to iterate, the folder relative audio paths are read from). A save_to_disk folder is
    memory-mapped; data files and other folders are streamed (load_dataset(..., streaming=True)), so
    nothing is copied into the datasets cache. Audio columns are left undecoded: their bytes or
    paths are all a manifest needs."""
    import datasets  # optional (requirements-extras.txt): only this converter needs it

    first = Path(paths[0])
    if first.is_dir() and any(
        (first / name).exists() for name in ("dataset_info.json", "dataset_dict.json")
    ):
        ds = datasets.load_from_disk(str(first))
        if isinstance(ds, datasets.DatasetDict):
            if split is None and len(ds) > 1:
                raise UserError(f"{first} holds the splits {', '.join(ds)}: pick one with --split")
            ds = ds[split or next(iter(ds))]
        return ds, first
    if first.is_dir():
        return datasets.load_dataset(str(first), split=split or "train", streaming=True), first
    builder = HF_BUILDERS.get(first.suffix)
    if builder is None:
        raise UserError(f"{first}: not a dataset folder nor a {' / '.join(HF_BUILDERS)} file")
    files = [str(p) for p in paths]
    return datasets.load_dataset(
        builder, data_files=files, split="train", streaming=True
    ), first.parent


def undecoded(ds, column):
    """The dataset with its Audio column cast to decode=False ({"bytes", "path"} per row)."""
    import datasets

    features = ds.features or {}
    if column not in features and features:
        raise UserError(
            f"no column '{column}' (the columns: {', '.join(features)}); name it with "
            "--audio-column"
        )
    if isinstance(features.get(column), datasets.Audio):
        ds = ds.cast_column(column, datasets.Audio(decode=False))
    return ds


AUDIO_MAGIC = {
    b"RIFF": ".wav",
    b"fLaC": ".flac",
    b"OggS": ".ogg",
    b"ID3": ".mp3",
    b"\xff\xfb": ".mp3",
}


def hf_audio_file(value, base, out):
    """One row's audio value -> a file on disk: bytes are written once to <out>/audio/<hash><ext>
    (as they are: no decoding, no re-encoding; the same bytes in two datasets, as the English audio
    of each MuST-C pair, make one file), a path is read in place, a decoded array is written as
    FLAC. None if the value holds no audio."""
    if isinstance(value, str):
        value = {"path": value, "bytes": None}
    if not isinstance(value, dict):
        return None
    if value.get("bytes"):
        data = value["bytes"]
        ext = Path(value.get("path") or "").suffix.lower()
        if ext not in {".wav", ".flac", ".ogg", ".mp3"}:
            ext = next((e for magic, e in AUDIO_MAGIC.items() if data.startswith(magic)), ".wav")
        return write_once(
            out, hashlib.sha1(data).hexdigest(), ext, lambda tmp: tmp.write_bytes(data)
        )
    if value.get("array") is not None:
        array = np.asarray(value["array"], dtype=np.float32)
        digest = hashlib.sha1(array.tobytes() + str(value["sampling_rate"]).encode()).hexdigest()
        rate = value["sampling_rate"]
        return write_once(
            out,
            digest,
            ".flac",
            lambda tmp: sf.write(str(tmp), array, rate, "PCM_16", format="FLAC"),
        )
    if value.get("path"):
        path = Path(value["path"])
        for candidate in (path, base / path, Path.cwd() / path):
            if candidate.is_file():
                return candidate
    return None


def write_once(out, digest, ext, write):
    """<out>/audio/<digest[:2]>/<digest><ext>, written by write(temporary path) unless it exists."""
    target = Path(out) / "audio" / digest[:2] / f"{digest}{ext}"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        write(tmp)
        os.replace(tmp, target)
    return target


def hf_name(args, path):
    """The manifest's name: --name, else the names `mix` reads for the presets (mustc_en-de_train
    from en-de/train.parquet, spoken_squad_test from spoken_squad_test.parquet), else the file or
    folder name."""
    if args.name:
        return args.name
    stem = path.stem if path.is_file() else path.name
    stem += f"_{args.split}" if args.split else ""
    if args.preset == "mustc" and args.tgt_lang:
        return f"mustc_en-{args.tgt_lang}_{stem}"
    return stem


def language_pair(path):
    """('en', 'de') from a path with a <src>-<tgt> folder (the authors' en-de/train.parquet), else
    None."""
    for part in reversed(Path(path).resolve().parts):
        m = re.fullmatch(r"([a-z]{2,3})-([a-z]{2,3})", part)
        if m:
            return m[1], m[2]
    return None


def hf_question(text):
    """The question without the '<audio>' placeholder the authors' Spoken-SQuAD questions carry."""
    return text.replace("\n<audio>", "").replace("<audio>", "").strip()


def hf_answers(value):
    """An answer column's value -> a string, a list of distinct strings, or None: a string, a list,
    or the SQuAD layout of the hub's QA datasets ({"text": [...], "answer_start": [...]})."""
    if isinstance(value, dict):
        value = value.get("text")
    if isinstance(value, (list, tuple)):
        return unique(str(v) for v in value) or None
    if value is None:
        return None
    return str(value).strip() or None


def hf_row(record, columns):
    """A dataset record -> (the manifest row without its audio, None), or (None, why it is left
    out)."""
    row = {}
    for field, column in columns.items():
        if column is None or record[column] is None:
            continue
        if field == "answer":
            value = hf_answers(record[column])
        else:
            value = str(record[column]).strip()
            value = hf_question(value) if field == "question" else value
        if value:
            row[field] = value
    if columns["text"] and "text" not in row:
        return None, "empty transcript"
    if columns["translation"] and "translation" not in row:
        return None, "empty translation"
    if columns["question"] and not ("question" in row and "answer" in row):
        return None, "no question or no answer"
    return row, None


def convert_hf(args):
    for flag, value in HF_PRESETS.get(args.preset, {}).items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    if args.preset == "mustc" and args.tgt_lang is None:
        pair = language_pair(args.paths[0])
        if pair is None:
            raise UserError(
                f"{args.paths[0]}: no <src>-<tgt> folder in the path; give the target with "
                "--tgt-lang"
            )
        args.tgt_lang = pair[1]
    if args.text_column is None and args.question_column is None:
        args.text_column = "text"
    if args.translation_column and not args.tgt_lang:
        raise UserError(
            "--translation-column needs --tgt-lang (the target language's code: de, fr, ...)"
        )
    if bool(args.question_column) != bool(args.answer_column):
        raise UserError("spoken QA needs both --question-column and --answer-column")
    columns = {
        "text": args.text_column,
        "translation": args.translation_column,
        "question": args.question_column,
        "answer": args.answer_column,
        "speaker": args.speaker_column,
    }
    paths, out = [Path(p) for p in args.paths], Path(args.out)
    for path in paths:
        if not path.exists():
            raise UserError(f"{path}: no such file or folder")
    with reading(paths[0]):
        rows, skipped = hf_rows(args, paths, columns, out)
    report(write_manifest(out / f"{hf_name(args, paths[0])}.jsonl", rows), len(rows), skipped)


def hf_rows(args, paths, columns, out):
    """The manifest lines of a Hugging Face dataset, and the Counter of what was left out."""
    ds, base = open_hf_dataset(paths, args.split)
    rows, skipped = [], Counter()
    for record in tqdm(undecoded(ds, args.audio_column), desc=f"hf {paths[0].name}"):
        missing = [c for c in [args.audio_column, *columns.values()] if c and c not in record]
        if missing:
            raise UserError(
                f"no column '{missing[0]}' (the columns: {', '.join(record)}); see --help for the "
                "flags"
            )
        row, why = hf_row(record, columns)
        audio = hf_audio_file(record[args.audio_column], base, out) if row else None
        if row and audio is None:
            why = "no audio (no bytes, and no path that exists)"
        if why is None:
            try:
                seconds = sf.info(str(audio)).duration
            except Exception:  # soundfile raises its own error types for unreadable files
                why = "audio soundfile cannot read"
        if why:
            skipped[why] += 1
            continue
        row.update({"tgt_lang": args.tgt_lang} if args.translation_column else {})
        row.update({"task": "qa"} if args.question_column else {})
        rows.append({"audio": audio_ref(audio, out), **row, "duration": round(seconds, 3)})
    return rows, skipped


# -----------------------------------------------------------------------------
# The paper's mix (the authors' scripts/data_configs): from the manifests above, in the folder they
# are in

SPLIT_NAMES = {  # our converters' names, then the authors' parquet names
    "train": ["train"],
    "dev": ["dev", "validation"],
    "tst-COMMON": ["tst-COMMON", "test"],
    "tst-HE": ["tst-HE", "test_he"],
}


def read_jsonl(path, out):
    """The rows of a converter's manifest (each with its `duration`, which the selection filters
    on), with relative audio paths made relative to `out` instead."""
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            with reading(path, f":{line_no}"):
                row = json.loads(line)
                assert isinstance(row, dict) and isinstance(row.get("audio"), str), "no 'audio'"
            if "duration" not in row:
                raise UserError(
                    f"{path}:{line_no}: no 'duration' (the converters write one; mix filters on it)"
                )
            if not Path(row["audio"]).is_absolute():
                row["audio"] = audio_ref(Path(path).parent / row["audio"], out)
            rows.append(row)
    return rows


def mustc_rows(folder, tgt, splits, out):
    """The lines of these MuST-C splits of en-<tgt> (our names or the authors'), or None if one is
    missing."""
    rows = []
    for split in splits:
        paths = [folder / f"mustc_en-{tgt}_{name}.jsonl" for name in SPLIT_NAMES[split]]
        path = next((p for p in paths if p.exists()), None)
        if path is None:
            return None
        rows += read_jsonl(path, out)
    return rows


def within(rows, low, high=None):
    return [r for r in rows if r["duration"] >= low and (high is None or r["duration"] <= high)]


def convert_mix(args):
    folder, out = Path(args.folder), Path(args.out or args.folder)
    lo, hi = args.min_seconds, args.max_seconds
    written, missing, common_only = [], [], []

    def test_rows(tgt):
        """tst-COMMON + tst-HE, as the authors' evaluation; tst-HE left out where it was not
        converted (said below), unless --tst-he asks for it."""
        rows = mustc_rows(folder, tgt, ["tst-COMMON"], out)
        he = None if args.with_tst_he is False else mustc_rows(folder, tgt, ["tst-HE"], out)
        if rows is None or (he is None and args.with_tst_he):
            return None
        if he is None and args.with_tst_he is None:
            common_only.append(f"en-{tgt}")
        return rows + (he or [])

    def write(name, rows):
        if rows is None:
            missing.append(name)
        else:
            write_manifest(out / f"{name}.jsonl", rows)
            written.append((name, len(rows)))

    # MuST-C en-de: ASR + ST into German, and stage 1's data (its English side); tests: no longest
    for split in ("train", "dev"):
        rows = mustc_rows(folder, "de", [split], out)
        write(f"sentences_{split}", None if rows is None else within(rows, lo, hi))
    rows = test_rows("de")
    write("sentences_test", None if rows is None else within(rows, lo))
    # MuST-C en-fr, en-it, en-es: ST only (their English side is not ASR data a second time)
    for split in ("train", "dev"):
        parts = [mustc_rows(folder, tgt, [split], out) for tgt in args.st_langs]
        rows = (
            None
            if None in parts
            else [{**r, "task": "st"} for part in parts for r in within(part, lo, hi)]
        )
        write(f"st_{split}", rows)
    for tgt in ["de", *args.st_langs]:
        rows = test_rows(tgt)
        write(
            f"st-{tgt}_test",
            None if rows is None else [{**r, "task": "st"} for r in within(rows, lo)],
        )
    # Spoken-SQuAD: train 1-150 s, minus --qa-dev-passages whole passages held out as a dev set;
    # test 1-100 s
    train = folder / "spoken_squad_train.jsonl"
    if train.exists():
        rows = within(read_jsonl(train, out), lo, args.qa_max_seconds)
        passages = sorted({r.get("passage", r["audio"]) for r in rows})
        dev = set(
            random.Random(args.seed).sample(passages, min(args.qa_dev_passages, len(passages)))
        )
        write("qa_train", [r for r in rows if r.get("passage", r["audio"]) not in dev])
        write("qa_dev", [r for r in rows if r.get("passage", r["audio"]) in dev])
    else:
        missing += ["qa_train", "qa_dev"]
    test = folder / "spoken_squad_test.jsonl"
    write(
        "qa_test",
        within(read_jsonl(test, out), lo, args.qa_test_max_seconds) if test.exists() else None,
    )

    width = max(len(name) for name, _ in written) if written else 0
    print(
        "\n".join(f"  {name:<{width}}  {n:>8} lines" for name, n in written) or "  nothing written"
    )
    if common_only:
        print(
            f"  the tests of {', '.join(sorted(set(common_only)))} are tst-COMMON alone: no tst-HE "
            "manifest was converted (the authors' tests were tst-COMMON + tst-HE)"
        )
    if missing:
        print(
            f"not written, their converter's manifests are missing in {folder}: "
            f"{', '.join(missing)}"
        )


# -----------------------------------------------------------------------------
# The command line


OUT_HELP = "the folder to write the manifests (and any audio written out) to"


def get_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("mustc", help="MuST-C: <root>/en-<tgt>/data/<split>/{wav,txt}")
    g.add_argument("root", help="the folder holding en-de/, en-fr/, ... (or one en-<tgt> folder)")
    g.add_argument(
        "--pairs",
        nargs="+",
        metavar="TGT",
        help="target languages to convert (default: every pair)",
    )
    g.add_argument(
        "--splits", nargs="+", help="splits to convert (default: all: train dev tst-COMMON tst-HE)"
    )
    g.add_argument("--out", required=True, help=OUT_HELP)

    g = sub.add_parser(
        "spoken-squad", help="Spoken-SQuAD: spoken_{train,test}-v1.1.json + train_wav/, dev_wav/"
    )
    g.add_argument("root", help="the folder holding the JSON files and the unzipped audio folders")
    g.add_argument("--out", required=True, help=OUT_HELP)

    g = sub.add_parser(
        "librispeech", help="LibriSpeech: <split>/<speaker>/<chapter>/*.flac + *.trans.txt"
    )
    g.add_argument("root", help="the folder holding the splits (or LibriSpeech/ itself)")
    g.add_argument("--splits", nargs="+", help="splits to convert (default: every one found)")
    g.add_argument(
        "--lowercase",
        action="store_true",
        help="lower-case the transcripts (distributed upper case)",
    )
    g.add_argument("--out", required=True, help=OUT_HELP)

    g = sub.add_parser("hf", help="a Hugging Face datasets dataset with an audio column")
    g.add_argument(
        "paths",
        nargs="+",
        help="a save_to_disk folder, a dataset folder, or data files (parquet, ...)",
    )
    g.add_argument(
        "--preset", choices=list(HF_PRESETS), help="the authors' column names for their data"
    )
    g.add_argument("--split", help="the split of a dataset with several")
    g.add_argument("--name", help="the manifest's name (default: from the path; see the docstring)")
    g.add_argument(
        "--audio-column",
        default="audio",
        help="audio: an Audio feature, bytes/path structs or paths",
    )
    g.add_argument(
        "--text-column", help="the transcript (default: text; mustc preset: sentence; QA: none)"
    )
    g.add_argument(
        "--translation-column", help="the translation (mustc preset: translation); needs --tgt-lang"
    )
    g.add_argument(
        "--tgt-lang",
        help="the translation's language code (mustc preset: from the en-<tgt> folder)",
    )
    g.add_argument(
        "--question-column", help="spoken QA: the question (spoken-squad preset: question)"
    )
    g.add_argument(
        "--answer-column",
        help="spoken QA: the answer, a string or a list (spoken-squad preset: answer)",
    )
    g.add_argument("--speaker-column", help="the speaker (optional)")
    g.add_argument("--out", required=True, help=OUT_HELP)

    g = sub.add_parser(
        "mix", help="the paper's fine-tuning mix and test sets from the manifests above"
    )
    g.add_argument("folder", help="the folder the converters wrote to")
    g.add_argument("--out", help="where to write (default: the same folder)")
    g.add_argument(
        "--st-langs", nargs="+", default=["fr", "it", "es"], help="the other ST pairs besides en-de"
    )
    g.add_argument(
        "--tst-he",
        "--with-tst-he",
        dest="with_tst_he",
        action=argparse.BooleanOptionalAction,
        help="MuST-C tests: tst-COMMON + tst-HE, as the authors (default: tst-HE where converted; "
        "--no-tst-he: tst-COMMON alone)",
    )
    g.add_argument(
        "--min-seconds",
        type=float,
        default=1.0,
        help="shortest audio kept, every set (the authors: 1)",
    )
    g.add_argument(
        "--max-seconds",
        type=float,
        default=45.0,
        help="longest MuST-C train/dev segment (the authors: 45)",
    )
    g.add_argument(
        "--qa-max-seconds",
        type=float,
        default=150.0,
        help="longest Spoken-SQuAD train passage (150)",
    )
    g.add_argument(
        "--qa-test-max-seconds",
        type=float,
        default=100.0,
        help="longest Spoken-SQuAD test passage (100)",
    )
    g.add_argument(
        "--qa-dev-passages",
        type=int,
        default=100,
        help="Spoken-SQuAD train passages held out as dev",
    )
    g.add_argument("--seed", type=int, default=42, help="the draw of the dev passages")

    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    convert = {
        "mustc": convert_mustc,
        "spoken-squad": convert_spoken_squad,
        "librispeech": convert_librispeech,
        "hf": convert_hf,
        "mix": convert_mix,
    }
    WRITTEN.clear()
    convert[args.command](args)
    if not sum(WRITTEN):  # every converter reports what it left out, and why, above
        raise UserError(f"{args.command}: wrote nothing (what was left out, and why, is above)")


if __name__ == "__main__":
    common.run_main(main)
