"""Runs that never lose or mix up work, and input that never gets a traceback (issue 19).

Every bad input below ends in one line naming what is wrong (a UserError / ModelError, which
common.run_main prints as one line with exit status 1, or argparse's "argument --x: ..." with exit
status 2), or is accepted as documented; no run's files are lost or mixed with another's. The cases
are tables, so their count is easy to see: FLAG_CASES, MANIFEST_CASES, RUN_CASES, CHECKPOINT_CASES
and the single cases after them (see N_BAD_INPUTS at the end).

    python -m pytest -q tests/test_robustness_runs.py
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from tiny import argv, write_manifest

import common
import evaluate
import finetune
import pretrain
from data import Collator, ManifestError, check_audio, read_manifest

REPO = Path(__file__).resolve().parents[1]
TINY = (
    "--llm {llm} --encoder {hubert} --data {data} --out {out} --qformer-dim 32 --qformer-heads 4 "
    "--qformer-layers 2 --layers 0,5 --device cpu --dtype float32 --batch-size 4 --lr 1e-3 "
    "--warmup-ratio 0 --grad-accum 1"
)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("data"), n=8)


def pretrain_argv(paths, manifest, out, extra=""):
    return argv(f"{TINY} {extra}", data=manifest, out=out, **paths)


@pytest.fixture(scope="module")
def base_run(paths, manifest, tmp_path_factory):
    """A finished 2-step run with a checkpoint at every step."""
    out = tmp_path_factory.mktemp("base") / "run"
    pretrain.main(pretrain_argv(paths, manifest, out, "--max-steps 2 --save-every 1"))
    return out


@pytest.fixture
def run_copy(base_run, tmp_path):
    """A copy of the base run to damage."""
    return Path(shutil.copytree(base_run, tmp_path / "run"))


def files_of(folder):
    """Every file of a run folder with its bytes: 'lost or mixed up' is a change here."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def steps_logged(out):
    """(step, kind) of every record of log.jsonl: a training step ('train') or an evaluation."""
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [(r["step"], "train" if "lr" in r else "eval") for r in records]


# -----------------------------------------------------------------------------
# Flags: each numeric flag has its range; a value outside it is argparse's one line (exit 2)

FLAG_CASES = [
    ("pretrain", "--max-steps -1", "argument --max-steps: must be an integer >= 0"),
    ("pretrain", "--save-every -1", "argument --save-every: must be an integer >= 0"),
    ("pretrain", "--eval-every -5", "argument --eval-every: must be an integer >= 0"),
    ("pretrain", "--lr -1", "argument --lr: must be a number >= 0"),
    ("pretrain", "--lr abc", "argument --lr: must be a number >= 0"),
    ("pretrain", "--lr nan", "argument --lr: must be a number >= 0"),
    ("pretrain", "--emb-lr inf", "argument --emb-lr: must be a number >= 0"),
    ("pretrain", "--batch-size 0", "argument --batch-size: must be an integer >= 1"),
    ("pretrain", "--batch-size 1.5", "argument --batch-size: must be an integer >= 1"),
    ("pretrain", "--grad-accum 0", "argument --grad-accum: must be an integer >= 1"),
    ("pretrain", "--window 0", "argument --window: must be an integer >= 1"),
    ("pretrain", "--queries 0", "argument --queries: must be an integer >= 1"),
    ("pretrain", "--qformer-dim 0", "argument --qformer-dim: must be an integer >= 1"),
    ("pretrain", "--qformer-layers -1", "argument --qformer-layers: must be an integer >= 1"),
    ("pretrain", "--qformer-dim 32 --qformer-heads 5", "--qformer-heads 5 must divide --qformer"),
    ("pretrain", "--dropout 1.5", r"argument --dropout: must be a number in \[0, 1\)"),
    ("pretrain", "--time-mask -0.1", r"argument --time-mask: must be a number in \[0, 1\)"),
    ("pretrain", "--warmup-ratio 2", r"argument --warmup-ratio: must be a number in \[0, 1\]"),
    ("pretrain", "--epochs 0", "argument --epochs: must be a number > 0"),
    ("pretrain", "--grad-clip 0", "argument --grad-clip: must be a number > 0"),
    ("pretrain", "--seed -1", "argument --seed: must be an integer >= 0"),
    ("pretrain", "--temperature 0", "argument --temperature: must be a number > 0"),
    ("pretrain", "--ctc-weight -1", "argument --ctc-weight: must be a number >= 0"),
    ("pretrain", "--center-items 0", "argument --center-items: must be an integer >= 1"),
    ("pretrain", "--emb-steps -1", "argument --emb-steps: must be an integer >= 0"),
    ("pretrain", "--dev-size -1", "argument --dev-size: must be an integer >= 0"),
    ("pretrain", "--max-audio-seconds 0", "argument --max-audio-seconds: must be a number > 0"),
    ("pretrain", "--device tpu9", "argument --device: expected auto, cpu or cuda"),
    (
        "pretrain",
        "--resume --overwrite",
        "argument --overwrite: not allowed with argument --resume",
    ),
    ("finetune", "--frac 1.5", r"argument --frac: must be a number in \[0, 1\]"),
    ("finetune", "--frac 0", r"--frac must be in \(0, 1\]"),
    ("finetune", "--lora -1", "argument --lora: must be an integer >= 0"),
    ("finetune", "--lora-alpha 0", "argument --lora-alpha: must be a number > 0"),
    ("finetune", "--frac-seed -2", "argument --frac-seed: must be an integer >= 0"),
    ("finetune", "--ctc-temperature 0", "argument --ctc-temperature: must be a number > 0"),
    ("evaluate", "--limit -3", "argument --limit: must be an integer >= 1"),
    ("evaluate", "--batch-size 0", "argument --batch-size: must be an integer >= 1"),
    ("evaluate", "--loop-repeats -1", "argument --loop-repeats: must be an integer >= 0"),
    ("evaluate", "--show -1", "argument --show: must be an integer >= 0"),
    ("evaluate", "--max-new-tokens 0", "argument --max-new-tokens: expected 'auto' or a positive"),
]
if not torch.cuda.is_available():
    FLAG_CASES.append(("pretrain", "--device cuda", "--device: cuda: CUDA is not available"))


@pytest.mark.parametrize("script, flags, expect", FLAG_CASES)
def test_a_flag_out_of_range_is_one_line(script, flags, expect, tmp_path, capsys):
    modules = {"pretrain": pretrain, "finetune": finetune, "evaluate": evaluate}
    base = {"pretrain": "--llm tiny", "finetune": "--init none", "evaluate": "--ckpt nowhere"}
    with pytest.raises(SystemExit) as stopped:
        modules[script].get_args(argv(f"{base[script]} {flags} --out {{out}}", out=tmp_path))
    assert stopped.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"{Path(sys.argv[0]).name}: error: "), last
    assert re.search(expect, last), last


# -----------------------------------------------------------------------------
# Manifests: a line that cannot be read or used is a bad line naming file:line; --skip-bad skips it


def wav(folder, name, samples, dtype="float32", value=0.1):
    path = folder / "audio" / name
    sf.write(path, np.full(samples, value, dtype=dtype), 16000, subtype="FLOAT")
    return f"audio/{name}"


def bad_lines(folder):
    """name -> (the bytes of one bad line, what its error says)."""
    (folder / "audio" / "text.wav").write_text("not audio")
    (folder / "audio" / "empty.wav").write_bytes(b"")
    sf.write(folder / "audio" / "silent.wav", np.zeros(0, "float32"), 16000)
    good = json.dumps({"audio": wav(folder, "ok.wav", 16000), "text": "x"})
    line = lambda **row: json.dumps(row).encode()  # noqa: E731
    return {
        "non-UTF-8 byte": (b'{"audio": "audio/ok.wav", "text": "caf\xe9"}', "can't decode byte"),
        "transcript too long": (line(audio="audio/ok.wav", text="word " * 5000), "longer than"),
        "translation too long": (
            line(audio="audio/ok.wav", text="x", translation="w" * 9000),
            "'translation' is longer than 8000",
        ),
        "clip shorter than a frame": (
            line(audio=wav(folder, "short.wav", 100), text="x"),
            "shorter than one encoder frame",
        ),
        "segment shorter than a frame": (
            line(audio="audio/ok.wav", text="x", offset=0.5, duration=0.01),
            "shorter than one encoder frame",
        ),
        "not JSON": (b"audio=ok.wav text=x", "Expecting value"),
        "truncated JSON": (good[:-5].encode(), "Expecting|Unterminated"),
        "a JSON list": (b'["audio/ok.wav", "x"]', "must be a JSON object"),
        "no transcript": (line(audio="audio/ok.wav"), "missing field 'text'"),
        "transcript not a string": (line(audio="audio/ok.wav", text=3), "must be a string"),
        "empty transcript": (line(audio="audio/ok.wav", text="  "), "empty transcript"),
        "audio not found": (line(audio="audio/none.wav", text="x"), "audio file not found"),
        "not an audio file": (line(audio="audio/text.wav", text="x"), "not a readable audio"),
        "an empty file": (line(audio="audio/empty.wav", text="x"), "not a readable audio"),
        "no samples": (line(audio="audio/silent.wav", text="x"), r"empty \(0 samples\)"),
        "negative offset": (line(audio="audio/ok.wav", text="x", offset=-1), "must be >= 0"),
        "offset past the end": (line(audio="audio/ok.wav", text="x", offset=5), "after the end"),
        "NaN samples": (
            line(audio=wav(folder, "nan.wav", 16000, value=np.nan), text="x"),
            "NaN or infinite",
        ),
        "answer not strings": (
            line(audio="audio/ok.wav", task="qa", question="q", answer=[1]),
            "'answer' must be a string",
        ),
        "QA without a question": (
            line(audio="audio/ok.wav", task="qa", answer="a"),
            "needs 'question' and 'answer'",
        ),
        "an unknown task": (
            line(audio="audio/ok.wav", text="x", task="asr_"),
            "field 'task' must be one of asr, st, qa, got 'asr_'",
        ),
        "a task that is not a string": (
            line(audio="audio/ok.wav", text="x", task=["asr"]),
            "field 'task' must be one of asr, st, qa",
        ),
        "QA with an empty question": (
            line(audio="audio/ok.wav", task="qa", question=" ", answer="a"),
            "empty question",
        ),
        "QA with an empty answer": (
            line(audio="audio/ok.wav", task="qa", question="who?", answer=""),
            "empty answer",
        ),
        "QA with an empty gold answer": (
            line(audio="audio/ok.wav", task="qa", question="who?", answer=["anna", "  "]),
            "empty answer",
        ),
    }


MANIFEST_CASES = [
    "non-UTF-8 byte", "transcript too long", "translation too long", "clip shorter than a frame",
    "segment shorter than a frame", "not JSON", "truncated JSON", "a JSON list", "no transcript",
    "transcript not a string", "empty transcript", "audio not found", "not an audio file",
    "an empty file", "no samples", "negative offset", "offset past the end", "NaN samples",
    "answer not strings", "QA without a question", "an unknown task", "a task that is not a string",
    "QA with an empty question", "QA with an empty answer", "QA with an empty gold answer",
]  # fmt: skip


@pytest.mark.parametrize("case", MANIFEST_CASES)
def test_a_bad_manifest_line_is_named_and_skippable(case, manifest, tmp_path):
    folder = manifest.parent
    bad, expect = bad_lines(folder)[case]
    lines = manifest.read_bytes().splitlines()
    path = folder / f"bad-{MANIFEST_CASES.index(case)}.jsonl"
    path.write_bytes(b"\n".join([lines[0], bad, *lines[1:]]) + b"\n")
    with pytest.raises(ManifestError, match=rf"{path.name}:2: .*({expect})"):
        read_manifest(path, log=lambda *_: None)
    skipped = []
    rows = read_manifest(path, skip_bad=True, log=skipped.append)
    assert len(rows) == len(lines) and any(f"{path.name}:2" in s for s in skipped)


def test_special_tokens_in_a_transcript_are_text(paths, manifest):
    """'<|im_end|>' written in a transcript is characters, never the end-of-turn token."""
    from transformers import AutoFeatureExtractor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(paths["llm"])
    collate = Collator(AutoFeatureExtractor.from_pretrained(paths["hubert"]), tokenizer)
    row = read_manifest(manifest, log=lambda *_: None)[0]
    batch = collate([{**row, "text": "she said <|im_end|> and left"}])
    assert not set(batch["text_ids"][0].tolist()) & set(tokenizer.all_special_ids)


def test_a_clip_past_whispers_window_is_refused_named(paths, tmp_path):
    """Whisper's encoder sees 30 s: a longer clip is refused naming the limit, never cut."""
    from transformers import AutoFeatureExtractor

    (tmp_path / "audio").mkdir()
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"audio": wav(tmp_path, "long.wav", 31 * 16000), "text": "x"}))
    rows = read_manifest(path, log=lambda *_: None)
    collate = Collator(AutoFeatureExtractor.from_pretrained(paths["whisper"]))
    with pytest.raises(common.UserError, match="long.wav: 31.0 s .*Whisper encoder's 30 s"):
        collate(rows)


def test_evaluate_audio_shorter_than_a_frame(tmp_path):
    (tmp_path / "audio").mkdir()
    clip = tmp_path / wav(tmp_path, "short.wav", 100)
    with pytest.raises(common.UserError, match="shorter than one encoder frame"):
        check_audio(clip)


# -----------------------------------------------------------------------------
# One run per folder; --resume with flags that cannot change mid-run is refused, naming the flag

RUN_CASES = [
    ("", "holds another run .*--resume, pick a new --out, or pass --overwrite"),
    ("--resume --batch-size 2", r"--batch-size 2 \(the run has 4\): cannot change mid-run"),
    ("--resume --lr 5e-4", r"--lr 0.0005 \(the run has 0.001\)"),
    ("--resume --seed 7", r"--seed 7 \(the run has 42\)"),
    ("--resume --layers 0", r"--layers 0 \(the run has 0,5\)"),
    ("--resume --loss asr", r"--loss asr \(the run has contrastive\)"),
    ("--resume --qformer-dim 64", r"--qformer-dim 64 \(the run has 32\)"),
    ("--resume --window 9", r"--window 9 \(the run has 17\)"),
    ("--resume --dropout 0", r"--dropout 0.0 \(the run has 0.1\)"),
    ("--resume --encoder {whisper}", "--encoder .*whisper.* cannot change mid-run"),
    ("--resume --data {other}", "--data .*other.jsonl .*cannot change mid-run"),
    ("--resume --grad-accum 2", r"--grad-accum 2 \(the run has 1\)"),
]


@pytest.mark.parametrize("extra, expect", RUN_CASES)
def test_another_run_into_the_folder_is_refused(extra, expect, paths, manifest, base_run):
    before = files_of(base_run)
    other = write_manifest(manifest.parent, n=8, seed=5, name="other.jsonl")
    command = pretrain_argv(paths, manifest, base_run, "--max-steps 2 --save-every 1")
    with pytest.raises(common.UserError, match=expect):
        pretrain.main(command + argv(extra, other=other, **paths))
    assert files_of(base_run) == before  # nothing written, nothing lost


def test_a_finetune_resume_into_a_stage1_folder(paths, manifest, base_run):
    with pytest.raises(common.UserError, match="holds a pretrain.py run, not a finetune.py one"):
        finetune.main(
            argv("--init {init} --data {data} --out {init} --resume", init=base_run, data=manifest)
        )


def test_changed_data_under_the_same_name_is_refused(paths, manifest, run_copy, tmp_path):
    data = Path(shutil.copy(manifest, tmp_path / "data.jsonl"))
    shutil.copytree(manifest.parent / "audio", tmp_path / "audio")
    out = tmp_path / "changing"
    pretrain.main(pretrain_argv(paths, data, out, "--max-steps 1 --save-every 1"))
    data.write_text("\n".join(data.read_text().splitlines()[::-1]) + "\n")  # same lines, reordered
    with pytest.raises(common.UserError, match="training data .*data.jsonl changed since"):
        pretrain.main(pretrain_argv(paths, data, out, "--max-steps 2 --resume"))


def test_overwrite_clears_the_earlier_run(paths, manifest, run_copy):
    (run_copy / "notes.txt").write_text("mine")  # not a run file: --overwrite leaves it
    pretrain.main(pretrain_argv(paths, manifest, run_copy, "--max-steps 1 --overwrite"))
    assert [s for s, kind in steps_logged(run_copy) if kind == "train"] == [1]
    assert [p.name for p in common.checkpoints(run_copy)] == ["ckpt-0000001"]
    assert (run_copy / "notes.txt").read_text() == "mine"


def test_resume_may_run_longer_and_logs_each_step_once(paths, manifest, run_copy, capsys):
    """--max-steps may change (printed, recorded in run.json); log.jsonl is cut back to the
    checkpoint, so a step killed after its log line is never logged twice; pruning keeps the newest
    three checkpoints by step."""
    shutil.rmtree(
        run_copy / "ckpt-0000002"
    )  # as if killed after step 2's log line, before its ckpt
    pretrain.main(pretrain_argv(paths, manifest, run_copy, "--max-steps 5 --save-every 1 --resume"))
    assert "--resume: --max-steps 2 -> 5" in capsys.readouterr().out
    assert json.loads((run_copy / "run.json").read_text())["changes"]["max_steps"] == [2, 5]
    logged = steps_logged(run_copy)
    assert len(logged) == len(set(logged))
    assert [step for step, kind in logged if kind == "train"] == [1, 2, 3, 4, 5]
    assert [p.name for p in common.checkpoints(run_copy)] == [f"ckpt-000000{i}" for i in (3, 4, 5)]


def test_pruning_goes_by_step_not_by_name(tmp_path):
    for name in ("ckpt-0000009", "ckpt-10000000", "ckpt-0000010", "ckpt-junk"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train_state.pt").write_bytes(b"")
    assert [p.name for p in common.checkpoints(tmp_path)] == [
        "ckpt-0000009",
        "ckpt-0000010",
        "ckpt-10000000",
    ]


# -----------------------------------------------------------------------------
# Checkpoints and caches: nothing unpickles code; a damaged file is one line; the others stay


class Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_pickle(run):
    marker = run.parent / "pwned"
    torch.save({"step": 2, "payload": Planted(marker)}, run / "ckpt-0000002" / "train_state.pt")
    return marker


CHECKPOINT_CASES = [
    ("a planted pickle", plant_pickle, "holds more than tensors and plain data"),
    (
        "a truncated train state",
        lambda run: (run / "ckpt-0000002" / "train_state.pt").write_bytes(b"PK\x03\x04broken"),
        "checkpoint .*ckpt-0000002 is damaged .*remove that folder",
    ),
    (
        "a damaged projector",
        lambda run: (run / "ckpt-0000002" / "projector.safetensors").write_bytes(b"\x00" * 20),
        "checkpoint .*ckpt-0000002 is damaged",
    ),
    (
        "a damaged run.json",
        lambda run: (run / "run.json").write_text("{not json"),
        "run.json is damaged",
    ),
]


@pytest.mark.parametrize(
    "case, damage, expect", CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES]
)
def test_a_damaged_checkpoint_is_one_line(case, damage, expect, paths, manifest, run_copy):
    marker = damage(run_copy)
    before = files_of(run_copy)
    with pytest.raises((common.UserError, common.ModelError), match=expect):
        pretrain.main(pretrain_argv(paths, manifest, run_copy, "--max-steps 4 --resume"))
    assert files_of(run_copy) == before
    assert not (isinstance(marker, Path) and marker.exists()), "the planted pickle ran"


def test_a_full_disk_is_one_line_and_earlier_checkpoints_stay(
    paths, manifest, tmp_path, monkeypatch
):
    real, calls = torch.save, []

    def full_after_one(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_after_one)
    out = tmp_path / "run"
    expect = "the disk is full: could not write .*ckpt-0000002 .*last good checkpoint is .*0001"
    with pytest.raises(common.UserError, match=expect):
        pretrain.main(pretrain_argv(paths, manifest, out, "--max-steps 4 --save-every 1"))
    assert [p.name for p in common.checkpoints(out)] == ["ckpt-0000001"]
    assert not list(out.glob(".ckpt-*"))  # no half-written folder left behind


def test_a_corrupt_feature_cache_is_rebuilt_with_a_warning(paths, manifest, tmp_path, capsys):
    cache = tmp_path / "features.pt"
    cache.write_bytes(b"garbage")
    out = tmp_path / "run"
    pretrain.main(
        pretrain_argv(
            paths, manifest, out, f"--max-steps 1 --cache-features --feature-cache-file {cache}"
        )
    )
    assert "warning: the feature cache" in capsys.readouterr().out
    assert len(torch.load(cache, weights_only=True)) == 4  # rebuilt: one step of 4 clips


def test_the_final_pair_is_written_as_one(paths, manifest, run_copy, monkeypatch):
    """A failure while the final projector is written leaves the previous pair as it was."""
    before = {n: (run_copy / n).read_bytes() for n in ("projector.safetensors", "meta.json")}

    class Model:
        def save_projector(self, out, **meta):
            (Path(out) / "projector.safetensors").write_bytes(b"half")
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(common, "save_checkpoint", lambda *a, **k: None)
    with pytest.raises(common.UserError, match="No space left"):
        common.save_final(run_copy, Model(), None, 3, None, argparse.Namespace())
    assert {n: (run_copy / n).read_bytes() for n in before} == before


@pytest.mark.parametrize("damaged", ["meta.json", "projector.safetensors"])
def test_a_damaged_init_or_ckpt_is_one_line(damaged, manifest, run_copy):
    (run_copy / damaged).write_bytes(b"\xff garbage")
    with pytest.raises(common.ModelError, match="is damaged"):
        finetune.get_args(argv("--init {init} --data {data}", init=run_copy, data=manifest))
    with pytest.raises(common.ModelError, match="is damaged"):
        evaluate.get_args(argv("--ckpt {ckpt}", ckpt=run_copy))


# -----------------------------------------------------------------------------
# As a user runs it: one line on stderr, the exit status, no traceback


@pytest.mark.parametrize(
    "extra, code, expect",
    [
        ("--max-steps 1", 1, "pretrain.py: error: --out .* holds another run"),
        ("--max-steps 1 --lr -1", 2, "pretrain.py: error: argument --lr: must be a number >= 0"),
    ],
)
def test_as_a_user_sees_it(extra, code, expect, paths, manifest, base_run):
    result = subprocess.run(
        [sys.executable, "pretrain.py", *pretrain_argv(paths, manifest, base_run, extra)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == code and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert re.match(expect, result.stderr.strip().splitlines()[-1]), result.stderr


# -----------------------------------------------------------------------------
# prepare_data.py: bad input is one line naming the file (and where in it); nothing written is an
# error too


def mustc(root, yaml="- {wav: t.wav, offset: 0, duration: 1}\n", en=b"hello\n"):
    txt, wavs = root / "en-de" / "data" / "train" / "txt", root / "en-de" / "data" / "train" / "wav"
    txt.mkdir(parents=True)
    wavs.mkdir(parents=True)
    sf.write(wavs / "t.wav", np.zeros(32000, "float32"), 16000)
    (txt / "train.yaml").write_text(yaml)
    (txt / "train.en").write_bytes(en)
    (txt / "train.de").write_text("hallo\n")
    return root


def squad(root, text):
    (root / "train_wav").mkdir(parents=True)
    (root / "spoken_train-v1.1.json").write_text(text)
    return root


def libri(root, flac=b"fLaC broken"):
    chapter = root / "train" / "1" / "2"
    chapter.mkdir(parents=True)
    (chapter / "1-2.trans.txt").write_text("1-2-0000 HELLO\n")
    (chapter / "1-2-0000.flac").write_bytes(flac)
    return root


def file_with(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


CONVERTER_CASES = [
    ("mustc", lambda d: mustc(d, yaml="- {wav: t.wav, offset: [\n"), r"train.yaml: cannot be read"),
    ("mustc", lambda d: mustc(d, en=b"caf\xe9\n"), r"train.en: cannot be read: UnicodeDecodeError"),
    ("mustc", lambda d: mustc(d, yaml="- {wav: t.wav, duration: 1}\n"), "segment 1: cannot be"),
    ("mustc", lambda d: mustc(d, yaml="just text\n"), "train.yaml: cannot be read"),
    ("mustc", lambda d: d / "missing", "no MuST-C language pair here"),
    ("spoken-squad", lambda d: squad(d, '{"data": [{"paragr'), "v1.1.json: cannot be read"),
    ("spoken-squad", lambda d: squad(d, '{"data": [{"title": 1}]}'), "v1.1.json: cannot be read"),
    ("spoken-squad", lambda d: squad(d, "[1, 2]"), "v1.1.json: cannot be read"),
    ("spoken-squad", lambda d: d, "spoken-squad: wrote nothing"),
    ("spoken-squad", lambda d: d / "missing", "spoken-squad: wrote nothing"),
    ("librispeech", lambda d: d / "missing", "missing: not a folder"),
    ("librispeech", lambda d: file_with(d / "a-file", b"x"), "a-file: not a folder"),
    ("librispeech", lambda d: libri(d), r"1-2-0000.flac: cannot be read"),
    ("librispeech", lambda d: d, "no LibriSpeech split here"),
    ("hf", lambda d: d / "missing.parquet", "missing.parquet: no such file or folder"),
    ("hf", lambda d: file_with(d / "x.parquet", os.urandom(256)), "x.parquet: cannot be read"),
    ("hf", lambda d: d, "cannot be read|not a dataset folder"),
    ("mix", lambda d: d, "mix: wrote nothing"),
    ("mix", lambda d: d / "missing", "mix: wrote nothing"),
    ("mix", lambda d: file_with(d / "librispeech_train.jsonl", b'{"audio": 3}\n'), "wrote nothing"),
]


@pytest.mark.parametrize(
    "command, make, expect", CONVERTER_CASES, ids=[f"{c[0]}-{c[2][:30]}" for c in CONVERTER_CASES]
)
def test_a_converter_on_bad_input_is_one_line(command, make, expect, tmp_path):
    from scripts import prepare_data

    source = make(tmp_path / "in")
    if not (tmp_path / "in").exists():
        (tmp_path / "in").mkdir()
    where = ["--out", str(tmp_path / "out")] if command != "mix" else []
    with pytest.raises(common.UserError, match=expect):
        prepare_data.main([command, str(source), *where])


# -----------------------------------------------------------------------------
# compare.py: a relative --out is where compare.py was started, for its children too


def test_compare_resolves_a_relative_out_where_it_was_started(tmp_path, monkeypatch):
    from scripts import compare

    monkeypatch.chdir(tmp_path)
    args = compare.get_args(["--out", "grid", "--corpus", "corpus"])
    assert args.out == str(tmp_path / "grid") and args.corpus == str(tmp_path / "corpus")


# the single cases above: special tokens, Whisper's window, --audio too short,
# another script's run, changed data, the full disk, the corrupt cache, the final pair, 2 damaged
# --init / --ckpt files (x2 scripts), 2 run as a user (counted once more: they are also in tables)
N_BAD_INPUTS = (
    len(FLAG_CASES)
    + len(MANIFEST_CASES)
    + len(RUN_CASES)
    + len(CHECKPOINT_CASES)
    + len(CONVERTER_CASES)
    + 2
    + 4
    + 4
)


def test_the_suite_tries_at_least_60_bad_inputs():
    assert N_BAD_INPUTS >= 60, N_BAD_INPUTS
