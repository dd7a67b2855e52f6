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
import json
import math
import os
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
#   finetune  stage 2's optimisation

RECIPES = {
    "paper": dict(
        model=dict(encoder="hubert", qformer_dim=768, qformer_heads=12, qformer_layers=4, queries=4, window=17,
                   window_pos=False, dropout=0.1, time_mask=0.0, sink_token=False, match_embedding_rms=False),
        pretrain=dict(lr=1e-4, batch_size=10, grad_accum=2, epochs=5, max_steps=0, warmup_ratio=0.03,
                      center=False, emb_steps=0, emb_lr=1e-3, eval_every=1000),
        finetune=dict(lr=1e-4, batch_size=4, grad_accum=5, epochs=2, warmup_ratio=0.03, eval_every=1000,
                      compress=False, lora=0, ctc_weight=0.0),
    ),
    "demo": dict(
        model=dict(encoder="whisper-tiny", qformer_dim=256, qformer_heads=4, qformer_layers=2, queries=4,
                   window=17, window_pos=True, dropout=0.1, time_mask=0.0, sink_token=True,
                   match_embedding_rms=True),
        pretrain=dict(lr=3e-4, batch_size=16, grad_accum=1, epochs=100, max_steps=500, warmup_ratio=0.01,
                      center=True, emb_steps=400, emb_lr=1e-3, eval_every=100),
        finetune=dict(lr=1e-3, batch_size=8, grad_accum=1, epochs=10, warmup_ratio=0.03, eval_every=50,
                      compress=False, lora=0, ctc_weight=0.0),
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


def add_data_flags(p, several, max_audio_seconds):
    """several (finetune.py): --data and --dev-data take one manifest or more."""
    g = p.add_argument_group("data")
    nargs = "+" if several else None
    g.add_argument(
        "--data", nargs=nargs, default="demo", help="training manifest(s), JSONL; demo: the demo's"
    )
    g.add_argument("--dev-data", nargs=nargs, help="dev manifest(s); demo: the demo's dev split")
    g.add_argument("--dev-size", type=int, default=100, help="dev examples used")
    add_demo_corpus_flag(g)
    g.add_argument("--skip-bad", action="store_true", help="skip bad manifest lines (counted)")
    g.add_argument(
        "--max-audio-seconds", type=float, default=max_audio_seconds, help="skip longer audio"
    )
    g.add_argument(
        "--cache-features", action=ON_OFF, default=True, help="keep encoder outputs in memory"
    )
    g.add_argument("--feature-cache-file", help="and in this file across runs")


def add_demo_corpus_flag(p):
    p.add_argument(
        "--demo-corpus", choices=["full", "large"], default="full", help="which demo corpus"
    )


def data_defaults(first, encoder):
    """The demo corpus's dev split and feature cache when --data is the demo's (demokit builds it on
    use)."""
    if first.data not in ("demo", ["demo"]):
        return {}
    import demokit  # the demo's plumbing, outside the tutorial files

    encoder = encoder.replace("/", "_")
    cache = demokit.corpus_folder(first.demo_corpus) / f"features-{encoder}.pt"
    return {
        "dev_data": first.dev_data or "demo",
        "feature_cache_file": first.feature_cache_file or str(cache),
    }


def add_projector_flags(p, title="projector"):
    g = p.add_argument_group(title)
    g.add_argument("--qformer-dim", type=int, help="Q-Former width")
    g.add_argument("--qformer-heads", type=int, help="attention heads")
    g.add_argument("--qformer-layers", type=int, help="Q-Former blocks")
    g.add_argument("--queries", type=int, help="query tokens per window")
    g.add_argument("--window", type=int, help="encoder frames per window (17 = 0.34 s)")
    g.add_argument("--window-pos", action=ON_OFF, help="learned position within the window")
    g.add_argument(
        "--match-embedding-rms", action=ON_OFF, help="start at the LLM's embedding scale"
    )
    g.add_argument("--dropout", type=float, help="the projector's dropout")
    g.add_argument("--time-mask", type=float, help="share of encoder frames masked in training")


def add_optimisation_flags(p):
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, help="per device")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimiser step")
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--epochs", type=float, help="passes over the training data")
    g.add_argument("--max-steps", type=int, default=0, help="optimiser steps (0: from --epochs)")
    g.add_argument("--warmup-ratio", type=float, help="linear warmup, a share of the steps")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
    g.add_argument("--seed", type=int, default=42, help="initialisation, data order, dropout")


def add_system_flags(p, training=True):
    """--device, --dtype; for training also checkpoints, --resume and the optional log
    destinations."""
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    dtypes = ["auto", "float32", "bfloat16", "float16"]
    g.add_argument(
        "--dtype", choices=dtypes, default="auto", help="auto: bf16 on CUDA and AMX CPUs"
    )
    if training:
        g.add_argument(
            "--eval-every", type=int, help="dev evaluation every N steps (0: at the end)"
        )
        g.add_argument(
            "--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end)"
        )
        g.add_argument(
            "--resume", action="store_true", help="continue from the newest checkpoint in --out"
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
    """Every script ends in `common.run_main(main)`: a UserError or ModelError is one line on stderr
    and exit status 1; anything else is a bug in the code, and keeps its traceback."""
    try:
        main()
    except (UserError, ModelError) as e:
        sys.exit(f"{Path(sys.argv[0]).name}: error: " + " ".join(str(e).splitlines()))


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


def resolve_model(name, kind):
    """--llm / --encoder (kind "llm" | "encoder") -> the hub id or folder to load."""
    import demokit  # the demo's plumbing, imported only here

    build = demokit.PRESETS[kind].get(name)
    if build:
        return str(build())
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
    CPU with Intel AMX), float32 elsewhere (an emulated bf16 would be slower than float32)."""
    if name == "auto":
        native = device.type == "cuda" or (
            device.type == "cpu" and torch.cpu._is_amx_tile_supported()
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
# Checkpoints: <out>/ckpt-<step>/ = projector.safetensors + meta.json + train_state.pt


def save_checkpoint(out, model, optimizer, step, order, args, keep=3, **meta):
    """Everything a run needs to continue exactly, written to a temporary folder and renamed, so a
    kill mid-write leaves the previous checkpoint as the newest complete one. Rank 0 only."""
    out = Path(out)

    def write(tmp):
        model.save_projector(tmp, step=step, args=vars(args), **meta)
        rng = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        state = {
            "optimizer": optimizer.state_dict(),
            "step": step,
            "order": order.state_dict(),
            "rng": rng,
        }
        torch.save(state, tmp / "train_state.pt")

    final = write_folder_atomically(out / f"ckpt-{step:07d}", write)
    for old in sorted(out.glob("ckpt-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out):
    ckpts = sorted(p for p in Path(out).glob("ckpt-*") if (p / "train_state.pt").exists())
    return ckpts[-1] if ckpts else None


def resume(out, model, optimizer, order):
    """Load the newest checkpoint in `out`; returns the step to continue from (0 if there is
    none)."""
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
    write(tmp)
    os.replace(tmp, path)
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
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


# -----------------------------------------------------------------------------
# The log: one JSON line per logged step in <out>/log.jsonl, optionally mirrored to W&B /
# TensorBoard


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
            try:
                import wandb
            except ImportError:
                raise UserError("--wandb needs the wandb package: pip install wandb") from None
            self.wandb = wandb.init(
                project=wandb_project, name=Path(out).name, dir=str(out), config=config
            )
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError(
                    "--tensorboard needs the tensorboard package: pip install tensorboard"
                ) from None
            self.tensorboard = SummaryWriter(str(Path(out) / "tensorboard"))

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
