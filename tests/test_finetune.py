"""finetune.py: only the answer is supervised, --frac draws the same subset every time and of the
right size, the CLI runs from scratch (--init none) and from a stage-1 checkpoint (whose projector
it really starts from), and a wrong --llm / --encoder / shape flag against that checkpoint fails
clearly.

    PYTHONPATH=.:tests python3 -m pytest -q tests/test_finetune.py
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tiny import argv, write_manifest

import finetune
import pretrain
from data import Collator, UserError, read_manifest, task_examples
from model import QFormerConfig, SpeechLLM

REPO = Path(__file__).resolve().parents[1]
# the {projector} field of an argv line (argv splits it into its flags with the rest of the line)
TINY_PROJECTOR = "--qformer-dim 32 --qformer-heads 4 --qformer-layers 2"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """12 utterances: 8 sentences with a German translation (ASR + ST examples) and 4 QA
    passages."""
    extra = {i: {"translation": f"satz {i}", "tgt_lang": "de"} for i in range(8)}
    extra.update(
        {
            i: {"task": "qa", "question": f"what is number {i}?", "answer": ["anna", "Anna B."]}
            for i in range(8, 12)
        }
    )
    return write_manifest(tmp_path_factory.mktemp("data"), n=12, extra=extra)


def ft_args(paths, manifest, out, *extra):
    """A tiny fine-tuning run: one process, batch 2, no accumulation, the dev loss on the training
    file."""
    # float32: resume and DDP equality are float32 properties (auto is bf16 on a CPU with bf16 instructions)
    line = (
        "--data {data} --dev-data {data} --out {out} --batch-size 2 --grad-accum 1 --device cpu"
        " --dtype float32 --no-cache-features"
    )
    return [*argv(line, data=manifest, out=out), *extra]


def test_only_the_answer_and_end_of_turn_are_supervised(paths, manifest, monkeypatch):
    torch.manual_seed(0)
    model = SpeechLLM(
        paths["llm"], paths["hubert"], QFormerConfig(dim=32, heads=4, layers=2, dropout=0.0)
    ).eval()
    examples = task_examples(read_manifest(manifest), "mix")
    batch = Collator(model.encoder.feature_extractor)(
        [examples[0], examples[9], examples[-1]]
    )  # asr, st, qa
    seen = {}
    real_lm_loss = model.lm_loss

    def spy(embeds, mask, labels, **kwargs):
        seen.update(embeds=embeds, mask=mask, labels=labels)
        return real_lm_loss(embeds, mask, labels, **kwargs)

    monkeypatch.setattr(model, "lm_loss", spy)
    loss = finetune.answer_loss(model, batch)

    labels, mask = seen["labels"], seen["mask"]
    eot = model.prompt_ids("x")[2]
    for i, ex in enumerate(batch["examples"]):
        answer = model.tokenizer(ex["target"], add_special_tokens=False).input_ids + [eot]
        supervised = (labels[i] != -100).nonzero().flatten()
        n = int(
            mask[i].sum()
        )  # right padding: the sequence is positions 0..n-1, the answer its last tokens
        assert supervised.tolist() == list(range(n - len(answer), n))
        assert labels[i, supervised].tolist() == answer
        # everything before is the prompt: chat header, speech, then the instruction (with the QA
        # question)
        before, after, _ = model.prompt_ids(ex["instruction"])
        speech_len = n - len(answer) - len(before) - len(after)
        assert speech_len > 0 and model.tokenizer.decode(after).strip().endswith("assistant")
        assert ex["instruction"] in model.tokenizer.decode(after)
    assert (
        batch["examples"][2]["task"] == "qa"
        and "what is number" in batch["examples"][2]["instruction"]
    )
    # the loss is the mean cross-entropy over those positions and no others
    with torch.no_grad():
        logits = model.llm(inputs_embeds=seen["embeds"], attention_mask=mask.long()).logits
    keep = labels[:, 1:] != -100
    expected = F.cross_entropy(logits[:, :-1][keep], labels[:, 1:][keep])
    torch.testing.assert_close(loss.detach(), expected)


def test_frac_subset_is_deterministic_and_sized(paths, manifest):
    def draw(*extra):
        args = finetune.get_args(ft_args(paths, manifest, "unused", "--task", "mix", *extra))
        return [(ex["task"], ex["audio"]) for ex in finetune.load_data(args)[0]]

    everything = draw()
    assert (
        len(everything) == 8 + 8 + 4
    )  # asr + st (the sentences) + qa (the passages), in the authors' order
    half = draw("--frac", "0.5")
    assert half == draw("--frac", "0.5")  # seed 42: the same subset every run...
    assert len(half) == 10 and set(half) <= set(
        everything
    )  # ...of int(0.5 * 20) examples of the mix
    assert half != draw("--frac", "0.5", "--frac-seed", "1")
    assert (
        draw("--frac", "0.5", "--seed", "7") == half
    )  # the training seed does not move the subset
    per_task = draw("--frac", "0.5", "--stratify")
    assert sorted(t for t, _ in per_task) == ["asr"] * 4 + ["qa"] * 2 + ["st"] * 4
    with pytest.raises(SystemExit):
        finetune.get_args(["--task", "qa", "--stratify"])  # stratify needs the mix


def test_cli_from_scratch(paths, manifest, tmp_path):
    """The real entry point: `python finetune.py --init none`."""
    out = tmp_path / "scratch"
    line = "--task qa --init none --llm {llm} --encoder {hubert} {projector} --max-steps 2"
    extra = argv(line, **paths, projector=TINY_PROJECTOR)
    cmd = [sys.executable, "finetune.py", *ft_args(paths, manifest, out, *extra)]
    result = subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "final dev loss" in result.stdout and "python evaluate.py --ckpt" in result.stdout
    meta = json.loads((out / "meta.json").read_text())
    assert (
        meta["stage"] == "finetune"
        and meta["task"] == "qa"
        and meta["init"] == "none"
        and meta["step"] == 2
    )
    assert (
        meta["qformer"]["dim"] == 32 and meta["args"]["lr"] == 1e-4 and meta["args"]["epochs"] == 2
    )  # the paper's recipe
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2] and "dev_loss" in log[-1]
    assert (out / "ckpt-0000002" / "train_state.pt").exists()


@pytest.fixture(scope="module")
def stage1(paths, manifest, tmp_path_factory):
    """A stage-1 checkpoint made by pretrain.py itself (2 steps)."""
    out = tmp_path_factory.mktemp("pretrain")
    line = (
        "--llm {llm} --encoder {hubert} --data {data} --out {out} {projector} --layers 0,5,10"
        " --batch-size 4 --grad-accum 1 --device cpu --max-steps 2 --no-cache-features"
    )
    pretrain.main(argv(line, **paths, data=manifest, out=out, projector=TINY_PROJECTOR))
    return out


def same_projector(a, b):
    """The projectors saved in checkpoint folders a and b are identical, tensor by tensor."""
    before, after = load_file(a / "projector.safetensors"), load_file(b / "projector.safetensors")
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_cli_from_a_stage1_checkpoint(paths, manifest, stage1, tmp_path):
    out = tmp_path / "ft"
    # lr 0: the fine-tuned projector must be exactly the stage-1 one it started from
    line = "--task mix --frac 0.5 --init {init} --max-steps 2 --lr 0 --dropout 0.0"
    finetune.main(ft_args(paths, manifest, out, *argv(line, init=stage1)))
    assert same_projector(stage1, out)
    meta, stage1_meta = (
        json.loads((out / "meta.json").read_text()),
        json.loads((stage1 / "meta.json").read_text()),
    )
    assert (
        meta["llm"] == stage1_meta["llm"] and meta["encoder"] == stage1_meta["encoder"]
    )  # taken from the checkpoint
    assert meta["qformer"] == {**stage1_meta["qformer"], "dropout": 0.0}
    assert meta["init"] == str(stage1) and meta["task"] == "mix"


def test_freeze_projector_trains_lora_alone(paths, manifest, stage1, tmp_path):
    """--freeze-projector: the stage-1 projector comes out unchanged, the LoRA weights move. Refused
    for a fresh projector (--init none), without --lora (nothing would train) and with a CTC weight
    (a frozen projector has no alignment to keep)."""
    out = tmp_path / "ft"
    line = "--task asr --init {init} --max-steps 2 --lr 1e-2 --lora 2 --freeze-projector"
    finetune.main(ft_args(paths, manifest, out, *argv(line, init=stage1)))
    assert same_projector(stage1, out)
    lora = load_file(out / "lora.safetensors")
    assert any("lora_b" in k and v.abs().sum() > 0 for k, v in lora.items())
    for refused in (
        ["--init", "none", "--lora", "2", "--freeze-projector"],
        ["--init", str(stage1), "--freeze-projector"],
        ["--init", str(stage1), "--lora", "2", "--freeze-projector", "--ctc-weight", "1"],
    ):
        with pytest.raises(SystemExit):
            finetune.get_args(ft_args(paths, manifest, out, *refused))


def test_the_init_checkpoint_and_the_recipe_say_what_they_set(
    paths, manifest, stage1, tmp_path, capsys
):
    """--init decides the models and the projector's shape, the recipe the optimisation: the run's
    first two lines say what each set, and meta.json keeps both."""
    out = tmp_path / "ft"
    finetune.main(
        ft_args(paths, manifest, out, "--task", "asr", "--init", str(stage1), "--max-steps", "1")
    )
    first, second = capsys.readouterr().out.splitlines()[:2]
    assert first.startswith(
        f"--init {stage1} sets llm={paths['llm']} encoder={paths['hubert']} qformer_dim=32"
    )
    assert second.startswith(f"recipe paper (the default for --llm {paths['llm']}) sets lr=0.0001")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["init_set"]["qformer_dim"] == 32 and meta["init_set"]["sink_token"] is False
    assert meta["recipe"]["name"] == "paper" and meta["recipe"]["set"]["epochs"] == 2
    assert "batch_size" not in meta["recipe"]["set"] and meta["args"]["qformer_layers"] == 2


def test_mismatched_flags_against_the_checkpoint_fail_clearly(paths, manifest, stage1, tmp_path):
    run = lambda *extra: finetune.main(
        ft_args(paths, manifest, tmp_path, "--init", str(stage1), "--max-steps", "1", *extra)
    )  # noqa: E731
    with pytest.raises(UserError, match="--llm tiny does not match the --init checkpoint"):
        run("--llm", "tiny")
    with pytest.raises(UserError, match="--encoder tiny-whisper does not match"):
        run("--encoder", "tiny-whisper")
    with pytest.raises(
        UserError, match="--qformer-dim 64: the projector's shape comes from the --init checkpoint"
    ):
        run("--qformer-dim", "64")
    with pytest.raises(UserError, match="no stage-1 checkpoint there.*--init none"):
        finetune.main(ft_args(paths, manifest, tmp_path, "--init", str(tmp_path / "nowhere")))


def test_a_few_steps_lower_the_answer_loss_and_train_the_projector_only(paths, manifest):
    torch.manual_seed(0)
    model = SpeechLLM(
        paths["llm"], paths["hubert"], QFormerConfig(dim=32, heads=4, layers=2, dropout=0.0)
    ).train()
    frozen = {k: v.clone() for k, v in model.llm.state_dict().items()}
    batch = Collator(model.encoder.feature_extractor)(task_examples(read_manifest(manifest), "qa"))
    optimizer = torch.optim.AdamW(model.projector.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = finetune.answer_loss(model, batch)
        loss.backward()
        assert all(p.grad is None for p in model.llm.parameters())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    # A random 64-wide LLM can only be steered so far through its input (5.34 -> ~5.05 here), but it
    # moves.
    assert losses[-1] < losses[0] - 0.15, losses
    assert all(torch.equal(v, model.llm.state_dict()[k]) for k, v in frozen.items())


def test_auto_dtype_is_bf16_only_where_the_hardware_has_it(monkeypatch):
    import common

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert common.resolve_dtype("auto", cuda) == torch.bfloat16
    for amx, avx512_bf16 in ((True, False), (False, True), (True, True)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)  # noqa: B023
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)  # noqa: B023
        assert common.resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)  # emulated: slower
    assert common.resolve_dtype("auto", cpu) == torch.float32
    assert common.resolve_dtype("float32", cuda) == torch.float32


def test_bfloat16_on_a_cpu_follows_float32(paths, manifest, tmp_path):
    """--dtype bfloat16 on a CPU (autocast; the frozen weights in bf16, the projector in float32):
    it runs through the Whisper log-mel path (which must stay float32) and gives about the float32
    losses."""
    losses = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        line = (
            "--task asr --init none --llm {llm} --encoder {whisper} {projector} --seed 0"
            " --max-steps 3"
        )
        extra = argv(line, **paths, projector=TINY_PROJECTOR)
        finetune.main(ft_args(paths, manifest, out, *extra) + ["--dtype", dtype, "--dropout", "0"])
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        losses[dtype] = [r["loss"] for r in log if "loss" in r] + [log[-1]["dev_loss"]]
    torch.testing.assert_close(
        torch.tensor(losses["bfloat16"]), torch.tensor(losses["float32"]), rtol=0.02, atol=0
    )


def test_resume_continues_exactly(paths, manifest, stage1, tmp_path):
    """A run stopped after its step-2 checkpoint and resumed ends with the projector of an
    uninterrupted run (same data order, optimiser state and dropout RNG: common.resume, shared with
    pretrain.py)."""
    line = "--task mix --init {init} --lr 1e-3 --max-steps 4 --save-every 2 --eval-every 0"
    run = lambda out, *extra: finetune.main(  # noqa: E731
        ft_args(paths, manifest, out, *argv(line, init=stage1), *extra)
    )
    run(tmp_path / "straight")
    run(tmp_path / "stopped")
    for leftover in (
        "projector.safetensors",
        "meta.json",
    ):  # as if killed after the step-2 checkpoint
        (tmp_path / "stopped" / leftover).unlink()
    shutil.rmtree(tmp_path / "stopped" / "ckpt-0000004")
    run(tmp_path / "stopped", "--resume")
    a, b = (
        load_file(tmp_path / "straight" / "projector.safetensors"),
        load_file(tmp_path / "stopped" / "projector.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_ddp_two_processes_equal_one(paths, manifest, tmp_path):
    """torchrun with 2 ranks x batch 2 == 1 process with batch 2 x 2 accumulation steps (the answer
    loss is a per-micro-batch mean, and DDP averages the ranks' gradients)."""
    line = (
        "--task mix --init none --llm {llm} --encoder {hubert} {projector} --max-steps 3"
        " --dropout 0 --lr 1e-3 --eval-every 0"
    )
    common = argv(line, **paths, projector=TINY_PROJECTOR)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, *argv("-m torch.distributed.run --standalone --nproc_per_node=2")]
    one = [sys.executable, "finetune.py", *ft_args(paths, manifest, tmp_path / "one", *common)]
    for cmd in (
        torchrun + ["finetune.py", *ft_args(paths, manifest, tmp_path / "ddp", *common)],
        one + ["--grad-accum", "2"],
    ):
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    a, b = (
        load_file(tmp_path / "ddp" / "projector.safetensors"),
        load_file(tmp_path / "one" / "projector.safetensors"),
    )
    for k in a:
        x, y = a[k], b[k]
        if k.endswith(
            "in_proj_bias"
        ):  # the key bias's true gradient is 0: Adam amplifies round-off (see test_robustness)
            d = len(x) // 3
            x, y = torch.cat([x[:d], x[2 * d :]]), torch.cat([y[:d], y[2 * d :]])
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5, msg=k)


def test_the_demo_counts_stage_2_in_steps_unless_epochs_are_given():
    """The demo recipe trains stage 2 for 150 steps whatever the --frac; --epochs on the command
    line takes over from that budget (and --max-steps from both); the paper's counts epochs."""
    assert finetune.get_args(["--init", "none"]).max_steps == 150
    assert finetune.get_args(["--init", "none", "--epochs", "3"]).max_steps == 0
    given = finetune.get_args(["--init", "none", "--epochs", "3", "--max-steps", "7"])
    assert (given.epochs, given.max_steps) == (3, 7)
    paper = finetune.get_args(["--llm", "llama", "--init", "none"])
    assert (paper.epochs, paper.max_steps) == (2, 0)
