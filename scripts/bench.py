"""
bench.py: speed and memory, measured side by side, printed as one markdown table.

    # everything
    python -m scripts.bench
    # sections 1-2: the contrastive loss, ours vs loops written like the authors' code
    python -m scripts.bench --only loss
    # section 3: one pretraining step, broken down
    python -m scripts.bench --only step
    # one CPU thread (the default: all cores)
    python -m scripts.bench --only loss --repeats 3 --threads 1
    # the planner: the paper's peak GPU memory per stage, what fits a 24 / 40 / 80 GB card,
    # GPU-hours (scripts/plan.py; estimates measured on this machine)
    python -m scripts.bench --plan --llm llama --encoder hubert

Section 1: the all-layer cosine loss, forward + backward, at the paper's shapes (10 utterances, 7
layers, D = 4096, transcripts of 5-40 tokens, speech of 30-250 projector tokens), against the
authors' loop (per layer, unpad every example, mean, normalise, similarity, cross-entropy); on a GPU
with Triton, also the Triton pooling kernel; and the floor of any implementation on this device, a
plain copy of the speech states (the loss must read each of them once and write each of their
gradients once). Section 2: the Wasserstein loss at the same shapes but D = 256: our batched
Sinkhorn against a loop of the same Sinkhorn per (text, speech) pair, and against geomloss per pair
(the authors' code) when it is installed. Times are medians over --repeats runs after one warm-up
run.
"Ours" is contrastive_fast.py, the loss pretrain.py runs by default (contrastive.py, the reference
written for reading, gives the same numbers more slowly).

Memory ("peak extra"): on CUDA, torch.cuda.max_memory_allocated above what was allocated before the
call. On the CPU there is no allocator statistic, so the torch profiler's allocation events are
replayed in order and the largest sum of live bytes is reported: the peak of the tensors torch
allocated during the call (outputs and input gradients included, inputs excluded), not the process's
RSS.

CPU timings: glibc is asked to keep freed memory (as PyTorch's caching allocator does on a GPU), so
that page faults on fresh gradient buffers do not swamp the timings of both sides; --no-malloc-cache
turns it off.
"""

import argparse
import functools
import statistics
import time

import torch
import torch.nn.functional as F

import common
from contrastive import select_layers
from contrastive_fast import (
    HAS_TRITON,
    contrastive_loss,
    masked_mean,
    sinkhorn_divergence,
    wasserstein_logits,
)
from scripts.plan import live_bytes

# -----------------------------------------------------------------------------
# Measuring


def keep_freed_cpu_memory():
    """Ask glibc to keep freed memory instead of returning it to the OS (what PyTorch's CUDA caching
    allocator does on a GPU). Otherwise every fresh 40 MB gradient buffer is paid for in page
    faults, which on this kind of machine costs more than computing it, and the CPU timings measure
    the kernel, not the loss. Returns whether it worked (glibc only)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from malloc.h
        return bool(
            libc.mallopt(M_MMAP_THRESHOLD, 2**30) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
        )
    except OSError:
        return False


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device, repeats):
    """Median wall time of fn() in milliseconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_bytes(fn, device):
    """Peak bytes of tensors allocated by torch while fn() runs, above what was live before it
    (scripts/plan.py's live_bytes: the allocator's statistics on CUDA, the profiler's allocation
    events replayed on the CPU)."""
    return live_bytes(fn, device)[0]


def fmt_mb(nbytes):
    return "n/a" if nbytes is None else f"{nbytes / 2**20:.0f} MiB"


def rel_diff(a, b):
    return ((a - b).abs() / b.abs().clamp(min=1e-12)).max().item()


# -----------------------------------------------------------------------------
# Inputs at the paper's shapes, and the references written like the authors' code


def ragged_batch(L, B, lo, hi, D, device, seed, grad=False):
    """L separate [B, T, D] hidden states (a tuple, as transformers returns them) and a right-padded
    mask with lengths uniform in [lo, hi]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (B,), generator=g)
    T = int(lengths.max())
    mask = (torch.arange(T)[None] < lengths[:, None]).to(device)
    base = torch.randn(
        B, 1, D, generator=g
    )  # a shared direction per utterance: the loss is not trivial
    layers = [
        (base + torch.randn(B, T, D, generator=g)).to(device).requires_grad_(grad) for _ in range(L)
    ]
    return layers, mask


def authors_cos_loss(text_layers, text_mask, speech_layers, speech_mask, temperature=0.1):
    """The authors' `contrastive_avg`, called once per layer and summed: unpad every example with
    its mask, mean over its tokens, L2-normalise, similarity / temperature, cross-entropy with
    diagonal targets."""
    total = 0
    for text, speech in zip(text_layers, speech_layers):
        unpad_text = [t[m] for t, m in zip(text, text_mask)]
        unpad_speech = [s[m] for s, m in zip(speech, speech_mask)]
        avg_text = F.normalize(torch.stack([t.mean(0) for t in unpad_text]), p=2, dim=1)
        avg_speech = F.normalize(torch.stack([s.mean(0) for s in unpad_speech]), p=2, dim=1)
        similarity = avg_text @ avg_speech.T / temperature
        total = total + F.cross_entropy(
            similarity, torch.arange(len(similarity), device=similarity.device)
        )
    return total


def per_pair_divergences(text_layers, text_mask, speech_layers, speech_mask, divergence):
    """The authors' `contrastive_wasserstein` distances, per layer: unpad, L2-normalise every token
    (float32), one divergence(text_i, speech_j) call per pair (B^2 per layer). Returns [L, B, B]."""
    layers = []
    for text, speech in zip(text_layers, speech_layers):
        unpad_text = [F.normalize(t[m].float(), p=2, dim=-1) for t, m in zip(text, text_mask)]
        unpad_speech = [F.normalize(s[m].float(), p=2, dim=-1) for s, m in zip(speech, speech_mask)]
        B = len(unpad_text)
        layers.append(
            torch.stack(
                [
                    torch.stack([divergence(unpad_text[i], unpad_speech[j]) for j in range(B)])
                    for i in range(B)
                ]
            )
        )
    return torch.stack(layers)


def per_pair_wasserstein_loss(
    text_layers, text_mask, speech_layers, speech_mask, divergence, temperature=0.1
):
    """... and their loss: cross-entropy of -distance / temperature with diagonal targets, summed
    over layers."""
    distances = per_pair_divergences(text_layers, text_mask, speech_layers, speech_mask, divergence)
    L, B, _ = distances.shape
    target = torch.arange(B, device=distances.device).repeat(L)
    return (
        F.cross_entropy((-distances / temperature).reshape(L * B, B), target, reduction="none")
        .view(L, B)
        .mean(1)
        .sum()
    )


def our_sinkhorn_one_pair(x, y):
    """Our batched sinkhorn_divergence called on a single pair (its own diameter, as geomloss per
    pair)."""
    ones = lambda z: torch.ones(1, len(z), dtype=torch.bool, device=z.device)  # noqa: E731
    return sinkhorn_divergence(x[None], ones(x), y[None], ones(y))[0, 0]


def measure(section, shape, runs, device, repeats, reference):
    """Time and measure every run: name -> (loss closure, the speech states it differentiates into).
    Speed-ups are against the section's first run, loss differences against the run named
    `reference`."""
    rows, values = [], {}
    for name, (loss_fn, speech) in runs.items():

        def run():  # noqa: B023  (called within this iteration only)
            loss = loss_fn()  # noqa: B023
            # forward + backward into the speech states
            torch.autograd.grad(loss, speech)  # noqa: B023
            return loss.detach()

        values[name] = run()  # run() is used within this iteration only
        rows.append(
            dict(
                section=section,
                shape=shape,
                what=name,
                ms=median_ms(run, device, repeats),
                mem=peak_extra_bytes(run, device),
            )
        )
    for r in rows:
        r["speedup"] = rows[0]["ms"] / r["ms"]
        r["diff"] = rel_diff(values[r["what"]], values[reference])
    return rows


# -----------------------------------------------------------------------------
# Sections 1 and 2: the contrastive loss


def bench_loss(args, device):
    L, B = 7, 10

    # --- 1. cosine, D = 4096 ---------------------------------------------------------------------
    D = 4096
    text, text_mask = ragged_batch(L, B, 5, 40, D, device, seed=0)
    speech, speech_mask = ragged_batch(L, B, 30, 250, D, device, seed=1, grad=True)
    shape = (
        f"B={B}, L={L}, D={D}, T_text<={text_mask.shape[1]}, T_speech<={speech_mask.shape[1]}, fp32"
    )
    authors = "authors' loop (per layer, per example)"
    runs = {
        authors: (lambda: authors_cos_loss(text, text_mask, speech, speech_mask), speech),
        "ours, kernel=torch": (
            lambda: contrastive_loss(text, text_mask, speech, speech_mask)[0],
            speech,
        ),
    }
    # the model hands over one stacked [L, B, T, D] tensor rather than a tuple of layers
    st, ss = torch.stack(text).detach(), torch.stack(speech).detach().requires_grad_()
    runs["ours, kernel=torch, stacked input"] = (
        lambda: contrastive_loss(st, text_mask, ss, speech_mask)[0],
        ss,
    )
    if device.type == "cuda" and HAS_TRITON:
        runs["ours, kernel=triton, stacked input"] = (
            lambda: contrastive_loss(st, text_mask, ss, speech_mask, kernel="triton")[0],
            ss,
        )
    rows = measure("1. cos loss, fwd+bwd", shape, runs, device, args.repeats, reference=authors)
    # The floor of ANY implementation: pooling must read every speech state once, and the backward
    # must write a gradient for every one of them. A plain copy of the stacked states does exactly
    # that traffic (into a buffer allocated once: a fresh 250 MB allocation can cost more in page
    # faults than the copy).
    buffer = torch.empty_like(ss)
    floor = median_ms(lambda: buffer.copy_(ss.detach()), device, args.repeats)
    rows.append(
        dict(
            section=rows[0]["section"],
            shape=shape,
            what="floor: one read of the speech states + one write (a copy)",
            ms=floor,
            speedup=rows[0]["ms"] / floor,
            mem=None,
            diff=None,
        )
    )
    grad_bytes = sum(s.numel() * s.element_size() for s in speech)
    args.notes.append(
        f"section 1: the gradient of the speech states alone takes {fmt_mb(grad_bytes)}; the rest "
        "of the peak is what each implementation allocates on top. The floor's speed-up is the "
        f"most any implementation can reach on this device: {rows[0]['ms'] / floor:.1f}x; ours "
        f"(stacked) is {rows[2]['ms'] / floor:.2f}x the floor ({2 * grad_bytes / 1e6 / floor:.1f} "
        "GB/s moved by the copy)"
    )
    text = speech = st = ss = runs = None  # free section 1's tensors before section 2

    # --- 2. Wasserstein, D = 256 -----------------------------------------------------------------
    D = 256
    text, text_mask = ragged_batch(L, B, 5, 40, D, device, seed=2)
    speech, speech_mask = ragged_batch(L, B, 30, 250, D, device, seed=3, grad=True)
    shape = (
        f"B={B}, L={L}, D={D}, T_text<={text_mask.shape[1]}, T_speech<={speech_mask.shape[1]}, fp32"
    )
    per_pair = {}  # name -> divergence of one (text, speech) pair
    try:
        from geomloss import SamplesLoss

        per_pair["geomloss, one call per pair (the authors' code)"] = SamplesLoss(
            "sinkhorn", p=2, blur=0.05
        )
    except ImportError:
        print("geomloss is not installed (pip install -r requirements-dev.txt): skipping its row")
    per_pair["our Sinkhorn, one call per pair"] = our_sinkhorn_one_pair
    runs = {
        name: (
            lambda fn=fn: per_pair_wasserstein_loss(text, text_mask, speech, speech_mask, fn),
            speech,
        )
        for name, fn in per_pair.items()
    }
    runs["ours: all pairs batched"] = (
        lambda: contrastive_loss(text, text_mask, speech, speech_mask, sim="wasserstein")[0],
        speech,
    )
    reference = next(iter(per_pair))  # geomloss when installed
    rows += measure(
        "2. wasserstein loss, fwd+bwd", shape, runs, device, max(1, args.repeats // 2), reference
    )
    with torch.no_grad():  # the divergences themselves, not just the loss
        ours = -wasserstein_logits(text, text_mask, speech, speech_mask, temperature=1.0)
        theirs = per_pair_divergences(text, text_mask, speech, speech_mask, per_pair[reference])
    args.notes.append(
        f"section 2: the {ours.numel()} divergences (L x B x B), ours batched vs {reference}: "
        f"max relative difference {rel_diff(ours, theirs):.1e}"
    )
    return rows


# -----------------------------------------------------------------------------
# Section 3: one pretraining step of the demo, ours vs the naive way, broken into its parts


class Stopwatch:
    """Accumulates wall time per named part: `with watch("encoder"): ...`."""

    def __init__(self, device):
        self.device, self.parts = device, {}

    def __call__(self, name):
        watch = self

        class Part:
            def __enter__(self):
                sync(watch.device)
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                sync(watch.device)
                watch.parts[name] = (
                    watch.parts.get(name, 0.0) + (time.perf_counter() - self.t0) * 1e3
                )

        return Part()


def step_ours(model, batch, layers, optimizer, text_cache, watch):
    """Our step, pretrain.py's, timed by the method calls it makes: the speech side
    (SpeechLLM.speech_states: encoder features from the cache, the projector, the LLM pass without
    the LM head keeping only the selected states), the transcripts' pooled states read from the text
    cache, the batched loss."""
    with watch("speech side (fwd)"):
        states, pool_mask, _, _ = model.speech_states(batch, layers)
    with watch("text side (cache)"):
        text_pooled = torch.stack(
            [text_cache[f"{layers}:{ex['text']}"] for ex in batch["examples"]], 1
        )
    with watch("loss (fwd)"):
        loss = contrastive_loss(None, None, states, pool_mask, text_pooled=text_pooled)[0]
    with watch("backward"):
        loss.backward()
    with watch("optimiser"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def step_naive(model, batch, layers, optimizer, watch):
    """The same step as the authors' code runs it: the encoder every time, both modalities through
    the full causal LM (logits over the vocabulary, every hidden state), the per-example, per-layer
    loss loop."""
    with watch("encoder (frozen)"):
        with torch.no_grad():
            frames, frame_mask = model.encoder(batch["speech_inputs"], batch["speech_input_mask"])
    with watch("projector"):
        speech, speech_mask = model.projector(frames.float(), frame_mask)
    with watch("LLM text pass (no grad)"):
        with torch.no_grad():
            text = model.llm(
                inputs_embeds=model.embed_tokens(batch["text_ids"]),
                attention_mask=batch["text_mask"].long(),
                output_hidden_states=True,
            )
    with watch("LLM speech pass (fwd)"):
        out = model.llm(
            inputs_embeds=speech, attention_mask=speech_mask.long(), output_hidden_states=True
        )
    with watch("loss (fwd)"):
        loss = authors_cos_loss(
            [text.hidden_states[i] for i in layers],
            batch["text_mask"],
            [out.hidden_states[i] for i in layers],
            speech_mask,
        )
    with watch("backward"):
        loss.backward()
    with watch("optimiser"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def speech_pass_floor(model, batch, layers, watch):
    """The floor no implementation can go under: the speech pass through the LLM with gradients."""
    with torch.no_grad():
        frames, frame_mask = model.speech_frames(batch)
        speech, speech_mask = model.projector(frames.float(), frame_mask)
    speech.requires_grad_(True)
    with watch("floor"):
        states = model.hidden_states(speech, speech_mask, layers)
        torch.autograd.grad(states.float().pow(2).mean(), speech)


def bench_step(args, device):
    """A demo pretraining step (SmolLM2-135M + Whisper tiny.en + the demo projector, batch 16, all 7
    layers, the paper's loss), ours vs naive, each part timed; medians over --repeats steps."""
    import copy
    from types import SimpleNamespace

    import demokit
    import pretrain
    from data import Collator, read_manifest, to_device
    from extras.demo import resolve_model

    # the demo recipe's models, projector and batch size; no sink token: the naive step has none,
    # and both steps must compute the same loss
    recipe = common.RECIPES["demo"]
    demo = SimpleNamespace(
        **{**recipe["model"], **recipe["pretrain"], "llm": "smollm2", "sink_token": False}
    )
    model = pretrain.build_model(demo, torch.float32, resolve_model).to(device)
    model.feature_cache = {}
    corpus = demokit.corpus_path(small=args.small_corpus)
    rows = read_manifest(corpus / "sentences_train.jsonl")[: demo.batch_size * (args.repeats + 1)]
    collate = Collator(model.encoder.feature_extractor, model.tokenizer)
    batches = [
        to_device(collate(rows[i : i + demo.batch_size]), device)
        for i in range(0, len(rows), demo.batch_size)
    ]
    layers = select_layers("all", model.num_layers)
    shape = (
        f"SmolLM2-135M + Whisper tiny.en, demo projector, batch {demo.batch_size}, layers "
        f"{layers}, fp32"
    )
    text_cache, results, losses = {}, {}, {}
    for b in (
        batches
    ):  # the caches a real run fills in its first epoch: encoder features, pooled transcripts
        with torch.no_grad():
            model.speech_frames(b)
            text = masked_mean(*model.text_states(b, layers))
            text_cache.update(
                {f"{layers}:{ex['text']}": text[:, i] for i, ex in enumerate(b["examples"])}
            )
    for name in ("naive", "ours"):
        proj = copy.deepcopy(model.projector.state_dict())
        optimizer = torch.optim.AdamW(
            model.projector.parameters(), lr=0.0
        )  # lr 0: every step sees the same projector
        totals, parts = [], []
        for i, batch in enumerate(batches):
            watch = Stopwatch(device)
            t0 = time.perf_counter()
            loss = (
                step_ours(model, batch, layers, optimizer, text_cache, watch)
                if name == "ours"
                else step_naive(model, batch, layers, optimizer, watch)
            )
            losses.setdefault(name, loss)
            if i > 0 or len(batches) == 1:  # the first step warms up
                totals.append((time.perf_counter() - t0) * 1e3)
                parts.append(watch.parts)
        model.projector.load_state_dict(proj)
        results[name] = (
            statistics.median(totals),
            {k: statistics.median(p[k] for p in parts) for k in parts[0]},
        )
    floors = []
    for batch in batches[1:]:
        watch = Stopwatch(device)
        speech_pass_floor(model, batch, layers, watch)
        floors.append(watch.parts["floor"])
    floor = statistics.median(floors)
    mem = {}
    for name, fn, extra in (
        ("naive", step_naive, (Stopwatch(device),)),
        ("ours", step_ours, (text_cache, Stopwatch(device))),
    ):
        optimizer = torch.optim.AdamW(model.projector.parameters(), lr=0.0)
        step = functools.partial(fn, model, batches[-1], layers, optimizer, *extra)
        mem[name] = peak_extra_bytes(step, device)
    rows_out = []
    for name in ("naive", "ours"):
        total, parts = results[name]
        rows_out.append(
            dict(
                section="3. pretraining step",
                shape=shape,
                what=f"{name} step",
                ms=total,
                speedup=results["naive"][0] / total,
                mem=mem[name],
                diff=rel_diff(losses[name], losses["naive"]),
            )
        )
        args.notes.append(
            f"section 3, {name} step ({total / 1e3:.2f} s, {demo.batch_size / total * 1e3:.1f} "
            "samples/s): " + ", ".join(f"{k} {v / 1e3:.2f} s" for k, v in parts.items())
        )
    rows_out.append(
        dict(
            section="3. pretraining step",
            shape=shape,
            what="floor: the LLM speech pass, fwd+bwd",
            ms=floor,
            speedup=results["naive"][0] / floor,
            mem=None,
            diff=None,
        )
    )
    ours_total, ours_parts = results["ours"]
    args.notes.append(
        f"section 3: ours / floor = {ours_total / floor:.2f} (target <= 1.15); loss share of our "
        f"step = {ours_parts['loss (fwd)'] / ours_total:.1%} forward (target <= 5%); naive / ours "
        f"= {results['naive'][0] / ours_total:.2f}"
    )
    return rows_out


def print_table(rows, device, args):
    """One markdown table. A row is a dict: section, shape, what, ms, and optionally speedup, mem
    (bytes), diff; bench_step (section 3) returns rows of the same form, and notes go to
    args.notes."""
    cache = (
        ", freed CPU memory kept by malloc (--no-malloc-cache to turn off)"
        if args.malloc_cache
        else ""
    )
    print(
        f"\ndevice: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}{cache}\n"
    )
    print(
        "| section | shapes | implementation | time (ms, median) | speed-up | peak extra memory | "
        "loss rel. diff |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        speedup = f"{r['speedup']:.1f}x" if r.get("speedup") is not None else ""
        diff = f"{r['diff']:.1e}" if r.get("diff") is not None else ""
        print(
            f"| {r['section']} | {r['shape']} | {r['what']} | {r['ms']:.1f} | {speedup} | "
            f"{fmt_mb(r.get('mem'))} | {diff} |"
        )
    for note in args.notes:
        print(f"\n{note}")
    print(
        "\nspeed-up: against the first row of its section. loss rel. diff: section 1 against the "
        "authors' loop, section 2 against geomloss per pair (our per-pair loop when geomloss is "
        "absent)."
    )


def main():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--only", choices=["loss", "step", "all"], default="all", help="which sections to run"
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument(
        "--repeats", type=int, default=5, help="timed runs per measurement (after one warm-up)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for torch (default 0: torch's default, all cores; "
        "every implementation gets the same; 1 is the most repeatable)",
    )
    p.add_argument(
        "--small-corpus",
        action="store_true",
        help="section 3 reads the small smoke-test corpus (the tests' quick run)",
    )
    p.add_argument(
        "--no-malloc-cache",
        action="store_true",
        help="CPU: let glibc return freed memory to the OS (page faults included in the timings)",
    )
    g = p.add_argument_group("the planner (scripts/plan.py)")
    g.add_argument(
        "--plan",
        action="store_true",
        help="print the paper's peak GPU memory per stage, what fits which card, GPU-hours",
    )
    g.add_argument("--llm", default="llama", help="llama | smollm2 | a folder with a config.json")
    g.add_argument(
        "--encoder", default="hubert", help="hubert | whisper-tiny | a folder with a config.json"
    )
    g.add_argument(
        "--plan-dtype",
        choices=["bf16", "float32"],
        default="bf16",
        help="the run's dtype (bf16: the scripts' default on CUDA)",
    )
    args = p.parse_args()
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    args.malloc_cache = (
        device.type == "cpu" and not args.no_malloc_cache and keep_freed_cpu_memory()
    )
    if args.plan:
        from scripts import plan

        return plan.main(args, device)
    rows, args.notes = [], []
    if args.only in ("loss", "all"):
        rows += bench_loss(args, device)
    if args.only in ("step", "all"):
        rows += bench_step(args, device)
    print_table(rows, device, args)


if __name__ == "__main__":
    common.run_main(main)
