"""Run folders that never crash, never mislead (issue 35): a meta.json that disagrees with its
tensors is one line before anything is built, results are never written through a planted link,
`--overwrite` never follows a ckpt-* link out of the run, a full disk names the last good
checkpoint, and a run refused before its first step leaves its --out as it found it.

    python -m pytest -q tests/test_robustness_checkpoints.py
"""

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from test_errors import fails_in_one_line
from tiny import TINY, argv, write_manifest

import common
import evaluate
import finetune
import model
import pretrain


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("data"), n=8)


@pytest.fixture(scope="module")
def finetuned(paths, manifest, tmp_path_factory):
    """A one-step ASR fine-tuning from a fresh projector (the paper's recipe: no additions)."""
    out = tmp_path_factory.mktemp("ft") / "run"
    line = TINY + " --task asr --init none --data {data} --max-steps 1 --out {out}"
    finetune.main(argv(line, **paths, data=manifest, out=out))
    return out


@pytest.fixture
def run_copy(finetuned, tmp_path):
    return Path(shutil.copytree(finetuned, tmp_path / "run"))


def edit_meta(run, **qformer):
    meta = json.loads((run / "meta.json").read_text())
    meta["qformer"].update(qformer)
    (run / "meta.json").write_text(json.dumps(meta))


@pytest.fixture
def nothing_built(monkeypatch):
    """Building a SpeechLLM fails the test: a refusal must come before any model is built."""

    def built(*args, **kwargs):
        raise AssertionError("a SpeechLLM was built from a checkpoint that should be refused")

    monkeypatch.setattr(model.SpeechLLM, "__init__", built)


# -----------------------------------------------------------------------------
# meta.json against the tensors, before anything is built

META_CASES = [
    ("another Q-Former width", dict(dim=64), r"does not match projector.safetensors.*\[4, 64\]"),
    ("terabytes", dict(dim=2**20, layers=1000), "does not match projector.safetensors"),
    ("more queries", dict(queries=8), r"queries of shape \[8, 32\], the file's \[4, 32\]"),
    ("an unknown field", dict(width=3), "no projector can be built from it .*TypeError"),
    ("heads that do not divide", dict(heads=5), "no projector can be built from it"),
]


@pytest.mark.parametrize("case, qformer, expect", META_CASES, ids=[c[0] for c in META_CASES])
def test_a_meta_json_that_disagrees_with_its_tensors(
    case, qformer, expect, run_copy, nothing_built
):
    edit_meta(run_copy, **qformer)
    with pytest.raises(common.ModelError, match=f"run/meta.json.*{expect}"):
        evaluate.main(argv("--ckpt {ckpt} --task asr --device cpu", ckpt=run_copy))
    with pytest.raises(common.ModelError, match=expect):
        finetune.get_args(argv("--init {init} --data x.jsonl", init=run_copy))
    with pytest.raises(common.ModelError, match=expect):
        model.SpeechLLM.from_checkpoint(run_copy)


def test_a_meta_json_that_disagrees_as_a_user_sees_it(run_copy):
    edit_meta(run_copy, dim=64)
    fails_in_one_line(f"evaluate.py --ckpt {run_copy} --device cpu", "meta.json does not match")


# -----------------------------------------------------------------------------
# Results and run folders: links are replaced or removed, never followed


def test_evaluate_out_naming_a_folder_is_one_line_before_decoding(finetuned, manifest, tmp_path,
                                                                  nothing_built):  # fmt: skip
    with pytest.raises(common.UserError, match=f"--out {re.escape(str(tmp_path))} is a folder"):
        evaluate.main(argv("--ckpt {ckpt} --data {data} --out {out} --device cpu",
                           ckpt=finetuned, data=manifest, out=tmp_path))  # fmt: skip


def test_results_are_never_written_through_a_planted_link(run_copy, manifest, tmp_path, capsys):
    outside = tmp_path / "outside.txt"
    outside.write_text("not yours")
    (run_copy / "eval-asr.json").symlink_to(outside)
    (run_copy / "eval-asr.json.tmp").symlink_to(tmp_path / "outside-tmp.txt")  # and beside it
    evaluate.main(argv("--ckpt {ckpt} --data {data} --limit 2 --max-new-tokens 2 --device cpu",
                       ckpt=run_copy, data=manifest))  # fmt: skip
    assert outside.read_text() == "not yours" and not (tmp_path / "outside-tmp.txt").exists()
    results = run_copy / "eval-asr.json"
    assert not results.is_symlink() and json.loads(results.read_text())["n"] == 2
    assert "was a symbolic link" in capsys.readouterr().out


def test_overwrite_removes_a_ckpt_link_never_its_target(paths, manifest, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "keep").mkdir(parents=True)
    (elsewhere / "keep" / "train_state.pt").write_text("someone else's")
    out = tmp_path / "run"
    line = TINY + " --data {data} --out {out} --max-steps 1"
    pretrain.main(argv(line, **paths, data=manifest, out=out))
    (out / "ckpt-0000009").symlink_to(elsewhere / "keep", target_is_directory=True)
    (out / "tensorboard").symlink_to(elsewhere, target_is_directory=True)
    pretrain.main(argv(line + " --overwrite", **paths, data=manifest, out=out))
    assert (elsewhere / "keep" / "train_state.pt").read_text() == "someone else's"
    assert not (out / "ckpt-0000009").exists() and not (out / "tensorboard").exists()
    assert [p.name for p in common.checkpoints(out)] == ["ckpt-0000001"]


# -----------------------------------------------------------------------------
# A run refused before its first step leaves --out as it found it


def test_a_refused_log_package_leaves_out_untouched(paths, manifest, tmp_path, monkeypatch):
    """--tensorboard without its package is refused before run.json is written: the same command,
    once the package is there, is not refused as "another run"."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails: not installed
    out = tmp_path / "run"
    line = TINY + " --data {data} --out {out} --max-steps 1 --tensorboard"
    with pytest.raises(common.UserError, match="--tensorboard needs the tensorboard package"):
        pretrain.main(argv(line, **paths, data=manifest, out=out))
    assert not out.exists()
    with pytest.raises(common.UserError, match="--tensorboard needs the tensorboard package"):
        finetune.main(argv(TINY + " --task asr --init none --data {data} --out {out} --tensorboard",
                           **paths, data=manifest, out=out))  # fmt: skip
    assert not out.exists()


def test_a_full_disk_while_saving_the_final_projector(paths, manifest, tmp_path, monkeypatch):
    """The last step's checkpoint is written, then the final projector finds the disk full: the
    message says so and names that checkpoint; --resume then finishes the run."""
    out = tmp_path / "run"
    line = TINY + " --data {data} --out {out} --max-steps 2"
    real = common.write_folder_atomically

    def full_for_the_final(folder, write):
        if folder.name == ".final":
            raise OSError(28, "No space left on device")
        return real(folder, write)

    monkeypatch.setattr(common, "write_folder_atomically", full_for_the_final)
    expect = "the disk is full: .*last good checkpoint is .*ckpt-0000002.*--resume"
    with pytest.raises(common.UserError, match=expect):
        pretrain.main(argv(line, **paths, data=manifest, out=out))
    monkeypatch.setattr(common, "write_folder_atomically", real)
    pretrain.main(argv(line + " --resume", **paths, data=manifest, out=out))
    assert (out / "projector.safetensors").exists()
