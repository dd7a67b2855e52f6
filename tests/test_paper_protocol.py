"""The paper's recipe as the authors ran it, and what its first GPU run needs: the data named, their
checkpoint cadence and gradient checkpointing, no feature cache, models loaded onto their device, a
resume that loads onto the CPU, the Triton kernel on the tensor's device, COMET for ST, the decoding
protocol printed. Each test failed on the code before these fixes.

    python -m pytest -q tests/test_paper_protocol.py
"""

import json
import sys
import types

import pytest
import torch
from tiny import argv, write_manifest

import common
import contrastive_fast
import evaluate
import finetune
import model as model_module
import pretrain
from data import Collator, read_manifest, task_examples
from model import QFormerConfig, SpeechLLM


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    qa = {
        i: {"question": f"what is {i}?", "answer": "anna", "translation": "hallo"} for i in range(8)
    }
    return write_manifest(tmp_path_factory.mktemp("data"), n=8, extra=qa)


SMALL = " --qformer-dim 32 --qformer-heads 4 --qformer-layers 2 --window 4 --batch-size 4"


def test_the_papers_recipe_defaults_are_the_authors(paths):
    """--llm llama (any LLM but the demo's): checkpoints every 1000 steps, gradient checkpointing,
    no feature cache, QA targets ending in a newline; the demo keeps its own."""
    paper = pretrain.get_args(["--llm", "llama"])
    assert (paper.save_every, paper.grad_checkpoint, paper.cache_features) == (1000, True, False)
    assert paper.data is None
    stage2 = finetune.get_args(["--llm", "llama", "--init", "none"])
    assert (stage2.save_every, stage2.grad_checkpoint, stage2.qa_newline) == (1000, True, True)
    demo = pretrain.get_args([])
    assert (demo.save_every, demo.grad_checkpoint, demo.cache_features, demo.data) == (
        0, False, True, "demo",
    )  # fmt: skip


def test_a_paper_run_without_data_is_one_line_naming_the_converter(paths, tmp_path):
    line = "--llm {llm} --encoder {hubert} --device cpu --out {out}"
    with pytest.raises(common.UserError, match="--data: name the training manifest.*prepare_data"):
        pretrain.main(argv(line, **paths, out=tmp_path / "s1"))
    with pytest.raises(common.UserError, match="--data: name the training manifest"):
        finetune.main(argv(line + " --init none", **paths, out=tmp_path / "s2"))
    assert not (tmp_path / "s1").exists() and not (tmp_path / "s2").exists()


def test_finetune_with_its_own_data_and_no_dev_data(paths, manifest, tmp_path, capsys):
    """The README's paper stage 2 named no --dev-data: it died after loading the models."""
    line = "--llm {llm} --encoder {hubert} --init none --task qa --data {data} --device cpu"
    line += " --dtype float32 --max-steps 1 --out {out}" + SMALL
    finetune.main(argv(line, **paths, data=manifest, out=tmp_path / "ft"))
    assert (tmp_path / "ft" / "projector.safetensors").exists()
    assert "0 dev" in capsys.readouterr().out


def test_qa_targets_end_in_a_newline_in_the_papers_recipe(manifest):
    rows = read_manifest(manifest)
    assert task_examples(rows, "qa", qa_newline=True)[0]["target"] == "anna\n"
    assert task_examples(rows, "qa")[0]["target"] == "anna"
    assert task_examples(rows, "qa", qa_newline=True)[0]["references"] == ["anna"]


@pytest.mark.parametrize("stage", ["speech_states", "answer_loss"])
def test_grad_checkpointing_gives_the_same_loss_and_gradients(paths, manifest, stage):
    """The same numbers with and without, and the layers really run twice (the recompute)."""
    rows = read_manifest(manifest)[:3]
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        cfg = QFormerConfig(dim=32, heads=4, layers=2, window=4, dropout=0.0)
        model = SpeechLLM(paths["llm"], paths["hubert"], cfg).train()
        calls = []
        # (a hook on the layer's MLP: transformers recomputes the layer's forward, not its __call__)
        mlp = model.llm.get_decoder().layers[0].mlp
        mlp.register_forward_pre_hook(lambda *a, calls=calls: calls.append(1))
        if checkpointing:
            model.enable_grad_checkpointing()
        batch = Collator(model.encoder.feature_extractor, model.tokenizer)(rows)
        if stage == "speech_states":
            states, pool_mask, _, _ = model.speech_states(batch, [0, 1, 2])
            loss = (states.float() ** 2).mean()
        else:
            speech, mask = model.encode_speech(batch)
            instructions = ["Can you transcribe this audio?"] * len(rows)
            loss = model.answer_loss(speech, mask, instructions, [r["text"] for r in rows])
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.projector.named_parameters()}
        results.append((loss.item(), grads, len(calls)))
    (plain, plain_grads, plain_calls), (ckpt, ckpt_grads, ckpt_calls) = results
    assert ckpt == pytest.approx(plain, rel=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-4, atol=1e-6)
    # checkpointed: the forward, then the recompute in backward (and no cached shared prefix, which
    # the plain answer loss computes with one more forward of the layer)
    assert ckpt_calls == 2 and plain_calls == (2 if stage == "answer_loss" else 1)


def test_a_resume_loads_the_train_state_onto_the_cpu(monkeypatch, tmp_path):
    seen = {}
    real = torch.load

    def load(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    torch.save({"step": 1}, tmp_path / "train_state.pt")
    monkeypatch.setattr(torch, "load", load)

    class Model:
        def load_projector(self, ckpt):
            pass

    common.read_checkpoint(tmp_path, Model())
    assert seen["map_location"] == "cpu"


def test_the_frozen_models_load_straight_onto_a_cuda_device(paths, monkeypatch):
    assert model_module.onto("cuda:1") == {"device_map": "cuda:1"}
    assert model_module.onto("cpu") == {} and model_module.onto(None) == {}
    asked, real = [], model_module.load_pretrained

    def load(auto_class, name, what, **kwargs):
        asked.append((what, kwargs.pop("device_map", None)))
        return real(auto_class, name, what, **kwargs)  # (no GPU here: loaded on the CPU)

    monkeypatch.setattr(model_module, "load_pretrained", load)
    SpeechLLM(paths["llm"], paths["hubert"], QFormerConfig(dim=32, heads=4, layers=1),
              device=torch.device("cuda", 1))  # fmt: skip
    assert ("LLM", "cuda:1") in asked and ("speech encoder", "cuda:1") in asked


def test_the_triton_kernel_launches_on_the_tensors_device():
    on_gpu1 = types.SimpleNamespace(device=torch.device("cuda", 1))
    guard = contrastive_fast.launch_device(on_gpu1)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(contrastive_fast.launch_device(torch.zeros(1)), torch.cuda.device)


def test_comet_scores_st_through_the_package_or_says_what_is_missing(monkeypatch, tmp_path):
    """The real COMET model cannot be loaded here (no hub): a stand-in for unbabel-comet's API checks
    what evaluate.py hands it (the gold transcripts as sources) and that the score is x 100."""
    monkeypatch.setitem(sys.modules, "comet", None)
    with pytest.raises(common.UserError, match="unbabel-comet"):
        evaluate.comet("Unbabel/wmt22-comet-da", ["a"], ["b"], ["c"])
    given = {}

    class Scorer:
        def predict(self, rows, batch_size, gpus, progress_bar):
            given["rows"] = rows
            return types.SimpleNamespace(system_score=0.8125)

    fake = types.ModuleType("comet")
    fake.download_model = lambda name: given.setdefault("downloaded", name) and "x/model.ckpt"
    fake.load_from_checkpoint = lambda path: given.setdefault("loaded", path) and Scorer()
    monkeypatch.setitem(sys.modules, "comet", fake)
    assert evaluate.comet("Unbabel/wmt22-comet-da", ["hello"], ["hallo"], ["hallo!"]) == 81.25
    assert given["rows"] == [{"src": "hello", "mt": "hallo", "ref": "hallo!"}]
    assert given["downloaded"] == "Unbabel/wmt22-comet-da"
    (tmp_path / "checkpoints").mkdir()
    evaluate.comet(str(tmp_path), ["hello"], ["hallo"], ["hallo!"])
    assert given["loaded"] == "x/model.ckpt"  # setdefault: the first load's path was kept
    fake.load_from_checkpoint = lambda path: (_ for _ in ()).throw(FileNotFoundError(path))
    with pytest.raises(common.ModelError, match="cannot load the COMET model"):
        evaluate.comet(str(tmp_path), ["a"], ["b"], ["c"])


def test_evaluate_prints_the_protocol_it_used(paths, manifest, tmp_path, capsys):
    torch.manual_seed(0)
    SpeechLLM(
        paths["llm"], paths["hubert"], QFormerConfig(dim=32, heads=4, layers=1)
    ).save_projector(tmp_path, step=1, stage="finetune", task="asr", init="none")
    line = "--ckpt {ckpt} --data {data} --device cpu --limit 2 --max-new-tokens 2"
    evaluate.main(argv(line, ckpt=tmp_path, data=manifest))
    out = capsys.readouterr().out
    assert "protocol: the paper recipe's: greedy, at most 2 new tokens, loop guard off" in out
    evaluate.main(argv("--ckpt {ckpt} --data {data} --device cpu --limit 2", ckpt=tmp_path,
                       data=manifest))  # fmt: skip
    assert (
        "the paper recipe's (the authors): greedy, at most 200 new tokens"
        in capsys.readouterr().out
    )
    saved = json.loads((tmp_path / "eval-asr.json").read_text())
    assert saved["decoding"]["max_new_tokens"] == 200


def test_greedy_decoding_stops_at_the_first_newline_as_the_authors(paths, manifest):
    from test_evaluate import steered

    torch.manual_seed(0)
    cfg = QFormerConfig(dim=32, heads=4, layers=2, dropout=0.0)
    model = SpeechLLM(paths["llm"], paths["hubert"], cfg).eval()
    batch = Collator(model.encoder.feature_extractor)(read_manifest(manifest)[:2])
    tok = lambda s: model.tokenizer(s, add_special_tokens=False).input_ids[0]  # noqa: E731
    handle = steered(model, [tok("a"), tok("b"), tok("\n"), tok("c")])  # never an end of turn
    try:
        texts, why = model.generate(batch, ["Can you transcribe this audio?"] * 2, 8)
    finally:
        handle.remove()
    assert texts == ["ab"] * 2 and why == ["end"] * 2  # not "ab\ncccccc", cut by the cap


def test_the_authors_system_prompt_in_their_llama3_template(paths, tmp_path):
    """The paper's recipe puts the authors' system turn first; a Llama 3 tokenizer gets their own
    template (LLaVA's conv_llama_3_1: no "Cutting Knowledge Date" lines); any other LLM its
    template with that system turn. The checkpoint keeps it for evaluate.py; the demo keeps its
    template's own."""
    assert pretrain.get_args(["--llm", "llama"]).system_prompt == common.AUTHORS_SYSTEM_PROMPT
    assert finetune.get_args(["--llm", "llama", "--init", "none"]).system_prompt.startswith(
        "A chat"
    )
    assert pretrain.get_args([]).system_prompt == ""
    model = SpeechLLM(paths["llm"], paths["hubert"], QFormerConfig(dim=32, heads=4, layers=1))
    model.system_prompt = common.AUTHORS_SYSTEM_PROMPT
    before, after, eot = model.prompt_ids("Can you transcribe this audio?")
    chatml = model.tokenizer.decode(before)
    assert chatml.startswith("<|im_start|>system\nA chat between a curious user")
    model.save_projector(tmp_path / "ckpt")
    assert SpeechLLM.from_checkpoint(tmp_path / "ckpt")[0].system_prompt == model.system_prompt
    llama3 = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    model.tokenizer.add_special_tokens({"additional_special_tokens": llama3})
    model._template = None
    before, after, eot = model.prompt_ids("Can you transcribe this audio?")
    text = model.tokenizer.decode(before) + "<|audio|>" + model.tokenizer.decode(after)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        + common.AUTHORS_SYSTEM_PROMPT
        + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n<|audio|>\nCan you transcribe this"
        " audio?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert model.tokenizer.convert_ids_to_tokens(eot) == "<|eot_id|>"
