"""
model.py: the SpeechLLM of the paper, built bottom-up in one file.

    waveform --(frozen speech encoder)--> frames at 50 Hz, [B, T, D_enc]
             --(trainable windowed Q-Former)--> LLM input embeddings, [B, W*Q, D_llm]
             --(frozen causal LLM)--> hidden states / next-token predictions

In the paper only the projector (the Q-Former in the middle) trains; the encoder and the LLM are
loaded from Hugging Face ids or local folders through transformers' Auto classes and stay frozen.
(This project's additions, in extras/, wrap the model from outside: e.g. extras/lora.py trains
low-rank updates inside the LLM; model.additions lists what they changed.)

    from model import SpeechLLM
    # the paper: Llama-3.1-8B-Instruct + HuBERT-large
    m = SpeechLLM(llm="llama", encoder="hubert")
    m = SpeechLLM(llm="/path/to/any/causal/lm", encoder="/path/to/any/hubert/or/whisper")

Sections: speech encoder | windowed Q-Former | SpeechLLM (speech -> embeddings, text -> embeddings,
stage 1's two sides through the frozen LLM, the chat prompt and the answer loss, greedy generation,
checkpoints).
"""

import contextlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    StoppingCriteriaList,
)

import contrastive
from common import (
    ModelError,
    check_checkpoint,
    load_pretrained,
    print0,
    read_meta,
    resolve_model,
    unwrap,
    write_atomically,
)


def onto(device):
    """from_pretrained's arguments that load the weights straight onto a CUDA device."""
    device = torch.device(device) if device is not None else None
    return {"device_map": str(device)} if device is not None and device.type == "cuda" else {}


# -----------------------------------------------------------------------------
# The frozen speech encoder: 16 kHz audio features -> frames at 50 Hz, with a validity mask.


class SpeechEncoder(nn.Module):
    """A frozen HF encoder of either family:
    - HuBERT / wav2vec2 style: raw waveform in (`input_values`), conv stack with a 320-sample
      stride;
    - Whisper style: log-mel in (`input_features`, 100 frames/s), two convs, the second with
      stride 2.
    Both give 50 frames per second. The batch comes from data.py's collator (feature extractor
    output)."""

    def __init__(self, name_or_path, dtype=torch.float32, device=None):
        super().__init__()
        self.name = name_or_path
        self.feature_extractor = load_pretrained(
            AutoFeatureExtractor, name_or_path, "speech encoder's feature extractor"
        )
        config = load_pretrained(AutoConfig, name_or_path, "speech encoder")
        self.is_whisper = config.model_type == "whisper"
        self.max_seconds = 30.0 if self.is_whisper else None  # Whisper's positions end at 30 s
        model = load_pretrained(
            AutoModel, name_or_path, "speech encoder", dtype=dtype, **onto(device)
        )
        # Whisper: keep the encoder, drop the decoder
        self.model = model.encoder if self.is_whisper else model
        self.dim = config.d_model if self.is_whisper else config.hidden_size
        self.model.requires_grad_(False)
        self.model.eval()

    def train(self, mode=True):
        # Always eval: HuBERT's LayerDrop would change the number of hidden states, dropout adds
        # noise.
        return super().train(False)

    @torch.no_grad()
    def forward(self, inputs, input_mask):
        """inputs: [B, samples] waveform or [B, 80, mel frames] log-mel; input_mask:
        [B, samples|mel frames] bool.
        Returns frames [B, T, D] and a bool mask [B, T] of valid frames."""
        if self.is_whisper:
            return self._whisper_true_length(inputs, input_mask)
        out = self.model(inputs, attention_mask=input_mask.long()).last_hidden_state
        lengths = self.model._get_feat_extract_output_lengths(input_mask.sum(-1))
        return out, torch.arange(out.shape[1], device=out.device)[None] < lengths[:, None]

    def _whisper_true_length(self, mel, mel_mask):
        # HF's WhisperEncoder insists on 30 s of (mostly padded) input: many times the work for a
        # short clip, and the padding frames would dominate. So we run its own modules on the clip's
        # true length, masking the batch padding in attention and zeroing it after each conv so a
        # clip's frames do not depend on what it was batched with.
        enc = self.model
        x = F.gelu(enc.conv1(mel * mel_mask[:, None, :])) * mel_mask[:, None, :]
        mask = mel_mask[:, ::2]  # conv2 has stride 2: 100 mel frames/s -> 50 frames/s
        x = F.gelu(enc.conv2(x)).transpose(1, 2) * mask[:, :, None]
        x = x + enc.embed_positions.weight[: x.shape[1]]
        additive = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(
            ~mask, torch.finfo(x.dtype).min
        )
        for layer in enc.layers:
            x = layer(x, attention_mask=additive[:, None, None, :])
            x = x[0] if isinstance(x, tuple) else x
        return enc.layer_norm(x), mask


# -----------------------------------------------------------------------------
# The projector: a window-level Q-Former (SALMONN style), the only trainable part.


@dataclass
class QFormerConfig:
    dim: int = 768  # Q-Former width (BERT-base, as the paper)
    heads: int = 12  # attention heads
    layers: int = 4  # blocks of self-attention + cross-attention + FFN
    queries: int = 4  # learned query tokens per window -> LLM tokens per window
    # frames per window: round(50 Hz * 1/3 s) = 17 -> 4 tokens per 0.34 s (~11.8 tokens/s)
    window: int = 17
    dropout: float = 0.1  # BERT's hidden and attention dropout
    # add a learned position-within-window to the frames (not in the paper)
    window_pos: bool = False
    # in training, the share of encoder frames zeroed in 0.2 s spans (mask_time)
    time_mask: float = 0.0


class QFormerBlock(nn.Module):
    """One post-LN BERT block for the queries: self-attention among the queries, cross-attention
    from the queries to the window's encoder frames (keys/values keep the encoder width), then a
    feed-forward net."""

    def __init__(self, cfg, enc_dim):
        super().__init__()
        d = cfg.dim
        self.self_attn = nn.MultiheadAttention(d, cfg.heads, dropout=cfg.dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(
            d, cfg.heads, dropout=cfg.dropout, batch_first=True, kdim=enc_dim, vdim=enc_dim
        )
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.norms = nn.ModuleList([nn.LayerNorm(d, eps=1e-12) for _ in range(3)])
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, q, frames, key_padding_mask):
        q = self.norms[0](q + self.drop(self.self_attn(q, q, q, need_weights=False)[0]))
        q = self.norms[1](
            q
            + self.drop(
                self.cross_attn(
                    q, frames, frames, key_padding_mask=key_padding_mask, need_weights=False
                )[0]
            )
        )
        return self.norms[2](q + self.drop(self.ffn(q)))


def mask_time(frames, mask, share, span=10):
    """SpecAugment's time masking on the encoder frames [B, T, D]: zero spans of `span` frames
    (0.2 s) at random starts, about `share` of each utterance's valid frames (spans may overlap). A
    regulariser: the projector cannot lean on any one stretch of the audio. HuBERT masks its own
    features so in train mode (mask_time_prob 0.05, mask_time_length 10), which the authors' trainer
    probably leaves on; here the encoder always runs in eval mode (and its frames may come from the
    cache), so this flag is the only masking."""
    keep = torch.ones(frames.shape[:2], dtype=torch.bool, device=frames.device)
    for row, length in enumerate(mask.sum(-1).tolist()):
        if length <= span:
            continue
        spans = int(share * length / span + torch.rand(()).item())  # stochastic rounding, as HF's
        for start in torch.randint(0, length - span + 1, (spans,)).tolist():
            keep[row, start : start + span] = False
    return frames * keep[:, :, None]


REGULARISERS = ("dropout", "time_mask")  # QFormerConfig fields that only act in training


class WindowQFormer(nn.Module):
    """Encoder frames [B, T, D_enc] -> LLM input embeddings [B, W*Q, D_llm], W = ceil(T / window).

    The time axis is cut into non-overlapping windows; every window is read independently by the
    same learned queries, so the output length grows linearly with the audio (unlike a global
    Q-Former)."""

    def __init__(self, enc_dim, llm_dim, cfg=None):
        super().__init__()
        self.cfg = cfg = cfg or QFormerConfig()
        self.ln_speech = nn.LayerNorm(enc_dim)
        self.window_pos = nn.Parameter(torch.zeros(cfg.window, enc_dim)) if cfg.window_pos else None
        self.queries = nn.Parameter(torch.randn(cfg.queries, cfg.dim) * 0.02)
        # BERT's embedding LayerNorm, applied to the queries
        self.query_ln = nn.LayerNorm(cfg.dim, eps=1e-12)
        self.query_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([QFormerBlock(cfg, enc_dim) for _ in range(cfg.layers)])
        self.out = nn.Linear(cfg.dim, llm_dim)

    def forward(self, frames, mask):
        if self.training and self.cfg.time_mask > 0:
            frames = mask_time(frames, mask, self.cfg.time_mask)
        B, T, D = frames.shape
        k, Q = self.cfg.window, self.cfg.queries
        W = -(-T // k)  # ceil
        # zero-pad the end to a multiple of k
        frames = F.pad(self.ln_speech(frames), (0, 0, 0, W * k - T))
        mask = F.pad(mask, (0, W * k - T), value=False)
        frames = frames.view(B * W, k, D)
        if self.window_pos is not None:
            frames = frames + self.window_pos
        mask = mask.view(B * W, k)
        window_valid = mask.any(-1)  # a window is valid iff it holds at least one valid frame
        # A fully padded window would give an all -inf softmax (NaN); let it attend to its (zero)
        # frames instead: its output is masked out anyway.
        key_padding_mask = ~mask & window_valid[:, None]
        q = self.query_drop(self.query_ln(self.queries)).expand(B * W, Q, -1)
        for block in self.blocks:
            q = block(q, frames, key_padding_mask)
        out = self.out(q).view(B, W * Q, -1)
        return out, window_valid.view(B, W).repeat_interleave(Q, dim=1)


# -----------------------------------------------------------------------------
# The SpeechLLM: what pretrain.py, finetune.py and evaluate.py call.

AUDIO = "<|audio|>"  # placeholder in the chat prompt, replaced by the projector's output embeddings
# the instruction's place while the chat template is rendered: the instruction itself is tokenized
# apart, as plain text (prompt_ids)
INSTRUCTION = "<|instruction|>"


class SpeechLLM(nn.Module):
    def __init__(
        self,
        llm="llama",
        encoder="hubert",
        qformer=None,
        dtype=torch.float32,
        sink_token=False,
        resolve=resolve_model,
        device=None,
    ):
        """llm / encoder: a preset name ('llama', 'hubert', the demo's 'smollm2', 'whisper-tiny',
        'tiny'), a hub id or a local folder, kept as given (the checkpoint's meta.json records it).
        resolve(name, kind) -> the hub id or folder to load (common.resolve_model).
        sink_token: put the LLM's BOS token in front of BOTH the speech and the text sequence in
        contrastive training (see pretrain.py --sink-token); the paper does not (False).
        device: a CUDA device loads the frozen models straight onto it (no copy in host memory)."""
        super().__init__()
        self.llm_name, self.encoder_name = llm, encoder
        llm_path = resolve(llm, "llm")
        self.tokenizer = load_pretrained(AutoTokenizer, llm_path, "LLM's tokenizer")
        self.llm = load_pretrained(
            AutoModelForCausalLM, llm_path, "LLM", dtype=dtype, **onto(device)
        )
        self.encoder = SpeechEncoder(resolve(encoder, "encoder"), dtype, device)
        self.llm.requires_grad_(False)
        self.llm.eval()
        self.num_layers = self.llm.config.num_hidden_layers
        self.projector = WindowQFormer(self.encoder.dim, self.llm.config.hidden_size, qformer)
        self.sink_token = sink_token
        self.feature_cache = None  # key -> frozen encoder frames (the scripts' --cache-features)
        # what this project's additions (extras/) changed in this model, e.g. {"lora": {...}}; empty
        # for the paper; saved in meta.json, so that from_checkpoint rebuilds the same model
        self.additions = {}
        self._template = None  # the chat template around the audio and the instruction (template)
        # a system turn before the user's (the paper: the authors' sentence; None: the template's own)
        self.system_prompt = None
        self.grad_checkpointing = False

    def enable_grad_checkpointing(self):
        """Keep only each decoder layer's input for the backward pass and recompute the rest there
        (the authors' setting): a frozen 8B LLM's activations are most of a step's memory, and this
        trades them for a second forward of the layers the speech side goes through."""
        self.llm.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        for layer in self.llm.get_decoder().layers:
            # transformers checkpoints a layer only in training mode; the layer's own modules stay in
            # eval mode (no dropout), only this flag changes
            layer.training = True
        self.grad_checkpointing = True

    def train(self, mode=True):
        # Only the projector ever changes mode: the frozen encoder and LLM stay in eval (no
        # dropout).
        self.training = mode
        self.projector.train(mode)
        return self

    # --- speech and text -> LLM input embeddings ------------------------------------------------

    def speech_frames(self, batch):
        """Frozen encoder frames for a collated batch, from the feature cache where possible."""
        keys, cache = batch.get("keys"), self.feature_cache
        if cache is None or keys is None:
            return self.encoder(batch["speech_inputs"], batch["speech_input_mask"])
        for i, key in enumerate(keys):
            if key not in cache:
                # each clip alone, without padding, so its frames never depend on what it was batched
                # with (a resumed run then reads exactly the values an uninterrupted one would)
                n = int(batch["speech_input_mask"][i].sum())
                inputs, mask = (
                    batch["speech_inputs"][i : i + 1, ..., :n],
                    batch["speech_input_mask"][i : i + 1, :n],
                )
                frames, frame_mask = self.encoder(inputs, mask)
                cache[key] = frames[0, : frame_mask[0].sum()].to(
                    "cpu", torch.float16
                )  # fp16: half the size
        device = batch["speech_inputs"].device
        seqs = [cache[key] for key in keys]
        lengths = torch.tensor([len(s) for s in seqs], device=device)
        frames = nn.utils.rnn.pad_sequence(seqs, batch_first=True).to(device, torch.float32)
        return frames, torch.arange(frames.shape[1], device=device)[None] < lengths[:, None]

    def load_feature_cache(self, path):
        """Keep frozen encoder outputs in memory (and, with a path, on disk across runs: tensors only).
        A file that cannot be read is only a copy: it is rebuilt, with a warning."""
        self.feature_cache = {}
        if path and Path(path).exists():
            try:
                cache = torch.load(path, weights_only=True)
                assert isinstance(cache, dict) and all(torch.is_tensor(v) for v in cache.values())
                self.feature_cache = cache
            except Exception as e:  # damaged, truncated, or not a cache at all
                print0(
                    f"warning: the feature cache {path} cannot be read ({type(e).__name__}): rebuilt"
                )
        self._cached_on_disk = len(self.feature_cache)

    def save_feature_cache(self, path):
        if (
            path
            and self.feature_cache is not None
            and len(self.feature_cache) > self._cached_on_disk
        ):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, lambda tmp: torch.save(self.feature_cache, tmp))
            self._cached_on_disk = len(self.feature_cache)

    def encode_speech(self, batch):
        """Collated batch -> (speech embeddings [B, S, D_llm], mask [B, S]). Gradients reach the
        projector."""
        frames, mask = self.speech_frames(batch)
        return self.projector(frames.float(), mask)

    def embed_tokens(self, ids):
        return self.llm.get_input_embeddings()(ids)

    def with_sink(self, embeds, mask):
        """One side of the contrastive pair as the LLM reads it: (embeds, attention mask, pool
        mask). Without sink_token (the paper) that is the input itself. With it, the BOS embedding
        goes in front of every sequence: its position takes the LLM's "attention sink" (huge
        activations in middle layers), and since it is the same token on both sides it carries no
        information, so the pool mask leaves it out."""
        if not self.sink_token:
            return embeds, mask, mask
        bos = self.embed_tokens(torch.tensor([self.tokenizer.bos_token_id], device=embeds.device))
        embeds = torch.cat([bos.to(embeds.dtype).expand(len(embeds), 1, -1), embeds], dim=1)
        mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        return embeds, mask, torch.cat([torch.zeros_like(mask[:, :1]), mask[:, 1:]], dim=1)

    def match_embedding_rms(self):
        """Scale the projector's output layer so its outputs start at the RMS of the LLM's own token
        embeddings (PyTorch's default init gives ~0.6, while e.g. SmolLM2's embeddings have RMS
        ~0.14; inputs far off that scale land in a region of the frozen LLM it has never seen)."""
        target = self.llm.get_input_embeddings().weight.float().pow(2).mean().sqrt()
        out = unwrap(self.projector).out
        with torch.no_grad():
            # Kaiming-uniform init has weight variance 1/(3 fan_in); inputs are LayerNorm-ed
            # (RMS ~1).
            out.weight.mul_(target / math.sqrt(1 / 3))
            out.bias.zero_()

    # --- the frozen LLM as a feature extractor: selected hidden states, no LM head ----------------

    def hidden_states(self, embeds, mask, layers):
        """Run the frozen LLM on inputs_embeds and return the hidden states at `layers` as one
        tensor [len(layers), B, T, D]. Index 0 = the input embeddings, index k = output of decoder
        layer k, index num_layers = after the final norm (transformers' `hidden_states` convention).
        No LM head, and the forward stops after the highest layer asked for."""
        if max(layers) == 0:
            return embeds[None]  # the "emb" loss needs no LLM pass at all
        base = self.llm.get_decoder()  # the transformer without the LM head
        top, L = max(layers), self.num_layers
        saved = {0: embeds}

        def keep(i):
            return lambda module, args, out: saved.__setitem__(
                i, out[0] if isinstance(out, tuple) else out
            )

        hooks = [base.layers[i - 1].register_forward_hook(keep(i)) for i in layers if 0 < i < L]
        if L in layers:
            hooks.append(base.norm.register_forward_hook(keep(L)))
        all_layers = base.layers
        # a causal LM in depth: layer k never depends on later layers
        base.layers = all_layers[:top]
        try:
            base(inputs_embeds=embeds, attention_mask=mask.long(), use_cache=False)
        finally:
            base.layers = all_layers
            for h in hooks:
                h.remove()
        return torch.stack([saved[i] for i in layers])

    # --- stage 1: both sides of a contrastive pair through the frozen LLM -------------------------

    def speech_states(self, batch, layers):
        """The speech side: frozen encoder -> projector -> frozen LLM, with gradients into the
        projector. Returns (states [L, B, S, D] at `layers`, the positions the mean pools [B, S]
        (the sink token left out), the projector's outputs [B, S', D] and their mask, which an ASR
        loss can reuse)."""
        speech, speech_mask = self.encode_speech(batch)
        inputs, mask, pool_mask = self.with_sink(speech, speech_mask)
        return self.hidden_states(inputs, mask, layers), pool_mask, speech, speech_mask

    @torch.no_grad()
    def text_states(self, batch, layers):
        """The text side: the transcript's token embeddings -> the same frozen LLM, the same layers,
        no gradients (it has nothing to train). Returns (states [L, B, T, D], the positions the mean
        pools)."""
        text, mask, pool_mask = self.with_sink(
            self.embed_tokens(batch["text_ids"]), batch["text_mask"]
        )
        return self.hidden_states(text, mask, layers), pool_mask

    @torch.no_grad()
    def pooled_pairs(self, batches, layers, autocast=contextlib.nullcontext):
        """Mean-pooled states at `layers` of every (speech, transcript) pair of collated batches,
        for retrieval: (text [L, N, D], speech [L, N, D]). autocast(): the context of each forward
        (the batches are collated outside it: the log-mel must stay float32)."""
        was_training, text, speech = self.training, [], []
        self.eval()
        for batch in batches:
            with autocast():
                states, pool_mask, _, _ = self.speech_states(batch, layers)
                speech.append(contrastive.masked_mean(states, pool_mask))
                text.append(contrastive.masked_mean(*self.text_states(batch, layers)))
        self.train(was_training)
        return torch.cat(text, 1), torch.cat(speech, 1)

    # --- the chat prompt: speech first in the user turn, then the instruction ---------------------

    def prompt_ids(self, instruction):
        """Token ids before and after the audio in the LLM's own chat template, and the end-of-turn
        id. The instruction is user text (a question from a manifest, --prompt), tokenized as plain
        text: "<|im_end|>" or the audio placeholder written in it stay characters, so it can neither
        end the user's turn nor forge another. (The template's own text, after it, begins with a
        special token, where a tokenizer always cuts: an ordinary instruction gets the ids it would
        get in one piece with the template.)"""
        before, between, after, end_of_turn = self.template()
        plain = self.tokenizer(between + instruction, add_special_tokens=False,
                               split_special_tokens=True).input_ids  # fmt: skip
        return before, plain + after, end_of_turn

    def template(self):
        """The chat template rendered once around placeholders for the audio and the instruction:
        (ids before the audio, the text between the audio and the instruction, ids after the
        instruction, the end-of-turn id)."""
        if self._template is None:
            system = (
                [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            )
            user = system + [{"role": "user", "content": f"{AUDIO}\n{INSTRUCTION}"}]
            text = self.render(user, generation_prompt=True)
            if text.count(AUDIO) != 1 or text.count(INSTRUCTION) != 1:
                raise ModelError(
                    f"the chat template of {self.llm_name} does not write the user's message once"
                )
            before, rest = text.split(AUDIO)
            between, after = rest.split(INSTRUCTION)
            full = self.render(user + [{"role": "assistant", "content": "X"}])
            # what the template writes after the answer, e.g. "<|eot_id|>"
            end_of_turn = full[len(text) + 1 :]
            encode = lambda s: self.tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
            self._template = (encode(before), between, encode(after), encode(end_of_turn)[0])
        return self._template

    def render(self, messages, generation_prompt=False):
        """The chat as text in the LLM's template. A Llama 3 with a system prompt gets the authors'
        own template (LLaVA's conv_llama_3_1), without the dates Llama-3.1's template writes into
        every system turn."""
        if self.system_prompt and "<|start_header_id|>" in self.tokenizer.get_vocab():
            turn = "<|start_header_id|>{}<|end_header_id|>\n\n{}<|eot_id|>".format
            text = "<|begin_of_text|>" + "".join(turn(m["role"], m["content"]) for m in messages)
            return text + (
                "<|start_header_id|>assistant<|end_header_id|>\n\n" if generation_prompt else ""
            )
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def chat_batch(self, speech, speech_mask, instructions, targets=None):
        """Splice unpadded speech embeddings into the chat prompt.
        Training (targets given): right padding, labels = answer tokens + end-of-turn,
        -100 elsewhere.
        Generation (targets None): left padding, so every sequence ends where the answer starts."""
        seqs, labels = [], []
        for i, instruction in enumerate(instructions):
            before, after, eot = self.prompt_ids(instruction)
            answer = [] if targets is None else self.answer_ids(targets[i]) + [eot]
            ids = lambda x: torch.tensor(x, dtype=torch.long, device=speech.device)  # noqa: E731
            parts = [
                self.embed_tokens(ids(before)),
                speech[i][speech_mask[i]],
                self.embed_tokens(ids(after + answer)),
            ]
            seqs.append(torch.cat([p.to(speech.dtype) for p in parts]))
            labels.append(torch.cat([ids([-100] * (len(seqs[-1]) - len(answer))), ids(answer)]))
        left = targets is None
        B, T = len(seqs), max(len(s) for s in seqs)
        embeds = speech.new_zeros(B, T, speech.shape[-1])
        mask = torch.zeros(B, T, dtype=torch.bool, device=speech.device)
        label_ids = torch.full((B, T), -100, dtype=torch.long, device=speech.device)
        for i, (seq, lab) in enumerate(zip(seqs, labels)):
            span = slice(T - len(seq), T) if left else slice(0, len(seq))
            embeds[i, span], mask[i, span], label_ids[i, span] = seq, True, lab
        return embeds, mask, label_ids

    def answer_ids(self, text):
        """A target's tokens as plain text: "<|im_end|>" written in a transcript stays characters,
        never the real end-of-turn token."""
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids

    def lm_loss(self, embeds, mask, labels, prefix=0):
        """Mean next-token cross-entropy over the supervised (answer) tokens of the batch. The LM
        head runs only where a next token is supervised: a few answer tokens instead of every
        position (the logits over a 50k-128k vocabulary would otherwise cost more memory than the
        rest of the step).
        prefix: the first `prefix` positions hold the same tokens in every sequence (shared_prefix);
        their keys and values are computed once, for one sequence, and every sequence attends to
        that copy: the same numbers, without a forward and backward of the prefix per example.
        (Where weights inside the LLM train, e.g. LoRA, the copy keeps its graph: the gradients of
        all sequences meet in it, as they would have summed over separate prefixes.)"""
        decoder = self.llm.get_decoder()
        cache = None
        if prefix:  # the template's embeddings need no gradient
            cache = decoder(inputs_embeds=embeds[:1, :prefix].detach(), use_cache=True).cache
            cache.batch_repeat_interleave(len(embeds))
            # the mask keeps the prefix: it covers the cache
            embeds, labels = embeds[:, prefix:], labels[:, prefix:]
        hidden = decoder(
            inputs_embeds=embeds,
            attention_mask=mask.long(),
            cache=cache,
            use_cache=cache is not None,
        ).last_hidden_state
        targets = labels[:, 1:]
        supervised = targets != -100
        logits = self.llm.get_output_embeddings()(hidden[:, :-1][supervised])
        return F.cross_entropy(logits.float(), targets[supervised])

    def answer_loss(self, speech, speech_mask, instructions, targets):
        """Stage 2's loss (and ASR pretraining's): each utterance's speech (the projector's outputs)
        spliced into the chat prompt before its instruction, next-token cross-entropy on the target
        and the end-of-turn token only."""
        embeds, mask, labels = self.chat_batch(speech, speech_mask, instructions, targets)
        # no shared prefix under gradient checkpointing (which drops a layer's cache)
        prefix = 0 if self.grad_checkpointing else self.shared_prefix(instructions)
        return self.lm_loss(embeds, mask, labels, prefix=prefix)

    def shared_prefix(self, instructions):
        """How many positions every chat_batch sequence of these instructions starts with in common:
        the chat template's text before the speech (e.g. a system turn), which does not depend on
        the instruction."""
        befores = {tuple(self.prompt_ids(instruction)[0]) for instruction in instructions}
        return len(befores.pop()) if len(befores) == 1 else 0

    @torch.no_grad()
    def generate(self, batch, instructions, max_new_tokens=200, stops=None):
        """Greedy decoding of the answer for every utterance in a collated batch, as the authors:
        up to max_new_tokens (200), ending at the end-of-turn token or a newline. Returns (texts,
        why each ended: "end" or "cap"). stops: see generate_from."""
        speech, speech_mask = self.encode_speech(batch)
        return self.generate_from(speech, speech_mask, instructions, max_new_tokens, stops)

    @torch.no_grad()
    def generate_from(self, speech, speech_mask, instructions, max_new_tokens=200, stops=None):
        """generate() from embeddings in the speech's place [B, S, D_llm] with a mask [B, S].
        stops: a transformers StoppingCriteria that also records, per answer, why it ended
        (`reason`) and how many tokens to keep (`keep`): extras/decoding.Stops (per-answer caps, the
        loop guard)."""
        embeds, mask, _ = self.chat_batch(speech, speech_mask, instructions)
        eot = self.prompt_ids(instructions[0])[2]
        out = self.llm.generate(
            inputs_embeds=embeds.to(self.llm.dtype),
            attention_mask=mask.long(),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eot,
            pad_token_id=self.tokenizer.pad_token_id or eot,
            stopping_criteria=StoppingCriteriaList([stops] if stops else []),
            # the authors' decoding ends an answer at its first newline (stop_strings="\n")
            **({} if stops else {"stop_strings": "\n", "tokenizer": self.tokenizer}),
        )
        texts, reasons = [], []
        for i, ids in enumerate(out.tolist()):
            keep = stops.keep[i] if stops else None
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            reason = stops.reason[i] if stops else ("end" if eot in ids or "\n" in text else None)
            texts.append(self.tokenizer.decode(ids[:keep], skip_special_tokens=True).strip())
            reasons.append(reason or "cap")
        return texts, reasons

    # --- checkpoints: the projector alone, safetensors + JSON ------------------------------------

    def meta(self):
        return {
            "llm": self.llm_name,
            "encoder": self.encoder_name,
            "qformer": asdict(unwrap(self.projector).cfg),
            "sink_token": self.sink_token,
            "system_prompt": self.system_prompt,
            "llm_dim": self.llm.config.hidden_size,
            "encoder_dim": self.encoder.dim,
            "additions": self.additions,
        }

    def save_projector(self, out, **extra):
        """Write <out>/projector.safetensors and <out>/meta.json atomically. Frozen weights are
        never copied."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        state = {
            k: v.detach().contiguous().cpu() for k, v in unwrap(self.projector).state_dict().items()
        }
        write_atomically(out / "projector.safetensors", lambda tmp: save_file(state, tmp))
        # what the additions trained besides the projector (LoRA's weights)
        if self.additions:  # extras: save
            import extras

            extras.save(self, out)
        meta = json.dumps({**self.meta(), **extra}, indent=2, default=str)
        write_atomically(out / "meta.json", lambda tmp: tmp.write_text(meta))

    def load_projector(self, ckpt):
        """Load a projector saved by save_projector, checking it was built for these models'
        widths."""
        ckpt = Path(ckpt)
        if not (ckpt / "projector.safetensors").exists():
            raise ModelError(
                f"No projector checkpoint at {ckpt}: "
                f"expected {ckpt}/projector.safetensors and meta.json"
            )
        meta = read_meta(ckpt)
        mine = self.meta()
        for key in ("llm_dim", "encoder_dim", "qformer"):
            theirs, ours = meta.get(key), mine[key]
            # dropout and time masking are no part of the shape: fine-tuning may change them
            if key == "qformer":
                theirs, ours = (
                    {k: v for k, v in (c or {}).items() if k not in REGULARISERS}
                    for c in (theirs, ours)
                )
            if theirs != ours:
                raise ModelError(
                    f"Checkpoint {ckpt} does not fit this model: {key} is {theirs} there, "
                    f"{ours} here (checkpoint made for llm={meta.get('llm')}, "
                    f"encoder={meta.get('encoder')})."
                )
        state = load_file(ckpt / "projector.safetensors")
        # what the additions changed: the CTC blank on the projector, LoRA on the LLM, compression
        if meta.get("additions") or "blank" in state:  # extras: restore
            import extras

            extras.restore(self, meta, ckpt, state)
        unwrap(self.projector).load_state_dict(state)
        return meta

    @classmethod
    def from_checkpoint(
        cls, ckpt, dtype=torch.float32, dropout=None, resolve=resolve_model, device=None
    ):
        """Rebuild the SpeechLLM a checkpoint was trained with and load its projector.
        dropout: a new dropout rate for further training (default: the checkpoint's); resolve,
        device: as for __init__."""
        path = Path(ckpt) / "meta.json"
        if not path.exists():
            raise ModelError(
                f"No checkpoint at {ckpt}: expected {path} (written by pretrain.py / finetune.py)"
            )
        meta = checked_meta(ckpt)  # before anything is built from it
        qformer = QFormerConfig(
            **{**meta["qformer"], **({} if dropout is None else {"dropout": dropout})}
        )
        model = cls(
            meta["llm"],
            meta["encoder"],
            qformer,
            dtype,
            meta.get("sink_token", False),
            resolve=resolve,
            device=device,
        )
        model.system_prompt = meta.get("system_prompt")
        model.load_projector(ckpt)
        return model, meta


def checked_meta(folder):
    """A checkpoint folder's meta.json, checked before anything is built from it: the files are
    readable (common.check_checkpoint), and the projector meta.json describes is the one its tensors
    were saved from. That projector is built on PyTorch's meta device (shapes, no memory) and
    compared with projector.safetensors' header, so an edited or mismatched meta.json (another
    Q-Former width, or one that would take terabytes) is one line, never an allocation. Returns
    meta.json, or None where there is none (the script's own message)."""
    folder = Path(folder)
    meta = check_checkpoint(folder)
    if meta is None:
        return None
    where = folder / "meta.json"
    try:
        with torch.device("meta"):
            cfg = QFormerConfig(**meta["qformer"])
            wanted = WindowQFormer(meta["encoder_dim"], meta["llm_dim"], cfg).state_dict()
    except Exception as e:  # a missing, mistyped or impossible field
        why = " ".join(str(e).split())[:200]
        raise ModelError(f"{where}: no projector can be built from it ({type(e).__name__}: {why}): "
                         "put back the run's own meta.json") from None  # fmt: skip
    with safe_open(str(folder / "projector.safetensors"), "pt") as f:
        saved = {key: f.get_slice(key).get_shape() for key in f.keys()}
    for key, tensor in wanted.items():
        if saved.get(key) != list(tensor.shape):
            raise ModelError(
                f"{where} does not match projector.safetensors: the projector it describes "
                f"(qformer {meta['qformer']}) has {key} of shape {list(tensor.shape)}, the "
                f"file's {saved[key] if key in saved else 'is missing'}. It was edited or comes "
                "from another run: put back the run's own meta.json"
            )
    return meta
