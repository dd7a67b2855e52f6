"""model.py: tiny random models saved to a temp folder and loaded through the same from_pretrained
path users take; windows, masks, hidden states, the chat prompt, checkpoints."""

import pytest
import torch
from tiny import write_manifest

from data import Collator, load_audio, read_manifest, task_examples
from model import ModelError, QFormerConfig, SpeechLLM, WindowQFormer, mask_time


@pytest.fixture(scope="module")
def model(paths):
    torch.manual_seed(0)
    return SpeechLLM(
        paths["llm"], paths["hubert"], QFormerConfig(dim=32, heads=4, layers=2, dropout=0.0)
    )


@pytest.fixture(scope="module")
def batch(model, tmp_path_factory):
    rows = read_manifest(write_manifest(tmp_path_factory.mktemp("data"), n=4))
    return Collator(model.encoder.feature_extractor, model.tokenizer)(rows)


def test_frozen_parts_and_trainable_projector(model):
    assert all(not p.requires_grad for p in model.llm.parameters())
    assert all(not p.requires_grad for p in model.encoder.parameters())
    trainable = dict(model.projector.named_parameters())
    assert "blank" not in trainable  # the paper's projector: extras/ctc.py adds a CTC blank
    assert all(p.requires_grad for p in trainable.values())
    model.train()
    assert not model.llm.training and not model.encoder.model.training and model.projector.training
    model.eval()


def test_windows_shapes_and_masks():
    torch.manual_seed(0)
    q = WindowQFormer(
        enc_dim=24,
        llm_dim=40,
        cfg=QFormerConfig(dim=16, heads=2, layers=1, queries=3, window=5, dropout=0.0),
    )
    frames = torch.randn(3, 12, 24)
    lengths = torch.tensor([12, 6, 0])  # full, 2 windows valid of 3, fully padded
    mask = torch.arange(12)[None] < lengths[:, None]
    out, out_mask = q(frames, mask)
    assert out.shape == (3, 3 * 3, 40)  # ceil(12 / 5) = 3 windows x 3 queries
    assert out_mask.tolist()[0] == [True] * 9
    assert out_mask.tolist()[1] == [True] * 6 + [False] * 3  # frames 0-5 touch windows 0 and 1
    assert out_mask.tolist()[2] == [False] * 9  # a fully padded window is masked...
    assert torch.isfinite(out).all()  # ...and gives no NaN


def test_padding_frames_do_not_change_valid_outputs():
    torch.manual_seed(0)
    q = WindowQFormer(
        enc_dim=8,
        llm_dim=8,
        cfg=QFormerConfig(dim=16, heads=2, layers=2, queries=2, window=4, dropout=0.0),
    ).eval()
    frames = torch.randn(1, 10, 8)
    mask = torch.ones(1, 10, dtype=torch.bool)
    alone, _ = q(frames, mask)
    padded = torch.cat([frames, 100 * torch.randn(1, 5, 8)], 1)  # garbage in the padding
    out, out_mask = q(padded, torch.cat([mask, torch.zeros(1, 5, dtype=torch.bool)], 1))
    torch.testing.assert_close(out[:, : alone.shape[1]], alone)
    assert out_mask[0, alone.shape[1] :].sum() == 0


def test_time_mask_zeroes_spans_of_valid_frames_only():
    torch.manual_seed(0)
    frames = torch.randn(64, 300, 4) + 10  # no frame is zero by chance
    lengths = torch.randint(100, 301, (64,))
    mask = torch.arange(300)[None] < lengths[:, None]
    out = mask_time(frames, mask, 0.1)
    zeroed = (out == 0).all(-1)
    assert not (zeroed & ~mask).any()  # the padding is left as it is...
    assert torch.equal(out[~zeroed], frames[~zeroed])  # ...and so are the kept frames
    share = (zeroed.sum(-1) / lengths).mean()
    assert 0.08 < share < 0.12  # 10% in expectation (a little less where spans overlap)
    for row in (
        zeroed
    ):  # every masked stretch is one span of 10 frames, or overlapping spans: never shorter
        edges = torch.diff(torch.cat([torch.tensor([0]), row.int(), torch.tensor([0])]))
        starts, ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
        assert ((ends - starts) >= 10).all()
    short = torch.ones(1, 8, dtype=torch.bool)  # shorter than a span: nothing to mask
    assert torch.equal(mask_time(frames[:1, :8], short, 0.5), frames[:1, :8])


def test_time_mask_acts_in_training_only():
    torch.manual_seed(0)
    cfg = QFormerConfig(dim=16, heads=2, layers=1, queries=2, window=4, dropout=0.0, time_mask=0.5)
    q = WindowQFormer(enc_dim=8, llm_dim=8, cfg=cfg)
    frames, mask = torch.randn(2, 40, 8), torch.ones(2, 40, dtype=torch.bool)
    q.eval()
    torch.testing.assert_close(q(frames, mask)[0], q(frames, mask)[0])
    q.train()
    assert not torch.allclose(q(frames, mask)[0], q.eval()(frames, mask)[0])


def test_paper_projector_size():
    q = WindowQFormer(
        enc_dim=1024, llm_dim=4096
    )  # HuBERT-large -> Llama-3.1-8B, the paper's defaults
    assert abs(sum(p.numel() for p in q.parameters()) / 1e6 - 42.5) < 0.2  # the paper's "42.5M"


def test_hidden_states_match_transformers(model, batch):
    ids, mask = batch["text_ids"], batch["text_mask"]
    embeds = model.embed_tokens(ids)
    with torch.no_grad():
        ref = model.llm(
            inputs_embeds=embeds, attention_mask=mask.long(), output_hidden_states=True
        ).hidden_states
        ours = model.hidden_states(embeds, mask, [0, 5, 10])
        early = model.hidden_states(embeds, mask, [0, 3])  # stops after layer 3
    assert len(ref) == model.num_layers + 1 == 11
    for got, i in zip(ours, [0, 5, 10]):
        torch.testing.assert_close(got, ref[i])
    torch.testing.assert_close(early[1], ref[3])


def test_speech_embeddings_and_feature_cache(model, batch):
    model.eval()
    with torch.no_grad():
        speech, mask = model.encode_speech(batch)
        model.feature_cache = {}
        first, _ = model.encode_speech(batch)  # fills the cache
        cached, cached_mask = model.encode_speech(
            {**batch, "speech_inputs": torch.zeros_like(batch["speech_inputs"])}
        )
    model.feature_cache = None
    assert speech.shape[:2] == mask.shape and speech.shape[-1] == model.llm.config.hidden_size
    assert torch.equal(cached_mask, mask)
    # valid positions only: fully padded windows attend to whatever padding they hold, and are
    # masked
    torch.testing.assert_close(
        first[mask], speech[mask], atol=2e-3, rtol=2e-3
    )  # the cache keeps fp16 frames
    torch.testing.assert_close(cached[mask], speech[mask], atol=2e-3, rtol=2e-3)


def test_whisper_encoder_true_length_is_batch_invariant(paths, tmp_path):
    """The encoder runs on each clip's true length: batch padding must not change a clip's
    frames."""
    model = SpeechLLM(
        paths["llm"], paths["whisper"], QFormerConfig(dim=32, heads=4, layers=1, dropout=0.0)
    )
    rows = read_manifest(write_manifest(tmp_path, n=3, seed=3))
    batch = Collator(model.encoder.feature_extractor, model.tokenizer)(rows)
    frames, mask = model.encoder(batch["speech_inputs"], batch["speech_input_mask"])
    for i, row in enumerate(rows):
        mel_frames = len(load_audio(row["audio"])) // 160  # 100 log-mel frames per second
        assert batch["speech_input_mask"][i].sum() == mel_frames
        assert mask[i].sum() == (mel_frames + 1) // 2  # conv2's stride 2 -> 50 frames per second
        alone, _ = model.encoder(
            batch["speech_inputs"][i : i + 1, :, :mel_frames],
            batch["speech_input_mask"][i : i + 1, :mel_frames],
        )
        torch.testing.assert_close(frames[i, : mask[i].sum()], alone[0], atol=1e-5, rtol=1e-5)


def test_chat_batch_supervises_only_the_answer(model, batch):
    examples = task_examples(batch["examples"], "asr")
    speech, mask = model.encode_speech(batch)
    embeds, attn, labels = model.chat_batch(
        speech, mask, [e["instruction"] for e in examples], [e["target"] for e in examples]
    )
    eot = model.prompt_ids("x")[2]
    for i, e in enumerate(examples):
        supervised = labels[i][labels[i] != -100].tolist()
        assert supervised == model.tokenizer(e["target"], add_special_tokens=False).input_ids + [
            eot
        ]
        assert attn[i, : int(attn[i].sum())].all()  # right padding in training
    # generation: left padding, every prompt ends at the same (last) position
    embeds, attn, _ = model.chat_batch(speech, mask, [e["instruction"] for e in examples])
    assert attn[:, -1].all() and not attn[:, 0].all()


def test_generate_stops_at_end_of_turn(model, batch):
    out, why = model.generate(
        batch, ["Can you transcribe this audio?"] * len(batch["keys"]), max_new_tokens=4
    )
    assert len(out) == len(batch["keys"]) and all(isinstance(s, str) for s in out)
    assert set(why) <= {"end", "cap"}


def test_projector_checkpoint_roundtrip_and_mismatch(model, paths, tmp_path):
    model.save_projector(tmp_path / "ckpt", step=7)
    other = SpeechLLM.from_checkpoint(tmp_path / "ckpt")[0]
    for a, b in zip(model.projector.state_dict().values(), other.projector.state_dict().values()):
        assert torch.equal(a, b)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "meta.json",
        "projector.safetensors",
    ]
    masked = SpeechLLM(
        paths["llm"], paths["hubert"], QFormerConfig(dim=32, heads=4, layers=2, time_mask=0.05)
    )
    masked.load_projector(tmp_path / "ckpt")  # dropout and time masking are no part of the shape
    wider = SpeechLLM(paths["llm"], paths["hubert"], QFormerConfig(dim=64, heads=4, layers=2))
    with pytest.raises(ModelError, match="qformer"):
        wider.load_projector(tmp_path / "ckpt")
    with pytest.raises(ModelError, match="No projector checkpoint"):
        model.load_projector(tmp_path / "nowhere")


def test_missing_model_says_what_and_why(tmp_path, monkeypatch):
    monkeypatch.setattr(
        "huggingface_hub.constants.HF_HUB_OFFLINE", True
    )  # no network in CI either way
    with pytest.raises(
        ModelError,
        match="(?s)Cannot load 'meta-llama/Llama-3.1-8B-Instruct'.*login.*offline CPU demo",
    ):
        SpeechLLM("llama", "hubert")
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    with pytest.raises(ModelError, match="(?s)Could not load the LLM's tokenizer.*empty-folder"):
        SpeechLLM(str(empty), "tiny")


def test_lm_loss_equals_cross_entropy_over_full_logits(model):
    """lm_loss runs the LM head only at supervised positions; the value must be the usual one."""
    torch.manual_seed(0)
    embeds, mask = torch.randn(2, 12, 64), torch.ones(2, 12, dtype=torch.bool)
    mask[1, 9:] = False
    labels = torch.full((2, 12), -100)
    labels[0, 8:11], labels[1, 5:8] = torch.tensor([5, 6, 7]), torch.tensor([9, 10, 257])
    with torch.no_grad():
        logits = model.llm(inputs_embeds=embeds, attention_mask=mask.long()).logits
        reference = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
        )
        torch.testing.assert_close(model.lm_loss(embeds, mask, labels), reference)


def test_lm_loss_with_a_shared_prefix_cached_is_the_same(model):
    """lm_loss(prefix=k) computes the first k positions once and lets every sequence attend to that
    copy: the loss and the gradient into the (speech) embeddings must not change."""
    instructions = ["Can you transcribe this audio?"] * 3
    prefix = model.shared_prefix(instructions)
    assert prefix == len(model.prompt_ids(instructions[0])[0]) > 0
    assert (
        model.shared_prefix(["a"]) == prefix
    )  # the text before the speech does not depend on the instruction
    torch.manual_seed(0)
    speech = torch.randn(3, 7, 64, requires_grad=True)
    speech_mask = torch.ones(3, 7, dtype=torch.bool)
    speech_mask[1, 5:], speech_mask[2, 2:] = False, False
    losses, grads = [], []
    for k in (0, prefix):
        embeds, mask, labels = model.chat_batch(
            speech, speech_mask, instructions, ["ab", "a longer one", "c"]
        )
        losses.append(model.lm_loss(embeds, mask, labels, prefix=k))
        grads.append(torch.autograd.grad(losses[-1], speech)[0])
    torch.testing.assert_close(losses[1], losses[0])
    torch.testing.assert_close(grads[1], grads[0])
