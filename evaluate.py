"""
evaluate.py: score a trained projector with the metrics the field uses.

    # the paper's checkpoints: name the test manifest
    python evaluate.py --ckpt runs/ft --task asr --data data/paper/sentences_test.jsonl
    python evaluate.py --ckpt runs/ft --task st --data data/paper/st-de_test.jsonl --batch-size 16
    python evaluate.py --ckpt runs/ft --task all --data data/paper/mix_test.jsonl
    # stage 1: speech->text R@1 per contrastive layer
    python evaluate.py --ckpt runs/contr-cos-all --task retrieval --data data/paper/sentences_dev.jsonl
    # the demo's: its test split of the checkpoint's task by default (QA: EM / F1)
    python evaluate.py --ckpt out/finetune-qa
    # one recording
    python evaluate.py --ckpt out/finetune-qa --audio my.wav --question "Who does Klara meet?"
    python evaluate.py --ckpt out/finetune-mix --audio my.wav --task st --tgt-lang de
    python evaluate.py --ckpt out/finetune-mix --audio my.wav --prompt "What is said in this audio?"
    # a recording of any length: ASR and ST read it in pieces of at most 30 s, cut at pauses
    python evaluate.py --ckpt out/finetune-asr --audio talk-one-hour.wav

Generation is greedy, batched with left padding, as the authors: up to 200 new tokens, ending at the
LLM's end-of-turn token, and an answer ends at its first newline. A checkpoint of the demo's recipe
decodes with this project's additions by default (extras/decoding.py: a length cap that follows the
audio, a loop guard, joint CTC / LLM decoding of ASR, the readout, --seen-in); each flag asks for
them with any checkpoint. Prints the table (with how many answers the cap or the guard cut), a few
hypotheses next to their references, and writes a JSON file of everything (default
<ckpt>/eval-<task>.json).

Sections: metrics | retrieval (stage 1) | generation | the command line.
"""

import argparse
import json
import os
import re
import string
from collections import Counter
from pathlib import Path

import jiwer
import soundfile as sf
import torch
from sacrebleu.metrics import BLEU, CHRF
from tqdm import tqdm

import common
import contrastive
from data import (
    INSTRUCTIONS,
    LANGUAGES,
    Collator,
    UserError,
    check_audio,
    need_transcripts,
    pieces,
    read_manifest,
    task_examples,
    to_device,
)
from model import SpeechLLM, checked_meta

# -----------------------------------------------------------------------------
# Metrics, in percent: WER for ASR, BLEU and chrF for ST, SQuAD EM and F1 for spoken QA


def compute_metrics(task, hypotheses, references):
    """task: asr | st | qa. references: one string per hypothesis, or a list of gold strings per
    hypothesis (QA: the best-matching gold answer counts; ST: several reference translations, same
    number for all; ASR: the first one)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise ValueError("nothing to score")
    golds = [[r] if isinstance(r, str) else list(r) for r in references]
    if task == "asr":
        return word_error_rates(hypotheses, [g[0] for g in golds])
    if task == "st":
        return bleu_chrf(hypotheses, golds)
    if task == "qa":
        return squad_em_f1(hypotheses, golds)
    raise ValueError(f"no metrics for task {task!r} (asr, st or qa)")


# The authors' WER normalisation (jiwer): lower-case, strip all Unicode punctuation ("don't" ->
# "dont"), collapse and strip spaces; then words.
WER_TEXT = jiwer.Compose(
    [
        jiwer.ToLowerCase(),
        jiwer.RemovePunctuation(),
        jiwer.RemoveMultipleSpaces(),
        jiwer.Strip(),
        jiwer.ReduceToListOfListOfWords(),
    ]
)


def word_error_rates(hypotheses, references):
    """wer: corpus-level (all errors / all reference words), the usual number.
    wer_mean: the mean of the per-utterance WERs, which is what the authors report.
    wer_median and exact (the share of utterances with no error): one runaway answer can double the
    corpus WER, so these two say what a typical utterance looks like."""
    wer = lambda refs, hyps: jiwer.wer(  # noqa: E731
        refs, hyps, reference_transform=WER_TEXT, hypothesis_transform=WER_TEXT
    )
    per_utterance = sorted(wer(r, h) for r, h in zip(references, hypotheses))
    n = len(per_utterance)
    median = (per_utterance[(n - 1) // 2] + per_utterance[n // 2]) / 2
    return {
        "wer": 100 * wer(list(references), list(hypotheses)),
        "wer_mean": 100 * sum(per_utterance) / n,
        "wer_median": 100 * median,
        "exact": 100 * sum(e == 0 for e in per_utterance) / n,
    }


def bleu_chrf(hypotheses, golds):
    """sacrebleu's corpus BLEU (13a tokenisation, case-sensitive: its defaults, as the authors) and
    chrF, with the signature strings that say exactly how they were computed."""
    if len({len(g) for g in golds}) != 1:
        raise ValueError("ST: every hypothesis needs the same number of reference translations")
    # sacrebleu wants one list per reference "stream"
    streams = [list(refs) for refs in zip(*golds)]
    bleu, chrf = BLEU(), CHRF()
    return {
        "bleu": bleu.corpus_score(hypotheses, streams).score,
        "chrf": chrf.corpus_score(hypotheses, streams).score,
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


def comet(model_name, sources, hypotheses, references, batch_size=16):
    """COMET x 100, as the paper reports ST (the authors: `evaluate.load("comet")`, whose default is
    Unbabel/wmt22-comet-da; sources = the gold English transcripts). model_name: a hub id, or a
    local folder as the hub lays it out (<folder>/checkpoints/model.ckpt). Needs the optional
    unbabel-comet package (requirements-extras.txt)."""
    try:
        from comet import download_model, load_from_checkpoint
    except ImportError:
        raise UserError(
            "--comet needs the unbabel-comet package: pip install -r requirements-extras.txt"
        ) from None
    folder = Path(model_name)
    try:
        if folder.exists():
            checkpoint = folder / "checkpoints" / "model.ckpt" if folder.is_dir() else folder
        else:
            checkpoint = download_model(model_name)
        scorer = load_from_checkpoint(str(checkpoint))
    except Exception as e:  # the hub out of reach, a folder without the checkpoint, ...
        raise common.ModelError(
            f"--comet {model_name}: cannot load the COMET model ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:200]}); give a hub id the machine can reach or a local "
            "copy of one (a folder holding checkpoints/model.ckpt)"
        ) from None
    rows = [{"src": s, "mt": h, "ref": r} for s, h, r in zip(sources, hypotheses, references)]
    gpus = 1 if torch.cuda.is_available() else 0
    out = scorer.predict(rows, batch_size=batch_size, gpus=gpus, progress_bar=False)
    return 100 * float(out.system_score)


def squad_normalize(text):
    """The official SQuAD v1.1 answer normalisation: lower-case, drop ASCII punctuation, drop the
    articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_f1(prediction, gold):
    """Token-level F1 between the bags of normalised words (0 when they share none)."""
    pred, ref = squad_normalize(prediction).split(), squad_normalize(gold).split()
    shared = sum((Counter(pred) & Counter(ref)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(pred), shared / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_em_f1(hypotheses, golds):
    """Exact match and F1, each the best over a question's gold answers, averaged over questions."""
    em = [
        max(float(squad_normalize(h) == squad_normalize(g)) for g in gs)
        for h, gs in zip(hypotheses, golds)
    ]
    f1 = [max(squad_f1(h, g) for g in gs) for h, gs in zip(hypotheses, golds)]
    return {"em": 100 * sum(em) / len(em), "f1": 100 * sum(f1) / len(f1)}


# -----------------------------------------------------------------------------
# Retrieval: is each utterance's own transcript the nearest among all transcripts? (stage 1)


def evaluate_retrieval(model, rows, layers, batch_size, device, dtype, centers=None):
    """R@1 per layer in percent on the first utterances of a manifest: plain, centred by the set's
    own means, and (when the checkpoint stored them) centred by the training means (see cos_logits'
    center).
    The pooled pairs come from stage 1's own forward (SpeechLLM.pooled_pairs)."""
    need_transcripts(rows, "retrieval")
    collate = Collator(model.encoder.feature_extractor, model.tokenizer)
    batches = (
        to_device(collate(rows[i : i + batch_size]), device)
        for i in range(0, len(rows), batch_size)
    )
    text, speech = model.pooled_pairs(batches, layers, lambda: common.autocast(device, dtype))
    table = contrastive.retrieval_table(text, speech, centers)
    metrics = {
        "layers": layers,
        "r1": (100 * table["plain"]).tolist(),
        "r1_centred": (100 * table["centred"]).tolist(),
    }
    metrics["chance"] = 100 / len(rows)
    if centers is not None:
        metrics["r1_centred_train"] = (100 * table["centred_train"]).tolist()
    return metrics


# -----------------------------------------------------------------------------
# Generation: the answers of a fine-tuned model


def unique_questions(examples):
    """Spoken-SQuAD lists a question once per gold answer; as the authors, score each question once
    against all its gold answers. (They key on the question text alone; we key on recording +
    question, so the same question about two different passages stays two questions.)"""
    merged = {}
    for ex in examples:
        key = (ex["audio"], ex["instruction"])
        if key in merged:
            merged[key]["references"] += [
                r for r in ex["references"] if r not in merged[key]["references"]
            ]
        else:
            merged[key] = {**ex, "references": list(ex["references"])}
    return list(merged.values())


def longest_first(examples, batch_size):
    """The examples' indices in batches, longest audio first (little padding in each batch)."""
    order = sorted(range(len(examples)), key=lambda i: -examples[i].get("duration", 0))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def generate_answers(model, examples, batch_size, max_new_tokens, device, dtype, progress=True):
    """Greedy answers for every example (batched, longest first to keep the padding small), in
    input order, each ending at its first newline (as the authors). Returns (answers, why each
    ended: "end" or "cap")."""
    collate = Collator(model.encoder.feature_extractor)
    answers, reasons = [None] * len(examples), [None] * len(examples)
    model.eval()
    for idx in tqdm(longest_first(examples, batch_size), desc="generate", disable=not progress):
        # collated outside autocast: the log-mel must stay float32
        batch = to_device(collate([examples[i] for i in idx]), device)
        instructions = [examples[i]["instruction"] for i in idx]
        with common.autocast(device, dtype):
            texts, why = model.generate(batch, instructions, max_new_tokens)
        for i, text, reason in zip(idx, texts, why):
            answers[i], reasons[i] = text.split("\n")[0].strip(), reason
    return answers, reasons


def evaluate_task(model, task, rows, args, device, dtype):
    """Generate and score one task on the rows of a manifest; returns the results as a dict."""
    examples = task_examples(rows, task)
    return score(
        model, task, unique_questions(examples) if task == "qa" else examples, args, device, dtype
    )


def score(model, task, examples, args, device, dtype, hypotheses=None, reasons=None, decoding=None):
    """Answers to the examples (unless given: greedy, as the paper), their metrics, how each ended,
    and every output. decoding: how the given hypotheses were decoded (extras/decoding.py)."""
    if hypotheses is None:
        hypotheses, reasons = generate_answers(model, examples, args.batch_size,
                                               args.max_new_tokens, device, dtype)  # fmt: skip
        decoding = {"max_new_tokens": args.max_new_tokens}
    reasons = reasons or ["end"] * len(examples)
    decoding = {**decoding, "stopped": {why: reasons.count(why) for why in ("end", "cap", "loop")}}
    references = [ex["references"] if task == "qa" else ex["references"][0] for ex in examples]
    outputs = [
        {"audio": ex["audio"], "instruction": ex["instruction"], "hypothesis": h,
         "references": ex["references"], "stop": why}
        for ex, h, why in zip(examples, hypotheses, reasons)
    ]  # fmt: skip
    metrics = compute_metrics(task, hypotheses, references)
    if task == "st" and getattr(args, "comet", None):
        sources = [need_transcripts([ex], "COMET's sources")[0]["text"] for ex in examples]
        metrics["comet"] = comet(args.comet, sources, hypotheses, references)
    return {"task": task, "n": len(examples), "metrics": metrics, "decoding": decoding,
            "outputs": outputs}  # fmt: skip


# -----------------------------------------------------------------------------
# The command line


def by_recipe(flag):
    """A decoding flag's default, named in --help: the checkpoint's recipe's (common.RECIPES)."""
    paper, demo = (common.RECIPES[name]["evaluate"][flag] for name in ("paper", "demo"))
    return f" (default: the checkpoint's recipe's; paper: {paper}, demo: {demo})"


def add_decoding_flags(p):
    """The test data, the batch size and the decoding rule, shared with scripts/toplines.py. A flag
    left out takes the checkpoint's recipe's value (common.RECIPES: the paper's is the authors')."""
    p.add_argument(
        "--data", help="test manifest (the demo: default its test split; open: its open test)"
    )
    common.add_demo_corpus_flag(p)
    p.add_argument("--limit", type=common.positive_int, help="score only the first N utterances")
    p.add_argument("--batch-size", type=common.positive_int, default=8, help="utterances per batch")
    p.add_argument(
        "--max-new-tokens",
        type=max_tokens,
        default=argparse.SUPPRESS,
        help="a number; auto: follows the audio" + by_recipe("max_new_tokens"),
    )
    p.add_argument("--loop-repeats", type=common.non_negative_int, default=argparse.SUPPRESS,
                   help="stop at N copies of a span (0: off)" + by_recipe("loop_repeats"))  # fmt: skip
    p.add_argument("--show", type=common.non_negative_int, default=5, help="hypotheses to print")


def get_args(argv=None):
    p = common.parser(__doc__)
    p.add_argument(
        "--ckpt", required=True, help="a checkpoint folder of pretrain.py or finetune.py"
    )
    tasks = ["asr", "st", "qa", "all", "retrieval", "readout"]
    p.add_argument("--task", choices=tasks, help="default: the checkpoint's (retrieval: stage 1)")
    add_decoding_flags(p)
    p.add_argument(
        "--layers", help="retrieval: emb | all | a comma list (default: the checkpoint's)"
    )
    p.add_argument("--out", help="results JSON (default: <ckpt>/eval-<task>.json)")
    p.add_argument("--comet", help="ST: also COMET with this model (e.g. Unbabel/wmt22-comet-da)")
    g = p.add_argument_group("additions (extras/decoding.py; the demo recipe's defaults)")
    g.add_argument("--joint-ctc", type=joint_weight, default=argparse.SUPPRESS,
                   help="ASR: joint CTC / LLM weight, or auto" + by_recipe("joint_ctc"))  # fmt: skip
    g.add_argument("--beam", type=common.positive_int, default=4, help="with --joint-ctc")
    g.add_argument("--seen-in", help="ASR, readout: the training manifest, for unseen-word recall")
    g = p.add_argument_group("one recording")
    g.add_argument("--audio", help="answer for this recording (any format and sample rate)")
    g.add_argument("--question", help="with --audio --task qa: the question about the recording")
    g.add_argument("--tgt-lang", default="de", help="with --audio --task st: the target language")
    g.add_argument("--prompt", help="with --audio: any instruction instead of a task's")
    common.add_system_flags(p, training=False)
    args = p.parse_args(argv)
    checked_meta(args.ckpt)  # a damaged checkpoint, or one whose meta.json lies, is one line
    if args.audio:
        check_audio(args.audio)  # readable, and at least one encoder frame long
    decoding_defaults(args, recipe_of(checkpoint_meta(args.ckpt)))
    return args


def checkpoint_meta(ckpt):
    """The checkpoint's meta.json ({} while there is none: from_checkpoint says so)."""
    return common.read_meta(ckpt) if (Path(ckpt) / "meta.json").exists() else {}


def joint_weight(value):
    return value if value == "auto" else common.unit_interval(value)


def max_tokens(value):
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive number, got {value!r}")
    return int(value)


def recipe_of(meta):
    """The recipe a checkpoint was trained with (older ones: by their LLM, as the scripts chose)."""
    name = (meta.get("recipe") or {}).get("name")
    return name or ("demo" if meta.get("llm") == "smollm2" else "paper")


def decoding_defaults(args, recipe):
    """The decoding flags left out take the recipe's values (common.RECIPES[...]["evaluate"])."""
    for flag, value in common.RECIPES[recipe]["evaluate"].items():
        if flag not in vars(args):  # left out (argparse.SUPPRESS)
            setattr(args, flag, value)


def protocol(args, recipe):
    """The decoding a number comes from, printed first, so that it can be set beside the paper's."""
    rule = (
        f"greedy, at most {args.max_new_tokens} new tokens, loop guard {args.loop_repeats or 'off'}"
    )
    if args.joint_ctc:
        rule += f", ASR by joint CTC / LLM decoding ({args.joint_ctc}, beam {args.beam})"
    authors = recipe == "paper" and (args.max_new_tokens, args.loop_repeats, args.joint_ctc) == (
        200,
        0,
        0,
    )
    return (
        f"protocol: the {recipe} recipe's{' (the authors)' if authors else ''}: {rule}; an answer ends "
        "at the end of turn or its first newline"
    )


def uses_additions(args, model, task):
    """Whether scoring needs extras/decoding.py: the readout, --seen-in, a length cap that follows
    the audio, the loop guard, joint decoding, or a model the additions changed."""
    return bool(
        task == "readout" or args.seen_in or model.additions or args.max_new_tokens == "auto"
        or args.loop_repeats or args.joint_ctc
    )  # fmt: skip


def default_task(meta):
    if "task" not in meta:  # stage 1 writes no task
        return "retrieval"
    return "all" if meta["task"] == "mix" else meta["task"]


def instruction_for(args, task):
    """--audio: the instruction of the task (or --prompt)."""
    if args.prompt:
        return args.prompt
    if task == "asr":
        return INSTRUCTIONS["asr"]
    if task == "st":
        return INSTRUCTIONS["st"].format(language=LANGUAGES.get(args.tgt_lang, args.tgt_lang))
    if task == "qa":
        if not args.question:
            raise UserError("--task qa with --audio needs --question")
        return INSTRUCTIONS["qa"].format(question=args.question)
    raise UserError(f"--audio: pass --task asr|st|qa or a free --prompt (not --task {task})")


# --audio: a recording longer than this is transcribed (or translated) piece by piece, in order.
# Whisper's window, and as long for other encoders: a piece's answer then fits the paper's cap of
# 200 new tokens (speech is ~4 tokens a second).
PIECE_SECONDS = 30.0
# the longest clip a model read in training where its meta.json does not say (the paper's longest,
# Spoken-SQuAD's passages)
TRAINED_SECONDS = 150.0


def longest_read(model, meta):
    """The longest audio the model reads at once: the encoder's window (Whisper: 30 s), else the
    longest clip it was trained on (--max-audio-seconds, in meta.json)."""
    trained = (meta.get("args") or {}).get("max_audio_seconds") or TRAINED_SECONDS
    return min(model.encoder.max_seconds or trained, trained)


def answer_one(model, args, task, device, dtype, meta=None):
    """--audio: print the model's answer for one recording. A long one is read in pieces
    (data.pieces) for ASR and ST, transcribed in order and joined; a question or a --prompt is
    about all of it, so a recording longer than the model reads at once is refused."""
    instruction = instruction_for(args, task)
    seconds = audio_seconds(args.audio)
    limit = longest_read(model, meta or {})
    if task in ("asr", "st") and not args.prompt:
        parts = pieces(args.audio, seconds, min(limit, PIECE_SECONDS))
    elif seconds > limit:
        raise UserError(
            f"--audio {args.audio}: {seconds:.1f} s, longer than the {limit:g} s this model reads "
            "at once, and a question or a --prompt is about all of it: cut out the part it is "
            f"about (ffmpeg -ss START -t SECONDS -i {args.audio} part.wav), or transcribe it all "
            "with --task asr"
        )
    else:
        parts = [(0.0, seconds)]
    collate = Collator(model.encoder.feature_extractor)
    answers = []
    name = f"{Path(args.audio).name}, {len(parts)} pieces"
    for offset, duration in tqdm(parts, desc=name, disable=len(parts) == 1):
        piece = {"audio": args.audio, "key": f"{args.audio}@{offset}"}
        if len(parts) > 1:
            piece.update(offset=offset, duration=duration)
        batch = to_device(collate([piece]), device)
        with common.autocast(device, dtype):
            if uses_additions(args, model, task):  # extras: decoding
                from extras import decoding

                answer = decoding.answer_one(model, batch, instruction, task, duration, args)
            else:
                answer = model.generate(batch, [instruction], args.max_new_tokens)[0][0]
        answers.append(answer)
    first_line = lambda answer: answer.split("\n")[0].strip()  # noqa: E731
    answer = answers[0] if len(answers) == 1 else " ".join(filter(None, map(first_line, answers)))
    print(answer if args.prompt else first_line(answer))
    return answer


def audio_seconds(path):
    """--audio: how long the recording is (read from its header), or one line on why it cannot be
    read."""
    if not Path(path).is_file():
        raise UserError(f"--audio {path}: no such file")
    try:
        info = sf.info(path)
    except Exception as e:  # soundfile raises its own error types for unreadable files
        raise UserError(
            f"--audio {path}: not a readable audio file ({e}). WAV, FLAC, OGG (Vorbis, Opus) "
            "and MP3 are read at any sample rate and channel count; convert other formats first, "
            "e.g. `ffmpeg -i my.m4a my.wav`"
        ) from None
    return info.frames / info.samplerate


def print_results(result, show):
    task, metrics = result["task"], result["metrics"]
    print(
        f"\n{task}: {result['n']} {'questions' if task == 'qa' else 'utterances'} "
        f"from {result['data']}"
    )
    if task == "retrieval":
        train = metrics.get("r1_centred_train")
        print(
            f"  {'layer':>5}  {'R@1':>6}  {'centred':>8}"
            + (f"  {'centred (train means)':>21}" if train else "")
            + f"   (speech->text, %, chance {metrics['chance']:.2f}; centred: by this set's means)"
        )
        for i, (layer, r1, centred) in enumerate(
            zip(metrics["layers"], metrics["r1"], metrics["r1_centred"])
        ):
            print(
                f"  {layer:>5}  {r1:6.2f}  {centred:8.2f}"
                + (f"  {train[i]:21.2f}" if train else "")
            )
        return
    for name, value in metrics.items():
        print(f"  {name:<16} {value:.2f}" if isinstance(value, float) else f"  {name:<16} {value}")
    decoding = result.get("decoding", {})
    if decoding:  # generated answers (not the readout)
        stopped = decoding["stopped"]
        print(
            f"  answers ended by the end-of-turn token: {stopped['end']}, "
            f"cut by the length cap: {stopped['cap']}, by the loop guard: {stopped['loop']} "
            f"(--max-new-tokens {decoding['max_new_tokens']}, "
            f"--loop-repeats {decoding.get('loop_repeats', 0)})"
        )
    if decoding.get("joint_ctc"):
        print(
            f"  joint CTC / LLM beam search: --joint-ctc {decoding['joint_ctc']}, "
            f"--beam {decoding['beam']} (no loop guard)"
        )
    for out in result["outputs"][:show]:
        print(f"  ref: {' | '.join(out['references'])}\n  hyp: {out['hypothesis']}")


def main(argv=None):
    args = get_args(argv)
    _, _, device = common.setup(args.device, seed=0)
    dtype = common.resolve_dtype(args.dtype, device)
    meta = checkpoint_meta(args.ckpt)
    recipe = recipe_of(meta)
    resolve, test_manifest = common.resolve_model, lambda data, task, size: data
    # the demo's models (built offline on first use) and its test splits
    needs_demo = recipe == "demo" or common.uses_demo(None, meta.get("llm"), meta.get("encoder"))
    if needs_demo:  # extras: demo
        from extras import demo

        resolve, test_manifest = demo.resolve_model, demo.test_manifest
    task = args.task or default_task(meta)
    open_test = "-open" if args.data == "open" else ""
    out = Path(args.out or Path(args.ckpt) / f"eval-{task}{open_test}.json")
    if out.is_dir() and not args.audio:  # said before minutes of decoding, not after
        raise UserError(
            f"--out {out} is a folder: name the results file, e.g. {out / out.name}.json"
        )
    model, meta = SpeechLLM.from_checkpoint(args.ckpt, dtype, resolve=resolve, device=device)
    model = model.to(device).eval()
    if args.audio:
        return answer_one(model, args, task, device, dtype, meta)
    print(protocol(args, recipe))

    results = {}
    for each in ("asr", "st", "qa") if task == "all" else (task,):
        data = test_manifest(args.data, each, args.demo_corpus)
        if data is None:
            raise UserError(
                "--data: name the test manifest (python -m scripts.prepare_data writes the paper's)"
            )
        rows = read_manifest(data)[: args.limit]
        if each == "retrieval":
            layers = retrieval_layers(args.layers, meta, model.num_layers)
            centers = common.load_centers(args.ckpt, layers)
            metrics = evaluate_retrieval(
                model, rows, layers, args.batch_size, device, dtype, centers
            )
            result = {"task": each, "n": len(rows), "metrics": metrics}
        elif uses_additions(args, model, each):  # extras: decoding
            from extras import decoding

            result = decoding.evaluate(model, each, rows, args, device, dtype)
        else:
            result = evaluate_task(model, each, rows, args, device, dtype)
        results[each] = {"ckpt": str(args.ckpt), "data": data, **result}
        print_results(results[each], args.show)
    if len(results) > 1:
        summary = [f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in r["metrics"].items()
                                           if isinstance(v, float))
                   for name, r in results.items()]  # fmt: skip
        print("\nsummary:  " + "   ".join(summary))
    write_results(out, results if task == "all" else results[task])
    return results


def retrieval_layers(spec, meta, num_layers):
    """--layers, else the checkpoint's contrastive layers, else all."""
    try:
        return (
            contrastive.select_layers(spec, num_layers)
            if spec
            else meta.get("layers") or contrastive.select_layers("all", num_layers)
        )
    except ValueError as e:
        raise UserError(f"--layers {spec}: {e}") from None


def write_results(out, results):
    """The results as JSON, written atomically: a symbolic link planted at `out` (in a run folder)
    is replaced by the file, never written through onto what it points to."""
    if out.is_symlink():
        print(f"note: {out} was a symbolic link (to {os.readlink(out)}): replaced by the results, "
              "what it pointed to is left as it was")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, ensure_ascii=False)
    common.write_atomically(out, lambda tmp: tmp.write_text(text))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    common.run_main(main)
