"""A user error ends a script with one line on stderr and a non-zero exit, never a traceback: a bad
manifest line, a missing or unfitting checkpoint, a model that cannot be reached or loaded,
conflicting flags. Each script runs as a user runs it (a subprocess, on the tiny models); a bug in
the code keeps its traceback.

    python -m pytest -q tests/test_errors.py
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import write_manifest

import common
import pretrain
from data import UserError
from model import ModelError

REPO = Path(__file__).resolve().parents[1]
TINY_PROJECTOR = "--qformer-dim 32 --qformer-heads 4 --qformer-layers 2 --device cpu"


def fails_in_one_line(command, expect, env=None):
    """Run `python <command>`: exit status 1, no traceback, and the last line of stderr the only
    error line, '<script>: error: ...' matching `expect`. (Above it stderr may hold transformers'
    progress bars.)"""
    script, *args = shlex.split(command)
    result = subprocess.run(
        [sys.executable, script, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and result.stderr.rstrip("\n").endswith(errors[0]), result.stderr[
        -3000:
    ]
    assert errors[0].startswith(f"{script}: error: ") and re.search(expect, errors[0]), errors[0]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("data"), n=8)


@pytest.fixture(scope="module")
def tiny(paths):
    return f"--llm {paths['llm']} --encoder {paths['hubert']} {TINY_PROJECTOR}"


@pytest.fixture(scope="module")
def stage1(tiny, manifest, tmp_path_factory):
    """A stage-1 run of one step, with its checkpoint (in-process: quicker than a subprocess)."""
    out = tmp_path_factory.mktemp("stage1")
    pretrain.main(shlex.split(f"{tiny} --data {manifest} --out {out} --batch-size 4 --max-steps 1"))
    return out


def test_a_bad_manifest_line(tiny, manifest, tmp_path):
    lines = manifest.read_text().splitlines()
    lines[1] = json.dumps({"audio": json.loads(lines[1])["audio"]})  # no transcript
    bad = manifest.parent / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    fails_in_one_line(
        f"pretrain.py {tiny} --data {bad} --out {tmp_path}", "bad.jsonl:2: missing field 'text'"
    )


def test_a_missing_checkpoint(tmp_path, manifest):
    fails_in_one_line(
        f"evaluate.py --ckpt {tmp_path}/nowhere --data {manifest}", "No checkpoint at .*nowhere"
    )
    fails_in_one_line(
        f"finetune.py --init {tmp_path}/nowhere --data {manifest}", "no stage-1 checkpoint there"
    )


def test_a_checkpoint_that_does_not_fit(tiny, manifest, stage1):
    fails_in_one_line(
        f"pretrain.py {tiny} --data {manifest} --out {stage1} --batch-size 4 --resume "
        "--qformer-dim 64",
        r"--resume: --qformer-dim 64 \(the run has 32\): cannot change mid-run",
    )


def test_a_model_out_of_reach_or_not_loadable(paths, manifest, tmp_path):
    offline = {"HF_HUB_OFFLINE": "1"}
    fails_in_one_line(
        f"pretrain.py --llm nobody/no-such-model --encoder {paths['hubert']} --data {manifest}",
        "Cannot load 'nobody/no-such-model'.*out of reach.*offline CPU demo",
        env=offline,
    )
    (tmp_path / "empty").mkdir()
    fails_in_one_line(
        f"finetune.py --init none --llm {tmp_path}/empty --encoder {paths['hubert']} --data "
        f"{manifest}",
        "Could not load the LLM's tokenizer '.*empty'",
        env=offline,
    )


def test_conflicting_flags(manifest, stage1, capsys):
    fails_in_one_line(
        f"finetune.py --init {stage1} --llm tiny --data {manifest}", "--llm tiny does not match"
    )
    # flags that contradict each other on the command line itself: argparse's usage and one error
    # line, exit 2
    with pytest.raises(SystemExit) as stopped:
        pretrain.get_args(["--gather-negatives", "--sim", "wasserstein"])
    assert stopped.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.endswith(
        ": error: --gather-negatives gathers pooled vectors: it works with --sim cos only"
    )


def test_run_main_keeps_the_traceback_of_a_bug():
    """common.run_main: a user error becomes SystemExit with one line; anything else propagates
    untouched."""

    def user_error():
        raise UserError("first line\nsecond line")

    def model_error():
        raise ModelError("no model")

    def bug():
        raise KeyError("a bug")

    with pytest.raises(SystemExit, match=r"error: first line second line$"):
        common.run_main(user_error)
    with pytest.raises(SystemExit, match=r"error: no model$"):
        common.run_main(model_error)
    with pytest.raises(KeyError, match="a bug"):
        common.run_main(bug)
