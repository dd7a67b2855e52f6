"""pretrain.py: a step changes the projector and nothing else, the loss falls and in-batch retrieval
becomes perfect when overfitting a tiny batch, and the CLI runs end to end."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import argv, pooled_pairs, write_manifest

import common
import pretrain
from contrastive import cos_logits, retrieval_r1
from data import Collator, read_manifest
from model import QFormerConfig, SpeechLLM

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("data"), n=8)


def tiny_args(paths, manifest, out, *extra):
    # --dtype float32: the tests recompute in float32 (auto is bf16 on a CPU with bf16 instructions)
    line = (
        "--llm {llm} --encoder {hubert} --data {data} --dev-data {data} --out {out} --qformer-dim 32"
        " --qformer-heads 4 --qformer-layers 2 --batch-size 4 --grad-accum 1 --device cpu"
        " --dtype float32"
    )
    return [*argv(line, **paths, data=manifest, out=out), *extra]


def test_step_changes_projector_only(paths, manifest):
    torch.manual_seed(0)
    model = SpeechLLM(paths["llm"], paths["hubert"], QFormerConfig(dim=32, heads=4, layers=2))
    args = pretrain.get_args(tiny_args(paths, manifest, "unused"))
    frozen = {
        k: v.clone()
        for k, v in list(model.llm.state_dict().items()) + list(model.encoder.state_dict().items())
    }
    before = {k: v.clone() for k, v in model.projector.state_dict().items()}
    batch = Collator(model.encoder.feature_extractor, model.tokenizer)(read_manifest(manifest)[:4])
    optimizer = torch.optim.AdamW(model.projector.parameters(), lr=1e-3)
    for loss_name in ("contrastive", "asr", "contrastive+asr"):
        args.loss = loss_name
        loss, logs = pretrain.train_step_loss(
            model.train(), batch, [0, 5, 10], args, text_cache=None
        )
        loss.backward()
        assert all(p.grad is None for p in model.llm.parameters())
        optimizer.step()
        optimizer.zero_grad()
    after = dict(list(model.llm.state_dict().items()) + list(model.encoder.state_dict().items()))
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    assert all(
        not torch.equal(before[k], v)
        for k, v in model.projector.state_dict().items()
        if "norm" not in k
        and "ln" not in k
        and k != "blank"  # the CTC blank: tests/test_alignment.py
    )


def test_contrastive_plus_asr_runs_the_encoder_and_projector_once(paths, manifest):
    """--loss contrastive+asr: one pass through the encoder and the projector feeds both losses; the
    ASR loss reads the projector's outputs without the sink token, so it equals --loss asr's on the
    same batch."""
    torch.manual_seed(0)
    qformer = QFormerConfig(dim=32, heads=4, layers=2, dropout=0.0)
    model = SpeechLLM(paths["llm"], paths["hubert"], qformer, sink_token=True).train()
    batch = Collator(model.encoder.feature_extractor, model.tokenizer)(read_manifest(manifest)[:4])
    calls = {"encoder": 0, "projector": 0}
    for name in calls:
        getattr(model, name).register_forward_hook(
            lambda *_, name=name: calls.__setitem__(name, calls[name] + 1)
        )
    args = pretrain.get_args(tiny_args(paths, manifest, "unused", "--loss", "contrastive+asr"))
    _, logs = pretrain.train_step_loss(model, batch, [0, 5, 10], args, text_cache=None)
    assert calls == {"encoder": 1, "projector": 1}
    assert logs["asr"] == pytest.approx(
        model.answer_loss(
            *model.encode_speech(batch),
            ["Can you transcribe this audio?"] * len(batch["examples"]),
            [ex["text"] for ex in batch["examples"]],
        ).item(),
        rel=1e-6,
    )


@pytest.mark.parametrize("sim", ["cos", "wasserstein"])
def test_loss_impl_reference_gives_the_fast_numbers(paths, manifest, sim):
    """--loss-impl reference (contrastive.py) and fast (contrastive_fast.py, the default) in a real
    step: the same loss, in-batch R@1 and projector gradients; with the text cache (cos), also on
    the cached text."""
    torch.manual_seed(0)
    model = SpeechLLM(
        paths["llm"], paths["hubert"], QFormerConfig(dim=32, heads=4, layers=2, dropout=0.0)
    ).train()
    batch = Collator(model.encoder.feature_extractor, model.tokenizer)(read_manifest(manifest)[:4])
    results = {}
    for impl in ("torch", "reference"):
        args = pretrain.get_args(
            tiny_args(paths, manifest, "unused", "--loss-impl", impl, "--sim", sim)
        )
        text_cache = {} if sim == "cos" else None
        for _ in range(
            2 if sim == "cos" else 1
        ):  # cos: the second step reads the pooled text from the cache
            loss, per_layer, acc, _ = pretrain.contrastive_step(
                model, batch, [0, 5, 10], args, text_cache
            )
            grads = torch.autograd.grad(
                loss, [p for p in model.projector.parameters() if p.requires_grad]
            )
            results.setdefault(impl, []).append((loss, per_layer, acc, *grads))
    for fast, reference in zip(results["torch"], results["reference"]):
        (loss, per_layer, acc, *grads), (ref_loss, ref_per_layer, ref_acc, *ref_grads) = (
            fast,
            reference,
        )
        assert torch.allclose(loss, ref_loss, rtol=1e-5) and torch.allclose(
            per_layer, ref_per_layer, rtol=1e-5
        )
        assert torch.equal(acc, ref_acc)
        for g, r in zip(
            grads, ref_grads
        ):  # through the projector: float32 round-off of the two orders of sums
            assert torch.allclose(g, r, rtol=1e-3, atol=1e-5)


def test_overfit_tiny_batch_retrieval_becomes_perfect(paths, manifest):
    torch.manual_seed(0)
    model = SpeechLLM(
        paths["llm"], paths["hubert"], QFormerConfig(dim=32, heads=4, layers=2, dropout=0.0)
    ).train()
    args = pretrain.get_args(tiny_args(paths, manifest, "unused"))
    batch = Collator(model.encoder.feature_extractor, model.tokenizer)(read_manifest(manifest)[:4])
    optimizer = torch.optim.AdamW(model.projector.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss, logs = pretrain.train_step_loss(model, batch, [0, 5, 10], args, text_cache=None)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
    assert logs["acc"].min() == 1.0  # every utterance finds its own transcript at every layer


def test_cli_smoke_and_outputs(paths, manifest, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "pretrain.py", *tiny_args(paths, manifest, out, "--max-steps", "2")]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "final dev R@1" in result.stdout
    assert (out / "projector.safetensors").exists()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["step"] == 2 and meta["layers"] == [0, 5, 10] and meta["llm"] == paths["llm"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]
    assert len(log[0]["per_layer"]) == 3 and len(log[0]["acc"]) == 3


def test_the_recipe_says_what_it_set_first_and_meta_json_keeps_it(
    paths, manifest, tmp_path, capsys
):
    """A flag left out takes the recipe's value (paper: the LLM is not smollm2); the run's first
    line names the recipe and every value it set, and meta.json keeps them, with the resolved values
    in its args."""
    out = tmp_path / "run"
    pretrain.main(tiny_args(paths, manifest, out, "--max-steps", "1", "--eval-every", "0"))
    first = capsys.readouterr().out.splitlines()[0]
    assert (
        first.startswith(f"recipe paper (the default for --llm {paths['llm']}) sets ")
        and "window=17" in first
    )
    meta = json.loads((out / "meta.json").read_text())
    assert meta["recipe"]["name"] == "paper" and meta["recipe"]["set"]["window"] == 17
    assert (
        "qformer_dim" not in meta["recipe"]["set"] and "encoder" not in meta["recipe"]["set"]
    )  # given as flags
    assert (
        meta["args"]["lr"] == 1e-4
        and meta["args"]["window_pos"] is False
        and meta["args"]["dropout"] == 0.1
    )


def test_center_stores_the_training_means_for_retrieval(paths, manifest, tmp_path, capsys):
    """--center: the per-layer means of the pooled training pairs are stored next to the projector,
    equal to a recomputation with the saved projector, and evaluate.py centres a retrieval with
    them."""
    import evaluate

    out = tmp_path / "run"
    pretrain.main(
        tiny_args(paths, manifest, out, "--max-steps", "1", "--center", "--center-items", "5")
    )
    assert "centred (stored train means)" in capsys.readouterr().out
    model, meta = SpeechLLM.from_checkpoint(out)
    layers = meta["layers"]
    text_mean, speech_mean = common.load_centers(out, layers)
    assert text_mean.shape == speech_mean.shape == (len(layers), model.llm.config.hidden_size)
    sample = random.Random(42).sample(read_manifest(manifest), 5)
    text, speech = pooled_pairs(model, sample, layers)
    assert torch.allclose(text.mean(1), text_mean, atol=1e-4) and torch.allclose(
        speech.mean(1), speech_mean, atol=1e-4
    )  # other batches: other padding
    assert common.load_centers(out, layers[:-1]) is None  # stored for other layers: not used
    metrics = evaluate.main(
        ["--ckpt", str(out), "--data", str(manifest), "--device", "cpu", "--dtype", "float32"]
    )
    metrics = metrics["retrieval"]["metrics"]
    rows = read_manifest(manifest)
    text, speech = pooled_pairs(model, rows, layers)
    assert metrics["r1_centred_train"] == pytest.approx(
        (100 * retrieval_r1(cos_logits(text, speech, center=(text_mean, speech_mean)))).tolist()
    )


def test_wasserstein_pretraining_runs_end_to_end(paths, manifest, tmp_path):
    """--sim wasserstein through the real entry point: the batched Sinkhorn on the LLM's token
    states (the text cache of pooled vectors is off for it: pretrain.py keeps it for cos), a finite
    loss per layer."""
    out = tmp_path / "run"
    pretrain.main(tiny_args(paths, manifest, out, "--max-steps", "2", "--sim", "wasserstein"))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(
        torch.isfinite(torch.tensor(r["per_layer"])).all() for r in steps
    )
    assert json.loads((out / "meta.json").read_text())["args"]["sim"] == "wasserstein"


def test_bf16_with_a_whisper_encoder_retrieves_at_the_end(paths, manifest, tmp_path):
    """Under bf16 autocast the log-mel is still computed in float32: the stored training means and
    the final dev retrieval (which collate while the forward runs under autocast) work with Whisper."""
    line = (
        "--llm {llm} --encoder {whisper} --data {data} --dev-data {data} --out {out} --max-steps 1"
        " --qformer-dim 32 --qformer-heads 4 --qformer-layers 2 --batch-size 4 --center"
        " --center-items 4 --dtype bfloat16 --device cpu"
    )
    pretrain.main(argv(line, **paths, data=manifest, out=tmp_path / "run"))
    assert (tmp_path / "run" / "centers.safetensors").exists()
