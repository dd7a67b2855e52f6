"""
Stage 2: task fine-tuning of the projector (ASR, speech translation, spoken QA, or the paper's mix
of all three), starting from a stage-1 checkpoint, or from a fresh projector (the no-pretraining
baseline).

Every example is a chat in the LLM's own template: the speech comes first in the user turn, then the
task's instruction; the assistant turn holds the target. The loss is next-token cross-entropy on the
answer tokens and the end-of-turn token only. The projector trains; the encoder and the LLM stay
frozen (the paper), except for low-rank updates of the LLM's attention with --lora, which
--freeze-projector trains alone.

    # the demo: 10% of the spoken-QA data, from out/pretrain
    python finetune.py --task qa --frac 0.1
    # no-pretraining baseline
    python finetune.py --task qa --frac 0.1 --init none --out out/finetune-qa-scratch
    # 10% of each task of the ASR+ST+QA mix
    python finetune.py --task mix --frac 0.1 --stratify
    # the paper
    python finetune.py --task mix --frac 0.1 --no-cache-features \\
        --init runs/contr-cos-all --out runs/ft \\
        --data data/paper/sentences_train.jsonl data/paper/st_train.jsonl data/paper/qa_train.jsonl
    torchrun --standalone --nproc_per_node=4 finetune.py --task mix --data mix.jsonl \\
        --init runs/contr-cos-all
    # after a CTC stage 1
    python finetune.py --task asr --frac 0.1 --compress --lora 8 --ctc-weight 1
    # LoRA alone, on the stage-1 projector as it is (ASR; docs/alignment.md)
    python finetune.py --task asr --frac 0.1 --freeze-projector --ctc-weight 0 --epochs 5
    # continue a killed run
    python finetune.py --task qa --out out/finetune-qa --resume
    # then score it (EM / F1 on the test split)
    python evaluate.py --ckpt out/finetune-qa
"""

import random
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import common
from common import (
    ON_OFF,
    UserError,
    non_negative_float,
    non_negative_int,
    positive_float,
    print0,
    unit_interval,
)
from data import Collator, frac_subset, read_manifest, task_examples, to_device
from model import QFormerConfig, SpeechLLM, checked_meta

# -----------------------------------------------------------------------------
# The command line: the shared flags (common.py), then stage 2's own. A flag left out takes its
# value from the --init checkpoint (the models, the projector's shape) or the recipe (the
# optimisation).


def get_args(argv=None):
    p = common.parser(__doc__)
    g = p.add_argument_group("task")
    g.add_argument("--task", choices=["asr", "st", "qa", "mix"], default="mix", help="mix: all 3")
    g.add_argument("--frac", type=unit_interval, default=1.0, help="share of the training data")
    g.add_argument("--frac-seed", type=non_negative_int, default=42, help="seed of the --frac draw")
    g.add_argument("--stratify", action="store_true", help="--task mix: draw --frac per task")
    g.add_argument("--qa-newline", action=ON_OFF, help="QA targets end in a newline (authors)")
    # the paper: clips up to 45 s (MuST-C) and 150 s (Spoken-SQuAD)
    common.add_data_flags(p, several=True, max_audio_seconds=150.0)
    g = p.add_argument_group("the starting projector")
    g.add_argument("--init", default="out/pretrain", help="stage-1 checkpoint, or none (fresh)")
    common.add_model_flags(p)
    common.add_projector_flags(p, "projector (--init none; a checkpoint brings its own shape)")
    g = p.add_argument_group("additions (extras/: off in the paper's recipe)")
    g.add_argument("--compress", action=ON_OFF, help="CTC-compressed: ~one vector per token")
    g.add_argument("--lora", type=non_negative_int, help="LoRA rank on the LLM's q/k/v/o (0: off)")
    g.add_argument("--lora-alpha", type=positive_float, help="LoRA's alpha (default: 2 x rank)")
    g.add_argument("--freeze-projector", action=ON_OFF, help="train --lora alone")
    g.add_argument("--ctc-weight", type=non_negative_float, help="keep the CTC alignment (0: off)")
    g.add_argument("--ctc-temperature", type=positive_float, default=0.05, help="cosine / this")
    g.add_argument("--ctc-classes", type=non_negative_int, help="CTC rows scored a step (0: all)")
    common.add_optimisation_flags(p)
    g = common.add_system_flags(p)
    g.add_argument("--out", help="checkpoints, final projector, log.jsonl")

    def defaults_for(first, given):
        init = checkpoint_defaults(first.init, first, given)
        first.llm = init.get("llm", first.llm)  # the recipe follows the checkpoint's LLM
        recipe = common.recipe_defaults(
            first, given, ["finetune"] if init else ["model", "finetune"]
        )
        out = {"out": f"out/finetune-{first.task}", "init_set": init}
        return {**recipe, **init, **out}

    args = common.parse_args(p, argv, defaults_for)
    common.check_projector_flags(p, args)
    if args.freeze_projector and args.init == "none":
        p.error("--freeze-projector: a fresh projector (--init none) has to train")
    if args.freeze_projector and not args.lora:
        p.error("--freeze-projector trains --lora alone: give --lora R")
    if args.freeze_projector and args.ctc_weight:
        p.error(
            "--ctc-weight keeps a training projector's alignment: a frozen one has nothing to keep"
        )
    if args.stratify and args.task != "mix":
        p.error("--stratify draws the fraction per task: it needs --task mix")
    if not 0 < args.frac <= 1:
        p.error(f"--frac must be in (0, 1], got {args.frac}")
    return args


def checkpoint_defaults(init, first, given):
    """--init <checkpoint>: its models, projector shape and sink token (and, unless given, its
    dropout and time masking) as defaults; an explicit flag that says otherwise is refused.
    --init none: {}."""
    path = Path(init) / "meta.json"
    # a missing checkpoint: main says so (--help still works)
    if init == "none" or not path.exists():
        return {}
    meta = checked_meta(init)  # a damaged checkpoint, or one whose meta.json lies, is one line
    for flag in ("llm", "encoder"):
        if flag in given and not common.same_model(getattr(first, flag), meta[flag]):
            raise UserError(
                f"--{flag} {getattr(first, flag)} does not match the --init checkpoint {init}, "
                f"which was trained with --{flag} {meta[flag]}: leave --{flag} out, "
                "or pass --init none to start from scratch."
            )
    for flag, field in common.SHAPE_FLAGS.items():
        if flag in given and getattr(first, flag) != meta["qformer"][field]:
            raise UserError(
                f"--{flag.replace('_', '-')} {getattr(first, flag)}: "
                f"the projector's shape comes from the --init "
                f"checkpoint {init} ({field}={meta['qformer'][field]}); leave the flag out."
            )
    chosen = {"llm": meta["llm"], "encoder": meta["encoder"]}
    chosen.update({flag: meta["qformer"][field] for flag, field in common.SHAPE_FLAGS.items()})
    chosen["sink_token"] = meta.get("sink_token", False)
    chosen.update(
        {
            flag: meta["qformer"].get(flag, 0.0)
            for flag in ("dropout", "time_mask")
            if flag not in given
        }
    )
    return chosen


def build_model(args, dtype, world=1, resolve=common.resolve_model, device=None):
    """The SpeechLLM to fine-tune: with --init, the stage-1 projector loaded into it."""
    if args.init != "none" and not (Path(args.init) / "meta.json").exists():
        hint = " (run `python pretrain.py` first)" if args.init == "out/pretrain" else ""
        raise UserError(
            f"--init {args.init}: no stage-1 checkpoint there, "
            f"expected {args.init}/meta.json{hint}. "
            "Use --init none for the no-pretraining baseline."
        )
    shape = {field: getattr(args, flag) for flag, field in common.SHAPE_FLAGS.items()}
    qformer = QFormerConfig(**shape, dropout=args.dropout, time_mask=args.time_mask)
    model = SpeechLLM(args.llm, args.encoder, qformer, dtype, args.sink_token, resolve, device)
    model.system_prompt = args.system_prompt or None
    if args.init != "none":
        model.load_projector(args.init)
    elif args.match_embedding_rms:
        model.match_embedding_rms()
    if args.compress or args.ctc_weight or args.lora:  # extras: ctc and lora
        from extras import finetuning

        finetuning.build(model, args, world)
    return model


# -----------------------------------------------------------------------------
# Data: task examples (instruction + target per utterance), then the --frac subset


def load_data(args, encoder_seconds=None):
    """Returns (training examples, dev examples). "demo": the demo corpus's manifests of the
    task."""

    def examples(paths, split):
        rows = [
            row
            for path in paths or []
            for row in read_manifest(
                path, args.skip_bad, args.max_audio_seconds, print0, encoder_seconds
            )
        ]
        return task_examples(rows, args.task, args.qa_newline)

    train = frac_subset(
        examples(args.data, "train"), args.frac, seed=args.frac_seed, stratify=args.stratify
    )
    dev = examples(args.dev_data, "dev") if args.dev_data else []  # no dev data: no dev loss
    # a fixed sample over every task of the mix
    dev = random.Random(0).sample(dev, min(args.dev_size, len(dev)))
    return train, dev


def count(examples):
    tasks = {}
    for ex in examples:
        tasks[ex["task"]] = tasks.get(ex["task"], 0) + 1
    return ", ".join(f"{n} {task}" for task, n in tasks.items())


def answer_loss(model, batch, args=None, with_ctc=True):
    """The loss of one micro-batch: the projector's outputs in the chat prompt, loss on the answers."""
    speech, speech_mask = model.encode_speech(batch)
    extra = 0.0
    # the CTC alignment kept while the answer loss trains; compressed speech
    if args is not None and (args.compress or args.ctc_weight):  # extras: ctc
        from extras import ctc

        extra, speech, speech_mask = ctc.finetune_inputs(
            model, speech, speech_mask, batch, args, with_ctc
        )
    instructions = [ex["instruction"] for ex in batch["examples"]]
    targets = [ex["target"] for ex in batch["examples"]]
    return model.answer_loss(speech, speech_mask, instructions, targets) + extra


@torch.no_grad()
def dev_loss(model, dev, collate, args, device, dtype):
    """Mean answer loss over the dev examples (teacher-forced; evaluate.py scores generated
    answers)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(dev), args.batch_size):
        chunk = dev[i : i + args.batch_size]
        batch = to_device(collate(chunk), device)  # outside autocast: the log-mel must stay float32
        with common.autocast(device, dtype):
            total += answer_loss(model, batch, args, with_ctc=False).item() * len(chunk)
    model.train(was_training)
    return total / len(dev)


# -----------------------------------------------------------------------------
# The loop (the same sections as pretrain.py's)


def main(argv=None):
    args = get_args(argv)
    rank, world, device = common.setup(args.device, args.seed)
    resolve = common.resolve_model
    # the demo's models and corpus, built offline on first use
    if common.uses_demo(args.data, args.llm, args.encoder):  # extras: demo
        from extras import demo

        resolve = demo.prepare(args, args.task, several=True)
    common.need_data(args)
    run = common.start_run(args, "finetune.py")  # one run per --out (checked, not yet claimed)
    dtype = common.resolve_dtype(args.dtype, device)
    master = rank == 0
    # what the checkpoint and the recipe set: the run's first lines, and meta.json
    if args.init_set:
        common.announce(f"--init {args.init}", args.init_set)
    recipe = args.recipe_set
    common.announce(f"recipe {recipe['name']} ({recipe['because']})", recipe["set"])

    model = build_model(args, dtype, world, resolve, device).to(device)
    if args.grad_checkpoint:
        model.enable_grad_checkpointing()
    examples, dev = load_data(args, model.encoder.max_seconds)
    n_params = sum(p.numel() for p in model.projector.parameters())
    print0(
        f"task {args.task}, init {args.init}: {len(examples)} training examples "
        f"({count(examples)}; --frac {args.frac}{' per task' if args.stratify else ''}), "
        f"{len(dev)} dev, {n_params / 1e6:.2f}M trainable"
    )
    if args.cache_features:
        model.load_feature_cache(args.feature_cache_file)

    order = common.BatchOrder(len(examples), args.batch_size, rank, world, seed=args.seed)
    # the transcripts' tokens only for the CTC alignment: the targets go through the chat template
    collate = Collator(
        model.encoder.feature_extractor, model.tokenizer if args.ctc_weight else None
    )
    # the projector (and --lora's weights)
    params = [p for p in model.parameters() if p.requires_grad]
    # a fresh optimiser, as the authors
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    total_steps = args.max_steps or max(1, int(args.epochs * order.per_epoch / args.grad_accum))
    warmup_steps = max(1, round(args.warmup_ratio * total_steps))
    step = common.begin_run(run, args, model, optimizer, order)  # --resume: its newest ckpt
    # DDP around the projector only: the frozen encoder and LLM have nothing to synchronise
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model.projector = DDP(model.projector, device_ids=ids, broadcast_buffers=False)
    guard, log = common.NonFiniteGuard(), common.JsonLog.for_run(args, enabled=master)
    meta = dict(
        stage="finetune", task=args.task, init=args.init, init_set=args.init_set, recipe=recipe
    )

    model.train()
    desc = f"finetune {args.task}"
    progress = tqdm(
        range(step, total_steps), initial=step, total=total_steps, disable=not master, desc=desc
    )
    for step in progress:
        lr = common.cosine_lr(step, total_steps, args.lr, warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        if master and dev and args.eval_every and step > 0 and step % args.eval_every == 0:
            loss = dev_loss(model, dev, collate, args, device, dtype)
            progress.write(f"step {step} dev loss {loss:.3f}")
            log(step=step, dev_loss=loss)
        if master and args.save_every and step > 0 and step % args.save_every == 0:
            common.save_checkpoint(args.out, model, optimizer, step, order, args, **meta)
            model.save_feature_cache(args.feature_cache_file)

        t0 = time.time()
        for micro in range(args.grad_accum):
            batch = to_device(collate([examples[i] for i in next(order)]), device)
            if world > 1:  # all-reduce the gradients only on the last micro-step (nanoGPT's trick)
                model.projector.require_backward_grad_sync = micro == args.grad_accum - 1
            with common.autocast(device, dtype):
                loss = answer_loss(model, batch, args)
            (loss / args.grad_accum).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        if guard.ok(grad_norm, step, args.out):  # skip a step whose gradient is inf/NaN
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        if master:
            seconds = time.time() - t0
            progress.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}")
            log(
                step=step + 1,
                lr=lr,
                seconds=round(seconds, 3),
                grad_norm=grad_norm.item(),
                loss=loss.item(),
            )
            progress.write(f"step {step + 1} loss {loss.item():.3f} ({seconds:.2f}s)")

    step = total_steps
    if master:
        common.save_final(args.out, model, optimizer, step, order, args, **meta)  # + the projector
        model.save_feature_cache(args.feature_cache_file)
        if dev:
            loss = dev_loss(model, dev, collate, args, device, dtype)
            log(step=step, dev_loss=loss)
            print0(f"final dev loss ({len(dev)} examples): {loss:.3f}")
        print0(f"saved the projector to {args.out}; skipped steps: {guard.skipped}\n"
               f"score it: python evaluate.py --ckpt {args.out}")  # fmt: skip
    log.close()  # --wandb / --tensorboard: flush and finish
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    common.run_main(main)
