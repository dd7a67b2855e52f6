"""The token-level alignment (extras/ctc.py), joint decoding (extras/joint.py), LoRA
(extras/lora.py): each piece against a slow, obviously-correct version, and the CLI paths end to end
with tiny models.

    python -m pytest -q tests/extras/test_alignment.py
"""

import argparse
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from tiny import argv, write_manifest

import evaluate
import finetune
import pretrain
from data import Collator, read_manifest
from extras import ctc, decoding, joint, lora
from extras.ctc import (
    ctc_alignment_loss,
    ctc_classes,
    ctc_compress,
    ctc_logits,
    ctc_readout,
    ctc_runs,
)
from extras.joint import ctc_empty_prefix, ctc_final_scores, ctc_prefix_scores, generate_joint
from model import QFormerConfig, SpeechLLM


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("data"), n=8)


def test_ctc_runs_collapse_repeats_and_drop_blanks():
    blank = 9
    assert ctc_runs([3, 3, 9, 3, 5, 5, 9, 9, -1, -1], blank) == [(3, 0, 2), (3, 3, 4), (5, 4, 6)]
    assert ctc_runs([9, 9, -1], blank) == []


def test_ctc_loss_is_pytorch_ctc_on_cosine_logits():
    """The loss against F.ctc_loss on logits built one position and one class at a time."""
    torch.manual_seed(0)
    table, blank = torch.randn(11, 6), torch.randn(6)
    speech = torch.randn(2, 7, 6, requires_grad=True)
    speech_mask = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    ids, ids_mask = (
        torch.tensor([[1, 2, 2], [4, 0, 0]]),
        torch.tensor([[True] * 3, [True, False, False]]),
    )
    classes = torch.cat([table, blank[None]])
    slow = torch.stack(
        [
            torch.stack(
                [F.cosine_similarity(speech[b, s], classes, dim=-1) / 0.05 for s in range(7)]
            )
            for b in range(2)
        ]
    )
    torch.testing.assert_close(ctc_logits(speech, table, blank), slow)
    expected = F.ctc_loss(
        slow.log_softmax(-1).transpose(0, 1),
        ids,
        torch.tensor([7, 5]),
        torch.tensor([3, 1]),
        blank=11,
    )
    loss = ctc_alignment_loss(speech, speech_mask, ids, ids_mask, table, blank)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert speech.grad[1, 5:].abs().sum() == 0  # padding gets no gradient


def test_ctc_loss_under_bf16_autocast_takes_the_vocabulary_product_in_bf16():
    """Under autocast only the product with the table runs in bf16 (as an LLM's output layer): the
    loss is the float32 loss on bf16-rounded logits, within bf16's error of the exact one."""
    torch.manual_seed(0)
    table, blank = torch.randn(300, 16), torch.randn(16)
    speech = torch.randn(2, 9, 16)
    mask = torch.ones(2, 9, dtype=torch.bool)
    ids, ids_mask = torch.tensor([[5, 6, 7], [8, 9, 9]]), torch.ones(2, 3, dtype=torch.bool)
    exact = ctc_alignment_loss(speech, mask, ids, ids_mask, table, blank)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = ctc_alignment_loss(speech, mask, ids, ids_mask, table, blank)
    rounded = ctc_logits(speech, table, blank, product_dtype=torch.bfloat16)
    assert rounded.dtype == torch.bfloat16
    log_probs = rounded.log_softmax(-1, dtype=torch.float32).transpose(0, 1)
    expected = F.ctc_loss(log_probs, ids, torch.tensor([9, 9]), torch.tensor([3, 3]), blank=300)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, expected)
    assert mixed != exact
    torch.testing.assert_close(mixed, exact, rtol=1e-2, atol=0)


def test_ctc_classes_keep_every_transcript_token_and_draw_the_rest_afresh():
    ids, mask = (
        torch.tensor([[7, 3, 3], [9, 0, 0]]),
        torch.tensor([[True] * 3, [True, False, False]]),
    )
    torch.manual_seed(0)
    rows, log_weight = ctc_classes(ids, mask, 100, 20)
    assert rows[:3].tolist() == [3, 7, 9] and len(rows) == len(set(rows.tolist())) == 20
    assert log_weight[:3].tolist() == [0, 0, 0]
    torch.testing.assert_close(log_weight[3:], torch.full((17,), math.log(97 / 17)))
    torch.manual_seed(0)
    assert ctc_classes(ids, mask, 100, 20)[0].tolist() == rows.tolist()  # seeded: resumable
    assert ctc_classes(ids, mask, 100, 20)[0].tolist() != rows.tolist()  # a fresh draw each step
    assert ctc_classes(ids, mask, 100, 2)[0].tolist() == [3, 7, 9]  # never fewer than the targets


def test_sampled_ctc_classes_estimate_the_whole_vocabulary():
    """Where every row outside the transcripts is the same vector, the drawn rows' sum with their
    log(rest / drawn) is exactly the rest's sum: the sampled loss is the full one, gradient too. With
    a random table it estimates it (low on average: the log of an unbiased sum); num_classes >= the
    vocabulary is the full loss."""
    torch.manual_seed(0)
    ids, ids_mask = torch.tensor([[5, 6, 7], [8, 9, 9]]), torch.ones(2, 3, dtype=torch.bool)
    speech_mask = torch.ones(2, 9, dtype=torch.bool)
    table, blank = torch.randn(16).repeat(300, 1), torch.randn(16)
    table[5:10] = torch.randn(5, 16)  # the targets (rows 5-9) differ, every other row is alike
    speech = torch.randn(2, 9, 16, requires_grad=True)
    full = ctc_alignment_loss(speech, speech_mask, ids, ids_mask, table, blank)
    (full_grad,) = torch.autograd.grad(full, speech)
    sampled = ctc_alignment_loss(speech, speech_mask, ids, ids_mask, table, blank, num_classes=40)
    (sampled_grad,) = torch.autograd.grad(sampled, speech)
    torch.testing.assert_close(sampled, full)
    torch.testing.assert_close(sampled_grad, full_grad)

    table = torch.randn(300, 16)
    full = ctc_alignment_loss(speech, speech_mask, ids, ids_mask, table, blank)
    every = ctc_alignment_loss(speech, speech_mask, ids, ids_mask, table, blank, num_classes=300)
    assert every == full
    draws = [
        ctc_alignment_loss(speech, speech_mask, ids, ids_mask, table, blank, num_classes=100)
        for _ in range(50)
    ]
    assert len({d.item() for d in draws}) > 1
    torch.testing.assert_close(torch.stack(draws).mean(), full, rtol=0.1, atol=0)


def test_readout_and_compression_follow_the_nearest_embedding():
    """Outputs placed on token embeddings (or the blank) read out as those tokens; compression keeps one
    vector per run, the mean of the run, and the gradient reaches every vector of it."""
    torch.manual_seed(0)
    table, blank = torch.randn(11, 6), torch.randn(6)
    path = [[3, 3, 11, 7, 7, 7, 11], [5, 11, 11, 11, 11, 11, 11]]
    classes = torch.cat([table, blank[None]])
    speech = torch.stack([classes[p] for p in path]) * 2.0  # the scale does not change a cosine
    speech = (speech + 0.01 * torch.randn_like(speech)).requires_grad_(True)
    mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4])
    assert ctc_readout(speech, mask, table, blank) == [[3, 7], [5]]
    short, short_mask = ctc_compress(speech, mask, table, blank)
    assert short_mask.tolist() == [[True, True], [True, False]]
    torch.testing.assert_close(short[0, 1], speech[0, 3:6].mean(0))
    short[0, 1].sum().backward()
    assert (speech.grad[0, 3:6] != 0).all() and (speech.grad[0, :3] == 0).all()


def test_ctc_logits_give_the_blank_and_the_speech_the_slow_gradients():
    """The frozen table is normalised once and the blank scored apart: the gradients into the
    speech and the blank are those of the obvious cosine against the concatenated classes."""
    torch.manual_seed(0)
    table = torch.randn(11, 6)
    slow_blank, blank = (torch.randn(6).requires_grad_(True) for _ in range(2))
    with torch.no_grad():
        blank.copy_(slow_blank)
    speech = torch.randn(2, 7, 6, requires_grad=True)
    weights = torch.randn(2, 7, 12)
    slow = F.cosine_similarity(speech[..., None, :], torch.cat([table, slow_blank[None]]), dim=-1)
    (slow / 0.05 * weights).sum().backward()
    speech_grad, speech.grad = speech.grad, None
    (ctc_logits(speech, table, blank) * weights).sum().backward()
    torch.testing.assert_close(speech.grad, speech_grad)
    torch.testing.assert_close(blank.grad, slow_blank.grad)


def test_the_normalised_table_is_recomputed_when_the_table_changes():
    torch.manual_seed(0)
    table, blank, speech = torch.randn(11, 6), torch.randn(6), torch.randn(1, 3, 6)
    first = ctc_logits(speech, table, blank)
    with torch.no_grad():
        table.mul_(-1)  # in place: a new version of the same tensor
    torch.testing.assert_close(ctc_logits(speech, table, blank)[..., :-1], -first[..., :-1])
    other = torch.randn(11, 6)  # another table of the same shape
    expected = F.cosine_similarity(speech[..., None, :], other, dim=-1) / 0.05
    torch.testing.assert_close(ctc_logits(speech, other, blank)[..., :-1], expected)


def test_compression_reads_the_same_paths_off_the_losss_logits():
    """finetune_inputs hands the CTC loss's float32 logits over every row to compression: the same
    runs as scoring the vocabulary again."""
    torch.manual_seed(0)
    table, blank = torch.randn(11, 6), torch.randn(6)
    speech, mask = torch.randn(2, 9, 6), torch.tensor([[True] * 9, [True] * 6 + [False] * 3])
    ids, ids_mask = torch.tensor([[1, 2], [4, 0]]), torch.tensor([[True, True], [True, False]])
    _, logits = ctc_alignment_loss(speech, mask, ids, ids_mask, table, blank, 0.1, keep_logits=True)
    again, again_mask = ctc_compress(speech, mask, table, blank)
    reused, reused_mask = ctc_compress(speech, mask, table, blank, logits)
    assert torch.equal(reused_mask, again_mask)
    torch.testing.assert_close(reused, again)


def test_a_shared_prefix_under_lora_gives_the_same_loss_and_gradients(paths):
    """With LoRA training inside the LLM the shared prefix is computed once with its graph: the
    loss and the gradients into the speech and every LoRA weight are those of separate prefixes."""
    torch.manual_seed(0)
    model = SpeechLLM(paths["llm"], paths["hubert"], QFormerConfig(dim=32, heads=4, layers=2))
    lora.add_lora(model, 4)
    for name, p in model.llm.named_parameters():
        if ".lora_" in name:  # B starts at 0: give it values, so that every weight has a gradient
            torch.nn.init.normal_(p, std=0.1)
    instructions = ["Can you transcribe this audio?"] * 3
    prefix = model.shared_prefix(instructions)
    assert prefix > 0
    speech = torch.randn(3, 5, model.llm.config.hidden_size, requires_grad=True)
    speech_mask = torch.ones(3, 5, dtype=torch.bool)
    speech_mask[2, 3:] = False
    lora_weights = [p for name, p in model.llm.named_parameters() if ".lora_" in name]
    results = []
    for k in (0, prefix):
        embeds, mask, labels = model.chat_batch(
            speech, speech_mask, instructions, ["ab", "c d", "e"]
        )
        loss = model.lm_loss(embeds, mask, labels, prefix=k)
        results.append((loss, *torch.autograd.grad(loss, [speech, *lora_weights])))
    for shared, separate in zip(results[1], results[0]):
        torch.testing.assert_close(shared, separate)


def test_lora_starts_as_the_frozen_llm_and_trains_alone(paths, manifest):
    torch.manual_seed(0)
    model = SpeechLLM(paths["llm"], paths["hubert"], QFormerConfig(dim=32, heads=4, layers=2))
    ids = torch.tensor([[1, 5, 7, 2]])
    before = model.llm(ids).logits
    lora.add_lora(model, 4)
    torch.testing.assert_close(
        model.llm(ids).logits, before
    )  # B = 0: the same function at the start
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        name.startswith("projector.") or ".lora_" in name for name in trainable
    )
    assert any(".lora_" in name for name in trainable)


def test_a_ctc_step_trains_the_projector_and_its_blank_only(paths, manifest):
    """--loss ctc: a real CTC loss (4-frame windows give enough positions for the tiny transcripts), a
    gradient for every projector weight and the blank, none for the frozen LLM."""
    torch.manual_seed(0)
    cfg = QFormerConfig(dim=32, heads=4, layers=2, window=4, dropout=0.0)
    model = SpeechLLM(paths["llm"], paths["hubert"], cfg).train()
    ctc.add_blank(model)
    args = pretrain.get_args(argv("--llm {llm} --encoder {hubert} --data x --loss ctc", **paths))
    batch = Collator(model.encoder.feature_extractor, model.tokenizer)(read_manifest(manifest)[:4])
    loss, logs = pretrain.train_step_loss(model, batch, [0], args, text_cache=None)
    assert logs["ctc"] > 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in model.llm.parameters())
    grads = {name: p.grad for name, p in model.projector.named_parameters()}
    assert grads["blank"] is not None and grads["out.weight"].abs().sum() > 0


def test_ctc_stage1_then_compressed_lora_stage2_then_readout(paths, manifest, tmp_path):
    """pretrain.py --loss contrastive+ctc, finetune.py --compress --lora --ctc-weight, evaluate.py on both:
    the fine-tuned checkpoint rebuilds its LoRA and compression, and answers as the in-process model."""
    common = "--llm {llm} --encoder {hubert} --data {data} --dev-data {data} --device cpu --dtype float32"
    values = dict(paths, data=manifest)
    stage1 = tmp_path / "s1"
    pretrain.main(
        argv(common + " --out {out} --loss contrastive+ctc --max-steps 3 --emb-steps 1 --batch-size 4"
             " --qformer-dim 32 --qformer-heads 4 --qformer-layers 2 --window 4 --ctc-classes 40",
             **values, out=stage1)
    )  # fmt: skip
    assert json.loads((stage1 / "meta.json").read_text())["args"]["ctc_classes"] == 40
    result = evaluate.main(
        argv("--ckpt {ckpt} --task readout --data {data} --device cpu", ckpt=stage1, data=manifest)
    )
    assert result["readout"]["n"] == 8 and "wer" in result["readout"]["metrics"]
    seen = evaluate.main(argv("--ckpt {ckpt} --task readout --data {data} --device cpu --seen-in {data}",
                              ckpt=stage1, data=manifest))["readout"]["metrics"]  # fmt: skip
    assert seen["unseen_words"] == 0.0 and seen["recall_unseen"] is None
    assert seen["wer"] == result["readout"]["metrics"]["wer"]
    stage2 = tmp_path / "s2"
    finetune.main(
        argv(common + " --out {out} --init {init} --task asr --max-steps 2 --batch-size 2 --compress --lora 2"
             " --ctc-weight 1 --ctc-classes 40 --no-cache-features", **values, out=stage2, init=stage1)
    )  # fmt: skip
    meta = json.loads((stage2 / "meta.json").read_text())
    assert meta["args"]["ctc_classes"] == 40
    additions = meta["additions"]
    assert additions["compress"] is True and additions["lora"] == {"rank": 2, "alpha": 4}
    assert (stage2 / "lora.safetensors").exists()
    model, _ = SpeechLLM.from_checkpoint(stage2)
    assert model.additions["compress"]
    assert any(".lora_" in name for name, _ in model.llm.named_parameters())
    rows = read_manifest(manifest)[:2]
    batch = Collator(model.encoder.feature_extractor)(rows)
    speech, speech_mask = decoding.speech_for_llm(model.eval(), batch)  # compressed
    instructions = ["Can you transcribe this audio?"] * 2
    expected, _ = model.generate_from(speech, speech_mask, instructions, 3)
    args = "--ckpt {ckpt} --task asr --data {data} --limit 2 --max-new-tokens 3 --loop-repeats 0 --device cpu"
    scored = evaluate.main(
        argv(args + " --dtype float32 --joint-ctc 0", ckpt=stage2, data=manifest)
    )["asr"]
    assert sorted(o["hypothesis"] for o in scored["outputs"]) == sorted(
        e.split("\n")[0].strip() for e in expected
    )
    joint = evaluate.main(argv(args + " --joint-ctc 0.5 --beam 2", ckpt=stage2, data=manifest))
    assert joint["asr"]["decoding"]["joint_ctc"] == 0.5 and joint["asr"]["n"] == 2
    # --joint-ctc auto: a CTC-aligned checkpoint decodes jointly
    assert "ctc" in json.loads((stage2 / "meta.json").read_text())["additions"]
    auto = evaluate.main(argv(args + " --joint-ctc auto", ckpt=stage2, data=manifest))["asr"]
    auto = auto["decoding"]
    assert auto["joint_ctc"] == decoding.JOINT_CTC
    # one recording decodes the same way as the test split
    one = (
        "--ckpt {ckpt} --task asr --audio {audio} --max-new-tokens 3 --device cpu --joint-ctc auto"
    )
    answer = evaluate.main(argv(one, ckpt=stage2, audio=rows[0]["audio"]))
    batch = Collator(model.encoder.feature_extractor)(rows[:1])
    assert (
        answer == generate_joint(model, batch, ["Can you transcribe this audio?"], 0.5, 4, 3)[0][0]
    )


def test_special_tokens_in_a_target_stay_plain_text(paths):
    """A transcript that holds the text of the end-of-turn token is supervised as characters; the
    one real end-of-turn token is the one chat_batch appends."""
    model = SpeechLLM(paths["llm"], paths["hubert"], QFormerConfig(dim=32, heads=4, layers=2))
    eot_text = model.tokenizer.convert_ids_to_tokens(model.prompt_ids("x")[2])
    speech, mask = (
        torch.zeros(1, 2, model.llm.config.hidden_size),
        torch.ones(1, 2, dtype=torch.bool),
    )
    _, _, labels = model.chat_batch(speech, mask, ["x"], [f"ok {eot_text} ok"])
    eot = model.prompt_ids("x")[2]
    assert (labels == eot).sum() == 1 and labels[0, labels[0] != -100][-1] == eot


def test_ctc_prefix_scores_sum_every_path_that_starts_with_the_prefix():
    """Joint decoding's CTC side against enumeration: log P(prefix + c, anything after) and
    log P(exactly the prefix) summed over all (V + 1)^S paths whose collapse fits."""
    torch.manual_seed(0)
    S, V = 5, 3
    blank = V
    log_probs = torch.randn(S, V + 1).log_softmax(-1)

    def collapse(path):
        return [c for i, c in enumerate(path) if c != blank and (i == 0 or c != path[i - 1])]

    paths = [(collapse(p), sum(log_probs[t, c].item() for t, c in enumerate(p)))
             for p in itertools.product(range(V + 1), repeat=S)]  # fmt: skip

    def enumerated(prefix, exact):
        total = sum(math.exp(score) for labels, score in paths
                    if (labels if exact else labels[: len(prefix)]) == prefix)  # fmt: skip
        return math.log(total) if total else -math.inf

    for prefix in ([], [0], [2, 2], [0, 1], [1, 0, 2]):
        r_n, r_b = (r[None] for r in ctc_empty_prefix(log_probs, blank))
        for i, token in enumerate(prefix):  # grow the prefix one token at a time
            last = torch.tensor([prefix[i - 1] if i else -1])
            _, new_n, new_b = ctc_prefix_scores(log_probs, blank, r_n, r_b, last,
                                                torch.tensor([i == 0]), torch.tensor([token]))  # fmt: skip
            r_n, r_b = new_n[:, 0], new_b[:, 0]
        last = torch.tensor([prefix[-1] if prefix else -1])
        scores, _, _ = ctc_prefix_scores(log_probs, blank, r_n, r_b, last,
                                         torch.tensor([not prefix]), torch.arange(V))  # fmt: skip
        for c in range(V):
            assert scores[0, c].item() == pytest.approx(enumerated(prefix + [c], False), abs=1e-4)
        final = ctc_final_scores(r_n, r_b)[0].item()
        assert final == pytest.approx(enumerated(prefix, True), abs=1e-4)


def test_joint_decoding_without_ctc_is_the_llms_greedy_answer(paths, manifest):
    """--joint-ctc's search with weight 0, one beam and every token a candidate is generate()'s
    greedy decoding: the LLM side (prompt, cache, end of turn) is the same."""
    torch.manual_seed(0)
    cfg = QFormerConfig(dim=32, heads=4, layers=2, window=4, dropout=0.0)
    model = SpeechLLM(paths["llm"], paths["hubert"], cfg).eval()
    ctc.add_blank(model)
    instruction, answers = "Can you transcribe this audio?", []
    for row in read_manifest(manifest)[:4]:
        batch = Collator(model.encoder.feature_extractor)([row])
        (greedy,), _ = model.generate(batch, [instruction], 6)
        vocabulary = len(ctc.embedding_table(model)) + 1
        (answer,), _ = generate_joint(model, batch, [instruction], 0.0, beam=1, max_new_tokens=6,
                                      per_position=vocabulary)  # fmt: skip
        assert answer == greedy
        answers.append(greedy)
    assert any(answers)  # the random LLM writes something for some of them


def test_joint_decoding_of_a_batch_is_each_utterance_decoded_alone(paths, manifest, monkeypatch):
    """generate_joint over a batch (left-padded prompts, every utterance's live hypotheses in one LLM
    forward a step, a cap each) gives each utterance's search the LLM log-probabilities it gets
    decoded alone, step by step, and so the same answer, ended the same way."""
    searches, step = [], joint.JointSearch.step

    def recorded(self, llm_lp, *args):  # what every search is given, step by step
        if not hasattr(self, "seen"):
            self.seen = []
            searches.append(self)
        self.seen.append(llm_lp)
        return step(self, llm_lp, *args)

    monkeypatch.setattr(joint.JointSearch, "step", recorded)
    torch.manual_seed(0)
    cfg = QFormerConfig(dim=32, heads=4, layers=2, window=4, dropout=0.0)
    model = SpeechLLM(paths["llm"], paths["hubert"], cfg).eval()
    ctc.add_blank(model)
    rows, instruction = read_manifest(manifest)[:5], "Can you transcribe this audio?"
    collate, caps = Collator(model.encoder.feature_extractor), [7, 2, 9, 5, 12]
    lengths = model.encode_speech(collate(rows))[1].sum(1)
    assert len(set(lengths.tolist())) > 1  # the prompts are padded to the longest
    texts, reasons = generate_joint(model, collate(rows), [instruction] * 5, 0.3, beam=3,
                                    max_new_tokens=caps, per_position=30)  # fmt: skip
    together = searches[:]
    for i, (row, cap) in enumerate(zip(rows, caps)):
        (alone,), (why,) = generate_joint(model, collate([row]), [instruction], 0.3, beam=3,
                                          max_new_tokens=cap, per_position=30)  # fmt: skip
        assert (texts[i], reasons[i]) == (alone, why)
        steps = [lp.shape for lp in searches[-1].seen]
        assert [lp.shape for lp in together[i].seen] == steps and len(steps) > 1
        for mine, its_own in zip(together[i].seen, searches[-1].seen):
            torch.testing.assert_close(mine, its_own, atol=1e-4, rtol=1e-4)
    assert any(texts) and "cap" in reasons  # the random LLM writes, and a cap cuts one answer


def test_joint_decoding_is_on_by_default_for_ctc_aligned_projectors_only(paths, tmp_path):
    """A CTC objective marks the projector (meta.json's additions, kept by a stage 2 that loads it);
    --joint-ctc auto (the demo's decoding) decodes such a projector jointly, any other with the LLM
    alone; the paper's recipe decodes with the LLM alone."""
    cfg = QFormerConfig(dim=32, heads=4, layers=2)
    plain, aligned = (SpeechLLM(paths["llm"], paths["hubert"], cfg) for _ in range(2))
    ctc.setup_pretrain(aligned, pretrain.get_args(["--loss", "ctc", "--data", "x"]))
    aligned.save_projector(tmp_path / "aligned")
    plain.save_projector(tmp_path / "plain")
    auto = argparse.Namespace()
    evaluate.decoding_defaults(auto, "demo")
    assert auto.joint_ctc == "auto"
    assert decoding.joint_ctc_weight(auto, plain) == 0.0
    assert decoding.joint_ctc_weight(auto, aligned) == decoding.JOINT_CTC
    paper = evaluate.get_args(["--ckpt", str(tmp_path / "plain"), "--task", "asr"])
    assert (paper.joint_ctc, paper.max_new_tokens, paper.loop_repeats) == (0.0, 200, 0)
    stage2 = SpeechLLM(paths["llm"], paths["hubert"], cfg)
    stage2.load_projector(tmp_path / "aligned")
    assert "ctc" in stage2.additions
    assert not SpeechLLM(paths["llm"], paths["hubert"], cfg).additions


@pytest.mark.parametrize("encoder", ["hubert", "whisper"])
def test_a_ctc_run_in_bf16_without_the_feature_cache_reads_out_at_its_dev_evaluation(
    paths, manifest, tmp_path, capsys, encoder
):
    """The readout at a dev evaluation runs under the run's autocast: in bf16 without the feature
    cache it met the bf16 encoder with float32 audio ("Input type (float) and bias type (BFloat16)").
    Its log-mel stays outside: Whisper's feature extractor computed it in bf16 under autocast and
    failed to hand it to numpy ("Got unsupported ScalarType BFloat16"), at the demo's step 100."""
    line = (
        "--llm {llm} --encoder {%s} --data {data} --dev-data {data} --device cpu --out {out}"
        % encoder
    )
    line += " --loss contrastive+ctc --dtype bfloat16 --no-cache-features --eval-every 1"
    line += " --max-steps 2 --batch-size 4 --qformer-dim 32 --qformer-heads 4 --qformer-layers 2"
    pretrain.main(argv(line, **paths, data=manifest, out=tmp_path / "s1"))
    assert "  read: " in capsys.readouterr().out
