"""
Stage 1: task-independent pretraining of the projector with the paper's all-layer contrastive loss.

Speech and its transcript both go through the frozen LLM; at the embedding layer and every 5th layer up to
the last, the mean-pooled speech states are pulled towards their own transcript's and away from the other
transcripts in the batch (contrastive.py). Only the projector trains.

    python pretrain.py                        # the offline CPU demo: SmolLM2-135M + Whisper tiny.en (~7 min, 2 cores)
    python pretrain.py --llm llama --encoder hubert --data train.jsonl --dev-data dev.jsonl   # the paper's setup (GPU)
    python pretrain.py --loss asr             # the ASR-pretraining baseline
    torchrun --standalone --nproc_per_node=4 pretrain.py --llm llama --data train.jsonl      # several GPUs (DDP)
    python pretrain.py --llm tiny --encoder tiny --data my.jsonl --max-steps 2              # a smoke run
    python pretrain.py --out out/pretrain --resume      # continue a killed run from its newest checkpoint
"""

import argparse
import functools
import random
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import common
import contrastive
import contrastive_fast
from common import print0
from contrastive import cos_logits, info_nce, retrieval_r1
from data import INSTRUCTIONS, Collator, need_transcripts, read_manifest, to_device

# -----------------------------------------------------------------------------
# The command line. The recipes (paper, demo) and the flags finetune.py takes too: common.py.


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_flags(p)
    common.add_data_flags(p, False, "retrieval R@1", max_audio_seconds=45.0, max_audio_note="the paper keeps 1-45 s")
    g = p.add_argument_group("objective")
    g.add_argument("--loss", choices=["contrastive", "asr", "contrastive+asr"], default="contrastive")
    g.add_argument(
        "--sim", choices=["cos", "wasserstein"], default="cos", help="mean-pooled cosine, or -Sinkhorn divergence"
    )
    g.add_argument(
        "--layers", default="all", help="emb | all (0, every 5th, last) | a comma list of hidden-state indices"
    )
    g.add_argument("--temperature", type=float, default=0.1)
    g.add_argument(
        "--symmetric", action="store_true", help="average text->speech and speech->text (the paper: text->speech only)"
    )
    g.add_argument(
        "--center",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="centre pooled states per batch before normalising (demo)",
    )
    g.add_argument(
        "--center-items",
        type=int,
        default=256,
        help="with --center: training pairs whose mean pooled states are stored for retrieval",
    )
    g.add_argument(
        "--sink-token",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="shared BOS in front of both sides, left out of the pool (demo)",
    )
    g.add_argument(
        "--emb-steps", type=int, default=None, help="first train the layer-0 loss alone for this many steps (demo: 400)"
    )
    g.add_argument("--emb-lr", type=float, default=None, help="learning rate of those layer-0 steps")
    g.add_argument(
        "--gather-negatives", action="store_true", help="under DDP, use every rank's batch as negatives (cos only)"
    )
    g.add_argument(
        "--loss-impl",
        choices=["fast", "reference"],
        default="fast",
        help="contrastive_fast.py, or contrastive.py: the same loss written for reading (slower)",
    )
    g.add_argument(
        "--kernel",
        choices=["torch", "triton", "auto"],
        default="torch",
        help="pooling kernel of the fast contrastive loss",
    )
    g.add_argument(
        "--text-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="cos: pool each transcript's states once and reuse them",
    )
    common.add_projector_flags(p)
    common.add_optimisation_flags(p, "pretrain")
    g = common.add_system_flags(p)
    g.add_argument("--out", default="out/pretrain", help="checkpoints, final projector, log.jsonl")
    g.add_argument("--eval-every", type=int, default=None, help="dev retrieval every N steps (0 = only at the end)")
    args = p.parse_args(argv)
    if args.loss_impl == "reference" and args.kernel != "torch":
        p.error("--kernel picks the pooling kernel of --loss-impl fast")
    if args.gather_negatives and args.sim != "cos":
        p.error("--gather-negatives gathers pooled vectors: it works with --sim cos only")
    if args.loss == "asr" and args.emb_steps:
        p.error("--emb-steps warms up the contrastive loss: it does not apply to --loss asr")
    if args.loss == "asr":
        args.emb_steps = 0  # no contrastive warm start for pure ASR
    args.recipe_choice = common.apply_recipe(args, "model", "pretrain")
    return args


# -----------------------------------------------------------------------------
# The losses of one micro-batch


def loss_functions(args):
    """--loss-impl: masked_mean and contrastive_loss from contrastive_fast.py (the default, with its pooling
    --kernel) or from contrastive.py, the reference written for reading. The same numbers either way."""
    if args.loss_impl == "reference":
        return contrastive.masked_mean, contrastive.contrastive_loss
    return (
        functools.partial(contrastive_fast.masked_mean, kernel=args.kernel),
        functools.partial(contrastive_fast.contrastive_loss, kernel=args.kernel),
    )


def contrastive_step(model, batch, layers, args, text_cache):
    """The paper's loss: stage 1's forward (common.stage1_forward: the text side through the frozen LLM without
    gradients, the speech side with gradients into the projector), then the contrastive loss summed over the
    layers. Returns (loss, per-layer losses, in-batch R@1, the projector's outputs and their mask, which the
    ASR loss of --loss contrastive+asr reuses)."""
    masked_mean, contrastive_loss = loss_functions(args)
    out = common.stage1_forward(model, batch, layers, text_cache, masked_mean)
    if args.gather_negatives and dist.is_initialized():
        total, per_layer, acc = gathered_cos_step(out, args)
    else:
        total, per_layer, logits = contrastive_loss(
            out.text_states,
            out.text_pool_mask,
            out.speech_states,
            out.speech_pool_mask,
            sim=args.sim,
            temperature=args.temperature,
            symmetric=args.symmetric,
            center=args.center,
            return_logits=True,
            text_pooled=out.text_pooled,
        )
        acc = retrieval_r1(logits)
    return total, per_layer, acc, (out.speech, out.speech_mask)


def gathered_cos_step(out, args):
    """--gather-negatives: every rank's pooled vectors join the batch. Each rank computes the same global
    loss but differentiates only through its own slice (the others arrive without gradients); DDP then
    averages the world's partial gradients, so scaling the loss by the world size gives exactly the
    gradient of the global loss."""
    world, rank = dist.get_world_size(), dist.get_rank()
    masked_mean, _ = loss_functions(args)

    def gather(x):
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.detach().contiguous())
        parts[rank] = x  # our own slice keeps its graph
        return torch.cat(parts, dim=1)

    text = gather(out.text_pooled if out.text_pooled is not None else masked_mean(out.text_states, out.text_pool_mask))
    speech = gather(masked_mean(out.speech_states, out.speech_pool_mask))
    logits = cos_logits(text, speech, args.temperature, args.center)
    per_layer = info_nce(logits, args.symmetric)
    return per_layer.sum() * world, per_layer, retrieval_r1(logits)


def asr_step(model, batch, speech=None):
    """The ASR-pretraining baseline: next-token loss on the transcript given the speech, inside the LLM's
    chat template, on the answer tokens only. speech: the projector's (outputs, mask) when the contrastive
    loss has computed them already."""
    speech, speech_mask = speech if speech is not None else model.encode_speech(batch)
    texts = [ex["text"] for ex in batch["examples"]]
    embeds, mask, labels = model.chat_batch(speech, speech_mask, [INSTRUCTIONS["asr"]] * len(texts), texts)
    return model.lm_loss(embeds, mask, labels, prefix=model.shared_prefix([INSTRUCTIONS["asr"]]))


def train_step_loss(model, batch, layers, args, text_cache, objective=None):
    """Dispatch on the objective (default: --loss); returns (loss to backpropagate, dict of things to log
    incl. the loss value). contrastive+asr runs the encoder and the projector once for both losses."""
    objective = objective or args.loss
    loss, logs, speech = 0.0, {"loss": 0.0}, None
    if objective in ("contrastive", "contrastive+asr"):
        contrastive, per_layer, acc, speech = contrastive_step(model, batch, layers, args, text_cache)
        loss = loss + contrastive
        logs.update(loss=per_layer.sum().item(), per_layer=per_layer.detach(), acc=acc)
    if objective in ("asr", "contrastive+asr"):
        asr = asr_step(model, batch, speech)
        loss = loss + asr
        logs.update(loss=logs["loss"] + asr.item(), asr=asr.item())
    return loss, logs


# -----------------------------------------------------------------------------
# Data and evaluation


def load_data(args):
    if args.data is None:  # the built-in demo corpus, synthesised offline on first use
        import demokit

        corpus = demokit.corpus_path(size=args.demo_corpus)
        args.data, args.dev_data = (
            str(corpus / "sentences_train.jsonl"),
            args.dev_data or str(corpus / "sentences_dev.jsonl"),
        )
        args.feature_cache_file = args.feature_cache_file or str(
            corpus / f"features-{args.encoder.replace('/', '_')}.pt"
        )
    rows = read_manifest(args.data, skip_bad=args.skip_bad, max_seconds=args.max_audio_seconds, log=print0)
    dev = (
        read_manifest(args.dev_data, skip_bad=args.skip_bad, max_seconds=args.max_audio_seconds, log=print0)[
            : args.dev_size
        ]
        if args.dev_data
        else []
    )
    return need_transcripts(rows, "pretraining"), need_transcripts(dev, "dev retrieval")


def dev_retrieval(model, dev, layers, args, device, dtype, centers=None):
    """Speech->text R@1 per layer on the dev set: plain, with each side centred by its dev-set mean, and
    (given the stored training means) centred by those."""
    text, speech = common.pooled_pairs(model, dev, layers, args.batch_size, device, common.autocast(device, dtype))
    results = [retrieval_r1(cos_logits(text, speech)), retrieval_r1(cos_logits(text, speech, center=True))]
    return results + ([retrieval_r1(cos_logits(text, speech, center=centers))] if centers is not None else [])


def store_training_means(model, rows, layers, args, device, dtype):
    """--center trains on per-batch centred states, so retrieval must centre too; a single query has no set
    to average over, so the per-layer means over --center-items training pairs (a seeded sample, pooled
    with the final projector) are stored next to it, in centers.safetensors. Returns (text, speech) [L, D]."""
    sample = random.Random(args.seed).sample(rows, min(args.center_items, len(rows)))
    text, speech = common.pooled_pairs(model, sample, layers, args.batch_size, device, common.autocast(device, dtype))
    common.save_centers(args.out, text.mean(1), speech.mean(1), layers, len(sample))
    return text.mean(1), speech.mean(1)


def fmt(values):
    return "[" + " ".join(f"{v:.2f}" for v in values.tolist()) + "]"


# -----------------------------------------------------------------------------
# The loop


def main(argv=None):
    args = get_args(argv)
    rank, world, device = common.setup(args.device, args.seed)
    dtype = common.resolve_dtype(args.dtype, device)
    master = rank == 0
    recipe = args.recipe_choice  # what the recipe set: the run's first line, and meta.json's "recipe"
    common.announce(f"recipe {recipe['name']} ({recipe['because']})", recipe["set"])

    model = common.build_model(args, dtype).to(device)
    layers = common.select_layers(args.layers, model.num_layers)
    rows, dev = load_data(args)
    print0(
        f"{len(rows)} training utterances, {len(dev)} dev, layers {layers}, "
        f"{sum(p.numel() for p in model.projector.parameters()) / 1e6:.2f}M trainable parameters"
    )
    if args.cache_features:
        model.load_feature_cache(args.feature_cache_file)
    text_cache = {} if args.text_cache and args.sim == "cos" and not args.gather_negatives else None
    meta = dict(layers=layers, recipe=recipe)

    order = common.BatchOrder(len(rows), args.batch_size, rank, world, seed=args.seed)
    collate = Collator(model.encoder.feature_extractor, model.tokenizer)
    optimizer = common.make_optimizer(model, args.lr)
    total_steps = args.max_steps or max(1, int(args.epochs * order.per_epoch / args.grad_accum))
    warmup_steps = max(1, round(args.warmup_ratio * (total_steps - args.emb_steps)))
    step = common.resume(args.out, model, optimizer, order) if args.resume else 0
    model = common.wrap_ddp(model, device, world)  # under torchrun: DDP around the projector only
    guard, log = common.NonFiniteGuard(), common.JsonLog.for_run(args, enabled=master)
    params = [p for p in model.projector.parameters() if p.requires_grad]

    model.train()
    progress = tqdm(range(step, total_steps), initial=step, total=total_steps, disable=not master, desc="pretrain")
    for step in progress:
        # the demo's warm start: the layer-0 contrastive loss alone (no LLM pass) before the full objective
        warm = step < args.emb_steps
        step_layers = [0] if warm else layers
        lr = (
            args.emb_lr
            if warm
            else common.cosine_lr(step - args.emb_steps, total_steps - args.emb_steps, args.lr, warmup_steps)
        )
        common.set_lr(optimizer, lr)

        if master and dev and args.eval_every and step > 0 and step % args.eval_every == 0:
            plain, centred = dev_retrieval(model, dev, layers, args, device, dtype)
            progress.write(f"step {step} dev R@1 per layer {layers}: plain {fmt(plain)} centred {fmt(centred)}")
            log(step=step, dev_r1=plain, dev_r1_centred=centred, layers=layers)
        if master and args.save_every and step > 0 and step % args.save_every == 0:
            common.save_checkpoint(args.out, model, optimizer, step, order, args, **meta)
            model.save_feature_cache(args.feature_cache_file)

        t0 = time.time()
        for micro in range(args.grad_accum):
            batch = to_device(collate([rows[i] for i in next(order)]), device)
            # under DDP, synchronise gradients only on the last micro-step (nanoGPT's trick)
            with common.grad_sync(model, micro, args.grad_accum), common.autocast(device, dtype):
                loss, logs = train_step_loss(
                    model, batch, step_layers, args, text_cache, "contrastive" if warm else args.loss
                )
                (loss / args.grad_accum).backward()
        grad_norm = common.clip_and_step(optimizer, params, args.grad_clip, guard, step, args.out)

        if master:
            seconds = time.time() - t0
            shown = {"loss": f"{logs['loss']:.3f}", "lr": f"{lr:.1e}"}
            if "acc" in logs:
                shown["acc"] = fmt(logs["acc"])
            progress.set_postfix(shown)
            log(step=step + 1, lr=lr, seconds=round(seconds, 3), grad_norm=grad_norm.item(), layers=step_layers, **logs)
            line = f"step {step + 1} loss {logs['loss']:.3f}"
            if "per_layer" in logs:
                line += f" per layer {step_layers}: {fmt(logs['per_layer'])} in-batch R@1 {fmt(logs['acc'])}"
            progress.write(line + (f" asr {logs['asr']:.3f}" if "asr" in logs else "") + f" ({seconds:.2f}s)")

    step = total_steps
    if master:
        common.save_checkpoint(args.out, model, optimizer, step, order, args, **meta)
        model.save_projector(args.out, step=step, args=vars(args), **meta)  # the final projector
        model.save_feature_cache(args.feature_cache_file)
        centers = store_training_means(model, rows, layers, args, device, dtype) if args.center else None
        if dev:
            plain, centred, *train = dev_retrieval(model, dev, layers, args, device, dtype, centers)
            log(
                step=step,
                dev_r1=plain,
                dev_r1_centred=centred,
                layers=layers,
                **({"dev_r1_centred_train": train[0]} if train else {}),
            )
            print0(
                f"final dev R@1 (speech->text, {len(dev)} utterances, chance {1 / len(dev):.2f}) per layer {layers}:\n"
                f"  plain                        {fmt(plain)}\n  centred (dev-set means)      {fmt(centred)}"
                + (f"\n  centred (stored train means) {fmt(train[0])}" if train else "")
            )
        print0(f"saved the projector to {args.out}; skipped steps: {guard.skipped}")
    log.close()  # --wandb / --tensorboard: flush and finish
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    common.run_main(main)
