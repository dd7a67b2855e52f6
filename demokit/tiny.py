"""
demokit/tiny.py: tiny random models, built in code, for the tests and for smoke runs
(`--llm tiny --encoder tiny` or `--encoder tiny-whisper`). They are saved like real ones, so they
load through the same from_pretrained path:

- a 10-layer Llama (width 64) with a byte-level tokenizer that has ChatML special tokens and a chat
  template, so the tiny path exercises the same tokenizer and chat-template code as a real LLM;
- a 2-layer HuBERT with HuBERT-large's conv stack (raw waveform in, 50 frames/s);
- a 2-layer Whisper (log-mel in), of which the SpeechLLM keeps the encoder.

Each build_tiny_*(folder) builds its folder once (demokit.build_once) and returns it as a string.
"""

import torch

from demokit import build_once


def build_tiny_tokenizer():
    """A byte-level tokenizer (256 byte tokens, no merges) with ChatML special tokens and chat
    template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    chat_template = (
        "{% for m in messages %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
        chat_template=chat_template,
    )


def build_tiny_llm(folder, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=10,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return save_once(folder, "a tiny random Llama", model, tok)


def build_tiny_hubert(folder, seed=0):
    from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor

    cfg = (
        HubertConfig(  # HuBERT-large's conv stack (320-sample stride = 50 Hz), everything else tiny
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            conv_dim=(32,) * 7,
            feat_extract_norm="layer",
            do_stable_layer_norm=True,
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
            mask_time_prob=0.0,
        )
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = HubertModel(cfg)
    fe = Wav2Vec2FeatureExtractor(
        sampling_rate=16000, do_normalize=True, return_attention_mask=True
    )
    return save_once(folder, "a tiny random HuBERT", model, fe)


def build_tiny_whisper(folder, seed=0):
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    cfg = WhisperConfig(
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=64,
        num_mel_bins=80,
        vocab_size=64,
        max_source_positions=1500,
        max_target_positions=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = WhisperModel(cfg)
    fe = WhisperFeatureExtractor(feature_size=80)
    return save_once(folder, "a tiny random Whisper", model, fe)


def save_once(folder, what, *parts):
    """save_pretrained every part (a model, its tokenizer or feature extractor) into `folder`,
    once."""

    def save(tmp):
        for part in parts:
            part.save_pretrained(tmp)

    return str(build_once(folder, save, what))
