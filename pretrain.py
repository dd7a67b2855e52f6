"""
Stage 1: task-independent pretraining of the projector with the paper's all-layer contrastive loss.

Speech and its transcript both go through the frozen LLM; at the embedding layer and every 5th layer
up to the last, the mean-pooled speech states are pulled towards their own transcript's and away
from the other transcripts in the batch (contrastive.py). Only the projector trains. The demo's recipe
adds a token-level alignment: CTC between the projector's outputs and the transcript's tokens over the
LLM's own embedding table (--loss contrastive+ctc; docs/alignment.md).

    # the offline CPU demo: SmolLM2-135M + Whisper tiny.en (8 min on 2 cores, after ~3 min building
    # the models and the corpus once)
    python pretrain.py
    # the paper's setup (GPU)
    python pretrain.py --llm llama --data train.jsonl --dev-data dev.jsonl
    # the ASR-pretraining baseline
    python pretrain.py --loss asr
    # the paper's loss plus token-level alignment (CTC)
    python pretrain.py --loss contrastive+ctc
    # several GPUs (DDP)
    torchrun --standalone --nproc_per_node=4 pretrain.py --llm llama --data train.jsonl
    # a smoke run
    python pretrain.py --llm tiny --encoder tiny --data my.jsonl --max-steps 2
    # continue a killed run from its newest checkpoint
    python pretrain.py --out out/pretrain --resume
"""

import functools
import random
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import common
import contrastive
import contrastive_fast
from common import (
    ON_OFF,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    print0,
)
from data import INSTRUCTIONS, Collator, need_transcripts, read_manifest, to_device
from model import QFormerConfig, SpeechLLM

# -----------------------------------------------------------------------------
# The command line: the shared flags (common.py), then stage 1's own. A flag left out takes its
# recipe's value.


def get_args(argv=None):
    p = common.parser(__doc__)
    common.add_model_flags(p)
    common.add_data_flags(p, several=False, max_audio_seconds=45.0)  # the paper keeps 1-45 s
    g = p.add_argument_group("objective (the paper: contrastive, cos, all layers, tau 0.1)")
    losses = ["contrastive", "asr", "contrastive+asr", "ctc", "contrastive+ctc"]
    g.add_argument("--loss", choices=losses, help="the objective (ctc: extras/ctc.py)")
    g.add_argument("--sim", choices=["cos", "wasserstein"], default="cos", help="cos or Sinkhorn")
    g.add_argument("--layers", default="all", help="emb | all (0, every 5th, last) | a comma list")
    g.add_argument("--temperature", type=positive_float, default=0.1, help="the logits' tau")
    g.add_argument("--symmetric", action="store_true", help="add speech->text to text->speech")
    g = p.add_argument_group("the demo's remedies (README: the recipes)")
    g.add_argument("--center", action=ON_OFF, help="centre pooled states per batch")
    g.add_argument("--center-items", type=positive_int, default=256, help="pairs for stored means")
    g.add_argument("--sink-token", action=ON_OFF, help="shared BOS in front of both sides")
    g.add_argument("--emb-steps", type=non_negative_int, help="first, the layer-0 loss alone")
    g.add_argument("--emb-lr", type=non_negative_float, help="the learning rate of those steps")
    g = p.add_argument_group("the CTC alignment (extras/ctc.py; --loss ...ctc)")
    g.add_argument("--ctc-weight", type=non_negative_float, default=1.0, help="its weight")
    g.add_argument("--ctc-temperature", type=positive_float, default=0.05, help="cosine / this")
    g.add_argument("--ctc-classes", type=non_negative_int, help="rows scored a step (0: all)")
    g = p.add_argument_group("speed (the same numbers)")
    g.add_argument("--gather-negatives", action="store_true", help="DDP: all ranks' negatives")
    impls = ["torch", "triton", "auto", "reference"]
    g.add_argument("--loss-impl", choices=impls, default="torch", help="pooling kernel, or plain")
    g.add_argument("--text-cache", action=ON_OFF, default=True, help="pool each transcript once")
    common.add_projector_flags(p)
    common.add_optimisation_flags(p)
    g = common.add_system_flags(p)
    g.add_argument("--out", default="out/pretrain", help="checkpoints, final projector, log.jsonl")

    def defaults_for(first, given):
        recipe = common.recipe_defaults(first, given, ["model", "pretrain"])
        if (first.loss or recipe["loss"]) in ("asr", "ctc"):
            recipe["emb_steps"] = 0  # the warm start is the contrastive loss's
        return recipe

    args = common.parse_args(p, argv, defaults_for)
    common.check_projector_flags(p, args)
    if args.gather_negatives and args.sim != "cos":
        p.error("--gather-negatives gathers pooled vectors: it works with --sim cos only")
    if args.loss in ("asr", "ctc") and args.emb_steps:
        p.error(
            f"--emb-steps warms up the contrastive loss: it does not apply to --loss {args.loss}"
        )
    return args


def build_model(args, dtype, resolve=common.resolve_model, device=None):
    """The SpeechLLM the flags describe; --match-embedding-rms starts the projector at the LLM's
    scale."""
    shape = {field: getattr(args, flag) for flag, field in common.SHAPE_FLAGS.items()}
    qformer = QFormerConfig(**shape, dropout=args.dropout, time_mask=args.time_mask)
    model = SpeechLLM(args.llm, args.encoder, qformer, dtype, args.sink_token, resolve, device)
    model.system_prompt = args.system_prompt or None
    if args.match_embedding_rms:
        model.match_embedding_rms()
    return model


# -----------------------------------------------------------------------------
# The losses of one micro-batch


def loss_functions(args):
    """(the pooling, the paper's loss): contrastive.contrastive_loss either way; --loss-impl torch,
    triton or auto swaps in contrastive_fast.py's pooling (with that kernel) and Sinkhorn, the same
    numbers faster; reference keeps contrastive.py's own, written for reading."""
    if args.loss_impl == "reference":
        return contrastive.masked_mean, contrastive.contrastive_loss
    pool = functools.partial(contrastive_fast.masked_mean, kernel=args.loss_impl)
    fast = dict(pool=pool, wasserstein=contrastive_fast.wasserstein_logits)
    return pool, functools.partial(contrastive.contrastive_loss, **fast)


def contrastive_step(model, batch, layers, args, text_cache):
    """The paper's loss: the speech side through the frozen LLM with gradients into the projector,
    the text side without, then the contrastive loss summed over the layers. Returns (loss,
    per-layer losses, in-batch R@1, the projector's outputs and their mask, which the ASR loss of
    --loss contrastive+asr reuses).
    text_cache (an addition, --text-cache): a transcript's pooled text states depend only on its
    words and the layers, so they are computed once and read back."""
    masked_mean, contrastive_loss = loss_functions(args)
    speech_states, speech_pool_mask, speech, speech_mask = model.speech_states(batch, layers)
    text_states = text_pool_mask = text_pooled = None
    if text_cache is None:
        text_states, text_pool_mask = model.text_states(batch, layers)
    else:
        keys = [f"{layers}:{ex['text']}" for ex in batch["examples"]]
        for i, key in enumerate(keys):
            if key not in text_cache:  # alone, unpadded: the value never depends on the batch
                n = int(batch["text_mask"][i].sum())
                one = {
                    "text_ids": batch["text_ids"][i : i + 1, :n],
                    "text_mask": batch["text_mask"][i : i + 1, :n],
                }
                # kept on the CPU: MuST-C's 230k transcripts x 7 layers x 4096 are ~25 GB
                text_cache[key] = masked_mean(*model.text_states(one, layers))[:, 0].cpu()
        text_pooled = torch.stack([text_cache[key] for key in keys], 1).to(speech_states.device)
    if args.gather_negatives and dist.is_initialized():
        text_pooled = (
            text_pooled if text_pooled is not None else masked_mean(text_states, text_pool_mask)
        )
        total, per_layer, acc = gathered_cos_loss(
            text_pooled, masked_mean(speech_states, speech_pool_mask), args
        )
    else:
        total, per_layer, logits = contrastive_loss(
            text_states, text_pool_mask, speech_states, speech_pool_mask, sim=args.sim,
            temperature=args.temperature, symmetric=args.symmetric, center=args.center,
            return_logits=True, text_pooled=text_pooled,
        )  # fmt: skip
        acc = contrastive.retrieval_r1(logits)
    return total, per_layer, acc, (speech, speech_mask)


def gathered_cos_loss(text_pooled, speech_pooled, args):
    """--gather-negatives: every rank's pooled vectors join the batch. Each rank computes the same
    global loss but differentiates only through its own slice (the others arrive without gradients);
    DDP then averages the world's partial gradients, so scaling the loss by the world size gives
    exactly the gradient of the global loss."""
    world, rank = dist.get_world_size(), dist.get_rank()

    def gather(x):
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.detach().contiguous())
        parts[rank] = x  # our own slice keeps its graph
        return torch.cat(parts, dim=1)

    logits = contrastive.cos_logits(
        gather(text_pooled), gather(speech_pooled), args.temperature, args.center
    )
    per_layer = contrastive.info_nce(logits, args.symmetric)
    return per_layer.sum() * world, per_layer, contrastive.retrieval_r1(logits)


def train_step_loss(model, batch, layers, args, text_cache, objective=None):
    """Returns (loss to backpropagate, dict of things to log incl. the loss value). A combined
    objective runs the encoder and the projector once for both losses. ASR pretraining (the
    baseline) is stage 2's answer loss with the transcript as the answer; CTC, the token-level
    alignment over the LLM's own embedding table (SpeechLLM.ctc_loss), needs no LLM pass."""
    objective, loss, logs, speech = objective or args.loss, 0.0, {"loss": 0.0}, None
    if objective in ("contrastive", "contrastive+asr", "contrastive+ctc"):
        contrastive_loss, per_layer, acc, speech = contrastive_step(
            model, batch, layers, args, text_cache
        )
        loss = loss + contrastive_loss
        logs.update(loss=per_layer.sum().item(), per_layer=per_layer.detach(), acc=acc)
    if objective in ("asr", "contrastive+asr"):
        speech, speech_mask = speech if speech is not None else model.encode_speech(batch)
        texts = [ex["text"] for ex in batch["examples"]]
        asr = model.answer_loss(speech, speech_mask, [INSTRUCTIONS["asr"]] * len(texts), texts)
        loss = loss + asr
        logs.update(loss=logs["loss"] + asr.item(), asr=asr.item())
    if "ctc" in objective:  # extras: ctc, the token-level alignment
        from extras import ctc

        speech, speech_mask = speech if speech is not None else model.encode_speech(batch)
        term, ctc_logs = ctc.pretrain_term(model, speech, speech_mask, batch, args)
        loss = loss + term
        logs.update(loss=logs["loss"] + term.item(), **ctc_logs)
    return loss, logs


# -----------------------------------------------------------------------------
# Data and evaluation


def load_data(args, encoder_seconds=None):
    """(training rows, dev rows): the manifests' lines, checked; "demo": the demo corpus's
    sentences."""

    def read(path, split):
        return (
            read_manifest(path, args.skip_bad, args.max_audio_seconds, print0, encoder_seconds)
            if path
            else []
        )

    rows, dev = read(args.data, "train"), read(args.dev_data, "dev")[: args.dev_size]
    return need_transcripts(rows, "pretraining"), need_transcripts(dev, "dev retrieval")


def dev_retrieval(model, rows, layers, args, device, dtype, centers=None):
    """Speech->text R@1 per layer on pooled pairs (contrastive.retrieval_table), and the pooled
    pairs."""
    collate = Collator(model.encoder.feature_extractor, model.tokenizer)
    size = args.batch_size
    batches = (to_device(collate(rows[i : i + size]), device) for i in range(0, len(rows), size))
    text, speech = model.pooled_pairs(batches, layers, lambda: common.autocast(device, dtype))
    return contrastive.retrieval_table(text, speech, centers), (text, speech)


def store_training_means(model, rows, layers, args, device, dtype):
    """--center trains on per-batch centred states, so retrieval must centre too; a single query has
    no set to average over, so the per-layer means over --center-items training pairs (a seeded
    sample, pooled with the final projector) are stored next to it, in centers.safetensors. Returns
    (text, speech) [L, D]."""
    sample = random.Random(args.seed).sample(rows, min(args.center_items, len(rows)))
    _, (text, speech) = dev_retrieval(model, sample, layers, args, device, dtype)
    common.save_centers(args.out, text.mean(1), speech.mean(1), layers, len(sample))
    return text.mean(1), speech.mean(1)


def fmt(values):
    return "[" + " ".join(f"{v:.2f}" for v in values.tolist()) + "]"


def phase_bar(previous, step, emb_steps, total_steps, master):
    """The progress bar of the phase `step` is in, the warm start's or the all-layer steps': an
    all-layer step costs 5-10 layer-0 steps on a CPU, so one bar over both would promise the end
    too early."""
    if previous is not None:
        previous.close()
    warm = step < emb_steps
    start, end = (0, min(emb_steps, total_steps)) if warm else (emb_steps, total_steps)
    if not warm:
        desc = "pretrain, all layers" if emb_steps else "pretrain"
    elif total_steps > emb_steps:
        desc = f"pretrain, layer 0 (then {total_steps - emb_steps} all-layer steps)"
    else:
        desc = "pretrain, layer 0"
    return tqdm(total=end - start, initial=step - start, disable=not master, desc=desc)


# -----------------------------------------------------------------------------
# The loop


def main(argv=None):
    args = get_args(argv)
    rank, world, device = common.setup(args.device, args.seed)
    resolve = common.resolve_model
    # the demo's models and corpus, built offline on first use
    if common.uses_demo(args.data, args.llm, args.encoder):  # extras: demo
        from extras import demo

        resolve = demo.prepare(args, "asr")
    common.need_data(args)
    run = common.start_run(args, "pretrain.py")  # one run per --out (checked, not yet claimed)
    dtype = common.resolve_dtype(args.dtype, device)
    master = rank == 0
    recipe = args.recipe_set  # what the recipe set: the run's first line, and meta.json's "recipe"
    common.announce(f"recipe {recipe['name']} ({recipe['because']})", recipe["set"])

    model = build_model(args, dtype, resolve, device).to(device)
    if args.grad_checkpoint:
        model.enable_grad_checkpointing()
    if "ctc" in args.loss:  # extras: ctc, the blank trains with the projector
        from extras import ctc

        ctc.setup_pretrain(model, args)
    try:
        layers = contrastive.select_layers(args.layers, model.num_layers)
    except ValueError as e:
        raise common.UserError(f"--layers {args.layers}: {e}") from None
    rows, dev = load_data(args, model.encoder.max_seconds)
    n_params = sum(p.numel() for p in model.projector.parameters())
    print0(
        f"{len(rows)} training utterances, {len(dev)} dev, layers {layers}, "
        f"{n_params / 1e6:.2f}M trainable"
    )
    if args.cache_features:
        model.load_feature_cache(args.feature_cache_file)
    text_cache = {} if args.text_cache and args.sim == "cos" and not args.gather_negatives else None
    meta = dict(layers=layers, recipe=recipe)

    order = common.BatchOrder(len(rows), args.batch_size, rank, world, seed=args.seed)
    collate = Collator(model.encoder.feature_extractor, model.tokenizer)
    params = [p for p in model.projector.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    total_steps = args.max_steps or max(1, int(args.epochs * order.per_epoch / args.grad_accum))
    warmup_steps = max(1, round(args.warmup_ratio * (total_steps - args.emb_steps)))
    first_step = common.begin_run(run, args, model, optimizer, order)  # --resume: its newest ckpt
    # DDP around the projector only: the frozen encoder and LLM have nothing to synchronise
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model.projector = DDP(model.projector, device_ids=ids, broadcast_buffers=False)
    guard, log = common.NonFiniteGuard(), common.JsonLog.for_run(args, enabled=master)

    model.train()
    progress = None
    for step in range(first_step, total_steps):
        # the demo's warm start: the layer-0 contrastive loss alone (no LLM pass; with CTC if asked)
        warm = step < args.emb_steps
        if progress is None or step == args.emb_steps:  # a bar per phase
            progress = phase_bar(progress, step, args.emb_steps, total_steps, master)
        step_layers = [0] if warm else layers
        cosine = common.cosine_lr(
            step - args.emb_steps, total_steps - args.emb_steps, args.lr, warmup_steps
        )
        lr = args.emb_lr if warm else cosine
        for group in optimizer.param_groups:
            group["lr"] = lr

        if master and dev and args.eval_every and step > 0 and step % args.eval_every == 0:
            # during the warm start only layer 0 trains: its retrieval needs no LLM pass
            r1, _ = dev_retrieval(model, dev, step_layers, args, device, dtype)
            progress.write(f"step {step} dev R@1 per layer {step_layers}: plain {fmt(r1['plain'])} "
                           f"centred {fmt(r1['centred'])}")  # fmt: skip
            log(step=step, dev_r1=r1["plain"], dev_r1_centred=r1["centred"], layers=step_layers)
            if "ctc" in args.loss:  # extras: ctc, what the projector spells so far
                in_autocast = lambda: common.autocast(device, dtype)  # noqa: E731
                ctc.print_read_out(model, dev, collate, device, progress.write, in_autocast)
        if master and args.save_every and step > 0 and step % args.save_every == 0:
            common.save_checkpoint(args.out, model, optimizer, step, order, args, **meta)
            model.save_feature_cache(args.feature_cache_file)

        t0 = time.time()
        for micro in range(args.grad_accum):
            batch = to_device(collate([rows[i] for i in next(order)]), device)
            if world > 1:  # all-reduce the gradients only on the last micro-step (nanoGPT's trick)
                model.projector.require_backward_grad_sync = micro == args.grad_accum - 1
            with common.autocast(device, dtype):
                warm_loss = "contrastive+ctc" if args.loss == "contrastive+ctc" else "contrastive"
                objective = warm_loss if warm else args.loss
                loss, logs = train_step_loss(model, batch, step_layers, args, text_cache, objective)
            (loss / args.grad_accum).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        if guard.ok(grad_norm, step, args.out):  # skip a step whose gradient is inf/NaN
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        if master:
            seconds = time.time() - t0
            shown = {"loss": f"{logs['loss']:.3f}", "lr": f"{lr:.1e}"}
            if "acc" in logs:
                shown["acc"] = fmt(logs["acc"])
            progress.set_postfix(shown)
            log(
                step=step + 1,
                lr=lr,
                seconds=round(seconds, 3),
                grad_norm=grad_norm.item(),
                layers=step_layers,
                **logs,
            )
            line = f"step {step + 1} loss {logs['loss']:.3f}"
            if "per_layer" in logs:
                line += (
                    f" per layer {step_layers}: {fmt(logs['per_layer'])} "
                    f"in-batch R@1 {fmt(logs['acc'])}"
                )
            progress.write(
                line
                + "".join(f" {name} {logs[name]:.3f}" for name in ("asr", "ctc") if name in logs)
                + f" ({seconds:.2f}s)"
            )
        progress.update()

    if progress is not None:
        progress.close()
    step = total_steps
    if master:
        common.save_final(args.out, model, optimizer, step, order, args, **meta)  # + the projector
        model.save_feature_cache(args.feature_cache_file)
        centers = (
            store_training_means(model, rows, layers, args, device, dtype) if args.center else None
        )
        if dev:
            r1, _ = dev_retrieval(model, dev, layers, args, device, dtype, centers)
            train = {"dev_r1_centred_train": r1["centred_train"]} if centers is not None else {}
            log(step=step, dev_r1=r1["plain"], dev_r1_centred=r1["centred"], layers=layers, **train)
            print0(
                f"final dev R@1 (speech->text, {len(dev)} utterances, "
                f"chance {1 / len(dev):.2f}) per layer {layers}:\n"
                f"  plain                        {fmt(r1['plain'])}\n"
                f"  centred (dev-set means)      {fmt(r1['centred'])}"
                + (f"\n  centred (stored train means) {fmt(r1['centred_train'])}" if train else "")
            )
        print0(f"saved the projector to {args.out}; skipped steps: {guard.skipped}")
    log.close()  # --wandb / --tensorboard: flush and finish
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    common.run_main(main)
