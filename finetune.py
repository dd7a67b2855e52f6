"""
Stage 2: task fine-tuning of the projector (ASR, speech translation, spoken QA, or the paper's mix of all
three), starting from a stage-1 checkpoint, or from a fresh projector (the no-pretraining baseline).

Every example is a chat in the LLM's own template: the speech comes first in the user turn, then the task's
instruction; the assistant turn holds the target. The loss is next-token cross-entropy on the answer tokens
and the end-of-turn token only. Only the projector trains; the encoder and the LLM stay frozen.

    python finetune.py --task qa --frac 0.1             # the demo: 10% of the spoken-QA data, from out/pretrain
    python finetune.py --task qa --frac 0.1 --init none --out out/finetune-qa-scratch   # no-pretraining baseline
    python finetune.py --task mix --frac 0.1 --stratify  # 10% of each task of the ASR+ST+QA mix
    python finetune.py --llm llama --task mix --frac 0.1 --data mustc_train.jsonl spoken_squad_train.jsonl \\
        --init runs/contr-cos-all --out runs/ft           # the paper's setup (GPU)
    torchrun --standalone --nproc_per_node=4 finetune.py --llm llama --task mix --data mix.jsonl \\
        --init runs/contr-cos-all
    python finetune.py --task qa --out out/finetune-qa --resume   # continue a killed run
    python evaluate.py --ckpt out/finetune-qa            # then score it (EM / F1 on the test split)
"""

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import common
import pretrain
from common import print0
from data import Collator, UserError, frac_subset, read_manifest, task_examples, to_device
from model import ENCODER_PRESETS, LLM_PRESETS, QFormerConfig, SpeechLLM

# -----------------------------------------------------------------------------
# Optimisation defaults. "paper" = the authors' fine-tuning scripts. "demo" = a higher rate and smaller
# batches, so the CPU demo's 10% runs take minutes yet move (the paper's recipe makes --task qa --frac 0.1
# just 10 steps); 40 steps of it on --task asr --frac 0.1 reach a dev loss of 1.20 from the demo's stage-1
# projector and 3.08 from scratch. The projector's shape is not here: it comes from the --init checkpoint,
# or, with --init none, from pretrain.RECIPES.

RECIPES = {
    "paper": dict(lr=1e-4, batch_size=4, grad_accum=5, epochs=2, warmup_ratio=0.03, eval_every=1000),
    "demo": dict(lr=1e-3, batch_size=8, grad_accum=1, epochs=10, warmup_ratio=0.03, eval_every=50),
}
# --flag -> QFormerConfig field: the projector's shape, for --init none
SHAPE = {
    "qformer_dim": "dim",
    "qformer_heads": "heads",
    "qformer_layers": "layers",
    "queries": "queries",
    "window": "window",
    "window_pos": "window_pos",
}
# the demo corpus's manifests of each task (demokit): <name>_{train,dev,test}.jsonl
DEMO_MANIFESTS = {"asr": ["sentences"], "st": ["sentences"], "qa": ["qa"], "mix": ["sentences", "qa"]}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # task and data
    p.add_argument(
        "--task",
        choices=["asr", "st", "qa", "mix"],
        default="mix",
        help="mix = ASR + ST + QA, concatenated as the authors (default)",
    )
    p.add_argument(
        "--frac", type=float, default=1.0, help="fraction of the training examples to use (the paper: 1.0 or 0.1)"
    )
    p.add_argument("--frac-seed", type=int, default=42, help="seed of the --frac draw (the authors: random.seed(42))")
    p.add_argument(
        "--stratify",
        action="store_true",
        help="with --task mix: draw --frac from each task (the authors: from the whole mix)",
    )
    p.add_argument(
        "--data",
        nargs="+",
        default=None,
        help="training manifest(s), concatenated (default: the demo corpus's for the task)",
    )
    p.add_argument(
        "--dev-data",
        nargs="+",
        default=None,
        help="dev manifest(s) for the dev loss (default: the demo's dev split when --data is default)",
    )
    p.add_argument("--dev-size", type=int, default=100, help="dev examples (a seeded sample) for the dev loss")
    p.add_argument("--skip-bad", action="store_true", help="skip bad manifest lines (counted) instead of stopping")
    p.add_argument(
        "--max-audio-seconds",
        type=float,
        default=150.0,
        help="skip longer audio (counted); the paper: 45 s for MuST-C, 150 s for Spoken-SQuAD",
    )
    p.add_argument(
        "--cache-features",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the frozen encoder's outputs in memory across epochs",
    )
    p.add_argument(
        "--feature-cache-file",
        default=None,
        help="also keep them in this file across runs (default: inside the demo corpus for the demo)",
    )
    # models and the starting projector
    p.add_argument(
        "--init",
        default="out/pretrain",
        help="stage-1 checkpoint folder to start from, or 'none' for a fresh projector (default: out/pretrain)",
    )
    p.add_argument(
        "--llm",
        default=None,
        help="llama | smollm2 | tiny | a hub id | a folder (default: the --init checkpoint's; "
        "smollm2 with --init none)",
    )
    p.add_argument(
        "--encoder",
        default=None,
        help="hubert | whisper-tiny | tiny | a hub id | a folder (default: the checkpoint's; "
        "by pretrain's recipe with --init none)",
    )
    p.add_argument(
        "--recipe",
        choices=["paper", "demo"],
        default=None,
        help="optimisation defaults (default: demo for smollm2, else paper)",
    )
    # projector shape: --init none only (a checkpoint brings its own)
    p.add_argument("--qformer-dim", type=int, default=None)
    p.add_argument("--qformer-heads", type=int, default=None)
    p.add_argument("--qformer-layers", type=int, default=None)
    p.add_argument("--queries", type=int, default=None, help="query tokens per window")
    p.add_argument("--window", type=int, default=None, help="encoder frames per window (17 = 0.34 s)")
    p.add_argument(
        "--window-pos", action=argparse.BooleanOptionalAction, default=None, help="learned position within the window"
    )
    p.add_argument(
        "--match-embedding-rms",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start a fresh projector's outputs at the LLM's embedding scale",
    )
    p.add_argument(
        "--dropout",
        type=float,
        default=None,
        help="the projector's dropout (default: the checkpoint's; 0.1 with --init none)",
    )
    # optimisation
    p.add_argument("--batch-size", type=int, default=None, help="per device (paper: 4)")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimiser step (paper: 5)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (paper: 1e-4)")
    p.add_argument("--epochs", type=float, default=None, help="paper: 2")
    p.add_argument("--max-steps", type=int, default=None, help="optimiser steps (overrides --epochs)")
    p.add_argument(
        "--warmup-ratio", type=float, default=None, help="linear warmup as a fraction of the steps (paper: 0.03)"
    )
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=42)
    # system
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16")
    p.add_argument("--out", default=None, help="checkpoints, final projector, log.jsonl (default: out/finetune-<task>)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0 = only at the end)")
    p.add_argument("--eval-every", type=int, default=None, help="dev loss every N steps (0 = only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    args = p.parse_args(argv)
    args.out = args.out or f"out/finetune-{args.task}"
    if args.stratify and args.task != "mix":
        p.error("--stratify draws the fraction per task: it needs --task mix")
    if not 0 < args.frac <= 1:
        p.error(f"--frac must be in (0, 1], got {args.frac}")
    return args


# -----------------------------------------------------------------------------
# The model: a stage-1 projector (its shape and models from its meta.json), or a fresh one


def same_model(given, saved, presets):
    """A --llm / --encoder value against a checkpoint's: equal as preset names, hub ids or folders."""
    a, b = presets.get(given, given), presets.get(saved, saved)
    if Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def build_model(args, dtype):
    """Returns the SpeechLLM to fine-tune. Fills args.llm / args.encoder / the shape flags with what was used."""
    if args.init != "none":
        path = Path(args.init) / "meta.json"
        if not path.exists():
            hint = " (run `python pretrain.py` first)" if args.init == "out/pretrain" else ""
            raise UserError(
                f"--init {args.init}: no stage-1 checkpoint there, expected {path}{hint}. "
                "Use --init none for the no-pretraining baseline."
            )
        meta = json.loads(path.read_text())
        # the checkpoint decides the models and the projector's shape: a flag that says otherwise is a mistake
        for flag, presets in (("llm", LLM_PRESETS), ("encoder", ENCODER_PRESETS)):
            given = getattr(args, flag)
            if given is not None and not same_model(given, meta[flag], presets):
                raise UserError(
                    f"--{flag} {given} does not match the --init checkpoint {args.init}, which was trained "
                    f"with --{flag} {meta[flag]}: leave --{flag} out, or pass --init none to start from scratch."
                )
        for flag, field in SHAPE.items():
            given = getattr(args, flag)
            if given is not None and given != meta["qformer"][field]:
                raise UserError(
                    f"--{flag.replace('_', '-')} {given}: the projector's shape comes from the --init "
                    f"checkpoint {args.init} ({field}={meta['qformer'][field]}); leave the flag out."
                )
        model, meta = SpeechLLM.from_checkpoint(args.init, dtype, dropout=args.dropout, resolve=common.resolve_model)
        args.llm, args.encoder = meta["llm"], meta["encoder"]
        args.dropout = model.projector.cfg.dropout
        for flag, field in SHAPE.items():
            setattr(args, flag, meta["qformer"][field])
        return model
    # --init none: the projector pretrain.py would start from, with the same recipes
    args.llm = args.llm or "smollm2"
    shape = pretrain.RECIPES["demo" if args.llm == "smollm2" else "paper"]
    for flag in ("encoder", "match_embedding_rms", *SHAPE):
        if getattr(args, flag) is None:
            setattr(args, flag, shape[flag])
    args.dropout = 0.1 if args.dropout is None else args.dropout
    qformer = QFormerConfig(**{field: getattr(args, flag) for flag, field in SHAPE.items()}, dropout=args.dropout)
    model = SpeechLLM(
        args.llm, args.encoder, qformer, dtype=dtype, sink_token=shape["sink_token"], resolve=common.resolve_model
    )
    if args.match_embedding_rms:
        model.match_embedding_rms()
    return model


# -----------------------------------------------------------------------------
# Data: task examples (instruction + target per utterance), then the --frac subset


def load_data(args):
    """Returns (training examples, dev examples). With no --data: the demo corpus's manifests of the task."""
    if args.data is None:
        import demokit

        corpus = demokit.corpus_path()
        args.data = [str(corpus / f"{name}_train.jsonl") for name in DEMO_MANIFESTS[args.task]]
        args.dev_data = args.dev_data or [str(corpus / f"{name}_dev.jsonl") for name in DEMO_MANIFESTS[args.task]]
        args.feature_cache_file = args.feature_cache_file or str(
            corpus / f"features-{args.encoder.replace('/', '_')}.pt"
        )

    def examples(paths):
        rows = [
            row
            for path in paths
            for row in read_manifest(path, skip_bad=args.skip_bad, max_seconds=args.max_audio_seconds, log=print0)
        ]
        return task_examples(rows, args.task)

    train = frac_subset(examples(args.data), args.frac, seed=args.frac_seed, stratify=args.stratify)
    dev = examples(args.dev_data) if args.dev_data else []
    dev = random.Random(0).sample(dev, min(args.dev_size, len(dev)))  # a fixed sample over every task of the mix
    return train, dev


def count(examples):
    tasks = {}
    for ex in examples:
        tasks[ex["task"]] = tasks.get(ex["task"], 0) + 1
    return ", ".join(f"{n} {task}" for task, n in tasks.items())


# -----------------------------------------------------------------------------
# The loss of one micro-batch, and the dev loss


def answer_loss(model, batch):
    """Next-token cross-entropy on the answers: each utterance's speech spliced into the chat prompt before
    its instruction, the target in the assistant turn; only the target tokens and the end-of-turn token
    are supervised (model.chat_batch masks everything else with -100)."""
    examples = batch["examples"]
    speech, speech_mask = model.encode_speech(batch)
    embeds, mask, labels = model.chat_batch(
        speech, speech_mask, [ex["instruction"] for ex in examples], [ex["target"] for ex in examples]
    )
    return model.lm_loss(embeds, mask, labels)


@torch.no_grad()
def dev_loss(model, dev, collate, batch_size, device, dtype):
    """Mean answer loss over the dev examples (teacher-forced; evaluate.py scores generated answers)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(dev), batch_size):
        chunk = dev[i : i + batch_size]
        with common.autocast(device, dtype):
            total += answer_loss(model, to_device(collate(chunk), device)).item() * len(chunk)
    model.train(was_training)
    return total / len(dev)


# -----------------------------------------------------------------------------
# The loop (the same sections as pretrain.py's)


def main(argv=None):
    args = get_args(argv)
    rank, world, device = common.setup(args.device, args.seed)
    dtype = common.resolve_dtype(args.dtype, device)
    master = rank == 0

    model = build_model(args, dtype).to(device)
    args.recipe = args.recipe or ("demo" if args.llm == "smollm2" else "paper")
    for key, value in RECIPES[args.recipe].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    examples, dev = load_data(args)
    print0(
        f"task {args.task}, recipe {args.recipe}, init {args.init}: {len(examples)} training examples "
        f"({count(examples)}; --frac {args.frac}{' per task' if args.stratify else ''}), {len(dev)} dev, "
        f"{sum(p.numel() for p in model.projector.parameters()) / 1e6:.2f}M trainable parameters"
    )
    if args.cache_features:
        model.load_feature_cache(args.feature_cache_file)

    order = common.BatchOrder(len(examples), args.batch_size, rank, world, seed=args.seed)
    collate = Collator(model.encoder.feature_extractor)  # no text side: the targets go through the chat template
    optimizer = common.make_optimizer(model, args.lr)  # a fresh optimiser, as the authors
    total_steps = args.max_steps or max(1, int(args.epochs * order.per_epoch / args.grad_accum))
    warmup_steps = max(1, round(args.warmup_ratio * total_steps))
    step = common.resume(args.out, model, optimizer, order) if args.resume else 0
    model = common.wrap_ddp(model, device, world)  # under torchrun: DDP around the projector only
    guard, log = common.NonFiniteGuard(), common.JsonLog(args.out, enabled=master)
    params = [p for p in model.projector.parameters() if p.requires_grad]
    meta = dict(stage="finetune", task=args.task, init=args.init)

    model.train()
    progress = tqdm(
        range(step, total_steps), initial=step, total=total_steps, disable=not master, desc=f"finetune {args.task}"
    )
    for step in progress:
        lr = common.cosine_lr(step, total_steps, args.lr, warmup_steps)
        common.set_lr(optimizer, lr)

        if master and dev and args.eval_every and step > 0 and step % args.eval_every == 0:
            loss = dev_loss(model, dev, collate, args.batch_size, device, dtype)
            progress.write(f"step {step} dev loss {loss:.3f}")
            log(step=step, dev_loss=loss)
        if master and args.save_every and step > 0 and step % args.save_every == 0:
            common.save_checkpoint(args.out, model, optimizer, step, order, args, **meta)
            model.save_feature_cache(args.feature_cache_file)

        t0 = time.time()
        for micro in range(args.grad_accum):
            batch = to_device(collate([examples[i] for i in next(order)]), device)
            # under DDP, synchronise gradients only on the last micro-step (nanoGPT's trick)
            with common.grad_sync(model, micro, args.grad_accum), common.autocast(device, dtype):
                loss = answer_loss(model, batch)
                (loss / args.grad_accum).backward()
        grad_norm = common.clip_and_step(optimizer, params, args.grad_clip, guard, step, args.out)

        if master:
            seconds = time.time() - t0
            progress.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}")
            log(step=step + 1, lr=lr, seconds=round(seconds, 3), grad_norm=grad_norm.item(), loss=loss.item())
            progress.write(f"step {step + 1} loss {loss.item():.3f} ({seconds:.2f}s)")

    step = total_steps
    if master:
        common.save_checkpoint(args.out, model, optimizer, step, order, args, **meta)
        model.save_projector(args.out, step=step, args=vars(args), **meta)  # the final projector
        model.save_feature_cache(args.feature_cache_file)
        if dev:
            loss = dev_loss(model, dev, collate, args.batch_size, device, dtype)
            log(step=step, dev_loss=loss)
            print0(f"final dev loss ({len(dev)} examples): {loss:.3f}")
        print0(
            f"saved the projector to {args.out}; skipped steps: {guard.skipped}\n"
            f"score it: python evaluate.py --ckpt {args.out}"
        )
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    common.run_main(main)
