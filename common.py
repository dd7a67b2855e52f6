"""
common.py: the recipes and the flags the two training scripts share, then their plumbing (nanochat's
common.py): one-line errors, models by name, torchrun setup, the data order, the schedule,
checkpoints, atomic writes and the log. It imports nothing from the project, so every other file can
import it.

    # every flag with the value that will run (the demo's recipe)
    python pretrain.py --help
    # the same under the paper's recipe
    python pretrain.py --llm llama --help
"""

import argparse
import errno
import hashlib
import importlib
import json
import math
import os
import pickle
import random
import shutil
import socket
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

# -----------------------------------------------------------------------------
# Recipes: the defaults of every flag a run leaves out. "paper" = the authors' scripts (the default
# for every LLM but the demo's). "demo" = what makes the all-layer loss learn within minutes on a
# 2-core CPU with a 135M LLM; the README's recipe table says what each departure buys.
#   model     the models and the projector (pretrain.py, and finetune.py --init none; a checkpoint
#             brings its own)
#   pretrain  stage 1's loss and optimisation
#   finetune  stage 2's optimisation and what it trains

# How a run is kept: the paper's on a GPU (its data named, checkpoints every 1000 steps as the
# authors', gradient checkpointing on as theirs, no encoder-feature cache: MuST-C's would be ~150 GB of
# host memory); the demo's on a CPU (its corpus, one checkpoint at the end, cached encoder features)
# The chat's system turn: the authors' (their LLaVA template), or the LLM template's own ("")
AUTHORS_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)
PAPER_RUN = dict(data=None, save_every=1000, grad_checkpoint=True, cache_features=False,
                 system_prompt=AUTHORS_SYSTEM_PROMPT)  # fmt: skip
DEMO_RUN = dict(data="demo", save_every=0, grad_checkpoint=False, cache_features=True,
                system_prompt="")  # fmt: skip

RECIPES = {
    "paper": dict(
        model=dict(encoder="hubert", qformer_dim=768, qformer_heads=12, qformer_layers=4, queries=4, window=17,
                   window_pos=False, dropout=0.1, time_mask=0.0, sink_token=False, match_embedding_rms=False),
        pretrain=dict(loss="contrastive", lr=1e-4, batch_size=10, grad_accum=2, epochs=5, max_steps=0,
                      warmup_ratio=0.03, center=False, emb_steps=0, emb_lr=1e-3, eval_every=1000,
                      ctc_classes=0, **PAPER_RUN),
        finetune=dict(lr=1e-4, batch_size=4, grad_accum=5, epochs=2, max_steps=0, warmup_ratio=0.03,
                      eval_every=1000, compress=False, lora=0, ctc_weight=0.0, freeze_projector=False,
                      ctc_classes=0, qa_newline=True, **PAPER_RUN),
        evaluate=dict(max_new_tokens=200, loop_repeats=0, joint_ctc=0.0),
    ),
    "demo": dict(
        model=dict(encoder="whisper-tiny", qformer_dim=256, qformer_heads=4, qformer_layers=2, queries=4,
                   window=17, window_pos=True, dropout=0.1, time_mask=0.0, sink_token=True,
                   match_embedding_rms=True),
        pretrain=dict(loss="contrastive+ctc", lr=3e-4, batch_size=16, grad_accum=1, epochs=100,
                      max_steps=640, warmup_ratio=0.01, center=True, emb_steps=600, emb_lr=1e-3,
                      eval_every=100, ctc_classes=8192, **DEMO_RUN),
        finetune=dict(lr=1e-3, batch_size=8, grad_accum=1, epochs=10, max_steps=150, warmup_ratio=0.03,
                      eval_every=50, compress=True, lora=8, ctc_weight=1.0, freeze_projector=False,
                      ctc_classes=0, qa_newline=False, **DEMO_RUN),
        evaluate=dict(max_new_tokens="auto", loop_repeats=3, joint_ctc="auto"),
    ),
}  # fmt: skip

# the projector's shape flags -> QFormerConfig's fields (dropout and time_mask only act in training)
SHAPE_FLAGS = dict(qformer_dim="dim", qformer_heads="heads", qformer_layers="layers",
                   queries="queries", window="window", window_pos="window_pos")  # fmt: skip


def recipe_defaults(first, given, parts):
    """The recipe's values of `parts` ("model", "pretrain", "finetune") as argparse defaults. first:
    the command line parsed once (its --recipe and --llm pick the recipe: demo for --llm smollm2,
    else paper); given: the flags on the command line. Also sets `recipe_set` (what the recipe
    decided, for the run's first line and meta.json)."""
    name = first.recipe or ("demo" if first.llm == "smollm2" else "paper")
    because = "--recipe" if first.recipe else f"the default for --llm {first.llm}"
    values = {flag: value for part in parts for flag, value in RECIPES[name][part].items()}
    if "epochs" in given and "max_steps" not in given:
        values["max_steps"] = 0  # --epochs on the command line: the recipe's step budget yields
    chosen = {flag: value for flag, value in values.items() if flag not in given}
    return {
        **values,
        "recipe": name,
        "recipe_set": {"name": name, "because": because, "set": chosen},
    }


def parse_args(p, argv, defaults_for):
    """Parse twice: once for the flags the defaults depend on (--llm, --recipe, --init, ...), then
    with the defaults defaults_for(first, given) returns, so --help and the run show the values that
    will run."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    first, _ = p.parse_known_args([a for a in argv if a not in ("-h", "--help")])
    p.set_defaults(**defaults_for(first, given_flags(p, argv)))
    return p.parse_args(argv)


def given_flags(p, argv):
    """The dest of every flag written on the command line (the parsers take no abbreviations)."""
    written = {a.split("=")[0] for a in argv if a.startswith("--")}
    return {action.dest for action in p._actions if written & set(action.option_strings)}


def announce(what, chosen):
    """'recipe demo (the default for --llm smollm2) sets encoder=whisper-tiny ... / lr=0.0003
    ...'."""
    models = {"llm", *RECIPES["paper"]["model"]}
    first = " ".join(f"{flag}={value}" for flag, value in chosen.items() if flag in models)
    second = " ".join(f"{flag}={value}" for flag, value in chosen.items() if flag not in models)
    print0(f"{what} sets " + ("\n    ".join(line for line in (first, second) if line) or "nothing"))


# -----------------------------------------------------------------------------
# The flags pretrain.py and finetune.py share. A flag a recipe sets is declared without a default:
# the script's parse_args fills it in before the final parse.

LLMS = "llama | smollm2 | tiny | a hub id | a local folder"
ENCODERS = "hubert | whisper-tiny | tiny | tiny-whisper | a hub id | a local folder"
ON_OFF = argparse.BooleanOptionalAction


def ranged(kind, text, low=None, high=None, low_open=False, high_open=False):
    """An argparse `type=` that parses `kind` and checks the range, so a value outside it is
    argparse's one line: "argument --lr: must be a number > 0, got '-1'" (exit 2)."""

    def parse(value):
        try:
            x = kind(value)
        except ValueError:
            x = None
        bad = x is None or not math.isfinite(x)
        bad = bad or (low is not None and (x < low or (low_open and x == low)))
        bad = bad or (high is not None and (x > high or (high_open and x == high)))
        if bad:
            raise argparse.ArgumentTypeError(f"must be {text}, got {value!r}")
        return x

    return parse


positive_int = ranged(int, "an integer >= 1", low=1)
non_negative_int = ranged(int, "an integer >= 0", low=0)
positive_float = ranged(float, "a number > 0", low=0, low_open=True)
non_negative_float = ranged(float, "a number >= 0", low=0)
fraction = ranged(float, "a number in [0, 1)", low=0, high=1, high_open=True)  # dropout, masking
unit_interval = ranged(float, "a number in [0, 1]", low=0, high=1)  # warmup ratio


def device_flag(value):
    """--device: auto | cpu | cuda | cuda:N, and CUDA only where there is one."""
    try:
        device = torch.device(value) if value != "auto" else None
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected auto, cpu or cuda[:N], got {value!r}") from None
    if device is not None and device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(
            f"{value}: CUDA is not available on this machine; use --device cpu (or auto)"
        )
    return value


def check_projector_flags(p, args):
    """What argparse cannot see flag by flag: the attention heads must divide the width."""
    if args.qformer_dim % args.qformer_heads:
        p.error(
            f"--qformer-heads {args.qformer_heads} must divide --qformer-dim {args.qformer_dim}"
        )


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every flag's default (the value that will run) after its
    help."""


def parser(doc):
    return argparse.ArgumentParser(
        description=doc, formatter_class=HelpFormatter, allow_abbrev=False
    )


def add_model_flags(p):
    g = p.add_argument_group("models")
    g.add_argument("--llm", default="smollm2", help=LLMS)
    g.add_argument("--encoder", help=ENCODERS)
    g.add_argument("--recipe", choices=list(RECIPES), help="the defaults of the flags left out")
    g.add_argument("--system-prompt", help="the chat's system turn ('': the template's own)")


def add_data_flags(p, several, max_audio_seconds):
    """several (finetune.py): --data and --dev-data take one manifest or more."""
    g = p.add_argument_group("data")
    nargs = "+" if several else None
    g.add_argument(
        "--data", nargs=nargs, help="training manifest(s), JSONL; demo: the demo corpus's"
    )
    g.add_argument("--dev-data", nargs=nargs, help="dev manifest(s); demo: the demo's dev split")
    g.add_argument("--dev-size", type=non_negative_int, default=100, help="dev examples used")
    add_demo_corpus_flag(g)
    g.add_argument("--skip-bad", action="store_true", help="skip bad manifest lines (counted)")
    g.add_argument(
        "--max-audio-seconds",
        type=positive_float,
        default=max_audio_seconds,
        help="skip longer audio",
    )
    g.add_argument("--cache-features", action=ON_OFF, help="keep encoder outputs in memory")
    g.add_argument("--feature-cache-file", help="and in this file across runs")


def add_demo_corpus_flag(p):
    p.add_argument(
        "--demo-corpus", choices=["full", "large"], default="full", help="which demo corpus"
    )


def need_data(args):
    """--data, named: the paper's runs train on manifests that scripts/prepare_data.py writes."""
    if not args.data:
        raise UserError(
            "--data: name the training manifest(s); `python -m scripts.prepare_data` writes the "
            "paper's from MuST-C and Spoken-SQuAD (docs/paper-setup.md), `--data demo` is the demo's"
        )


def uses_demo(data, llm, encoder):
    """Whether a run needs the offline demo (extras/demo.py, demokit/): its corpus (--data demo) or
    one of its models by name."""
    data = [data] if isinstance(data, str) else data or []
    return "demo" in data or llm in DEMO_MODELS["llm"] or encoder in DEMO_MODELS["encoder"]


def add_projector_flags(p, title="projector"):
    g = p.add_argument_group(title)
    g.add_argument("--qformer-dim", type=positive_int, help="Q-Former width")
    g.add_argument("--qformer-heads", type=positive_int, help="attention heads")
    g.add_argument("--qformer-layers", type=positive_int, help="Q-Former blocks")
    g.add_argument("--queries", type=positive_int, help="query tokens per window")
    g.add_argument("--window", type=positive_int, help="encoder frames per window (17 = 0.34 s)")
    g.add_argument("--window-pos", action=ON_OFF, help="learned position within the window")
    g.add_argument(
        "--match-embedding-rms", action=ON_OFF, help="start at the LLM's embedding scale"
    )
    g.add_argument("--dropout", type=fraction, help="the projector's dropout")
    g.add_argument("--time-mask", type=fraction, help="share of encoder frames masked in training")


def add_optimisation_flags(p):
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=positive_int, help="per device")
    g.add_argument("--grad-accum", type=positive_int, help="micro-batches per optimiser step")
    g.add_argument("--lr", type=non_negative_float, help="peak learning rate")
    g.add_argument("--epochs", type=positive_float, help="passes over the training data")
    g.add_argument(
        "--max-steps", type=non_negative_int, default=0, help="optimiser steps (0: from --epochs)"
    )
    g.add_argument("--warmup-ratio", type=unit_interval, help="linear warmup, a share of the steps")
    g.add_argument(
        "--grad-clip", type=positive_float, default=1.0, help="clip the gradient norm to this"
    )
    g.add_argument(
        "--seed", type=non_negative_int, default=42, help="initialisation, data order, dropout"
    )


def add_system_flags(p, training=True):
    """--device, --dtype; for training also checkpoints, --resume and the optional log
    destinations."""
    g = p.add_argument_group("system")
    g.add_argument("--device", type=device_flag, default="auto", help="auto | cpu | cuda")
    dtypes = ["auto", "float32", "bfloat16", "float16"]
    g.add_argument(
        "--dtype",
        choices=dtypes,
        default="auto",
        help="auto: bf16 on CUDA and on CPUs with bf16 instructions (AMX, AVX512-BF16)",
    )
    if training:
        g.add_argument(
            "--eval-every",
            type=non_negative_int,
            help="dev evaluation every N steps (0: at the end)",
        )
        g.add_argument(
            "--save-every", type=non_negative_int, help="checkpoint every N steps (0: at the end)"
        )
        g.add_argument(
            "--grad-checkpoint", action=ON_OFF, help="recompute the LLM's activations in backward"
        )
        once = g.add_mutually_exclusive_group()  # one run per --out folder (start_run)
        once.add_argument(
            "--resume", action="store_true", help="continue from the newest checkpoint in --out"
        )
        once.add_argument(
            "--overwrite", action="store_true", help="clear an earlier run out of --out first"
        )
        g.add_argument("--wandb", action="store_true", help="also log to Weights & Biases")
        g.add_argument("--wandb-project", default="contrastive-speechllm", help="the W&B project")
        g.add_argument("--tensorboard", action="store_true", help="also write <out>/tensorboard/")
    return g


# -----------------------------------------------------------------------------
# User errors: one line, not a traceback


class UserError(Exception):
    """A mistake in the input (a bad manifest line, conflicting flags): the scripts print it as one
    line."""


class ModelError(Exception):
    """A model that cannot be reached or loaded, or a checkpoint that is missing or does not fit."""


def run_main(main):
    """Every script ends in `common.run_main(main)`: a UserError or ModelError (or a full disk) is
    one line on stderr and exit status 1; anything else is a bug in the code, and keeps its
    traceback."""
    try:
        main()
    except (UserError, ModelError) as e:
        sys.exit(f"{Path(sys.argv[0]).name}: error: " + " ".join(str(e).splitlines()))
    except OSError as e:  # a full disk anywhere else (a log line, a cache): no bug, one line
        if e.errno != errno.ENOSPC:
            raise
        sys.exit(f"{Path(sys.argv[0]).name}: error: the disk is full ({e}): free some space")


# -----------------------------------------------------------------------------
# Models by name: the paper's presets are hub ids; the demo's ('smollm2', 'whisper-tiny', and the
# tiny random models for smoke runs) are folders that demokit builds on first use; anything else is
# a hub id or a folder.

LLM_PRESETS = {
    "llama": "meta-llama/Llama-3.1-8B-Instruct"
}  # the paper (gated: `huggingface-cli login`)
ENCODER_PRESETS = {"hubert": "facebook/hubert-large-ls960-ft"}  # the paper
HOW_TO_GET_MODELS = (
    "Hugging Face ids need the hub (or a local copy in the HF cache); gated models such as "
    "meta-llama/* also need an accepted licence and `huggingface-cli login`, and the paper's "
    "setup needs a GPU. `python pretrain.py` with no arguments runs the offline CPU demo instead."
)


# the demo's models by name: folders that demokit builds on first use (extras/demo.resolve_model)
DEMO_MODELS = {"llm": ("smollm2", "tiny"), "encoder": ("whisper-tiny", "tiny", "tiny-whisper")}


def resolve_model(name, kind):
    """--llm / --encoder (kind "llm" | "encoder") -> the hub id or folder to load."""
    if name in DEMO_MODELS[kind]:
        raise ModelError(f"'{name}' is a demo model: load it through extras.demo.resolve_model")
    target = {"llm": LLM_PRESETS, "encoder": ENCODER_PRESETS}[kind].get(name, name)
    if not Path(target).exists():
        check_hub(target)
    return target


def check_hub(repo_id):
    """Fail at once (rather than after minutes of retries) when a hub id is neither cached nor
    reachable."""
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return  # in the local HF cache
    host = urlparse(constants.ENDPOINT).hostname
    try:
        if constants.HF_HUB_OFFLINE:
            raise OSError("HF_HUB_OFFLINE is set")
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as e:
        raise ModelError(
            f"Cannot load '{repo_id}': it is not a local folder, not in the Hugging Face cache, "
            f"and the hub ({host}) is out of reach ({e}). " + HOW_TO_GET_MODELS
        ) from None


def load_pretrained(auto_class, name_or_path, what, **kwargs):
    """from_pretrained with an error that says what was tried and what to do instead."""
    try:
        return auto_class.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        why = " ".join(str(e).split())  # transformers' message, on one line
        why = why if len(why) <= 300 else why[:300] + " ..."
        raise ModelError(
            f"Could not load the {what} '{name_or_path}': {type(e).__name__}: {why} "
            + HOW_TO_GET_MODELS
        ) from None


def same_model(given, saved):
    """A --llm / --encoder value against a checkpoint's: equal as preset names, hub ids or
    folders."""
    presets = {**LLM_PRESETS, **ENCODER_PRESETS}
    a, b = presets.get(given, given), presets.get(saved, saved)
    if Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a == b


# -----------------------------------------------------------------------------
# Distributed setup: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain `python` run has none.


def setup(device_arg="auto", seed=1337):
    """Returns (rank, world, device). Every rank gets the same seed: the projector must start
    identical everywhere (DDP also broadcasts it); the data shards come from BatchOrder, not from
    the RNG."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_arg)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return rank, world, device


def unwrap(module):
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return getattr(module, "module", module)


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def autocast(device, dtype):
    """bf16/fp16 autocast (the frozen weights are loaded in that dtype too; the projector stays
    float32)."""
    if dtype != torch.float32:
        return torch.autocast(device.type, dtype=dtype)
    return nullcontext()


def resolve_dtype(name, device):
    """--dtype -> a torch dtype. auto: bf16 where the hardware multiplies bf16 natively (CUDA, or a
    CPU with Intel AMX or AVX512-BF16 instructions), float32 elsewhere (an emulated bf16 would be
    slower than float32)."""
    if name == "auto":
        native = device.type == "cuda" or (
            device.type == "cpu"
            and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
        )
        return torch.bfloat16 if native else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# -----------------------------------------------------------------------------
# Data order: deterministic, shardable, resumable


class BatchOrder:
    """Yields lists of example indices, one micro-batch per call, for this rank.

    Epoch e shuffles all examples with seed + e, cuts the permutation into global batches of
    batch_size * world examples (the incomplete last one is dropped), and rank r takes its slice.
    So N processes with batch B see exactly the batches one process with batch N*B sees, and the
    position (epoch, batch) is all a checkpoint needs to continue the same order."""

    def __init__(self, n, batch_size, rank=0, world=1, seed=0):
        self.n, self.batch_size, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
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
        order = torch.randperm(
            self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)
        )
        start = (self.index * self.world + self.rank) * self.batch_size
        self.index += 1
        return order[start : start + self.batch_size].tolist()

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state):
        if not 0 <= state["index"] <= self.per_epoch:  # another data or batch size (start_run)
            raise UserError(
                f"the saved data position (batch {state['index']}) lies past this epoch's "
                f"{self.per_epoch} batches: the data or --batch-size changed"
            )
        self.epoch, self.index = state["epoch"], state["index"]


# -----------------------------------------------------------------------------
# The schedule (the paper: AdamW, lr 1e-4, weight decay 0, cosine, 3% warmup, clip 1.0)


def cosine_lr(step, total_steps, lr, warmup_steps):
    """Linear warmup to lr, then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class NonFiniteGuard:
    """Skip optimiser steps whose gradient norm is inf/NaN (fp16/bf16 overflow, a degenerate batch),
    and stop the run after `patience` in a row. The norm is taken after DDP's all-reduce, so every
    rank makes the same decision."""

    def __init__(self, patience=5):
        self.patience, self.in_a_row, self.skipped = patience, 0, 0

    def ok(self, grad_norm, step, out):
        if torch.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        print0(
            f"step {step}: non-finite gradient norm ({grad_norm.item()}), skipped "
            f"({self.in_a_row} in a row)"
        )
        if self.in_a_row >= self.patience:
            raise UserError(
                f"Stopping: {self.in_a_row} non-finite steps in a row. The last good checkpoint "
                f"in {out} is intact; try a lower --lr, --dtype float32, or check the data."
            )
        return False


# -----------------------------------------------------------------------------
# One run per folder: <out>/run.json records what the run is (the script, its flags, its training
# data's hash); a second run into the folder is refused, a resumed one must match it.

RUN = "run.json"
# what a run writes into its folder (--overwrite clears exactly these, never anything else)
RUN_FILES = (RUN, "log.jsonl", "meta.json", "projector.safetensors", "lora.safetensors",
             "centers.safetensors", "eval*.json", "tensorboard", "wandb", "ckpt-*", ".ckpt-*",
             ".final*")  # fmt: skip
# flags a resumed run may change (printed when it does): how long it runs, how often it evaluates
# and saves, where it logs, the device and the caches (which hold the same values either way)
CHANGEABLE = {"max_steps", "epochs", "eval_every", "save_every", "resume", "overwrite", "wandb",
              "wandb_project", "tensorboard", "device", "dev_data", "dev_size", "cache_features",
              "feature_cache_file", "text_cache", "loss_impl", "recipe_set", "init_set",
              "out"}  # fmt: skip
PATH_FLAGS = ("data", "dev_data", "init", "feature_cache_file", "llm", "encoder")


def start_run(args, script):
    """Check --out before anything is built, writing nothing: refuse a folder that holds another
    run (unless --resume continues it or --overwrite clears it), a --resume whose flags or data
    differ where they cannot change mid-run, and the packages --wandb / --tensorboard need. Returns
    the run's record for begin_run."""
    out, record = Path(args.out), run_record(args, script)
    for flag in LOG_PACKAGES:  # checked now: the log opens after begin_run has written run.json
        if getattr(args, flag[2:]):
            log_package(flag)
    if args.resume:
        record["changes"] = compare_runs(out, record)
    elif not args.overwrite and holds_run(out):
        raise UserError(
            f"--out {out} holds another run ({', '.join(holds_run(out))}): continue it with "
            "--resume, pick a new --out, or pass --overwrite to clear it first"
        )
    return record


def begin_run(record, args, model, optimizer, order):
    """Once the models and data are ready: clear the folder (--overwrite), record the run in
    <out>/run.json, and load the newest checkpoint (--resume). Returns the step to start from."""
    out = Path(args.out)
    if dist.is_initialized():
        dist.barrier()  # every rank has checked the folder before rank 0 writes into it
    if args.overwrite and is_rank0():
        clear_run(out)
    step = resume(out, model, optimizer, order) if args.resume else 0
    if is_rank0():  # after a checkpoint that fails to load, the folder is as it was
        out.mkdir(parents=True, exist_ok=True)
        write_atomically(out / RUN, lambda tmp: tmp.write_text(json.dumps(record, indent=2)))
    return step


def is_rank0():
    return int(os.environ.get("RANK", 0)) == 0


def run_record(args, script):
    """The script, its flags (paths made absolute) and the training data's size and hash."""
    flags = json.loads(json.dumps(vars(args), default=str))
    for flag in PATH_FLAGS:
        flags[flag] = absolute(flags.get(flag))
    data = flags.get("data") if isinstance(flags.get("data"), list) else [flags.get("data")]
    return {"script": script, "args": flags, "data": {path: file_hash(path) for path in data}}


def absolute(value):
    """A path flag as an absolute path, where it names an existing file or folder."""
    if isinstance(value, list):
        return [absolute(v) for v in value]
    return str(Path(value).resolve()) if value and Path(value).exists() else value


def file_hash(path):
    """'<bytes> bytes, sha256 <hex>' of a file; None for what is not one ('demo')."""
    if not path or not Path(path).is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"{Path(path).stat().st_size} bytes, sha256 {digest.hexdigest()}"


def holds_run(out):
    """The names of a run's files in `out` (none: the folder is free)."""
    return sorted({p.name for pattern in RUN_FILES for p in Path(out).glob(pattern)})


def clear_run(out):
    for pattern in RUN_FILES:
        for path in Path(out).glob(pattern):
            # a symbolic link (a ckpt-* pointing elsewhere) goes, never what it points to
            path.unlink() if path.is_symlink() or not path.is_dir() else shutil.rmtree(path)
    print0(f"--overwrite: cleared the earlier run out of {out}")


def compare_runs(out, record):
    """--resume: the flags that cannot change mid-run must be those the run began with, and its
    data unchanged; the others may change, and are printed. Returns {flag: [was, now]}."""
    path = Path(out) / RUN
    if not path.exists():
        if latest_checkpoint(out) is not None:
            print0(f"--resume: {out} has no {RUN} (an older run): its flags cannot be compared")
        return {}
    try:
        saved = json.loads(path.read_text())
        was = saved["args"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"{path} is damaged ({e}): the run cannot be checked for --resume"
        ) from None
    if saved.get("script") != record["script"]:
        raise UserError(
            f"--resume: {out} holds a {saved.get('script')} run, not a {record['script']} one"
        )
    now = record["args"]
    differ = {k: [was.get(k), now.get(k)] for k in sorted(set(was) | set(now))
              if was.get(k) != now.get(k)}  # fmt: skip
    fixed = {k: v for k, v in differ.items() if k not in CHANGEABLE}
    if fixed:
        named = "; ".join(
            f"--{k.replace('_', '-')} {v[1]} (the run has {v[0]})" for k, v in fixed.items()
        )
        raise UserError(
            f"--resume: {named}: cannot change mid-run. Resume with the run's values, or start a "
            "new run (a new --out)"
        )
    for manifest, digest in record["data"].items():
        if saved.get("data", {}).get(manifest, digest) != digest:
            raise UserError(
                f"--resume: the training data {manifest} changed since the run began "
                f"({saved['data'][manifest]} then, {digest} now): start a new run (a new --out)"
            )
    quiet = ("resume", "overwrite", "recipe_set", "init_set", "out")  # follow from the others
    changes = {k: v for k, v in differ.items() if k not in quiet}
    for k, (a, b) in changes.items():
        print0(f"--resume: --{k.replace('_', '-')} {a} -> {b}")
    return changes


def cut_log(out, step):
    """Drop what log.jsonl holds past `step` (what a killed run logged after its checkpoint, which
    the resumed run logs again): keep records before it and the training record of step itself."""
    path = Path(out) / "log.jsonl"
    if not path.exists() or not is_rank0():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by the kill
        if record.get("step", 0) < step or (record.get("step") == step and "lr" in record):
            kept.append(line)
    write_atomically(path, lambda tmp: tmp.write_text("".join(f"{line}\n" for line in kept)))


# -----------------------------------------------------------------------------
# Checkpoints: <out>/ckpt-<step>/ = projector.safetensors + meta.json + train_state.pt. The train
# state is tensors and plain data only, read with weights_only=True: loading one runs no code.


def save_checkpoint(out, model, optimizer, step, order, args, keep=3, **meta):
    """Everything a run needs to continue exactly, written to a temporary folder and renamed, so a
    kill mid-write leaves the previous checkpoint as the newest complete one. Rank 0 only."""
    out = Path(out)

    def write(tmp):
        model.save_projector(tmp, step=step, args=vars(args), **meta)
        state = {
            "optimizer": optimizer.state_dict(),
            "step": step,
            "order": order.state_dict(),
            "rng": rng_state(),
        }
        torch.save(state, tmp / "train_state.pt")

    final = write_or_fail(out / f"ckpt-{step:07d}", write)
    for old in checkpoints(out)[:-keep]:  # the oldest by step
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_final(out, model, optimizer, step, order, args, **meta):
    """The last checkpoint, then the final projector and its meta.json as one unit: meta.json goes
    first and comes back last, so a kill in between leaves no pair rather than a mixed one."""
    save_checkpoint(out, model, optimizer, step, order, args, **meta)
    out = Path(out)
    tmp = write_or_fail(
        out / ".final", lambda tmp: model.save_projector(tmp, step=step, args=vars(args), **meta)
    )
    (out / "meta.json").unlink(missing_ok=True)
    for path in sorted(tmp.iterdir(), key=lambda p: p.name == "meta.json"):
        os.replace(path, out / path.name)
    tmp.rmdir()


def write_or_fail(folder, write):
    """write_folder_atomically, with a full disk (or any OSError) as one line naming the last good
    checkpoint (the half-written folder is gone by then)."""
    try:
        return write_folder_atomically(folder, write)
    except OSError as e:
        last = latest_checkpoint(Path(folder).parent)
        last = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        if e.errno == errno.ENOSPC:
            raise UserError(
                f"the disk is full: could not write {folder} ({e.strerror}); {last}, intact. Free "
                "some space, then continue the run with --resume"
            ) from None
        raise UserError(f"could not write {folder}: {e.strerror or e}; {last}, intact") from None


def rng_state():
    """Every RNG's state as tensors and plain data (what weights_only=True reads back)."""
    version, python, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return {
        "python": [version, torch.tensor(python, dtype=torch.int64), gauss],
        "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def set_rng_state(rng):
    version, python, gauss = rng["python"]
    random.setstate((version, tuple(python.tolist()), gauss))
    keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def checkpoints(out):
    """The complete checkpoints in `out`, oldest step first (by the number, not the name)."""
    found = [(int(p.name[5:]), p) for p in Path(out).glob("ckpt-*") if p.name[5:].isdigit()]
    return [p for _, p in sorted(found) if (p / "train_state.pt").exists()]


def latest_checkpoint(out):
    ckpts = checkpoints(out)
    return ckpts[-1] if ckpts else None


def read_checkpoint(ckpt, model):
    """The projector into `model` and the train state, or one line saying why it cannot be read."""
    path = ckpt / "train_state.pt"
    try:
        # onto the CPU: optimizer.load_state_dict moves each state to its parameter's device (without
        # it every rank would load onto the GPU it was saved from)
        state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise ModelError(
            f"{path} holds more than tensors and plain data (a pickle that could run code, or a "
            "checkpoint from an older version): refused, not loaded. Start a new run."
        ) from None
    except Exception as e:  # a truncated or overwritten file: torch names no common error type
        raise ModelError(damaged(ckpt, e)) from None
    try:
        model.load_projector(ckpt)
    except ModelError:
        raise
    except Exception as e:  # safetensors' and json's errors for a damaged file
        raise ModelError(damaged(ckpt, e)) from None
    return state


def damaged(ckpt, e):
    why = " ".join(str(e).split())[:200]
    return (
        f"checkpoint {ckpt} is damaged ({type(e).__name__}: {why}): remove that folder to resume "
        "from the one before it"
    )


def resume(out, model, optimizer, order):
    """Load the newest checkpoint in `out`; returns the step to continue from (0 if there is
    none). log.jsonl is cut back to that step, so it never holds a step twice."""
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        print0(f"--resume: no checkpoint in {out}, starting from scratch")
        cut_log(out, 0)
        return 0
    state = read_checkpoint(ckpt, model)
    optimizer.load_state_dict(state["optimizer"])
    order.load_state_dict(state["order"])
    set_rng_state(state["rng"])
    cut_log(out, state["step"])
    print0(f"resumed from {ckpt} at step {state['step']}")
    return state["step"]


def read_meta(folder):
    """A checkpoint's meta.json, or one line saying it is damaged."""
    path = Path(folder) / "meta.json"
    try:
        meta = json.loads(path.read_text())
        assert isinstance(meta, dict) and isinstance(meta["qformer"], dict)
        return meta
    except Exception as e:
        raise ModelError(damaged(folder, e)) from None


def check_checkpoint(folder):
    """--init / --ckpt: a checkpoint folder that exists must be readable (meta.json and the
    projector's tensors); returns its meta.json. A missing one (None) is left to the script's own
    message."""
    folder = Path(folder)
    if not (folder / "meta.json").exists():
        return None
    meta = read_meta(folder)
    try:
        with safe_open(str(folder / "projector.safetensors"), "pt") as f:
            for key in f.keys():
                f.get_tensor(key)
    except Exception as e:
        raise ModelError(damaged(folder, e)) from None
    return meta


CENTERS = "centers.safetensors"  # written next to the projector by `pretrain.py --center`


def save_centers(folder, text_mean, speech_mean, layers, items):
    """Store the per-layer means [L, D] of the pooled text and speech states over `items` training
    pairs."""
    tensors = {
        "text": text_mean.float().contiguous().cpu(),
        "speech": speech_mean.float().contiguous().cpu(),
    }
    metadata = {"layers": json.dumps(layers), "items": str(items)}
    write_atomically(
        Path(folder) / CENTERS, lambda tmp: save_file(tensors, str(tmp), metadata=metadata)
    )


def load_centers(folder, layers):
    """(text_mean, speech_mean) stored by pretraining for exactly these layers, else None."""
    path = Path(folder) / CENTERS
    if not path.exists():
        return None
    with safe_open(str(path), "pt") as f:
        if json.loads(f.metadata()["layers"]) != list(layers):
            return None
        return f.get_tensor("text"), f.get_tensor("speech")


# -----------------------------------------------------------------------------
# Writing a file or a folder atomically: a reader, or a run killed half way, never sees half of one.
# One writer at a time (rank 0, or under a lock as demokit.build_once takes).


def write_atomically(path, write):
    """write(tmp) to `path` + ".tmp", then rename it to `path` (os.replace is atomic)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a link planted there would be written through: write a new file
    write(tmp)
    os.replace(tmp, path)  # replaces a link at `path` itself, never the file it points to
    return path


def write_folder_atomically(folder, write):
    """write(tmp) into a new hidden folder .<name>.tmp beside `folder`, then put it in the place of
    `folder` (replacing an older one). A killed write leaves only the hidden folder, which the next
    write removes."""
    folder = Path(folder)
    for stale in folder.parent.glob(f".{folder.name}.tmp*"):  # left by a killed write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.with_name(f".{folder.name}.tmp")
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    folder.unlink() if folder.is_symlink() else shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


# -----------------------------------------------------------------------------
# The log: one JSON line per logged step in <out>/log.jsonl, optionally mirrored to W&B /
# TensorBoard


# the optional log destinations: flag -> (the module to import, the package that holds it)
LOG_PACKAGES = {"--wandb": ("wandb", "wandb"),
                "--tensorboard": ("torch.utils.tensorboard", "tensorboard")}  # fmt: skip


def log_package(flag):
    """The module a log flag writes with, or one line saying which package to install."""
    module, package = LOG_PACKAGES[flag]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{flag} needs the {package} package: pip install {package}") from None


class JsonLog:
    """One JSON line per logged step in <out>/log.jsonl (rank 0), for plots (scripts/plot_log.py)
    and the README's numbers; with --wandb and/or --tensorboard the same values go there too, a
    per-layer list as one scalar per layer ("dev_r1/layer5"). Both are optional packages, imported
    only when asked for."""

    def __init__(self, out, enabled=True, wandb_project=None, tensorboard=False, config=None):
        self.path, self.enabled, self.t0 = Path(out) / "log.jsonl", enabled, time.time()
        self.wandb = self.tensorboard = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if wandb_project:
            wandb = log_package("--wandb")
            self.wandb = wandb.init(
                project=wandb_project, name=Path(out).name, dir=str(out), config=config
            )
        if tensorboard:
            writer = log_package("--tensorboard").SummaryWriter
            self.tensorboard = writer(str(Path(out) / "tensorboard"))

    @classmethod
    def for_run(cls, args, enabled):
        """The log of a training run: --out, --wandb (--wandb-project), --tensorboard; the flags as
        config."""
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
        """The numbers of a record by name, each entry of a per-layer list under
        <name>/layer<index>."""
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
