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
                                        sources and their licences, seed, build time, Whisper's WER
                                        per voice
"""

import json
import os
import time
import traceback
from pathlib import Path

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


def synthesise(plan, folder, seed, workers):
    """Run the TTS jobs in `workers` processes with a progress bar; returns each job's duration in
    seconds."""
    import multiprocessing as mp
    import queue as queue_module

    from tqdm import tqdm

    ctx = mp.get_context(
        "spawn"
    )  # fresh interpreters: nothing of the parent's torch threads is inherited
    queue = ctx.Queue()
    shares = [[(i, job) for i, job in enumerate(plan) if i % workers == w] for w in range(workers)]
    procs = [
        ctx.Process(
            target=tts_worker, args=(share, str(folder), seed + 1000 * w, queue), daemon=True
        )
        for w, share in enumerate(shares)
    ]
    for p in procs:
        p.start()
    durations, running = [None] * len(plan), workers
    with tqdm(total=len(plan), desc="synthesising speech", unit="utt") as bar:
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
    t0 = time.time()
    (out / "audio").mkdir()
    pico = have_pico()
    plan = plan_corpus(size, seed, pico=pico)
    speakers = sorted({j["speaker"] for j in plan})
    held_out = sorted({j["speaker"] for j in plan if j["split"] == "open_test"})
    log(
        f"synthesising {len(plan)} utterances with {workers} worker processes: "
        f"{', '.join(speakers)}"
    )
    if not pico:
        log(
            "ttspico is not installed: the corpus is built without the two Pico voices "
            "(corpus.json says so)"
        )
    durations = synthesise(plan, out, seed, workers)
    tts_seconds = time.time() - t0
    manifests = manifest_lines(plan, durations)
    for name, lines in manifests.items():
        (out / name).write_text(
            "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8"
        )
    hours = {
        f"{kind}_{split}": round(
            sum(d for j, d in zip(plan, durations) if (j["kind"], j["split"]) == (kind, split))
            / 3600,
            3,
        )
        for kind, splits in SPLITS.items()
        for split in splits
    }  # a passage counts once
    summary = dict(
        version=VERSION,
        size=size,
        seed=seed,
        workers=workers,
        lines={name: len(lines) for name, lines in manifests.items()},
        hours=hours,
        total_hours=round(sum(durations) / 3600, 3),
        sources={name: SOURCES[name] for name in sorted({j.get("source") for j in plan} - {None})},
        qa_text="passages of a small template world (demokit/world.py), written for this project",
        speed=SPEED,
        pitch=PITCH,
        voices={
            name: dict(
                engine=VOICES[name][0],
                voice=VOICES[name][1],
                utterances=sum(j["speaker"] == name for j in plan),
            )
            for name in speakers
        },
        held_out_voices=held_out,
        pico="installed" if pico else "ttspico is not installed: built without the Pico voices",
        tts_seconds=round(tts_seconds, 1),
    )
    if (
        size == "full"
    ):  # listen to a few dev sentences of every voice: a broken voice fails loudly here
        summary["whisper_wer"] = check_voices(
            out,
            [j for j in plan if j["kind"] == "sentences" and j["split"] in ("dev", "open_test")],
            speakers,
        )
    summary["build_seconds"] = round(time.time() - t0, 1)
    (out / "corpus.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(
        f"corpus: {sum(summary['lines'].values())} manifest lines, {summary['total_hours']:.2f} h "
        f"of speech, {summary['build_seconds']:.0f} s"
    )


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
