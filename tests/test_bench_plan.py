"""The planner's CPU check (scripts/plan.py): its prediction of a step's peak memory is within 15%
of the peak measured for tiny models of the paper's architectures (a 12-layer Llama, a HuBERT with
HuBERT-large's conv stack) running the real steps: stage 1's speech side (SpeechLLM.speech_states +
the contrastive loss + backward) and stage 2's answer loss (finetune.answer_loss + backward), with
and without gradient checkpointing. Both sides compare the same thing: the step's peak above the
resting weights (the projector's gradients already there, as from the second micro-step on), under
the same bf16 autocast (CUDA's, as the planner measures).

    python -m pytest -q tests/test_bench_plan.py -s   # -s prints each case's figures
    python -m pytest -q -m slow tests/test_bench_plan.py -s   # the LLM phase at the paper's widths
"""

import dataclasses

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import AutoConfig

import finetune
from contrastive import select_layers
from contrastive_fast import contrastive_loss
from data import INSTRUCTIONS, Collator
from model import QFormerConfig, SpeechLLM
from scripts import plan

TOLERANCE = 0.15
QFORMER = QFormerConfig(dim=32, heads=2, layers=2)  # small, so that the LLM's share is not drowned
DTYPE, CPU = torch.bfloat16, torch.device("cpu")
CLIPS, SECONDS = (
    3,
    4.0,
)  # the checked batch: other shapes than the calibration's (1 x 256 positions)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Tiny random models of the paper's architectures, saved and loaded as real ones: a Llama (8
    layers, width 128, GQA, a 4096-row vocabulary so that the LM head can outgrow the layers, the
    tests' byte-level tokenizer) and a HuBERT with HuBERT-large's conv stack at 16 channels. Shaped
    so that each phase sets the peak somewhere: the LLM without checkpointing, the encoder with it,
    the LM head with long answers. (The shared tiny models of conftest.py have an LLM too narrow for
    that: their encoder's peak would set every case.)"""
    from transformers import (
        HubertConfig,
        HubertModel,
        LlamaConfig,
        LlamaForCausalLM,
        Wav2Vec2FeatureExtractor,
    )

    from demokit.tiny import build_tiny_tokenizer

    folder = tmp_path_factory.mktemp("plan-models")
    tok = build_tiny_tokenizer()
    llm = LlamaConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=12,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    hubert = HubertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(8,) * 7, feat_extract_norm="layer", do_stable_layer_norm=True,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, mask_time_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(llm).save_pretrained(folder / "llm")
    tok.save_pretrained(folder / "llm")
    HubertModel(hubert).save_pretrained(folder / "hubert")
    Wav2Vec2FeatureExtractor(return_attention_mask=True).save_pretrained(folder / "hubert")
    return {"llm": str(folder / "llm"), "hubert": str(folder / "hubert")}


@pytest.fixture(scope="module")
def calibrations(paths):
    """queries -> the planner's calibration for a projector with that many queries per window."""
    done = {}

    def get(queries):
        if queries not in done:
            torch.manual_seed(0)
            configs = (AutoConfig.from_pretrained(paths[k]) for k in ("llm", "hubert"))
            qformer = dataclasses.replace(QFORMER, queries=queries)
            done[queries] = plan.Calibration(*configs, qformer, DTYPE, CPU, progress=lambda s: None)
        return done[queries]

    return get


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    out = []
    for i in range(
        CLIPS
    ):  # the longest allowed, one a little shorter: a padded batch, as real ones
        seconds = SECONDS - (0.25 if i == CLIPS - 1 else 0)
        wave = 0.1 * rng.standard_normal(int(seconds * 16000)).astype("float32")
        sf.write(folder / f"{i}.wav", wave, 16000)
        out.append(
            {"audio": str(folder / f"{i}.wav"), "key": f"clip{i}", "text": f"{i} anna meets ben"}
        )
    return out


def real_model(paths, checkpointing, queries=4):
    torch.manual_seed(0)
    qformer = dataclasses.replace(QFORMER, queries=queries)
    model = SpeechLLM(paths["llm"], paths["hubert"], qformer, DTYPE)
    if checkpointing:
        model.enable_grad_checkpointing()
    return model.train()


def measured_peak(step):
    """The real step once (the projector's gradients come to exist), then its peak."""
    step()
    return plan.live_bytes(step, CPU)[0]


def check(name, predicted, measured):
    error = predicted["extra"] / measured - 1
    mib = lambda n: f"{n / 2**20:.2f} MiB"  # noqa: E731
    llm = predicted["front_live"] + predicted["llm"]
    print(
        f"\n{name}: predicted {mib(predicted['extra'])} (front {mib(predicted['front_peak'])}, "
        f"LLM phase {mib(llm)}), measured {mib(measured)} ({error:+.1%})"
    )
    assert abs(error) <= TOLERANCE, f"{name}: the planner is {error:+.1%} off"


@pytest.mark.parametrize("queries", [4, 8])  # 8: twice the LLM positions, which then set the peak
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_stage1_prediction_within_15_percent(paths, calibrations, rows, checkpointing, queries):
    model = real_model(paths, checkpointing, queries)
    batch = Collator(model.encoder.feature_extractor, model.tokenizer)(rows)
    layers = select_layers("all", model.num_layers)
    text = torch.randn(len(layers), CLIPS, model.llm.config.hidden_size)  # the text cache's

    def step():
        with plan.autocast(CPU, DTYPE):
            states, pool_mask, _, _ = model.speech_states(batch, layers)
            loss = contrastive_loss(None, None, states, pool_mask, text_pooled=text)[0]
        loss.backward()

    shape = plan.Batch("", CLIPS, SECONDS)
    predicted = plan.step_memory(calibrations(queries), 1, shape, checkpointing)
    check(f"stage 1, {queries} queries, {'checkpointed' if checkpointing else 'plain'}", predicted,
          measured_peak(step))  # fmt: skip


@pytest.mark.parametrize("answer", ["short", "long"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_stage2_prediction_within_15_percent(paths, calibrations, rows, checkpointing, answer):
    model = real_model(paths, checkpointing)
    target = "anna" if answer == "short" else "anna meets ben at nine in paris on monday " * 4
    examples = [{**row, "instruction": INSTRUCTIONS["asr"], "target": target} for row in rows]
    batch = Collator(model.encoder.feature_extractor)(examples)

    def step():
        with plan.autocast(CPU, DTYPE):
            loss = finetune.answer_loss(model, batch)
        loss.backward()

    before, after, _ = model.prompt_ids(INSTRUCTIONS["asr"])
    shape = plan.Batch(
        "", CLIPS, SECONDS, len(before) + len(after), len(model.answer_ids(target)) + 1
    )
    predicted = plan.step_memory(calibrations(4), 2, shape, checkpointing)
    check(f"stage 2, {answer} answers, {'checkpointed' if checkpointing else 'plain'}",
          predicted, measured_peak(step))  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_full_width_llm_phase_within_15_percent(checkpointing):
    """The same at the paper's widths (slow, ~4 GB of memory): Llama-3.1-8B's layers (4 of them; a
    1024-row vocabulary, as stage 1 never runs the LM head), the paper's projector, HuBERT-large
    with 2 layers; 2 clips of 20 s. The encoder's frames come from the feature cache, so that the
    step measured is the LLM phase the prediction adds to what the front leaves live."""
    from transformers import AutoModel, AutoModelForCausalLM

    llm_config, encoder_config = plan.model_config("llama"), plan.model_config("hubert")
    llm_config.vocab_size, llm_config.num_hidden_layers = 1024, 4
    encoder_config.num_hidden_layers = 2
    torch.manual_seed(0)
    cal = plan.Calibration(llm_config, encoder_config, QFormerConfig(), DTYPE, CPU, progress=print)
    Encoder, Model = plan.bare_models()
    encoder = Encoder(AutoModel.from_config(encoder_config, dtype=DTYPE), whisper=False)
    llm = AutoModelForCausalLM.from_config(llm_config, dtype=DTYPE)
    model = Model(llm, encoder, cal.model.projector).train()
    del cal.model.llm  # the calibration's copy: no longer needed
    if checkpointing:
        model.enable_grad_checkpointing()
    clips, seconds = 2, 20.0
    inputs = torch.randn(clips, int(seconds * 16000))
    mask = torch.ones(inputs.shape, dtype=torch.bool)
    mask[-1, -1600:] = False  # a padded batch
    batch = {"speech_inputs": inputs, "speech_input_mask": mask, "keys": ["a", "b"]}
    model.feature_cache = {}
    layers = select_layers("all", model.num_layers)
    text = torch.randn(len(layers), clips, llm_config.hidden_size)

    def step():
        with plan.autocast(CPU, DTYPE):
            states, pool_mask, _, _ = model.speech_states(batch, layers)
            loss = contrastive_loss(None, None, states, pool_mask, text_pooled=text)[0]
        loss.backward()

    predicted = plan.step_memory(cal, 1, plan.Batch("", clips, seconds), checkpointing)
    predicted["extra"] = predicted["front_live"] + predicted["llm"]  # the encoder is cached
    check(f"full width, 4 layers, {'checkpointed' if checkpointing else 'plain'}", predicted,
          measured_peak(step))  # fmt: skip
