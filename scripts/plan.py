"""
plan.py: the memory and time planner. How much GPU memory each stage of the paper's recipe needs at
its worst micro-batch, with and without gradient checkpointing; which flags fit a 24 / 40 / 80 GB
card; and how many GPU-hours the paper's runs take. Estimates, until a GPU measures them.

    # the paper: Llama-3.1-8B-Instruct + HuBERT-large (90 s on 2 CPU cores, 8.5 GB of memory)
    python -m scripts.bench --plan --llm llama --encoder hubert
    # the demo's models under the paper's steps and batches
    python -m scripts.bench --plan --llm smollm2 --encoder whisper-tiny
    # any model folder with a config.json
    python -m scripts.bench --plan --llm /models/my-llm --encoder /models/my-hubert

How. Nothing is downloaded: each model is built from its config with random weights (a step's
memory does not depend on their values) and cut to 2 layers at full width. Each piece of the
training step then runs on the CPU as the scripts run it, its memory replayed from the profiler
(live_bytes):
- the front: the frozen encoder (no gradients) and the projector on one clip of the batch's
  length: the peak while it runs, and what stays live after it (the projector's saved activations
  and outputs);
- the LLM: stage 1's speech side (SpeechLLM.hidden_states + the contrastive loss + backward) and
  stage 2's answer loss (SpeechLLM.lm_loss + backward) on one sequence of 256 positions, with 1 and
  with 2 decoder layers: the difference is what one more layer adds per position (without
  checkpointing, what autograd keeps of a layer; with it, the layer's input), the rest is the
  step's own per position (the stacked states and the loss, one layer's backward, the gradient of
  the input);
- stage 2's LM head on the supervised tokens (128k logits each), which can outgrow the rest: the
  step's peak is then the end of the forward (measured too) plus the head.
A batch of B clips costs B times one clip; a sequence of N positions N times one position
(attention kernels keep no N x N matrix); a 32-layer LLM 30 layers more than the 2-layer one. Under
bf16 the CPU runs as CUDA's autocast would: CUDA computes layer_norm and group_norm in float32 (its
autocast's float32 list), the CPU's autocast in bf16, which would halve the encoder's peak
(CudaNorms). tests/test_bench_plan.py holds the prediction within 15% of the peak measured for tiny
models of the same architectures running the real steps.

Not counted: the CUDA context and libraries (~1 GiB, outside PyTorch's allocator) and the
allocator's fragmentation: the table of cards leaves 1 GiB + 10% for them.

Sections: shapes and assumptions | measuring | the calibration | memory | time | printing.
"""

import contextlib
import copy
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

# -----------------------------------------------------------------------------
# Shapes: the models (their hub config.json, written out: nothing is downloaded) and the paper's
# batches, with the assumptions behind the time estimate.

CONFIGS = {
    # meta-llama/Llama-3.1-8B-Instruct
    "llama": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                            max_position_embeddings=131072, rms_norm_eps=1e-5,
                            tie_word_embeddings=False)),
    # HuggingFaceTB/SmolLM2-135M-Instruct (the demo's)
    "smollm2": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                              num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                              vocab_size=49152, max_position_embeddings=8192,
                              tie_word_embeddings=True)),
    # facebook/hubert-large-ls960-ft (HubertModel: the CTC head is dropped)
    "hubert": ("hubert", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                              intermediate_size=4096, conv_dim=(512,) * 7,
                              conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
                              conv_bias=True, feat_extract_norm="layer", do_stable_layer_norm=True,
                              num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16)),
    # openai/whisper-tiny.en (the demo's; the SpeechLLM keeps the encoder)
    "whisper-tiny": ("whisper", dict(d_model=384, encoder_layers=4, encoder_attention_heads=6,
                                     encoder_ffn_dim=1536, decoder_layers=4,
                                     decoder_attention_heads=6, decoder_ffn_dim=1536,
                                     num_mel_bins=80, vocab_size=51864, max_source_positions=1500,
                                     max_target_positions=448)),
}  # fmt: skip


@dataclass
class Batch:
    """One micro-batch of equal clips: the worst a stage meets (every clip as long as allowed)."""

    what: str
    clips: int  # per device
    seconds: float  # each clip's length
    prompt: int = 0  # chat-prompt tokens around the speech (stage 2)
    answer: int = 0  # supervised tokens per example: the target + the end-of-turn token (stage 2)


# Assumptions of stage 2's sequences (the Llama-3.1 chat template with the authors' system prompt,
# about 40 tokens before the speech and 15 after it with the instruction; a QA question ~25 more)
PROMPT_TOKENS, QA_QUESTION_TOKENS = 55, 25
TRANSCRIPT_TOKENS_PER_S = 3.8  # ~2.9 words/s in MuST-C's talks x ~1.3 Llama-3 tokens per word
TRANSLATION_TOKENS_PER_S = 4.5  # German, French, Italian, Spanish take more tokens per word
QA_ANSWER_TOKENS = 6  # a few words + the newline + the end of turn
STAGE1 = dict(batch=10, accum=2, epochs=5)  # the authors' scripts
STAGE2 = dict(batch=4, accum=5, epochs=2, frac=0.1)


def stage_batches(max_seconds=None):
    """The paper's worst micro-batches: stage 1 = 10 clips of 45 s (MuST-C, 1-45 s); stage 2 = 4
    spoken-QA passages of 150 s, and 4 MuST-C translations of 45 s (the longest targets). A Whisper
    encoder hears 30 s at most: its clips are cut there."""
    cap = lambda s: min(s, max_seconds or s)  # noqa: E731
    name = lambda clips, s, what: f"{clips} x {cap(s):.0f} s ({what})"  # noqa: E731
    qa, st = PROMPT_TOKENS + QA_QUESTION_TOKENS, round(cap(45.0) * TRANSLATION_TOKENS_PER_S) + 1
    return {
        1: [Batch(name(10, 45, "MuST-C"), 10, cap(45.0))],
        2: [
            Batch(name(4, 150, "Spoken-SQuAD"), 4, cap(150.0), qa, QA_ANSWER_TOKENS),
            Batch(name(4, 45, "MuST-C ST"), 4, cap(45.0), PROMPT_TOKENS, st),
        ],
    }


# The runs' data (public sizes; paper-notes.md): MuST-C v1.0 train segments and hours per pair;
# every Spoken-SQuAD question brings its passage's audio (its mean length is an assumption: SQuAD's
# paragraphs, ~120 words, read by a TTS voice).
MUSTC = {"de": (229.7e3, 408), "fr": (275.1e3, 492), "it": (253.4e3, 465), "es": (265.6e3, 504)}
SQA_EXAMPLES, SQA_SECONDS = 37.1e3, 45.0
MFU = 0.40  # model FLOP utilisation assumed for the GPU-hours
GPUS = {"A100": 312e12, "H100 SXM": 989e12}  # dense bf16 FLOP/s
CARDS = (24, 40, 80)  # GiB
CONTEXT_GIB, FRAGMENTATION = 1.0, 0.10  # outside the allocator; the allocator's slack
GiB = 2**30


def model_config(name):
    """A preset's config (CONFIGS) or a local folder's config.json."""
    from transformers import AutoConfig

    if name in CONFIGS:
        kind, values = CONFIGS[name]
        return AutoConfig.for_model(kind, **values)
    return AutoConfig.from_pretrained(name)


def is_whisper(config):
    return config.model_type == "whisper"


def count_parameters(config, causal_lm):
    """(all, the LLM's decoder layers + final norm / the encoder's conv feature extractor), from a
    model built on the meta device (no memory)."""
    from transformers import AutoModel, AutoModelForCausalLM

    with torch.device("meta"):
        model = (AutoModelForCausalLM if causal_lm else AutoModel).from_config(config)
    if causal_lm:
        decoder = model.get_decoder()
        part = sum(p.numel() for n, p in decoder.named_parameters() if "embed" not in n)
    else:
        model = model.encoder if is_whisper(config) else model
        convs = [model.conv1, model.conv2] if is_whisper(config) else [model.feature_extractor]
        part = sum(p.numel() for m in convs for p in m.parameters())
    return sum(p.numel() for p in model.parameters()), part


# -----------------------------------------------------------------------------
# Measuring


def live_bytes(fn, device=None):
    """Run fn() and return (peak, end, its result): the most bytes of tensors live at once while it
    runs, and those still live when it returns (its outputs and what autograd saved for a backward),
    both above what was live before. CUDA: the allocator's statistics. CPU: there is none, so the
    torch profiler's allocation events are replayed in order (tensors torch allocated, not the
    process's RSS)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return (
            torch.cuda.max_memory_allocated() - before,
            torch.cuda.memory_allocated() - before,
            out,
        )
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    live = peak = 0
    for e in events:  # nbytes > 0: an allocation, < 0: a free
        live += e.nbytes()
        peak = max(peak, live)
    return peak, live, out


class CudaNorms(TorchFunctionMode):
    """Under the CPU's autocast, compute layer_norm and group_norm in float32 as CUDA's autocast
    does (they are on its float32 list, not on the CPU's). Of that list they are the only ops these
    models call on bf16 tensors (the LLM's RMSNorm casts to float32 itself), and HuBERT's conv
    feature extractor calls them on its widest tensors: without this the CPU would measure the
    encoder's peak at half the GPU's."""

    FLOAT32 = ("layer_norm", "group_norm")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) in self.FLOAT32 and torch.is_autocast_enabled("cpu"):
            up = lambda x: x.float() if torch.is_tensor(x) and x.is_floating_point() else x
            with torch.autocast("cpu", enabled=False):
                return func(*map(up, args), **{k: up(v) for k, v in kwargs.items()})
        return func(*args, **kwargs)


@contextlib.contextmanager
def autocast(device, dtype):
    """The scripts' autocast (common.autocast), as CUDA's on a CPU (CudaNorms)."""
    import common

    emulate = device.type == "cpu" and dtype != torch.float32
    with common.autocast(device, dtype), CudaNorms() if emulate else contextlib.nullcontext():
        yield


# -----------------------------------------------------------------------------
# The calibration: the model's own methods around models built from configs, cut to 2 layers


def bare_models():
    """SpeechEncoder and SpeechLLM around models already built (random weights): nothing is loaded,
    no tokenizer is needed; every method the steps call is the model's own."""
    from model import SpeechEncoder, SpeechLLM

    class Encoder(SpeechEncoder):
        def __init__(self, model, whisper):
            nn.Module.__init__(self)
            self.model, self.is_whisper = model.requires_grad_(False).eval(), whisper

    class Model(SpeechLLM):
        def __init__(self, llm, encoder, projector):
            nn.Module.__init__(self)
            self.llm = llm.requires_grad_(False).eval()
            self.encoder, self.projector = encoder, projector
            self.num_layers = llm.config.num_hidden_layers
            self.sink_token, self.feature_cache, self.grad_checkpointing = False, None, False
            self.additions = {}

    return Encoder, Model


@dataclass
class Front:
    """The frozen encoder, then the projector, on clips of one length (bytes). The encoder's peak and
    its output are per clip. The projector's peak and what it leaves live (its saved activations and
    outputs, what the LLM phase runs on top of) are per clip plus once a step: autocast's bf16
    copies of its weights, cached for the backward."""

    encoder_peak: int  # per clip
    frames: int  # the encoder's output, per clip (kept for the backward by the projector's norm)
    peak: tuple  # the projector's: (once, per clip)
    live: tuple  # after the projector: (once, per clip)
    tokens: int  # the LLM positions a clip becomes

    def __call__(self, clips):
        """(the front's peak, what it leaves live) for a batch of `clips`."""
        proj = lambda once_per: once_per[0] + clips * once_per[1]  # noqa: E731
        peak = max(clips * self.encoder_peak, clips * self.frames + proj(self.peak))
        return peak, clips * self.frames + proj(self.live)


class Calibration:
    """The measurements a plan scales (bytes; per position of the LLM's input unless said), taken on
    a 2-layer copy of the LLM at full width, the encoder with 2 layers (its peak is the conv feature
    extractor's or one layer's: the depth does not change it) and the projector, in `dtype` on
    `device`, one example at a time."""

    def __init__(self, llm_config, encoder_config, qformer=None, dtype=torch.bfloat16,
                 device="cpu", positions=256, progress=print):  # fmt: skip
        from transformers import AutoModel, AutoModelForCausalLM

        from contrastive import select_layers
        from model import QFormerConfig, WindowQFormer

        self.device, self.dtype, self.positions = torch.device(device), dtype, positions
        self.llm_config, self.encoder_config = llm_config, encoder_config
        self.layers = llm_config.num_hidden_layers  # the target depth
        # the hidden states the stage-1 loss reads (7 of a 32-layer LLM)
        self.stacked = len(select_layers("all", self.layers))
        self.qformer = qformer or QFormerConfig()
        t0 = time.time()
        small = copy.deepcopy(llm_config)
        small.num_hidden_layers = 2
        llm = AutoModelForCausalLM.from_config(small, dtype=dtype)
        whisper = is_whisper(encoder_config)
        enc_small = copy.deepcopy(encoder_config)
        setattr(enc_small, "encoder_layers" if whisper else "num_hidden_layers", 2)
        encoder = AutoModel.from_config(enc_small, dtype=dtype)
        encoder = encoder.encoder if whisper else encoder
        self.enc_dim = encoder_config.d_model if whisper else encoder_config.hidden_size
        self.dim = llm_config.hidden_size
        Encoder, Model = bare_models()
        projector = WindowQFormer(self.enc_dim, self.dim, self.qformer)
        self.model = Model(llm, Encoder(encoder, whisper), projector).to(self.device)
        self.model.train()  # the projector's dropout, as in training; the frozen parts stay in eval
        self.max_seconds = 30.0 if whisper else None  # Whisper's positions end at 30 s
        self.fronts = {}
        self.coef = {}  # (what, checkpointing) -> (bytes per position, + per decoder layer)
        for checkpointing in (False, True):
            if checkpointing:
                self.model.enable_grad_checkpointing()
            for what, measure in (("contrastive", self._contrastive), ("answer", self._answer),
                                  ("forward", self._forward)):  # fmt: skip
                one, two = (measure(depth) for depth in (1, 2))
                self.coef[what, checkpointing] = (2 * one - two, two - one)
            if not checkpointing:  # the head, per supervised token: all positions supervised
                forward = sum(self.coef["forward", False])  # what one layer's forward leaves live
                above = self._answer(1, supervised="all") - forward
                self.head = above * self.positions / (self.positions - 2)
        progress(f"measured the LLM's step in {time.time() - t0:.0f} s")

    # --- the pieces, as the training step runs them --------------------------------------------

    def _measure(self, forward, backward=True):
        """Per position: the peak of forward() under the run's autocast and its loss's backward
        (outside it, as the scripts), or with backward=False what the forward leaves live."""

        def step():
            with autocast(self.device, self.dtype):
                out = forward()
            if backward:
                out.backward()
            return None if backward else out

        peak, end, _ = live_bytes(step, self.device)
        return (peak if backward else end) / self.positions

    @contextlib.contextmanager
    def _depth(self, n):
        """The calibration LLM cut to its first n decoder layers."""
        decoder = self.model.llm.get_decoder()
        layers = decoder.layers
        decoder.layers, self.model.num_layers = layers[:n], n
        try:
            yield
        finally:
            decoder.layers, self.model.num_layers = layers, len(layers)

    def _inputs(self):
        """One sequence of LLM inputs in the projector's output dtype, its last position padding (a
        padded batch's attention mask; the memory of a sequence without padding differs little)."""
        n, dtype = self.positions, (self.dtype if self.dtype != torch.float32 else torch.float32)
        embeds = torch.randn(1, n, self.dim, dtype=dtype, device=self.device).requires_grad_()
        mask = torch.ones(1, n, dtype=torch.bool, device=self.device)
        mask[0, -1] = False
        return embeds, mask

    def _contrastive(self, depth):
        """Stage 1's speech side: hidden_states at as many layers as the full LLM's loss reads,
        the all-layer cosine loss against pooled transcripts (the text cache's), backward."""
        from contrastive_fast import contrastive_loss

        embeds, mask = self._inputs()
        layers = [0] + [depth] * (self.stacked - 1)
        text = torch.randn(self.stacked, 1, self.dim, device=self.device)
        with self._depth(depth):
            return self._measure(
                lambda: contrastive_loss(
                    None, None, self.model.hidden_states(embeds, mask, layers), mask,
                    text_pooled=text,
                )[0]
            )  # fmt: skip

    def _answer(self, depth, supervised=1):
        """Stage 2's answer loss (lm_loss) with 1 supervised position, or all of them."""
        embeds, mask = self._inputs()
        labels = torch.full(mask.shape, -100, device=self.device)
        first = 1 if supervised == "all" else self.positions - 1 - supervised
        labels[0, first : self.positions - 1] = 1
        with self._depth(depth):
            return self._measure(lambda: self.model.lm_loss(embeds, mask, labels))

    def _forward(self, depth):
        """What stage 2's forward leaves live when the LM head starts: the saved activations and the
        last hidden state."""
        embeds, mask = self._inputs()
        decoder = self.model.llm.get_decoder()
        with self._depth(depth):
            return self._measure(
                lambda: decoder(inputs_embeds=embeds, attention_mask=mask.long(), use_cache=False)[
                    0
                ],
                backward=False,
            )

    def front(self, seconds):
        """SpeechLLM.encode_speech's two halves on clips of `seconds`, the last 0.1 s padding: the
        encoder (no gradients) on one clip, measured once per length (its attention mask grows with
        the square of it); the projector on one clip and on two, whose difference is one clip's
        share."""
        if seconds not in self.fronts:
            whisper = is_whisper(self.encoder_config)
            rate = 100 if whisper else 16000  # log-mel frames / samples per second
            n = int(round(seconds * rate))
            shape = (1, self.encoder_config.num_mel_bins, n) if whisper else (1, n)
            mask = torch.ones(1, n, dtype=torch.bool, device=self.device)
            mask[0, -rate // 10 :] = False
            batch = {
                "speech_inputs": torch.randn(shape, device=self.device),
                "speech_input_mask": mask,
            }
            with autocast(self.device, self.dtype):
                encoder_peak, frames, (out, out_mask) = live_bytes(
                    lambda: self.model.speech_frames(batch), self.device
                )
            projector = []
            for clips in (1, 2):
                frames_in, mask_in = out.repeat(clips, 1, 1), out_mask.repeat(clips, 1)
                with autocast(self.device, self.dtype):
                    peak, live, (speech, _) = live_bytes(
                        lambda f=frames_in, m=mask_in: self.model.projector(f.float(), m),
                        self.device,
                    )
                projector.append((peak, live))
            (p1, l1), (p2, l2) = projector
            self.fronts[seconds] = Front(
                encoder_peak,
                frames,
                (2 * p1 - p2, p2 - p1),
                (2 * l1 - l2, l2 - l1),
                speech.shape[1],
            )
        return self.fronts[seconds]


# -----------------------------------------------------------------------------
# Memory: one step's peak, from the calibration


def step_memory(cal, stage, batch, checkpointing):
    """The peak bytes of one training micro-step above the resting weights, and its parts: the
    front (B clips through the encoder and the projector) and the LLM phase on top of what the front
    leaves live. Stage 1: the speech side's pass and loss. Stage 2: the prompt spliced around the
    speech (one new [B, T, D] sequence), then the larger of the backward through the layers and the
    end of the forward plus the LM head on the supervised tokens."""
    front = cal.front(batch.seconds)

    def per_position(what):  # bytes per LLM position at the LLM's full depth
        base, per_layer = cal.coef[what, checkpointing]
        return base + cal.layers * per_layer

    positions = batch.clips * (front.tokens + batch.prompt + batch.answer)
    if stage == 1:
        llm = per_position("contrastive") * positions
    else:
        spliced = positions * cal.dim * torch.finfo(cal.dtype).bits // 8
        head = per_position("forward") * positions + cal.head * batch.clips * batch.answer
        llm = spliced + max(per_position("answer") * positions, head)
    front_peak, front_live = front(batch.clips)
    return dict(
        extra=max(front_peak, front_live + llm),
        front_peak=front_peak,
        front_live=front_live,
        llm=llm,
        positions=positions,
        tokens=front.tokens,
    )


def resting_memory(cal):
    """Bytes that stay through a run: the frozen weights in the run's dtype; the projector, its
    gradients and AdamW's two moments in float32."""
    bits = torch.finfo(cal.dtype).bits // 8
    llm, _ = count_parameters(cal.llm_config, causal_lm=True)
    encoder, _ = count_parameters(cal.encoder_config, causal_lm=False)
    projector = sum(p.numel() for p in cal.model.projector.parameters())
    return dict(llm=llm * bits, encoder=encoder * bits, projector=16 * projector,
                n_llm=llm, n_encoder=encoder, n_projector=projector)  # fmt: skip


def fits(total, card_gib):
    return total * (1 + FRAGMENTATION) + CONTEXT_GIB * GiB <= card_gib * GiB


# -----------------------------------------------------------------------------
# Time: the FLOPs of the paper's runs, and GPU-hours at an assumed utilisation


def speech_tokens(seconds, clips, qformer):
    """The projector's outputs for `clips` clips of `seconds` of audio in all: 50 frames per second,
    4 per 17-frame window, a last window half-filled on average."""
    return clips * qformer.queries * (50 * seconds / clips / qformer.window + 0.5)


def llm_flops(cfg, decoder_params, positions, length, grad, checkpointing):
    """The frozen LLM over `positions` positions in sequences of `length`: 2 FLOPs per weight and
    position forward, plus causal attention (2 x layers x width x length per position); with
    `grad`, the input gradient (the weights are frozen: no weight gradient) costs the forward's
    matmuls again and twice its attention; checkpointing runs the forward once more."""
    matmul = 2 * decoder_params * positions
    attention = 2 * cfg.num_hidden_layers * cfg.hidden_size * length * positions
    if not grad:
        return matmul + attention
    return (1 + checkpointing) * (matmul + attention) + matmul + 2 * attention


def encoder_flops(cfg, seconds, clip_seconds, transformer_params):
    """The frozen encoder's forward: its convolutions at their frame rates, 2 FLOPs per transformer
    weight per frame (50 per second), and attention over the whole clip."""
    if is_whisper(cfg):
        d = cfg.d_model
        conv = 2 * (cfg.num_mel_bins * d * 3 * 100 + d * d * 3 * 50)
        layers, width = cfg.encoder_layers, d
    else:
        conv, rate, dims = 0, 16000, (1,) + tuple(cfg.conv_dim)
        for i, (k, s) in enumerate(zip(cfg.conv_kernel, cfg.conv_stride)):
            rate /= s
            conv += 2 * dims[i] * dims[i + 1] * k * rate
        layers, width = cfg.num_hidden_layers, cfg.hidden_size
    frames = 50 * seconds
    return (
        seconds * conv
        + 2 * transformer_params * frames
        + 4 * layers * width * 50 * clip_seconds * frames
    )


def projector_flops(qformer, enc_dim, params, windows):
    """The projector trains: forward, input and weight gradients (3x the forward). Its keys and
    values read the window's frames; every other weight reads the window's queries."""
    kv = qformer.layers * 2 * enc_dim * qformer.dim
    return 3 * 2 * windows * (qformer.window * kv + qformer.queries * (params - kv))


def runs(cal):
    """{stage: (its data per epoch, one row per task: examples, seconds of audio, speech tokens,
    LLM positions, supervised tokens, transcript tokens for the text side), its epochs)}."""
    de_clips, de_hours = MUSTC["de"]
    st_clips = sum(c for c, _ in MUSTC.values())
    st_seconds = 3600 * sum(h for _, h in MUSTC.values())
    q = cal.qformer
    tok = lambda seconds, clips: speech_tokens(seconds, clips, q)  # noqa: E731
    stage1 = [("MuST-C en-de (en side)", de_clips, 3600 * de_hours, 0, 0,
               3600 * de_hours * TRANSCRIPT_TOKENS_PER_S)]  # fmt: skip
    f = STAGE2["frac"]
    stage2 = [
        ("ASR (MuST-C en-de)", de_clips, 3600 * de_hours, PROMPT_TOKENS,
         3600 * de_hours * TRANSCRIPT_TOKENS_PER_S / de_clips + 1, 0),
        ("ST (en-de/fr/it/es)", st_clips, st_seconds, PROMPT_TOKENS,
         st_seconds * TRANSLATION_TOKENS_PER_S / st_clips + 1, 0),
        ("QA (Spoken-SQuAD)", SQA_EXAMPLES, SQA_EXAMPLES * SQA_SECONDS,
         PROMPT_TOKENS + QA_QUESTION_TOKENS, QA_ANSWER_TOKENS, 0),
    ]  # fmt: skip
    stage2 = [(n, c * f, s * f, p, a, t) for n, c, s, p, a, t in stage2]
    out = {}
    for stage, parts, epochs in ((1, stage1, STAGE1["epochs"]), (2, stage2, STAGE2["epochs"])):
        rows = []
        for name, clips, seconds, prompt, answer, text in parts:
            speech = tok(seconds, clips)
            positions = speech + clips * (prompt + answer)
            rows.append(dict(name=name, clips=clips, seconds=seconds, speech=speech, text=text,
                             positions=positions, supervised=clips * answer))  # fmt: skip
        out[stage] = (rows, epochs)
    return out


def run_flops(cal, checkpointing):
    """{stage: (FLOPs of the whole run by part, the data)}. Stage 1's transcripts go through the LLM
    once, forward only (the text cache keeps their pooled states); everything else every epoch."""
    _, decoder = count_parameters(cal.llm_config, causal_lm=True)
    enc_all, enc_conv = count_parameters(cal.encoder_config, causal_lm=False)
    proj = sum(p.numel() for p in cal.model.projector.parameters())
    cfg, out = cal.llm_config, {}
    for stage, (rows, epochs) in runs(cal).items():
        parts = dict(llm=0.0, encoder=0.0, projector=0.0)
        for r in rows:
            length = r["positions"] / r["clips"]
            parts["llm"] += epochs * llm_flops(
                cfg, decoder, r["positions"], length, True, checkpointing
            )
            parts["llm"] += epochs * 4 * cfg.vocab_size * cfg.hidden_size * r["supervised"]  # head
            if r["text"]:
                parts["llm"] += llm_flops(
                    cfg, decoder, r["text"], r["text"] / r["clips"], False, False
                )
            clip = r["seconds"] / r["clips"]
            parts["encoder"] += epochs * encoder_flops(
                cal.encoder_config, r["seconds"], clip, enc_all - enc_conv
            )
            parts["projector"] += epochs * projector_flops(
                cal.qformer, cal.enc_dim, proj, r["speech"] / cal.qformer.queries
            )
        out[stage] = (parts, rows, epochs)
    return out


# -----------------------------------------------------------------------------
# Printing


def gib(nbytes):
    return f"{nbytes / GiB:.1f}"


def plan(cal, out=print):
    """Print the memory tables, the cards' table and the GPU-hours; returns the peaks (bytes) as
    {(stage, batch name, checkpointing): total} for the docs and the tests."""
    rest = resting_memory(cal)
    weights = rest["llm"] + rest["encoder"]
    batches = stage_batches(cal.max_seconds)
    dtype = str(cal.dtype).replace("torch.", "")
    totals = {}
    kib = lambda what, c, i=1: f"{cal.coef[what, c][i] / 1024:.0f}"  # noqa: E731
    out(
        "\nMeasured, per position of the LLM's input (KiB; without / with checkpointing): each "
        f"decoder layer keeps {kib('contrastive', False)} / {kib('contrastive', True)} in stage 1, "
        f"{kib('answer', False)} / {kib('answer', True)} in stage 2; the step's own on top (the "
        f"stacked states and the loss, one layer's backward, the input's gradient): "
        f"{kib('contrastive', False, 0)} / {kib('contrastive', True, 0)} in stage 1, "
        f"{kib('answer', False, 0)} / {kib('answer', True, 0)} in stage 2. The LM head: "
        f"{cal.head / 2**20:.2f} MiB per supervised token."
    )
    for stage, title in ((1, "stage 1, contrastive pretraining (the speech side through the LLM, "
                             "with gradients into the projector)"),
                         (2, "stage 2, the answer loss through the whole LLM")):  # fmt: skip
        for batch in batches[stage]:
            steps = {c: step_memory(cal, stage, batch, c) for c in (False, True)}
            s = steps[False]
            shape = f"{s['tokens']} speech tokens each" + (
                f", + {batch.prompt} prompt and {batch.answer} supervised" if stage == 2 else ""
            )
            out(f"\n### {title}: {batch.what}, {shape}; {s['positions']:,} positions\n")
            out("| GiB | no checkpointing | --grad-checkpoint |\n|---|---:|---:|")
            caches = (
                f"text cache on the CPU ({gib(text_cache_bytes(cal))} GiB of host RAM)"
                if stage == 1
                else "none"
            )
            both = lambda f: (f(steps[False]), f(steps[True]))  # noqa: E731, B023
            rows = [
                (f"frozen weights, {dtype}: LLM {gib(rest['llm'])} + encoder "
                 f"{gib(rest['encoder'])}", (weights, weights)),
                (f"projector ({rest['n_projector'] / 1e6:.1f}M): weights, gradients, AdamW "
                 "(float32)", (rest["projector"],) * 2),
                (f"caches on the GPU: {caches}; feature cache off", (0, 0)),
                ("activations: the step's peak above these", both(lambda s: s["extra"])),
                ("- the front's peak: the encoder (no gradients), the projector",
                 both(lambda s: s["front_peak"])),
                ("- the LLM phase: the projector's saved activations + the LLM's",
                 both(lambda s: s["front_live"] + s["llm"])),
            ]  # fmt: skip
            for label, (no, yes) in rows:
                out(f"| {label} | {gib(no)} | {gib(yes)} |")
            for c in (False, True):
                totals[stage, batch.what, c] = weights + rest["projector"] + steps[c]["extra"]
            out(f"| **peak** | **{gib(totals[stage, batch.what, False])}** | "
                f"**{gib(totals[stage, batch.what, True])}** |")  # fmt: skip
    out(cards_table(cal, weights + rest["projector"], batches))
    out(time_table(cal))
    return totals


def text_cache_bytes(cal):
    """Stage 1's text cache: every MuST-C transcript's pooled states at the loss's layers (float32)
    in host RAM."""
    return MUSTC["de"][0] * cal.stacked * cal.dim * 4


def cards_table(cal, resting, batches):
    """The first setting that fits each card: the paper's micro-batch first, then checkpointing,
    then smaller micro-batches with more accumulation (the same global batch)."""
    options = {
        1: [(False, 10, 2), (True, 10, 2), (True, 5, 4), (True, 2, 10), (True, 1, 20)],
        2: [(False, 4, 5), (True, 4, 5), (True, 2, 10), (True, 1, 20)],
    }
    lines = [
        f"\n### What fits a card (peak x {1 + FRAGMENTATION:.1f} + {CONTEXT_GIB:.0f} GiB for the "
        "CUDA context and the allocator's fragmentation; global batch 20 in both stages)\n",
        "| card | stage 1 | stage 2 |",
        "|---|---|---|",
    ]
    for card in CARDS:
        cells = []
        for stage in (1, 2):
            cell = "does not fit"
            for checkpointing, size, accum in options[stage]:
                peak = resting + max(
                    step_memory(cal, stage, Batch(b.what, size, b.seconds, b.prompt, b.answer),
                                checkpointing)["extra"]
                    for b in batches[stage]
                )  # fmt: skip
                if fits(peak, card):
                    flag = "--grad-checkpoint" if checkpointing else "--no-grad-checkpoint"
                    cell = f"`{flag} --batch-size {size} --grad-accum {accum}` ({gib(peak)} GiB)"
                    if stage == 1 and size < 10:
                        cell += ": fewer negatives per batch, not the paper's loss"
                    break
            cells.append(cell)
        lines.append(f"| {card} GB | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def time_table(cal):
    rows = [
        f"\n### GPU-hours (the compute floor, and at {MFU:.0%} MFU: an assumption)\n",
        "| run | audio | LLM positions | FLOPs: LLM + encoder + projector | "
        + " | ".join(f"{g}: floor / at {MFU:.0%} MFU" for g in GPUS)
        + " |",
        "|---|---:|---:|---:|" + "---:|" * len(GPUS),
    ]
    for checkpointing in (True, False):
        for stage, (parts, data, epochs) in run_flops(cal, checkpointing).items():
            total = sum(parts.values())
            hours = sum(r["seconds"] for r in data) / 3600
            positions = sum(r["positions"] for r in data)
            name = (f"stage 1, {epochs} epochs" if stage == 1 else
                    f"stage 2, {STAGE2['frac']:.0%} of the mix, {epochs} epochs")  # fmt: skip
            name += ", --grad-checkpoint" if checkpointing else ", no checkpointing"
            flops = " + ".join(f"{parts[k] / 1e18:.2f}" for k in ("llm", "encoder", "projector"))
            gpu = " | ".join(f"{total / peak / 3600:.1f} / {total / peak / 3600 / MFU:.1f} h"
                             for peak in GPUS.values())  # fmt: skip
            rows.append(f"| {name} | {hours:,.0f} h/epoch | {positions / 1e6:.1f}M/epoch | "
                        f"{flops} EFLOP | {gpu} |")  # fmt: skip
    rows.append(
        "\nThe floor: the frozen LLM's forward (2 FLOPs per weight per position, plus causal "
        "attention) and its input gradient (the same again; no weight gradients), one more forward "
        "with checkpointing; stage 1's transcripts once, forward only (the text cache); the LM "
        "head on stage 2's supervised tokens; the encoder's forward every step (no feature "
        "cache); the projector's forward and backward. Dense bf16 peaks: "
        + ", ".join(f"{g} {p / 1e12:.0f} TFLOP/s" for g, p in GPUS.items())
        + ". Padding not counted: random batches pad to their longest clip, which adds compute in "
        "proportion (the manifests' durations decide how much)."
    )
    rows.append(
        "\nData: MuST-C v1.0 train, segments / hours per pair "
        + ", ".join(f"en-{k} {c / 1e3:.1f}k / {h} h" for k, (c, h) in MUSTC.items())
        + f"; Spoken-SQuAD {SQA_EXAMPLES / 1e3:.1f}k questions, each with its passage's audio "
        f"(assumed {SQA_SECONDS:.0f} s). Tokens: {cal.qformer.queries} per "
        f"{cal.qformer.window}-frame window of speech (~11.8 per second); transcripts "
        f"{TRANSCRIPT_TOKENS_PER_S} and translations {TRANSLATION_TOKENS_PER_S} per second of "
        "audio; "
        f"stage 2's prompt {PROMPT_TOKENS} tokens (+{QA_QUESTION_TOKENS} for a QA question), a QA "
        f"answer {QA_ANSWER_TOKENS} (all assumptions)."
    )
    return "\n".join(rows)


def main(args, device):
    """scripts.bench --plan: calibrate, then print the plan."""
    import common
    from model import QFormerConfig

    llm_config, encoder_config = model_config(args.llm), model_config(args.encoder)
    dtype = torch.float32 if args.plan_dtype == "float32" else torch.bfloat16
    name = str(dtype).replace("torch.", "")
    recipe = common.RECIPES["demo" if args.llm == "smollm2" else "paper"]["model"]
    qformer = QFormerConfig(**{field: recipe[flag] for flag, field in common.SHAPE_FLAGS.items()})
    t0 = time.time()
    print(f"measuring on {device}: the LLM cut to 2 layers at full width, the encoder to 2 layers, "
          "random weights ...", flush=True)  # fmt: skip
    cal = Calibration(llm_config, encoder_config, qformer, dtype, device,
                      progress=lambda s: print(s, flush=True))  # fmt: skip
    for batches in stage_batches(cal.max_seconds).values():
        for b in batches:
            cal.front(b.seconds)
    how = (
        ", with layer norms in float32 under autocast as on CUDA"
        if device.type == "cpu" and dtype != torch.float32
        else ""
    )
    print(
        f"\n## Memory and time, estimated: --llm {args.llm} --encoder {args.encoder}, {name} "
        f"weights\n\nEstimates until a GPU measures them: each piece of the step measured on "
        f"{device}{how} ({time.time() - t0:.0f} s), scaled to the paper's batches "
        "(scripts/plan.py)."
    )
    plan(cal)
