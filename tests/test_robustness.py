"""Scale out and hold up: DDP equals one process, a SIGKILLed run resumes exactly, non-finite steps
are skipped and then stop the run, the same seed gives the same losses."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import write_manifest

import pretrain
from data import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("data"), n=16)


def args_for(paths, manifest, out, *extra):
    return [
        "--llm",
        paths["llm"],
        "--encoder",
        paths["hubert"],
        "--data",
        str(manifest),
        "--out",
        str(out),
        "--qformer-dim",
        "32",
        "--qformer-heads",
        "4",
        "--qformer-layers",
        "2",
        "--layers",
        "0,5,10",
        "--device",
        "cpu",
        "--dtype",
        "float32",  # exact equality is a float32 property (auto is bf16 on a CPU with bf16 instructions)
        "--lr",
        "1e-3",
        "--warmup-ratio",
        "0",
        "--grad-accum",
        "1",
        *extra,
    ]


def run(cmd, env=None):
    result = subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def projector(out):
    return load_file(Path(out) / "projector.safetensors")


def assert_same_projector(a, b, tol=1e-5):
    pa, pb = projector(a), projector(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        x, y = pa[k], pb[k]
        if k.endswith("in_proj_bias"):
            # The key bias's true gradient is 0 (softmax ignores a constant added to every score),
            # so Adam turns its float round-off (which differs between all-reduce and accumulation)
            # into +-lr steps. Compare the query and value biases only.
            d = len(x) // 3
            x, y = torch.cat([x[:d], x[2 * d :]]), torch.cat([y[:d], y[2 * d :]])
        # Likewise any weight whose gradient is ~0 at some step: its sign is round-off, and Adam
        # makes it a step of ~lr. A few such elements (one in a thousand) are allowed; a real
        # difference moves most.
        differ = ~torch.isclose(x, y, atol=tol, rtol=tol)
        assert differ.sum() <= max(1, x.numel() // 1000), (
            f"{k}: {differ.sum()} of {x.numel()} elements differ"
        )


@pytest.mark.parametrize("gather", [False, True])
def test_ddp_two_processes_equal_one(paths, manifest, tmp_path, gather):
    """2 ranks x batch 2 == 1 process with the same global batch: with per-rank negatives that is
    batch 2 with 2 accumulation steps (two separate 2x2 losses, averaged); with gathered negatives,
    batch 4."""
    common = ["--max-steps", "3", "--dropout", "0", "--no-text-cache"]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "pretrain.py",
    ]
    ddp_args = args_for(
        paths,
        manifest,
        tmp_path / "ddp",
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        *common,
        *(["--gather-negatives"] if gather else []),
    )
    run(torchrun + ddp_args)
    single = (
        ["--batch-size", "4", "--grad-accum", "1"]
        if gather
        else ["--batch-size", "2", "--grad-accum", "2"]
    )
    run(
        [
            sys.executable,
            "pretrain.py",
            *args_for(paths, manifest, tmp_path / "one", *single, *common),
        ]
    )
    assert_same_projector(tmp_path / "ddp", tmp_path / "one")


def test_sigkill_then_resume_ends_with_the_same_projector(paths, manifest, tmp_path):
    steps = [
        "--max-steps",
        "40",
        "--save-every",
        "2",
        "--batch-size",
        "4",
    ]  # dropout stays on: RNG state must resume too
    run([sys.executable, "pretrain.py", *args_for(paths, manifest, tmp_path / "straight", *steps)])

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "pretrain.py", *args_for(paths, manifest, killed, *steps)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 300
    while not list(killed.glob("ckpt-0000004")) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "projector.safetensors").exists(), (
        "the run finished before it could be killed"
    )
    run([sys.executable, "pretrain.py", *args_for(paths, manifest, killed, *steps, "--resume")])
    # exact, with the default feature and text caches: cached values never depend on the batch
    straight, resumed = projector(tmp_path / "straight"), projector(killed)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_non_finite_steps_are_skipped_then_stop(paths, manifest, tmp_path, monkeypatch, capsys):
    real = pretrain.train_step_loss
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        loss, logs = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] in (2, 4, 5, 6, 7, 8) else loss), logs

    monkeypatch.setattr(pretrain, "train_step_loss", sometimes_nan)
    out = tmp_path / "run"
    with pytest.raises(UserError, match="5 non-finite steps in a row.*last good checkpoint"):
        pretrain.main(
            args_for(
                paths, manifest, out, "--max-steps", "20", "--save-every", "3", "--batch-size", "4"
            )
        )
    printed = capsys.readouterr().out
    assert (
        "step 1: non-finite gradient norm" in printed
    )  # step index 1 = the 2nd call, skipped, run went on
    ckpt = out / "ckpt-0000003"
    assert (ckpt / "projector.safetensors").exists() and json.loads(
        (ckpt / "meta.json").read_text()
    )["step"] == 3


def test_same_seed_same_losses(paths, manifest, tmp_path):
    def losses(out):
        pretrain.main(
            args_for(paths, manifest, out, "--max-steps", "4", "--batch-size", "4", "--seed", "7")
        )
        return [
            r["loss"]
            for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())
            if "loss" in r
        ]

    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_resume_with_a_checkpoint_of_another_shape_fails_clearly(paths, manifest, tmp_path):
    pretrain.main(args_for(paths, manifest, tmp_path, "--max-steps", "1", "--batch-size", "4"))
    with pytest.raises(UserError, match="--qformer-dim 64 .the run has 32.: cannot change"):
        pretrain.main(
            args_for(
                paths,
                manifest,
                tmp_path,
                "--max-steps",
                "2",
                "--batch-size",
                "4",
                "--resume",
                "--qformer-dim",
                "64",
            )
        )
