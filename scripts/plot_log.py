"""
plot_log.py: a run's log.jsonl as one PNG: the loss over the steps, and for stage 1 the in-batch and
the dev speech->text R@1 of every contrastive layer.

    # -> out/pretrain/log.png
    python -m scripts.plot_log out/pretrain/log.jsonl
    # stage 2: training and dev loss
    python -m scripts.plot_log out/finetune-qa/log.jsonl --out qa.png
    # a running mean over 50 steps (long runs)
    python -m scripts.plot_log runs/contr-cos-all/log.jsonl --smooth 50

The log is what pretrain.py and finetune.py write (common.JsonLog): one line per training step
(loss, per_layer, acc = in-batch R@1 per layer, lr, ...) and one per dev evaluation (dev_r1,
dev_r1_centred per layer, or dev_loss). A half-written last line (a killed run) is skipped.
"""

import argparse
import json
from pathlib import Path

import numpy as np

import common
from data import UserError


def read_log(path):
    """The records of a log.jsonl, skipping lines that do not parse (a run killed mid-write)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no log at {path} (pretrain.py and finetune.py write <out>/log.jsonl)")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    if not records:
        raise UserError(f"{path}: no records")
    return records


def per_layer(records, field):
    """{layer: (steps, values)} of a per-layer field (acc, dev_r1, ...) over the records that have
    it."""
    series = {}
    for r in records:
        if field in r:
            for layer, value in zip(r["layers"], r[field]):
                steps, values = series.setdefault(layer, ([], []))
                steps.append(r["step"])
                values.append(value)
    return series


def smoothed(values, window):
    """A running mean over `window` values (the first ones over what there is so far)."""
    if window <= 1:
        return values
    cumulative = np.cumsum(np.insert(np.asarray(values, dtype=float), 0, 0.0))
    n = np.arange(1, len(values) + 1)
    start = np.maximum(0, n - window)
    return (cumulative[n] - cumulative[start]) / (n - start)


def plot(records, out, smooth=1, title=None):
    """Draw the panels the log has data for (loss; in-batch R@1 per layer; dev R@1 per layer) into
    `out`."""
    import matplotlib

    matplotlib.use("Agg")  # a file, no display
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    panels = [("loss", None)]
    if any("acc" in r for r in records):
        panels.append(("in-batch R@1 (speech->text)", "acc"))
    if any("dev_r1" in r for r in records):
        panels.append(("dev R@1 (speech->text; dashed: centred)", "dev_r1"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (name, field) in zip(axes[0], panels):
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if field is None:  # the losses
            ax.plot(
                [r["step"] for r in train],
                smoothed([r["loss"] for r in train], smooth),
                label="training",
            )
            if any("asr" in r for r in train):
                asr = [r for r in train if "asr" in r]
                ax.plot(
                    [r["step"] for r in asr],
                    smoothed([r["asr"] for r in asr], smooth),
                    label="ASR part",
                )
            dev = [r for r in records if "dev_loss" in r]
            if dev:
                ax.plot([r["step"] for r in dev], [r["dev_loss"] for r in dev], "o-", label="dev")
            ax.legend()
            continue
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        series = per_layer(records, field)
        centred = per_layer(records, "dev_r1_centred") if field == "dev_r1" else {}
        for i, (layer, (steps, values)) in enumerate(sorted(series.items())):
            colour = colours[i % len(colours)]
            marker = "o-" if field == "dev_r1" else "-"
            ax.plot(
                steps,
                values if field == "dev_r1" else smoothed(values, smooth),
                marker,
                color=colour,
                label=f"layer {layer}",
            )
            if layer in centred:
                ax.plot(*centred[layer], "o--", color=colour, alpha=0.6)
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8, ncol=2)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("log", help="a run's log.jsonl")
    p.add_argument("--out", help="the PNG to write (default: log.png next to the log)")
    p.add_argument(
        "--smooth",
        type=int,
        default=1,
        help="running mean over this many training steps (1 = none)",
    )
    args = p.parse_args(argv)
    out = Path(args.out or Path(args.log).with_name("log.png"))
    plot(read_log(args.log), out, args.smooth, title=str(Path(args.log).parent))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    common.run_main(main)
