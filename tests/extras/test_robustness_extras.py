"""The additions never crash, never mislead (issue 35): a LoRA run whose meta.json and
lora.safetensors disagree or are damaged is one line before any LoRA weight is allocated; a rank
that cannot fit is refused; --lora under DDP leaves --out as it found it; --seen-in a manifest
without transcripts is one line before decoding; a long recording decodes jointly piece by piece.

    python -m pytest -q tests/extras/test_robustness_extras.py
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from tiny import TINY, argv, write_manifest

import common
import data
import evaluate
import finetune
import pretrain
from data import INSTRUCTIONS, Collator
from extras import decoding, lora
from extras.joint import generate_joint
from model import SpeechLLM


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("data"), n=8)


@pytest.fixture(scope="module")
def lora_run(paths, manifest, tmp_path_factory):
    """One step of ASR fine-tuning with LoRA of rank 2 (alpha 4)."""
    out = tmp_path_factory.mktemp("lora") / "run"
    line = TINY + " --task asr --init none --lora 2 --data {data} --max-steps 1 --out {out}"
    finetune.main(argv(line, **paths, data=manifest, out=out))
    return out


def set_lora(spec):
    def edit(run):
        meta = json.loads((run / "meta.json").read_text())
        meta["additions"]["lora"] = spec
        (run / "meta.json").write_text(json.dumps(meta))

    return edit


def cut_in_half(run):
    path = run / "lora.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


LORA_CASES = [
    ("no lora.safetensors", lambda run: (run / "lora.safetensors").unlink(),
     "trained with LoRA but has no lora.safetensors: copy it back"),
    ("random bytes", lambda run: (run / "lora.safetensors").write_bytes(bytes(range(256)) * 8),
     "lora.safetensors is damaged"),
    ("cut in half", cut_in_half, "lora.safetensors is damaged"),
    ("rank 0", set_lora({"rank": 0, "alpha": 4}), r'"lora": \{"rank": 0, "alpha": 4\}, not'),
    ("an unknown key", set_lora({"rank": 2, "alpha": 4, "dropout": 0.1}), '"dropout": 0.1}, not'),
    ("a rank as text", set_lora({"rank": "2"}), r'"lora": \{"rank": "2"\}, not'),
    ("another rank", set_lora({"rank": 4, "alpha": 8}),
     r"does not match .*meta.json \(LoRA of rank 4\).*is \[2, 64\] there, \[4, 64\] here"),
]  # fmt: skip


@pytest.mark.parametrize("case, damage, expect", LORA_CASES, ids=[c[0] for c in LORA_CASES])
def test_a_damaged_or_mismatched_lora_run_is_one_line(case, damage, expect, lora_run, manifest,
                                                      tmp_path, monkeypatch):  # fmt: skip
    run = Path(shutil.copytree(lora_run, tmp_path / "run"))
    damage(run)

    def allocated(*args, **kwargs):
        raise AssertionError("LoRA weights were allocated for a run that should be refused")

    monkeypatch.setattr(lora.LoRALinear, "__init__", allocated)
    line = "--ckpt {ckpt} --task asr --data {data} --limit 1 --max-new-tokens 1 --device cpu"
    with pytest.raises(common.ModelError, match=expect):
        evaluate.main(argv(line, ckpt=run, data=manifest))
    with pytest.raises(common.ModelError, match=expect):  # fine-tuning further from it
        finetune.main(argv("--task asr --init {init} --data {data} --out {out} --device cpu",
                           init=run, data=manifest, out=tmp_path / "ft"))  # fmt: skip
    assert not (tmp_path / "ft").exists()


def test_a_damaged_lora_run_as_a_user_sees_it(lora_run, tmp_path):
    from test_errors import fails_in_one_line

    run = Path(shutil.copytree(lora_run, tmp_path / "run"))
    set_lora({"rank": 0, "alpha": 4})(run)
    fails_in_one_line(f"evaluate.py --ckpt {run} --device cpu", r'"rank": 0, "alpha": 4\}, not')


def test_a_lora_rank_that_cannot_fit_is_refused_before_allocating(paths, manifest, tmp_path,
                                                                  monkeypatch):  # fmt: skip
    def allocated(*args, **kwargs):
        raise AssertionError("LoRA weights were allocated")

    monkeypatch.setattr(lora.LoRALinear, "__init__", allocated)
    out = tmp_path / "run"
    line = TINY + " --task asr --init none --lora 1000000 --data {data} --out {out}"
    with pytest.raises(common.UserError, match="--lora 1000000: .* 32 dimensions .*--lora 32 or"):
        finetune.main(argv(line, **paths, data=manifest, out=out))
    assert not out.exists()


def test_lora_under_ddp_is_refused_and_leaves_out_as_it_was(paths, manifest, tmp_path,
                                                            monkeypatch):  # fmt: skip
    """torchrun with 2 ranks, simulated: the refusal comes before run.json is written, so the same
    command without --lora is not refused as "another run"."""
    monkeypatch.setattr(common, "setup", lambda *args: (0, 2, torch.device("cpu")))
    out = tmp_path / "run"
    line = TINY + " --task asr --init none --data {data} --out {out} --max-steps 1"
    with pytest.raises(common.UserError, match="--lora .* DDP here does not synchronise"):
        finetune.main(argv(line + " --lora 2", **paths, data=manifest, out=out))
    assert not out.exists()
    monkeypatch.undo()
    finetune.main(argv(line, **paths, data=manifest, out=out))


def test_seen_in_a_manifest_without_transcripts_is_one_line_before_decoding(
    lora_run, manifest, tmp_path, monkeypatch
):
    extra = {i: {"task": "qa", "question": "who?", "answer": "anna"} for i in range(2)}
    qa = write_manifest(tmp_path, n=2, extra=extra, name="qa.jsonl")
    lines = [json.loads(line) for line in qa.read_text().splitlines()]
    qa.write_text("".join(json.dumps({k: v for k, v in row.items() if k != "text"}) + "\n"
                          for row in lines))  # fmt: skip

    def decoded(*args, **kwargs):
        raise AssertionError("decoding ran before --seen-in was checked")

    monkeypatch.setattr(decoding, "generate_answers", decoded)
    monkeypatch.setattr(decoding, "joint_answers", decoded)
    line = "--ckpt {ckpt} --task asr --data {data} --seen-in {seen} --device cpu"
    with pytest.raises(
        common.UserError, match=r"--seen-in .*qa.jsonl needs a transcript \('text'\)"
    ):
        evaluate.main(argv(line, ckpt=lora_run, data=manifest, seen=qa))


def test_a_long_recording_decodes_jointly_piece_by_piece(paths, manifest, tmp_path):
    """A 70 s recording through --audio with joint CTC / LLM decoding (a CTC-aligned projector on
    the Whisper encoder, whose window is 30 s): the answer is each piece's, decoded alone, joined in
    order."""
    stage1 = tmp_path / "s1"
    line = TINY.replace("{hubert}", "{whisper}") + (
        " --data {data} --out {out} --loss contrastive+ctc --max-steps 2 --emb-steps 1"
        " --ctc-classes 40"
    )
    pretrain.main(argv(line, **paths, data=manifest, out=stage1))
    rng = np.random.default_rng(0)
    wave = np.concatenate([rng.standard_normal(16000) * 0.1 * (i % 2) for i in range(70)])
    sf.write(tmp_path / "long.wav", wave.astype("float32"), 16000)
    line = "--ckpt {ckpt} --task asr --audio {audio} --device cpu --joint-ctc 0.5 --beam 2"
    answer = evaluate.main(
        argv(line + " --max-new-tokens 3", ckpt=stage1, audio=tmp_path / "long.wav")
    )
    model, _ = SpeechLLM.from_checkpoint(stage1)
    collate, expected = Collator(model.eval().encoder.feature_extractor), []
    parts = data.pieces(tmp_path / "long.wav", 70.0, 30.0)
    for offset, duration in parts:
        piece = {"audio": str(tmp_path / "long.wav"), "offset": offset, "duration": duration,
                 "key": str(offset)}  # fmt: skip
        text = generate_joint(model, collate([piece]), [INSTRUCTIONS["asr"]], 0.5, 2, 3)[0][0]
        expected.append(text.split("\n")[0].strip())
    assert len(parts) == 3 and answer == " ".join(t for t in expected if t)
