"""
extras/demo.py: the offline demo as the scripts see it. demokit/ builds the demo's models and its
spoken corpus on first use; this file is where pretrain.py, finetune.py and evaluate.py reach it
(one line each, marked `# extras: demo`): the demo's model names, `--data demo` as the corpus's
manifests, its feature cache, and the demo recipe's decoding for evaluate.py.

    python pretrain.py                          # SmolLM2-135M + Whisper tiny.en on the demo corpus
    python pretrain.py --llm tiny --encoder tiny --data my.jsonl --max-steps 2   # a smoke run

The recipe itself (which defaults the demo changes, and why) is common.RECIPES, beside the paper's.
"""

import common
import demokit


def resolve_model(name, kind):
    """--llm / --encoder: the demo's names are folders demokit builds on first use; anything else
    as common.resolve_model."""
    build = demokit.PRESETS[kind].get(name)
    return str(build()) if build else common.resolve_model(name, kind)


def manifests(task, split, size="full"):
    """The corpus's manifests of `task` and `split` (train, dev, test, open), built on first use."""
    return demokit.manifests(task, split, size)


def prepare(args, task, several=False):
    """pretrain.py / finetune.py (several=True: lists of manifests): `--data demo` becomes the corpus's
    train manifests of `task` (and its dev split the dev data, unless given), and its encoder
    features are cached beside it. Returns the model resolver."""
    demo = ("demo", ["demo"])
    if args.data in demo and args.dev_data is None:
        args.dev_data = "demo"
    for flag, split in (("data", "train"), ("dev_data", "dev")):
        if getattr(args, flag) in demo:
            paths = manifests(task, split, args.demo_corpus)
            setattr(args, flag, paths if several else paths[0])
            if flag == "data" and args.feature_cache_file is None:
                encoder = args.encoder.replace("/", "_")
                folder = demokit.corpus_folder(args.demo_corpus)
                args.feature_cache_file = str(folder / f"features-{encoder}.pt")
    return resolve_model


def test_manifest(data, task, size):
    """evaluate.py: --data left out (or `open`): the corpus's test split of the task."""
    if data not in (None, "open"):
        return data
    task = "asr" if task in ("retrieval", "readout") else task
    return manifests(task, data or "test", size)[0]
