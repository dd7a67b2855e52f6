"""
Stage 2: task fine-tuning of the projector (ASR, speech translation, spoken QA, or the paper's mix of all
three), starting from a stage-1 checkpoint, or from a fresh projector (the no-pretraining baseline).

Every example is a chat in the LLM's own template: the speech comes first in the user turn, then the task's
instruction; the assistant turn holds the target. The loss is next-token cross-entropy on the answer tokens
and the end-of-turn token only. Only the projector trains; the encoder and the LLM stay frozen.

    python finetune.py --task qa --frac 0.1             # the demo: 10% of the spoken-QA data, from out/pretrain
    python finetune.py --task qa --frac 0.1 --init none --out out/finetune-qa-scratch   # no-pretraining baseline
    python finetune.py --task mix --frac 0.1 --stratify  # 10% of each task of the ASR+ST+QA mix
    python finetune.py --llm llama --task mix --frac 0.1 --no-cache-features --init runs/contr-cos-all --out runs/ft \\
        --data data/paper/sentences_train.jsonl data/paper/st_train.jsonl data/paper/qa_train.jsonl  # the paper (GPU)
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
from common import print0
from data import Collator, UserError, frac_subset, read_manifest, task_examples, to_device
from model import ENCODER_PRESETS, LLM_PRESETS

# the demo corpus's manifests of each task (demokit): <name>_{train,dev,test}.jsonl
DEMO_MANIFESTS = {"asr": ["sentences"], "st": ["sentences"], "qa": ["qa"], "mix": ["sentences", "qa"]}

# -----------------------------------------------------------------------------
# The command line. The recipes (paper, demo) and the flags pretrain.py takes too: common.py.


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("task")
    g.add_argument(
        "--task",
        choices=["asr", "st", "qa", "mix"],
        default="mix",
        help="mix = ASR + ST + QA, concatenated as the authors (default)",
    )
    g.add_argument(
        "--frac", type=float, default=1.0, help="fraction of the training examples to use (the paper: 1.0 or 0.1)"
    )
    g.add_argument("--frac-seed", type=int, default=42, help="seed of the --frac draw (the authors: random.seed(42))")
    g.add_argument(
        "--stratify",
        action="store_true",
        help="with --task mix: draw --frac from each task (the authors: from the whole mix)",
    )
    common.add_data_flags(
        p,
        True,
        "the dev loss (a seeded sample)",
        max_audio_seconds=150.0,
        max_audio_note="the paper: 45 s for MuST-C, 150 s for Spoken-SQuAD",
    )
    g = p.add_argument_group("the starting projector")
    g.add_argument(
        "--init",
        default="out/pretrain",
        help="stage-1 checkpoint folder to start from, or 'none' for a fresh projector (default: out/pretrain)",
    )
    common.add_model_flags(p, from_init=True)
    common.add_projector_flags(p, from_init=True)
    common.add_optimisation_flags(p, "finetune")
    g = common.add_system_flags(p)
    g.add_argument("--out", default=None, help="checkpoints, final projector, log.jsonl (default: out/finetune-<task>)")
    g.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="dev loss every N steps (0 = only at the end)" + common.recipe_note("eval_every", "finetune"),
    )
    args = p.parse_args(argv)
    args.out = args.out or f"out/finetune-{args.task}"
    if args.stratify and args.task != "mix":
        p.error("--stratify draws the fraction per task: it needs --task mix")
    if not 0 < args.frac <= 1:
        p.error(f"--frac must be in (0, 1], got {args.frac}")
    return args


# -----------------------------------------------------------------------------
# The model: a stage-1 projector (its models and shape from its meta.json), or a fresh one (by recipe)


def same_model(given, saved, presets):
    """A --llm / --encoder value against a checkpoint's: equal as preset names, hub ids or folders."""
    a, b = presets.get(given, given), presets.get(saved, saved)
    if Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def from_init(args):
    """--init <checkpoint>: the checkpoint decides the models, the projector's shape and its sink token (and,
    unless --dropout / --time-mask, its dropout and time masking); a flag that says otherwise is a mistake.
    Fills those flags and returns {flag: value} of what it set. --init none: nothing (the recipe decides)."""
    if args.init == "none":
        return {}
    path = Path(args.init) / "meta.json"
    if not path.exists():
        hint = " (run `python pretrain.py` first)" if args.init == "out/pretrain" else ""
        raise UserError(
            f"--init {args.init}: no stage-1 checkpoint there, expected {path}{hint}. "
            "Use --init none for the no-pretraining baseline."
        )
    meta = json.loads(path.read_text())
    for flag, presets in (("llm", LLM_PRESETS), ("encoder", ENCODER_PRESETS)):
        given = getattr(args, flag)
        if given is not None and not same_model(given, meta[flag], presets):
            raise UserError(
                f"--{flag} {given} does not match the --init checkpoint {args.init}, which was trained "
                f"with --{flag} {meta[flag]}: leave --{flag} out, or pass --init none to start from scratch."
            )
    for flag, field in common.SHAPE_FLAGS.items():
        given = getattr(args, flag)
        if given is not None and given != meta["qformer"][field]:
            raise UserError(
                f"--{flag.replace('_', '-')} {given}: the projector's shape comes from the --init "
                f"checkpoint {args.init} ({field}={meta['qformer'][field]}); leave the flag out."
            )
    chosen = {"llm": meta["llm"], "encoder": meta["encoder"]}
    chosen.update({flag: meta["qformer"][field] for flag, field in common.SHAPE_FLAGS.items()})
    chosen["sink_token"] = meta.get("sink_token", False)
    for flag in ("dropout", "time_mask"):  # training-only: the checkpoint's unless the flag says otherwise
        if getattr(args, flag) is None:
            chosen[flag] = meta["qformer"].get(flag, 0.0)
    for flag, value in chosen.items():
        setattr(args, flag, value)
    return chosen


def build_model(args, dtype):
    """The SpeechLLM to fine-tune, from the flags (which from_init and the recipe have filled): with --init,
    the stage-1 projector loaded into it."""
    model = common.build_model(args, dtype)
    if args.init != "none":
        model.load_projector(args.init)
    return model


# -----------------------------------------------------------------------------
# Data: task examples (instruction + target per utterance), then the --frac subset


def load_data(args):
    """Returns (training examples, dev examples). With no --data: the demo corpus's manifests of the task."""
    if args.data is None:
        import demokit

        corpus = demokit.corpus_path(size=args.demo_corpus)
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
    instructions = [ex["instruction"] for ex in examples]
    speech, speech_mask = model.encode_speech(batch)
    embeds, mask, labels = model.chat_batch(speech, speech_mask, instructions, [ex["target"] for ex in examples])
    return model.lm_loss(embeds, mask, labels, prefix=model.shared_prefix(instructions))


@torch.no_grad()
def dev_loss(model, dev, collate, batch_size, device, dtype):
    """Mean answer loss over the dev examples (teacher-forced; evaluate.py scores generated answers)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(dev), batch_size):
        chunk = dev[i : i + batch_size]
        batch = to_device(collate(chunk), device)  # outside autocast: the log-mel must stay float32
        with common.autocast(device, dtype):
            total += answer_loss(model, batch).item() * len(chunk)
    model.train(was_training)
    return total / len(dev)


# -----------------------------------------------------------------------------
# The loop (the same sections as pretrain.py's)


def main(argv=None):
    args = get_args(argv)
    rank, world, device = common.setup(args.device, args.seed)
    dtype = common.resolve_dtype(args.dtype, device)
    master = rank == 0
    # the flags left out: the --init checkpoint's models and shape, then the recipe's values (with --init none
    # its models and projector too); each says what it set here, and meta.json keeps both
    init_set = from_init(args)
    if init_set:
        common.announce(f"--init {args.init}", init_set)
    args.llm = args.llm or "smollm2"
    recipe = common.apply_recipe(args, *(["finetune"] if init_set else ["model", "finetune"]))
    common.announce(f"recipe {recipe['name']} ({recipe['because']})", recipe["set"])

    model = build_model(args, dtype).to(device)
    examples, dev = load_data(args)
    print0(
        f"task {args.task}, init {args.init}: {len(examples)} training examples "
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
    guard, log = common.NonFiniteGuard(), common.JsonLog.for_run(args, enabled=master)
    params = [p for p in model.projector.parameters() if p.requires_grad]
    meta = dict(stage="finetune", task=args.task, init=args.init, init_set=init_set, recipe=recipe)

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
    log.close()  # --wandb / --tensorboard: flush and finish
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    common.run_main(main)
