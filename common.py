"""
common.py: what the scripts share, so each of them reads as one loop. No script imports another: what two
of them need lives here (or below: data.py, contrastive.py, model.py).

- distributed setup for torchrun (nanoGPT style, inline, no framework) and print0
- the one place where a --llm / --encoder name becomes a folder or hub id, demo presets included
  (resolve_model), and where the flags become a SpeechLLM (build_model)
- the command line: the two recipes (paper, demo), the flags pretrain.py and finetune.py share (and
  evaluate.py's --device / --dtype), declared once, and run_main: a user error is one line, not a traceback
- stage 1's forward: speech and transcript through the frozen LLM (pretrain.py's loss, the retrieval of
  pretrain.py and evaluate.py, bench.py)
- the data order: a seeded permutation per epoch, cut into global batches, sharded over ranks, resumable
- the optimiser and the paper's schedule (AdamW, cosine with linear warmup)
- the pieces of one optimiser step: DDP around the projector, gradient sync on the last micro-step only,
  clip + non-finite guard + step
- checkpoints that a killed run resumes from exactly: projector + optimiser + step + RNG + data position,
  written atomically (temporary folder, then rename), the last few kept; the stored retrieval centres
"""

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import contrastive
from data import Collator, UserError, to_device
from model import ModelError, QFormerConfig, SpeechLLM, resolve, unwrap, write_atomically, write_folder_atomically

# -----------------------------------------------------------------------------
# Distributed setup: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain `python` run has none.


def setup(device_arg="auto", seed=1337):
    """Returns (rank, world, device). Initialises the process group under torchrun. Every rank gets the
    same seed: the projector must start identical everywhere (DDP also broadcasts it), and the data
    shards come from the sampler, not from the RNG."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_arg)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    seed_everything(seed)
    return rank, world, device


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def autocast(device, dtype):
    """bf16/fp16 autocast (the frozen weights are loaded in that dtype too; the projector stays float32)."""
    if dtype != torch.float32:
        return torch.autocast(device.type, dtype=dtype)
    return nullcontext()


def resolve_dtype(name, device):
    """--dtype -> a torch dtype. auto: bf16 where the hardware multiplies bf16 natively (CUDA, or a CPU with
    Intel AMX), float32 elsewhere (an emulated bf16 would be slower than float32)."""
    if name == "auto":
        native = device.type == "cuda" or (device.type == "cpu" and torch.cpu._is_amx_tile_supported())
        return torch.bfloat16 if native else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# -----------------------------------------------------------------------------
# Models by name: the paper's presets, hub ids and folders (model.resolve), and the demo's presets (demokit)


def resolve_model(name, kind):
    """--llm / --encoder (kind "llm" | "encoder") -> the hub id or folder to load; SpeechLLM(..., resolve=this).
    The demo's presets ('smollm2', 'whisper-tiny', and 'tiny', 'tiny-whisper': small random models for smoke
    runs) are folders that demokit builds on first use; every other name goes to model.resolve."""
    import demokit  # the demo's plumbing, outside the tutorial files: imported only here

    build = demokit.PRESETS[kind].get(name)
    return str(build()) if build else resolve(name, kind)


# the projector's shape flags -> QFormerConfig's fields (its dropout: --dropout)
SHAPE_FLAGS = {
    "qformer_dim": "dim",
    "qformer_heads": "heads",
    "qformer_layers": "layers",
    "queries": "queries",
    "window": "window",
    "window_pos": "window_pos",
}


def qformer_config(args):
    """The projector's QFormerConfig from the flags (after the recipe or the --init checkpoint filled them)."""
    shape = {field: getattr(args, flag) for flag, field in SHAPE_FLAGS.items()}
    return QFormerConfig(**shape, dropout=args.dropout, time_mask=args.time_mask)


def build_model(args, dtype):
    """The SpeechLLM the flags describe: --llm, --encoder, the projector (qformer_config), its sink token, and
    with --match-embedding-rms its outputs started at the LLM's embedding scale."""
    model = SpeechLLM(
        args.llm, args.encoder, qformer_config(args), dtype=dtype, sink_token=args.sink_token, resolve=resolve_model
    )
    if args.match_embedding_rms:
        model.match_embedding_rms()
    return model


# -----------------------------------------------------------------------------
# Recipes: the defaults of every flag left out. "paper" = the authors' scripts (the default for every LLM but
# the demo's). "demo" = what makes the all-layer loss learn within minutes on a 2-core CPU with a 135M LLM;
# each of its changes is a flag of its own and is measured in the README ("What the demo changes, and why").
#   model     the models and the projector, for pretrain.py and for finetune.py --init none (a checkpoint
#             brings its own)
#   pretrain  stage 1's loss and optimisation
#   finetune  stage 2's optimisation. The demo's: a higher rate, smaller batches and more epochs, so that
#             10% of the demo corpus is enough to learn from (the paper's recipe makes --task qa --frac 0.1
#             just 10 steps); its measurements are in the README ("Results at demo scale").

RECIPES = {
    "paper": dict(
        model=dict(
            encoder="hubert",
            qformer_dim=768,
            qformer_heads=12,
            qformer_layers=4,
            queries=4,
            window=17,
            window_pos=False,
            dropout=0.1,
            time_mask=0.0,
            sink_token=False,
            match_embedding_rms=False,
        ),
        pretrain=dict(
            lr=1e-4,
            batch_size=10,
            grad_accum=2,
            epochs=5,
            max_steps=None,
            warmup_ratio=0.03,
            center=False,
            emb_steps=0,
            emb_lr=1e-3,
            eval_every=1000,
        ),
        finetune=dict(lr=1e-4, batch_size=4, grad_accum=5, epochs=2, warmup_ratio=0.03, eval_every=1000),
    ),
    "demo": dict(
        model=dict(
            encoder="whisper-tiny",
            qformer_dim=256,
            qformer_heads=4,
            qformer_layers=2,
            queries=4,
            window=17,
            window_pos=True,
            dropout=0.1,
            time_mask=0.0,
            sink_token=True,
            match_embedding_rms=True,
        ),
        pretrain=dict(
            lr=3e-4,
            batch_size=16,
            grad_accum=1,
            epochs=100,
            max_steps=500,
            warmup_ratio=0.01,
            center=True,
            emb_steps=400,
            emb_lr=1e-3,
            eval_every=100,
        ),
        finetune=dict(lr=1e-3, batch_size=8, grad_accum=1, epochs=10, warmup_ratio=0.03, eval_every=50),
    ),
}


def apply_recipe(args, *parts):
    """Fill every flag left out (None) from the recipe's parts ("model", "pretrain", "finetune"): --recipe, or
    by default demo for --llm smollm2 and paper for any other LLM (so --llm tiny without --encoder gets the
    paper's HuBERT-large). Returns {name, because, set: {flag: value}}, which the run prints in its first
    lines (announce) and saves in meta.json ("recipe")."""
    because = "--recipe" if args.recipe else f"the default for --llm {args.llm}"
    args.recipe = args.recipe or ("demo" if args.llm == "smollm2" else "paper")
    chosen = {}
    for part in parts:
        for flag, value in RECIPES[args.recipe][part].items():
            if getattr(args, flag, None) is None and value is not None:
                setattr(args, flag, value)
                chosen[flag] = value
    return {"name": args.recipe, "because": because, "set": chosen}


def announce(what, chosen):
    """A line or two naming a choice and the flag values it set, the models and the projector on the first:
    'recipe demo (the default for --llm smollm2) sets encoder=whisper-tiny qformer_dim=256 ... / lr=0.0003 ...'."""
    models = {"llm", *RECIPES["paper"]["model"]}
    first = " ".join(f"{flag}={value}" for flag, value in chosen.items() if flag in models)
    second = " ".join(f"{flag}={value}" for flag, value in chosen.items() if flag not in models)
    lines = [line for line in (first, second) if line]
    print0(f"{what} sets " + ("\n    ".join(lines) or "nothing"))


def recipe_note(flag, stage):
    """' (by recipe: paper 768, demo 256)': what the recipes set a flag to, for its help string ('' if nothing)."""
    values = {name: {**recipe["model"], **recipe[stage]}.get(flag) for name, recipe in RECIPES.items()}
    values = ", ".join(f"{name} {value}" for name, value in values.items() if value is not None)
    return f" (by recipe: {values})" if values else ""


# -----------------------------------------------------------------------------
# The flags the scripts share, declared once. Every flag a recipe sets defaults to None ("by recipe").

LLMS = "llama | smollm2 | tiny | a hub id | a local folder"
ENCODERS = "hubert | whisper-tiny | tiny | tiny-whisper | a hub id | a local folder"


def add_model_flags(p, from_init=False):
    """--llm, --encoder, --recipe. from_init (finetune.py): the models come from the --init checkpoint."""
    g = p.add_argument_group("models")
    if from_init:
        g.add_argument("--llm", help=f"{LLMS} (default: the --init checkpoint's; smollm2 with --init none)")
        g.add_argument("--encoder", help=f"{ENCODERS} (default: the checkpoint's; with --init none, by recipe)")
    else:
        g.add_argument("--llm", default="smollm2", help=f"{LLMS} (default: smollm2, the demo)")
        g.add_argument("--encoder", help=ENCODERS + recipe_note("encoder", "pretrain"))
    g.add_argument(
        "--recipe",
        choices=list(RECIPES),
        help="the defaults of the flags left out (common.RECIPES; default: demo for --llm smollm2, else paper)",
    )


def add_demo_corpus_flag(p):
    """--demo-corpus: which demo corpus the defaults read (demokit builds it on first use)."""
    p.add_argument(
        "--demo-corpus",
        choices=["full", "large"],
        default="full",
        help="without --data (--corpus): the demo corpus (large: every Bible verse left for train, 3x the QA; built "
        "once)",
    )


def add_data_flags(p, several, dev_use, max_audio_seconds, max_audio_note):
    """--data, --dev-data, --dev-size, --demo-corpus, --skip-bad, --max-audio-seconds, --cache-features,
    --feature-cache-file. several (finetune.py): --data and --dev-data take one manifest or more."""
    g = p.add_argument_group("data")
    s, nargs = ("(s)", "+") if several else ("", None)
    g.add_argument("--data", nargs=nargs, help=f"training manifest{s} (JSONL; default: the demo corpus's)")
    g.add_argument(
        "--dev-data",
        nargs=nargs,
        help=f"dev manifest{s} for {dev_use} (default: the demo corpus's dev split when --data is default)",
    )
    g.add_argument("--dev-size", type=int, default=100, help=f"dev examples used for {dev_use}")
    add_demo_corpus_flag(g)
    g.add_argument("--skip-bad", action="store_true", help="skip bad manifest lines (counted) instead of stopping")
    g.add_argument(
        "--max-audio-seconds",
        type=float,
        default=max_audio_seconds,
        help=f"skip longer audio (counted); {max_audio_note}",
    )
    g.add_argument(
        "--cache-features",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the frozen encoder's outputs in memory across epochs",
    )
    g.add_argument(
        "--feature-cache-file",
        help="also keep them in this file across runs (default: inside the demo corpus for the demo)",
    )
    return g


def add_projector_flags(p, from_init=False):
    """The projector's shape (SHAPE_FLAGS), --match-embedding-rms and --dropout. from_init (finetune.py): a
    checkpoint brings its own shape, so the shape flags are for a fresh projector (--init none)."""
    g = p.add_argument_group("projector" + (" (--init none; a checkpoint brings its own shape)" if from_init else ""))
    note = lambda flag: recipe_note(flag, "pretrain")  # noqa: E731
    on_off = argparse.BooleanOptionalAction
    g.add_argument("--qformer-dim", type=int, help="Q-Former width" + note("qformer_dim"))
    g.add_argument("--qformer-heads", type=int, help="attention heads" + note("qformer_heads"))
    g.add_argument("--qformer-layers", type=int, help="Q-Former blocks" + note("qformer_layers"))
    g.add_argument("--queries", type=int, help="query tokens per window" + note("queries"))
    g.add_argument("--window", type=int, help="encoder frames per window, 17 = 0.34 s" + note("window"))
    g.add_argument("--window-pos", action=on_off, help="learned position within the window" + note("window_pos"))
    g.add_argument(
        "--match-embedding-rms",
        action=on_off,
        help="start a fresh projector's outputs at the LLM's embedding scale" + note("match_embedding_rms"),
    )
    g.add_argument(
        "--dropout",
        type=float,
        help="the projector's dropout (default: 0.1" + ("; the checkpoint's with --init)" if from_init else ")"),
    )
    g.add_argument(
        "--time-mask",
        type=float,
        help="in training, zero about this share of the encoder frames in 0.2 s spans, SpecAugment-style "
        "(default: 0" + ("; the checkpoint's with --init)" if from_init else ")"),
    )
    return g


def add_optimisation_flags(p, stage):
    """Batch, learning rate, length and warmup, clipping, seed; stage ("pretrain" | "finetune"): whose recipe
    values the help names."""
    g = p.add_argument_group("optimisation")
    note = lambda flag: recipe_note(flag, stage)  # noqa: E731
    g.add_argument("--batch-size", type=int, help="per device" + note("batch_size"))
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimiser step" + note("grad_accum"))
    g.add_argument("--lr", type=float, help="peak learning rate" + note("lr"))
    g.add_argument("--epochs", type=float, help="passes over the training data" + note("epochs"))
    g.add_argument("--max-steps", type=int, help="optimiser steps (overrides --epochs)" + note("max_steps"))
    g.add_argument("--warmup-ratio", type=float, help="linear warmup, a fraction of the steps" + note("warmup_ratio"))
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
    g.add_argument("--seed", type=int, default=42, help="the projector's initialisation, the data order, dropout")
    return g


def add_system_flags(p, training=True):
    """--device, --dtype; for the training scripts also --save-every, --resume and the optional log
    destinations (--wandb, --tensorboard: the values of log.jsonl, see JsonLog). Returns the group (the
    scripts add --out and --eval-every to it)."""
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="auto = bf16 on CUDA and on CPUs with AMX (recent Intel Xeons), float32 elsewhere",
    )
    if training:
        g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0 = only at the end)")
        g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
        g.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (pip install wandb)")
        g.add_argument("--wandb-project", default="contrastive-speechllm", help="the W&B project of --wandb")
        g.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events to <out>/tensorboard/")
    return g


# -----------------------------------------------------------------------------
# User errors: one line, not a traceback


def select_layers(spec, num_layers):
    """contrastive.select_layers for the --layers flag: a spec that does not fit the LLM is a user error."""
    try:
        return contrastive.select_layers(spec, num_layers)
    except ValueError as e:
        raise UserError(f"--layers {spec}: {e}") from None


def run_main(main):
    """Every script ends in `if __name__ == "__main__": common.run_main(main)`. A user error (UserError: a bad
    manifest line, conflicting flags, a missing --init checkpoint; ModelError: a model that cannot be reached
    or loaded, a checkpoint that is missing or does not fit) ends the run with one line on stderr and exit
    status 1, not a traceback. Anything else is a bug in the code, and keeps its traceback."""
    try:
        main()
    except (UserError, ModelError) as e:
        sys.exit(f"{Path(sys.argv[0]).name}: error: " + " ".join(str(e).splitlines()))


# -----------------------------------------------------------------------------
# Stage 1's forward: both sides of a contrastive pair through the frozen LLM


class Stage1(NamedTuple):
    """What stage1_forward returns.
    speech_states [L, B, S, D], speech_pool_mask [B, S]: the speech side's hidden states at the layers, and
        the positions its mean pools (the sink token left out).
    text_states [L, B, T, D], text_pool_mask [B, T]: the same for the transcripts; None with the text cache,
        which gives text_pooled [L, B, D] instead (else None).
    speech [B, S', D], speech_mask [B, S']: the projector's outputs as a chat prompt takes them (no sink
        token), so the ASR loss of --loss contrastive+asr reuses them."""

    speech_states: torch.Tensor
    speech_pool_mask: torch.Tensor
    text_states: torch.Tensor | None
    text_pool_mask: torch.Tensor | None
    text_pooled: torch.Tensor | None
    speech: torch.Tensor
    speech_mask: torch.Tensor


def untimed(name):
    return nullcontext()


def stage1_forward(model, batch, layers, text_cache=None, masked_mean=contrastive.masked_mean, part=untimed):
    """The paper's stage-1 forward of a collated batch (data.Collator with the tokenizer):

        speech  the frozen encoder -> the projector -> the frozen LLM: hidden states at `layers`, with
                gradients into the projector
        text    the transcript's token embeddings -> the same frozen LLM, the same layers, no gradients (the
                text side has nothing to train)

    Two additions, both off in the paper:
      - the sink token (model.sink_token, the demo's --sink-token): the LLM's BOS in front of both sequences,
        left out of the pool (model.with_sink);
      - the text cache (a dict, pretrain.py's --text-cache): a transcript's text side depends on nothing but
        its words and the layers, so its pooled states (masked_mean: the loss's own pooling) are stored
        under that key the first time and reused; then text_pooled holds them.
    part(name): a context manager around each part (bench.py times them)."""
    with part("encoder (frozen)"):
        frames, frame_mask = model.speech_frames(batch)  # from the feature cache where it has them
    with part("projector"):
        speech, speech_mask = model.projector(frames.float(), frame_mask)

    text_states = text_pool_mask = text_pooled = None
    with part("LLM text pass (no grad)"):
        keys = [f"{layers}:{ex['text']}" for ex in batch["examples"]]
        if text_cache is None or not all(key in text_cache for key in keys):
            with torch.no_grad():
                text, text_mask, text_pool_mask = model.with_sink(
                    model.embed_tokens(batch["text_ids"]), batch["text_mask"]
                )
                text_states = model.hidden_states(text, text_mask, layers)
        if text_cache is not None:  # the addition: pooled once per transcript, then read back
            if text_states is not None:
                pooled = masked_mean(text_states, text_pool_mask)
                text_cache.update({key: pooled[:, i] for i, key in enumerate(keys)})
            text_states, text_pool_mask = None, None
            text_pooled = torch.stack([text_cache[key] for key in keys], 1)

    with part("LLM speech pass (fwd)"):
        inputs, mask, speech_pool_mask = model.with_sink(speech, speech_mask)
        speech_states = model.hidden_states(inputs, mask, layers)
    return Stage1(speech_states, speech_pool_mask, text_states, text_pool_mask, text_pooled, speech, speech_mask)


@torch.no_grad()
def pooled_pairs(model, examples, layers, batch_size=16, device="cpu", autocast=None):
    """Mean-pooled hidden states at `layers` of every (speech, transcript) pair, for retrieval: two [L, N, D]
    tensors (text, speech)."""
    collate = Collator(model.encoder.feature_extractor, model.tokenizer)
    speech_pooled, text_pooled = [], []
    was_training = model.training
    model.eval()
    for i in range(0, len(examples), batch_size):
        batch = to_device(collate(examples[i : i + batch_size]), device)
        with autocast or torch.autocast("cpu", enabled=False):
            out = stage1_forward(model, batch, layers)
            speech_pooled.append(contrastive.masked_mean(out.speech_states, out.speech_pool_mask))
            text_pooled.append(contrastive.masked_mean(out.text_states, out.text_pool_mask))
    model.train(was_training)
    return torch.cat(text_pooled, 1), torch.cat(speech_pooled, 1)


# -----------------------------------------------------------------------------
# Data order: deterministic, shardable, resumable


class BatchOrder:
    """Yields lists of example indices, one micro-batch per call, for this rank.

    Epoch e shuffles all examples with seed + e, cuts the permutation into global batches of
    batch_size * world examples (the incomplete last one is dropped), and rank r takes its slice.
    So N processes with batch B see exactly the batches one process with batch N*B sees, and the
    position (epoch, batch) is all a checkpoint needs to continue the same order."""

    def __init__(self, n, batch_size, rank=0, world=1, seed=0, shuffle=True):
        self.n, self.batch_size, self.rank, self.world, self.seed, self.shuffle = (
            n,
            batch_size,
            rank,
            world,
            seed,
            shuffle,
        )
        self.per_epoch = n // (batch_size * world)
        if self.per_epoch == 0:
            raise UserError(
                f"{n} examples are fewer than one global batch ({batch_size} x {world} ranks): "
                "lower --batch-size or give more data"
            )
        self.epoch, self.index = 0, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.index == self.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        order = (
            torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
            if self.shuffle
            else torch.arange(self.n)
        )
        start = (self.index * self.world + self.rank) * self.batch_size
        self.index += 1
        return order[start : start + self.batch_size].tolist()

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state):
        self.epoch, self.index = state["epoch"], state["index"]


# -----------------------------------------------------------------------------
# Optimiser and schedule (the paper: AdamW, lr 1e-4, weight decay 0, cosine, 3% warmup, clip 1.0)


def make_optimizer(model, lr, weight_decay=0.0):
    params = [p for p in unwrap(model.projector).parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999))


def cosine_lr(step, total_steps, lr, warmup_steps):
    """Linear warmup to lr, then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class NonFiniteGuard:
    """Skip optimiser steps whose gradient norm is inf/NaN (fp16/bf16 overflow, a degenerate batch), and
    stop the run after `patience` in a row. The norm is taken after DDP's all-reduce, so every rank
    makes the same decision."""

    def __init__(self, patience=5):
        self.patience, self.in_a_row, self.skipped = patience, 0, 0

    def ok(self, grad_norm, step, out):
        if torch.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        print0(f"step {step}: non-finite gradient norm ({grad_norm.item()}), step skipped ({self.in_a_row} in a row)")
        if self.in_a_row >= self.patience:
            raise UserError(
                f"Stopping: {self.in_a_row} non-finite steps in a row. The last good checkpoint in {out} is "
                "intact; try a lower --lr, --dtype float32, or check the data."
            )
        return False


# -----------------------------------------------------------------------------
# One optimiser step, as both loops take it:
#
#     for micro in range(grad_accum):
#         with common.grad_sync(model, micro, grad_accum), common.autocast(device, dtype):
#             (loss / grad_accum).backward()
#     grad_norm = common.clip_and_step(optimizer, params, grad_clip, guard, step, out)


def wrap_ddp(model, device, world):
    """Under torchrun, DDP around the projector only: the frozen encoder and LLM have nothing to synchronise."""
    if world > 1:
        model.projector = DDP(
            model.projector, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
    return model


def grad_sync(model, micro, grad_accum):
    """Under DDP, all-reduce the gradients only on the last micro-step of an optimiser step (nanoGPT's
    trick): the earlier micro-steps just accumulate locally."""
    if micro == grad_accum - 1 or not isinstance(model.projector, DDP):
        return nullcontext()
    return model.projector.no_sync()


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_and_step(optimizer, params, grad_clip, guard, step, out):
    """Clip the gradient norm, take the step unless the norm is inf/NaN (NonFiniteGuard), clear the
    gradients. Returns the norm before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if guard.ok(grad_norm, step, out):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


# -----------------------------------------------------------------------------
# Checkpoints: <out>/ckpt-<step>/ = projector.safetensors + meta.json + train_state.pt


def save_checkpoint(out, model, optimizer, step, order, args, keep=3, **meta):
    """Everything a run needs to continue exactly. Written to a temporary folder and renamed, so a kill
    mid-write leaves the previous checkpoint as the newest complete one. Rank 0 only."""
    out = Path(out)

    def write(tmp):
        model.save_projector(tmp, step=step, args=vars(args), **meta)
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "step": step,
                "order": order.state_dict(),
                "rng": {
                    "python": random.getstate(),
                    "numpy": np.random.get_state(),
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                },
            },
            tmp / "train_state.pt",
        )

    final = write_folder_atomically(out / f"ckpt-{step:07d}", write)
    for old in sorted(out.glob("ckpt-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out):
    ckpts = sorted(p for p in Path(out).glob("ckpt-*") if (p / "train_state.pt").exists())
    return ckpts[-1] if ckpts else None


def resume(out, model, optimizer, order):
    """Load the newest checkpoint in `out`; returns the step to continue from (0 if there is none)."""
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        print0(f"--resume: no checkpoint in {out}, starting from scratch")
        return 0
    model.load_projector(ckpt)
    state = torch.load(ckpt / "train_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    order.load_state_dict(state["order"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    print0(f"resumed from {ckpt} at step {state['step']}")
    return state["step"]


CENTERS = "centers.safetensors"  # written next to the projector by `pretrain.py --center`


def save_centers(folder, text_mean, speech_mean, layers, items):
    """Store the per-layer means [L, D] of the pooled text and speech states over `items` training pairs."""
    from safetensors.torch import save_file

    tensors = {"text": text_mean.float().contiguous().cpu(), "speech": speech_mean.float().contiguous().cpu()}
    metadata = {"layers": json.dumps(layers), "items": str(items)}
    write_atomically(Path(folder) / CENTERS, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_centers(folder, layers):
    """(text_mean, speech_mean) stored by pretraining for exactly these layers, else None."""
    from safetensors import safe_open

    path = Path(folder) / CENTERS
    if not path.exists():
        return None
    with safe_open(str(path), "pt") as f:
        if json.loads(f.metadata()["layers"]) != list(layers):
            return None
        return f.get_tensor("text"), f.get_tensor("speech")


class JsonLog:
    """One JSON line per logged step in <out>/log.jsonl (rank 0), for plots (plot_log.py) and the README's
    numbers; with --wandb and/or --tensorboard the same values go there too, a per-layer list as one scalar
    per layer ("dev_r1/layer5"). Both are optional packages, imported only when asked for."""

    def __init__(self, out, enabled=True, wandb_project=None, tensorboard=False, config=None):
        self.path, self.enabled, self.t0 = Path(out) / "log.jsonl", enabled, time.time()
        self.wandb = self.tensorboard = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise UserError(
                    "--wandb needs the wandb package: pip install wandb (requirements-extras.txt)"
                ) from None
            self.wandb = wandb.init(project=wandb_project, name=Path(out).name, dir=str(out), config=config)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError(
                    "--tensorboard needs the tensorboard package: pip install tensorboard (requirements-extras.txt)"
                ) from None
            self.tensorboard = SummaryWriter(str(Path(out) / "tensorboard"))

    @classmethod
    def for_run(cls, args, enabled):
        """The log of a training run: --out, --wandb (--wandb-project), --tensorboard; the run's flags as config."""
        wandb_project = args.wandb_project if args.wandb else None
        return cls(args.out, enabled, wandb_project, args.tensorboard, config=vars(args))

    def __call__(self, **record):
        if not self.enabled:
            return
        record = {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"time": round(time.time() - self.t0, 2), **record}) + "\n")
        scalars = self.scalars(record)
        if self.wandb is not None:
            self.wandb.log(scalars, step=record.get("step"))
        if self.tensorboard is not None:
            for name, value in scalars.items():
                self.tensorboard.add_scalar(name, value, record.get("step"))

    @staticmethod
    def scalars(record):
        """The numbers of a record by name, each entry of a per-layer list under <name>/layer<index>."""
        layers = record.get("layers") or []
        out = {}
        for name, value in record.items():
            if name in ("step", "layers") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                out[name] = value
            elif isinstance(value, list) and len(value) == len(layers):
                out.update({f"{name}/layer{layer}": v for layer, v in zip(layers, value)})
        return out

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()
