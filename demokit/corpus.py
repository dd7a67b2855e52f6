"""
demokit/corpus.py: the spoken corpus. The plan (world.py) is synthesised in worker processes
(tts.py), then written as manifests in the project's JSONL format (`audio` relative to the
manifest's folder):

    sentences_{train,dev,test}.jsonl   {"audio": "audio/s00001.wav", "text": "<a Bible verse>",
                                        "translation": "<the German verse>", "tgt_lang": "de",
                                        "speaker": "hibari", "duration": 3.41, "source": "web",
                                        "ref": "43.11.35"}
    sentences_open_test.jsonl          {"audio": "audio/o02701.wav",
                                        "text": "<a Wikipedia sentence>", "speaker": "pico-gb",
                                        "duration": 4.2, "source": "wikipedia"}
    qa_{train,dev,test}.jsonl          {"task": "qa", "audio": "audio/p00001.wav",
                                        "text": "<passage>", "question": "...",
                                        "answer": "<a span of the passage>", "answer_start": 17,
                                        "speaker": "piper-joe", "duration": 9.8}
    corpus.json                        counts, hours, voices (and which is held out), the text
                                        sources and their licences, seed, each part's build time,
                                        Whisper's WER per voice

Two parts: the sentences (what stage 1 and ASR read: the first run waits for nothing else), then
the QA passages, when a command first asks for them (`finetune.py --task qa`, `python -m demokit`).
"""

import json
import os
import time
import traceback
from pathlib import Path

from common import write_atomically
from demokit import BuildError, log, whisper_tiny_path
from demokit.models import transcribe, word_error_rate
from demokit.text import SOURCES
from demokit.tts import SAMPLE_RATE, VOICES, Voices, have_pico
from demokit.world import PITCH, SEED, SPEED, plan_corpus

# of the corpus's design: 1 was template sentences; 2 real English text and an open test split
VERSION = 2
SPLITS = {"sentences": ("train", "dev", "test", "open_test"), "qa": ("train", "dev", "test")}

# -----------------------------------------------------------------------------
# Synthesis in worker processes


def tts_worker(jobs, folder, seed, queue):
    """Synthesise `jobs` in order, in this process (one thread), reporting (index, seconds) on
    `queue`. Each worker gets a fixed share of the jobs and a fixed onnxruntime seed, so that
    piper's audio is the same on every run with the same seed and number of workers (hibari's is
    seeded per utterance)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import onnxruntime
        import soundfile as sf

        onnxruntime.set_seed(seed)  # before any session exists: piper's in-graph noise then repeats
        voices = Voices()
        for index, job in jobs:
            audio = voices.say(
                job["text"], job["speaker"], job["speed"], job["pitch"], seed=seed + index
            )
            sf.write(str(Path(folder) / job["audio"]), audio, SAMPLE_RATE, subtype="PCM_16")
            queue.put((index, len(audio) / SAMPLE_RATE))
    except BaseException:
        queue.put(("error", traceback.format_exc()))
    queue.put(None)


def synthesise(numbered, folder, seed, workers):
    """Run the TTS jobs, (index in the plan, job) pairs, in `workers` processes with a progress bar;
    returns {index: duration in seconds}. A job goes to the worker its plan index names, so a part
    of the plan is spoken as it would be in a build of the whole."""
    import multiprocessing as mp
    import queue as queue_module

    from tqdm import tqdm

    ctx = mp.get_context(
        "spawn"
    )  # fresh interpreters: nothing of the parent's torch threads is inherited
    queue = ctx.Queue()
    shares = [[(i, job) for i, job in numbered if i % workers == w] for w in range(workers)]
    procs = [
        ctx.Process(
            target=tts_worker, args=(share, str(folder), seed + 1000 * w, queue), daemon=True
        )
        for w, share in enumerate(shares)
    ]
    for p in procs:
        p.start()
    durations, running = {}, workers
    with tqdm(total=len(numbered), desc="synthesising speech", unit="utt") as bar:
        while running:
            try:
                msg = queue.get(timeout=10)
            except queue_module.Empty:
                if not any(p.is_alive() for p in procs):
                    raise BuildError(
                        "a TTS worker died without a word (killed? out of memory?)"
                    ) from None
                continue
            if msg is None:
                running -= 1
            elif msg[0] == "error":
                for p in procs:
                    p.terminate()
                raise RuntimeError(
                    f"TTS failed in a worker:\n{msg[1]}"
                )  # a bug: keep the worker's traceback
            else:
                durations[msg[0]] = msg[1]
                bar.update()
    for p in procs:
        p.join()
    return durations


# -----------------------------------------------------------------------------
# The corpus: synthesis, manifests, a listen to every voice


def build_corpus(out, size="full", seed=SEED, workers=2):
    """The sentences, into the new folder `out`: what stage 1, ASR and ST read (train, dev, test,
    open test). The QA passages follow when a command first asks for them (add_qa)."""
    (out / "audio").mkdir()
    build_part(out, "sentences", size, seed, workers)


def has_qa(folder):
    """Are the QA passages of the corpus in `folder` built? (corpus.json names them last; a corpus
    built in one piece, before the parts, has no "parts" and all its manifests.)"""
    folder = Path(folder)
    manifests = all((folder / f"qa_{split}.jsonl").is_file() for split in SPLITS["qa"])
    summary = json.loads((folder / "corpus.json").read_text())
    return manifests and "qa" in summary.get("parts", {"qa": "built with the rest"})


def add_qa(folder, size="full", seed=SEED, workers=2):
    """The QA passages, into a built corpus folder: their audio, then their manifests (each written
    whole, under a temporary name), then corpus.json. A killed build leaves no manifest that looks
    finished; the next call speaks them again."""
    build_part(Path(folder), "qa", size, seed, workers)


def build_part(out, kind, size, seed, workers):
    """Synthesise the plan's utterances of `kind` (sentences | qa) into `out`, write their
    manifests, and add their figures to corpus.json. Each utterance is spoken as in a build of the
    whole plan (its index sets its worker and its seed), but for piper's in-graph noise, which runs
    on from the part's first utterance."""
    t0 = time.time()
    pico = have_pico()
    plan = plan_corpus(size, seed, pico=pico)
    numbered = [(i, job) for i, job in enumerate(plan) if job["kind"] == kind]
    jobs = [job for _, job in numbered]
    speakers = sorted({j["speaker"] for j in jobs})
    log(
        f"synthesising {len(jobs)} {'QA passages' if kind == 'qa' else 'sentences'} with {workers} "
        f"worker processes: {', '.join(speakers)}"
    )
    if not pico:
        log(
            "ttspico is not installed: the corpus is built without the two Pico voices "
            "(corpus.json says so)"
        )
    found = synthesise(numbered, out, seed, workers)
    durations = [found[i] for i, _ in numbered]
    tts_seconds = time.time() - t0
    manifests = {
        name: lines
        for name, lines in manifest_lines(jobs, durations).items()
        if name.startswith(f"{kind}_")
    }
    for name, lines in manifests.items():
        text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
        write_atomically(out / name, lambda tmp, text=text: Path(tmp).write_text(text, "utf-8"))
    summary = summary_of(out, size, seed, workers, pico)
    add_to_summary(summary, kind, jobs, durations, manifests)
    if kind == "sentences" and size == "full":
        # listen to a few dev sentences of every voice: a broken voice fails loudly here
        picked = [j for j in jobs if j["split"] in ("dev", "open_test")]
        summary["whisper_wer"] = check_voices(out, picked, speakers)
    summary["parts"][kind] = dict(
        tts_seconds=round(tts_seconds, 1), build_seconds=round(time.time() - t0, 1)
    )
    write_atomically(
        out / "corpus.json",
        lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2) + "\n"),
    )
    log(
        f"corpus {kind}: {sum(len(v) for v in manifests.values())} manifest lines, "
        f"{sum(durations) / 3600:.2f} h of speech, {time.time() - t0:.0f} s"
    )


def add_to_summary(summary, kind, jobs, durations, manifests):
    """corpus.json's counts, hours and voices, with a part's."""
    summary["lines"].update({name: len(lines) for name, lines in manifests.items()})
    for split in SPLITS[kind]:  # a passage counts once
        seconds = sum(d for j, d in zip(jobs, durations) if j["split"] == split)
        summary["hours"][f"{kind}_{split}"] = round(seconds / 3600, 3)
    summary["total_hours"] = round(sum(summary["hours"].values()), 3)
    for name in sorted({j["speaker"] for j in jobs}):
        voice = summary["voices"].setdefault(
            name, dict(engine=VOICES[name][0], voice=VOICES[name][1], utterances=0)
        )
        voice["utterances"] += sum(j["speaker"] == name for j in jobs)
    if kind == "sentences":
        summary["held_out_voices"] = sorted(
            {j["speaker"] for j in jobs if j["split"] == "open_test"}
        )
        summary["sources"] = {
            name: SOURCES[name] for name in sorted({j.get("source") for j in jobs} - {None})
        }


def summary_of(folder, size, seed, workers, pico):
    """corpus.json as far as it is written, or the start of a new one."""
    path = Path(folder) / "corpus.json"
    if path.is_file():
        return json.loads(path.read_text())
    return dict(
        version=VERSION, size=size, seed=seed, workers=workers, lines={}, hours={},
        total_hours=0.0, sources={},
        qa_text="passages of a small template world (demokit/world.py), written for this project",
        speed=SPEED, pitch=PITCH, voices={}, held_out_voices=[],
        pico="installed" if pico else "ttspico is not installed: built without the Pico voices",
        parts={},
    )  # fmt: skip


def manifest_lines(plan, durations):
    """The planned utterances and their durations -> {manifest file name: [JSON lines as dicts]}."""
    manifests = {f"{kind}_{split}.jsonl": [] for kind, splits in SPLITS.items() for split in splits}
    for job, seconds in zip(plan, durations):
        lines = manifests[f"{job['kind']}_{job['split']}.jsonl"]
        if job["kind"] == "sentences":
            line = dict(audio=job["audio"], text=job["text"])
            if (
                "translation" in job
            ):  # Bible verses carry their German verse; Wikipedia sentences none
                line.update(translation=job["translation"], tgt_lang="de")
            line.update(speaker=job["speaker"], duration=round(seconds, 2), source=job["source"])
            if "ref" in job:  # the verse, book.chapter.verse
                line["ref"] = job["ref"]
            lines.append(line)
        else:  # several questions share one spoken passage, as in SQuAD
            lines += [
                dict(
                    task="qa",
                    audio=job["audio"],
                    text=job["text"],
                    question=q,
                    answer=answer,
                    answer_start=start,
                    speaker=job["speaker"],
                    duration=round(seconds, 2),
                )
                for q, answer, start in job["questions"]
            ]
    return manifests


def check_voices(folder, jobs, speakers, per_voice=8, limit=0.5):
    """Whisper tiny.en's WER on `per_voice` utterances of every voice; fails if a voice is
    unintelligible."""
    import soundfile as sf

    whisper = whisper_tiny_path()
    log(
        f"listening to every voice with Whisper tiny.en ({per_voice} dev or open-test sentences "
        "each)"
    )
    results = {}
    for speaker in speakers:
        picked = [j for j in jobs if j["speaker"] == speaker][:per_voice]
        heard = transcribe(
            whisper, [sf.read(str(folder / j["audio"]), dtype="float32")[0] for j in picked]
        )
        results[speaker] = round(word_error_rate([j["text"] for j in picked], heard), 3)
        log(
            f"  {speaker:13s} WER {results[speaker]:6.1%}   e.g. {picked[0]['text']!r} -> "
            f"{heard[0]!r}"
        )
        if results[speaker] > limit:
            raise BuildError(
                f"the voice {speaker} is unintelligible to Whisper (WER {results[speaker]:.0%}): "
                "TTS is broken"
            )
    return results
