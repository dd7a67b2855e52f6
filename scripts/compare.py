"""
compare.py: the paper's comparison in one command. Stage-1 variants (none, ASR pretraining,
contrastive at the embedding layer or at all layers, cosine or Wasserstein, contrastive + ASR, and the
token-level alignment: CTC alone or with the contrastive loss at all layers or the embedding layer) ->
fine-tuning of each on 10% of the ASR and spoken-QA data (and the no-pretraining model on 100%, the
task-specialised model the paper compares against) -> test scores, next to a text topline and a
Whisper cascade.

    # the demo grid; rerun to continue. About 4.8 h on 2 cores of an AVX-512 Xeon, float32 or bf16
    # alike (estimated per cell from measured steps: docs/speed.md); about three times that on AVX2
    python -m scripts.compare
    # the whole grid with tiny budgets, in minutes (a smoke test)
    python -m scripts.compare --quick
    # another corpus in the demo's layout (below)
    python -m scripts.compare --corpus /data/mine
    # the paper's setup (GPU)
    python -m scripts.compare --llm llama --encoder hubert --corpus /data/paper --seeds 42 43 44

It runs the scripts as a user would (`python pretrain.py ...`, `python finetune.py ...`,
`python evaluate.py ...`), one cell at a time, and records each finished cell in
<out>/cells/<name>.json (its command, wall time and metrics); a rerun skips finished cells, so a
killed grid continues where it stopped.
At the end (and after every cell) it writes <out>/results.md (the table), results.json, and two
figures: r1_per_layer.png (dev R@1 per layer over the stage-1 steps) and metrics.png (test metrics
per variant, toplines as lines).

The corpus folder holds sentences_{train,dev,test}.jsonl (ASR; stage 1 trains on sentences_train)
and qa_{train,dev,test}.jsonl (spoken QA), in data.py's manifest format, as the demo's does.
"""

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

import common

REPO = Path(__file__).resolve().parents[1]

# -----------------------------------------------------------------------------
# The grid: stage-1 variants (pretrain.py flags on top of its recipe), then fine-tuning cells

VARIANTS = {
    "none": None,  # no stage 1: fine-tuning starts from a fresh projector
    "asr": ["--loss", "asr"],  # ASR pretraining (the paper's baseline)
    "cos-emb": ["--loss", "contrastive", "--layers", "emb"],  # contrastive, embedding layer only
    "cos-all": ["--loss", "contrastive"],  # contrastive, layers 0, 5, ..., last (the paper's best)
    "wass-all": ["--loss", "contrastive", "--sim", "wasserstein"],
    "cos-all+asr": ["--loss", "contrastive+asr"],
    # token-level alignment (an addition): CTC over the LLM's embedding table, alone and with the paper's
    "ctc": ["--loss", "ctc", "--lr", "1e-3"],  # the rate of the contrastive+ctc warm steps
    "cos-all+ctc": ["--loss", "contrastive+ctc"],
    "cos-emb+ctc": ["--loss", "contrastive+ctc", "--layers", "emb"],  # the same, embedding layer
}
NO_WARM_START = ("asr", "ctc")  # variants without the contrastive loss: no --emb-steps
KEY_VARIANTS = [
    "cos-all+ctc",
    "cos-all",
    "asr",
    "none",
]  # run with every --seeds; the others with the first seed only
TASKS = {
    "asr": "sentences",
    "qa": "qa",
    "st": "sentences",
}  # fine-tuning task -> the corpus's manifests
FULL_DATA = 1.0  # the no-pretraining model on all the data: the task-specialised model
METRIC = {
    "asr": ("wer", "lower"),
    "qa": ("f1", "higher"),
    "st": ("bleu", "higher"),
}  # each task's headline

# Budgets of the demo grid. ASR pretraining gets about the stage-1 wall time of the contrastive run
# (cos-all: 600 layer-0 + 40 all-layer steps, ~6.2 min on the Xeon of docs/speed.md; 80 ASR steps ~6.4)
DEMO_BUDGET = {"asr": ["--max-steps", "80"]}
_SMALL = "--dev-size 4 --batch-size 4 --grad-accum 1"  # what every --quick training run shares
QUICK = {  # tiny budgets: every cell runs, nothing learns
    "pretrain": shlex.split(
        f"--max-steps 3 --emb-steps 1 --eval-every 2 {_SMALL} --center-items 8"
    ),
    "pretrain_asr": shlex.split(f"--max-steps 2 {_SMALL} --center-items 8"),
    "finetune": shlex.split(f"--max-steps 2 {_SMALL}"),
    "evaluate": ["--limit", "4"],
}


def get_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--corpus",
        default=None,
        help="folder with sentences_*.jsonl and qa_*.jsonl (default: the demo corpus)",
    )
    common.add_demo_corpus_flag(p)
    p.add_argument("--out", default="out/compare", help="cells, tables, figures")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[42, 43],
        help="seeds of the key cells (cos-all, asr, none)",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        help="stage-1 variants to run",
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        default=["asr", "qa"],
        choices=list(TASKS),
        help="st: en->X translation",
    )
    p.add_argument("--frac", type=float, default=0.1, help="fine-tuning fraction of every variant")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny budgets and one seed: checks the whole grid runs, in minutes",
    )
    p.add_argument(
        "--report",
        action="store_true",
        help="run nothing: the table and figures from the finished cells",
    )
    p.add_argument(
        "--llm",
        default=None,
        help="passed to pretrain.py / finetune.py (default: their default, the demo's)",
    )
    p.add_argument("--encoder", default=None, help="passed to pretrain.py / finetune.py")
    p.add_argument(
        "--pretrain-args", default="", help="extra flags for every pretrain.py run, one string"
    )
    p.add_argument(
        "--finetune-args", default="", help="extra flags for every finetune.py run, one string"
    )
    p.add_argument(
        "--evaluate-args",
        default="--batch-size 16",
        help="extra flags for every evaluate.py run, one string",
    )
    p.add_argument(
        "--toplines",
        nargs="*",
        default=["transcript", "whisper"],
        choices=["transcript", "whisper"],
        help="also score the LLM reading the transcript (text topline) and Whisper's transcript "
        "(cascade; the demo's Whisper tiny.en, or --evaluate-args '--asr-model ...'); none: "
        "--toplines with no value",
    )
    args = p.parse_args(argv)
    # the cells run from the repository: paths given relative to where compare.py was started
    args.out = str(Path(args.out).resolve())
    args.corpus = args.corpus and str(Path(args.corpus).resolve())
    if args.quick:
        args.seeds = args.seeds[:1]
    return args


# -----------------------------------------------------------------------------
# Cells: one script run each, recorded when it finishes


def run_cell(out, name, command, log):
    """Run one command unless its cell is recorded; returns the record {command, seconds, ...}."""
    record = out / "cells" / f"{name}.json"
    if record.exists():
        return json.loads(record.read_text())
    if log is None:  # --report: run nothing
        return None
    if command[0] in ("pretrain.py", "finetune.py"):  # a cell killed half way continues
        command = [*command, "--resume"]
    log.write(f"\n=== {name}: {shlex.join(command)}\n")
    log.flush()
    t0 = time.time()
    result = subprocess.run(
        [sys.executable, *command], cwd=REPO, stdout=log, stderr=subprocess.STDOUT
    )
    if result.returncode != 0:
        raise SystemExit(
            f"compare.py: cell {name} failed (exit {result.returncode}); its output is in "
            f"{log.name}"
        )
    done = {
        "name": name,
        "command": "python " + shlex.join(relative_to_repo(command)),
        "seconds": round(time.time() - t0, 1),
    }
    record.parent.mkdir(parents=True, exist_ok=True)
    record.with_suffix(".tmp").write_text(json.dumps(done, indent=2))
    record.with_suffix(".tmp").replace(
        record
    )  # atomic: a killed run never records a half-finished cell
    return done


def relative_to_repo(command):
    """`command` with paths inside the repository written relative to it, so a cell's record
    reads the same on every machine and can be committed as is."""
    prefix = str(REPO) + "/"
    return [word.replace(prefix, "") for word in command]


def corpus_files(args):
    if args.corpus:
        corpus = Path(args.corpus)
    else:
        import demokit

        size = args.demo_corpus  # --report only reads: it finds the folder and builds nothing
        qa = "qa" in args.tasks
        corpus = (
            demokit.corpus_folder(size) if args.report else demokit.corpus_path(size=size, qa=qa)
        )
    files = {
        split: {kind: str(corpus / f"{kind}_{split}.jsonl") for kind in ("sentences", "qa")}
        for split in ("train", "dev", "test")
    }
    if (
        corpus / "sentences_open_test.jsonl"
    ).is_file():  # ASR is also scored on it, in a column of its own
        files["open_test"] = {"sentences": str(corpus / "sentences_open_test.jsonl")}
    return files, corpus


def model_flags(args):
    return [
        *(["--llm", args.llm] if args.llm else []),
        *(["--encoder", args.encoder] if args.encoder else []),
    ]


def stage1(args, out, files, variant, seed, log):
    """pretrain.py for one variant and seed; returns (its folder, its cell record)."""
    folder = out / "stage1" / f"{variant}-s{seed}"
    demo = args.llm in (None, "smollm2")
    budget = (
        (QUICK["pretrain_asr"] if variant in NO_WARM_START else QUICK["pretrain"])
        if args.quick
        else DEMO_BUDGET.get(variant, [])
        if demo
        else []
    )
    command = [
        "pretrain.py",
        *VARIANTS[variant],
        *model_flags(args),
        "--data",
        files["train"]["sentences"],
        "--dev-data",
        files["dev"]["sentences"],
        "--seed",
        str(seed),
        "--out",
        str(folder),
        *budget,
        *args.feature_flags,
        *shlex.split(args.pretrain_args),
    ]
    return folder, run_cell(out, f"stage1-{variant}-s{seed}", command, log)


def readout(args, out, files, variant, seed, folder, log):
    """evaluate.py --task readout on the test sentences: what the stage-1 projector spells without the
    LLM (each output's nearest token embedding, collapsed as CTC does). Returns its WER."""
    path = folder / "readout.json"
    command = ["evaluate.py", "--ckpt", str(folder), "--task", "readout", "--data",
               files["test"]["sentences"], "--out", str(path), *(QUICK["evaluate"] if args.quick else []),
               *shlex.split(args.evaluate_args)]  # fmt: skip
    if run_cell(out, f"readout-{variant}-s{seed}", command, log) is None:
        return None
    return json.loads(path.read_text())["metrics"]["wer"]


def finetune_and_score(args, out, files, variant, seed, task, frac, init, log, same_steps=False):
    """finetune.py on one task from one start, then evaluate.py on the task's test split.
    same_steps: train for as many steps as a --frac run does (same_steps_budget), so
    the 100% model gets the same compute and sees as many examples, only more distinct ones."""
    name = f"{variant}-s{seed}-{task}-{frac:g}"
    folder = out / "finetune" / name
    budget = QUICK["finetune"] if args.quick else []
    if same_steps and not args.quick:
        budget = same_steps_budget(args, frac)
    kind = TASKS[task]
    command = [
        "finetune.py",
        "--task",
        task,
        "--frac",
        str(frac),
        "--init",
        str(init) if init else "none",
        *(model_flags(args) if init is None else []),
        "--data",
        files["train"][kind],
        "--dev-data",
        files["dev"][kind],
        "--seed",
        str(seed),
        "--out",
        str(folder),
        *budget,
        *args.feature_flags,
        *shlex.split(args.finetune_args),
    ]
    trained = run_cell(out, f"finetune-{name}", command, log)
    score = [
        "evaluate.py",
        "--ckpt",
        str(folder),
        "--task",
        task,
        "--data",
        files["test"][kind],
        "--out",
        str(folder / "eval.json"),
        *(QUICK["evaluate"] if args.quick else []),
        *shlex.split(args.evaluate_args),
    ]
    scored = run_cell(out, f"evaluate-{name}", score, log)
    if trained is None or scored is None:
        return None
    cell = {
        "variant": variant,
        "seed": seed,
        "task": task,
        "frac": frac,
        "finetune_seconds": trained["seconds"],
        "evaluate_seconds": scored["seconds"],
        "commands": [trained["command"], scored["command"]],
        **read_eval(folder / "eval.json"),
    }
    return score_open_test(args, out, files, f"evaluate-open-{name}", score, folder, cell, log)


def with_value(command, flag, value):
    """`command` with the value after `flag` replaced."""
    i = command.index(flag)
    return [*command[: i + 1], str(value), *command[i + 2 :]]


def score_open_test(args, out, files, name, command, folder, cell, log):
    """ASR only: the same evaluate.py command on the open test split (an unseen text source and a
    held-out voice), merged into the cell as open_<metric>. Other tasks, and corpora without that
    split: the cell."""
    if cell["task"] != "asr" or "open_test" not in files:
        return cell
    command = with_value(
        with_value(command, "--data", files["open_test"]["sentences"]),
        "--out",
        folder / "eval-open.json",
    )
    scored = run_cell(out, name, command, log)
    if scored is None:  # --report, and this split not scored yet: the cell as it is
        return cell
    opened = read_eval(folder / "eval-open.json")
    cell["metrics"].update({f"open_{k}": v for k, v in opened["metrics"].items()})
    cell.update(
        evaluate_seconds=cell["evaluate_seconds"] + scored["seconds"],
        commands=[*cell["commands"], scored["command"]],
        open_samples=opened["samples"],
    )
    return cell


def finetune_recipe(args):
    """The recipe finetune.py will use: --finetune-args' --recipe, else the LLM's default."""
    extra = shlex.split(args.finetune_args)
    if "--recipe" in extra:
        return common.RECIPES[extra[extra.index("--recipe") + 1]]["finetune"]
    return common.RECIPES["demo" if args.llm in (None, "smollm2") else "paper"]["finetune"]


def finetune_epochs(args):
    """The epochs finetune.py will use: --finetune-args' --epochs, else its recipe's."""
    extra = shlex.split(args.finetune_args)
    if "--epochs" in extra:
        return float(extra[extra.index("--epochs") + 1])
    return finetune_recipe(args)["epochs"]


def same_steps_budget(args, frac):
    """The flags that give a run on `frac` of the data as many steps as a --frac run: none where
    fine-tuning counts steps (--max-steps, the demo recipe's 150), else the epochs scaled by
    --frac / frac."""
    extra = shlex.split(args.finetune_args)
    counts_steps = "--max-steps" in extra or finetune_recipe(args)["max_steps"]
    if counts_steps and "--epochs" not in extra:
        return []
    return ["--epochs", f"{finetune_epochs(args) * args.frac / frac:g}"]


def topline(args, out, files, read, task, log):
    """The LLM reading the reference transcript, or Whisper's transcript, instead of the speech."""
    kind, folder = TASKS[task], out / "toplines" / f"{read}-{task}"
    command = [
        "-m",
        "scripts.toplines",
        "--read",
        read,
        "--task",
        task,
        "--data",
        files["test"][kind],
        "--out",
        str(folder / "eval.json"),
        *model_flags(args),
        *(QUICK["evaluate"] if args.quick else []),
        *shlex.split(args.evaluate_args),
    ]
    scored = run_cell(out, f"topline-{read}-{task}", command, log)
    if scored is None:
        return None
    cell = {
        "variant": f"read-{read}",
        "task": task,
        "evaluate_seconds": scored["seconds"],
        "commands": [scored["command"]],
        **read_eval(folder / "eval.json"),
    }
    return score_open_test(
        args, out, files, f"topline-open-{read}-{task}", command, folder, cell, log
    )


def read_eval(path):
    result = json.loads(Path(path).read_text())
    return {
        "metrics": {k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))},
        "stopped": result["decoding"]["stopped"],
        "n": result["n"],
        "samples": result["outputs"][:3],
    }


# -----------------------------------------------------------------------------
# The table: one row per start, the headline metrics with their spread over seeds


def spread(values):
    """'mean' for one value, 'mean ± half the range' for several (range = max - min over the
    seeds)."""
    mean = sum(values) / len(values)
    return (
        f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {(max(values) - min(values)) / 2:.1f}"
    )


def table(cells, stage1_seconds, args, readouts=None):
    rows = {}
    for c in cells:
        rows.setdefault((c["variant"], c.get("frac")), []).append(c)
    columns = [
        ("asr", "wer", "ASR WER"),
        ("asr", "wer_mean", "ASR mean WER"),
        ("asr", "exact", "ASR exact"),
        ("asr", "wer_median", "ASR median WER"),
        ("asr", "open_wer", "ASR WER, open test"),
        ("qa", "f1", "QA F1"),
        ("qa", "em", "QA EM"),
        ("st", "bleu", "ST BLEU"),
        ("st", "chrf", "ST chrF"),
    ]
    columns = [
        c
        for c in columns
        if c[0] in args.tasks
        and (c[1] != "open_wer" or any("open_wer" in x["metrics"] for x in cells))
    ]
    lines = [
        "| start | fine-tuning data | "
        + " | ".join(c[2] for c in columns)
        + f" | readout WER | seeds | stage-1 time | fine-tune time ({' / '.join(args.tasks)}) |",
        "|---" * (len(columns) + 6) + "|",
    ]
    for (variant, frac), group in rows.items():
        values = []
        for task, metric, _ in columns:
            found = [
                c["metrics"][metric] for c in group if c["task"] == task and metric in c["metrics"]
            ]
            values.append(spread(found) if found else "-")
        seeds = sorted({c["seed"] for c in group if "seed" in c})
        s1 = [stage1_seconds[(variant, s)] for s in seeds if (variant, s) in stage1_seconds]
        ft = []  # the mean fine-tuning time of each task
        for task in args.tasks:
            times = [
                c["finetune_seconds"]
                for c in group
                if c["task"] == task and "finetune_seconds" in c
            ]
            ft.append(f"{sum(times) / len(times) / 60:.1f}" if times else "-")
        data = "-" if frac is None else f"{frac:.0%}"
        # what the stage-1 projector spells without the LLM (evaluate.py --task readout)
        read = [(readouts or {})[(variant, s)] for s in seeds if (variant, s) in (readouts or {})]
        values.append(spread(read) if read else "-")
        lines.append(
            f"| {variant} | {data} | "
            + " | ".join(values)
            + f" | {len(seeds) or '-'} | "
            + (f"{sum(s1) / len(s1) / 60:.1f} min" if s1 else "-")
            + " | "
            + (" / ".join(ft) + " min" if any(t != "-" for t in ft) else "-")
            + " |"
        )
    return "\n".join(lines)


def cpu_name():
    try:  # Linux: the model name, e.g. "AMD EPYC 7B13"
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(
            line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")
        )
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine():
    return {
        "platform": platform.platform(),
        "processor": cpu_name(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_results(out, cells, stage1_seconds, readouts, args, started):
    md = table(cells, stage1_seconds, args, readouts)
    info = machine()
    wall = sum(stage1_seconds.values()) + sum(
        c.get("finetune_seconds", 0) + c.get("evaluate_seconds", 0) for c in cells
    )
    text = (
        f"# Comparison ({'quick' if args.quick else 'full'} grid)\n\n{md}\n\n"
        "ASR: corpus WER, the mean per-utterance WER (the authors' metric), share of exact "
        "transcripts and median per-utterance WER (%) on the test "
        "split, and corpus WER on the open test split (where the corpus has one: a text source "
        "and a voice unseen in training); "
        "QA: SQuAD F1 / EM (%). "
        f"Mean ± half the range over seeds. Machine: {info['processor']}, {info['cpus']} CPUs, "
        f"torch {info['torch']}"
        f"{', ' + info['gpu'] if info['gpu'] else ''}. Run time of all cells: "
        f"{wall / 60:.0f} min.\n"
    )
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(
        json.dumps(
            {
                "cells": cells,
                "stage1_seconds": {f"{v}-s{s}": t for (v, s), t in stage1_seconds.items()},
                "readout_wer": {f"{v}-s{s}": w for (v, s), w in readouts.items()},
                "machine": info,
                "args": vars(args),
                "started": started,
            },
            indent=2,
        )
    )
    plots(out, cells, args)
    return text


# -----------------------------------------------------------------------------
# Figures


def plots(out, cells, args):
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    logs = sorted((out / "stage1").glob("*/log.jsonl"))
    curves = {}
    for path in logs:
        name = path.parent.name
        if name.startswith("asr-"):
            continue
        points = [json.loads(line) for line in path.read_text().splitlines()]
        points = [p for p in points if "dev_r1_centred" in p or "dev_r1" in p]
        if points:
            curves[name] = points
    if curves:
        layers = curves[next(iter(curves))][-1]["layers"]
        fig, axes = plt.subplots(
            1, len(layers), figsize=(2.6 * len(layers), 2.8), sharey=True, squeeze=False
        )
        for name, points in curves.items():
            for ax, layer in zip(axes[0], layers):
                key = "dev_r1_centred" if "dev_r1_centred" in points[-1] else "dev_r1"
                # each evaluation names its layers (the warm start's: layer 0 only)
                at = [(p["step"], p[key][p["layers"].index(layer)])
                      for p in points if key in p and layer in p["layers"]]  # fmt: skip
                ax.plot([x for x, _ in at], [y for _, y in at], marker=".", label=name)
                ax.set_title(f"layer {layer}")
                ax.set_xlabel("stage-1 step")
        axes[0][0].set_ylabel("dev R@1 (centred)")
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "r1_per_layer.png", dpi=110)
        plt.close(fig)

    tasks = [t for t in args.tasks if any(c["task"] == t for c in cells)]
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        metric, _ = METRIC[task]
        starts = []
        for c in cells:
            if c["task"] == task and not c["variant"].startswith("read-"):
                label = f"{c['variant']}\n{c['frac']:.0%}"
                if label not in starts:
                    starts.append(label)
        values = [
            [
                c["metrics"][metric]
                for c in cells
                if c["task"] == task and f"{c['variant']}\n{c.get('frac', 0):.0%}" == s
            ]
            for s in starts
        ]
        means = [sum(v) / len(v) for v in values]
        ax.bar(range(len(starts)), means, color="tab:blue")
        for x, v in enumerate(values):
            ax.plot([x] * len(v), v, "k.", ms=4)  # every seed
        for c in cells:
            if c["task"] == task and c["variant"].startswith("read-"):
                ax.axhline(
                    c["metrics"][metric],
                    ls="--",
                    color="tab:red" if "transcript" in c["variant"] else "tab:green",
                    label=f"{c['variant'][5:]} ({c['metrics'][metric]:.1f})",
                )
        ax.set_xticks(range(len(starts)), starts, fontsize=7)
        ax.set_ylabel(f"{task.upper()} test {metric.upper()} (%)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=110)
    plt.close(fig)


# -----------------------------------------------------------------------------
# The grid, in the order that gives the key comparison first


def main(argv=None):
    args = get_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files, corpus = corpus_files(args)
    # the frozen encoder's outputs, computed once for the whole grid (the demo keeps them inside its
    # corpus)
    cache = (
        corpus if args.corpus is None else out
    ) / f"features-{(args.encoder or 'whisper-tiny').replace('/', '_')}.pt"
    args.feature_flags = ["--feature-cache-file", str(cache)]
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    log = None if args.report else open(out / "grid.log", "a")
    cells, stage1_seconds, readouts = [], {}, {}

    def add(cell):
        if cell is not None:  # None: a cell --report found unfinished
            cells.append(cell)

    def start(variant, seed):
        if VARIANTS[variant] is None:
            return None
        folder, record = stage1(args, out, files, variant, seed, log)
        if record is not None:
            stage1_seconds[(variant, seed)] = record["seconds"]
            wer = readout(args, out, files, variant, seed, folder, log)
            if wer is not None:
                readouts[(variant, seed)] = wer
        return folder

    # the key comparison first (cos-all, asr, none; both tasks; the 100% model; the toplines), then
    # the other variants, then the key variants' other seeds
    first = args.seeds[0]
    plan = [(v, first) for v in KEY_VARIANTS if v in args.variants]
    plan += [(v, first) for v in args.variants if v not in KEY_VARIANTS]
    plan += [(v, s) for s in args.seeds[1:] for v in KEY_VARIANTS if v in args.variants]
    for i, (variant, seed) in enumerate(plan):
        for task in args.tasks:
            add(
                finetune_and_score(
                    args, out, files, variant, seed, task, args.frac, start(variant, seed), log
                )
            )
            if (
                variant == "none" and seed == first
            ):  # the task-specialised model: no pretraining, all the data
                add(
                    finetune_and_score(
                        args, out, files, "none", seed, task, FULL_DATA, None, log, same_steps=True
                    )
                )
            write_results(out, cells, stage1_seconds, readouts, args, started)
        if i == len([v for v in KEY_VARIANTS if v in args.variants]) - 1:
            for read in args.toplines:
                for task in args.tasks:
                    add(topline(args, out, files, read, task, log))
    print(write_results(out, cells, stage1_seconds, readouts, args, started))
    print(f"wrote {out}/results.md, results.json, r1_per_layer.png, metrics.png")


if __name__ == "__main__":
    main()
