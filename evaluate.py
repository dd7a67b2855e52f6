"""
evaluate.py: score a trained projector with the metrics the field uses.

    # its task on the demo's test split (QA: EM / F1)
    python evaluate.py --ckpt out/finetune-qa
    # ASR (WER), ST (BLEU / chrF), QA, each on its test split
    python evaluate.py --ckpt out/finetune-mix --task all
    python evaluate.py --ckpt runs/ft --task st --data data/paper/st-de_test.jsonl --batch-size 16
    # ASR decoded by the LLM alone (greedy), and with a heavier CTC side
    python evaluate.py --ckpt out/finetune-asr --joint-ctc 0
    python evaluate.py --ckpt out/finetune-asr --joint-ctc 0.7 --beam 8
    # stage 1: speech->text R@1 per contrastive layer; what the projector spells without the LLM
    python evaluate.py --ckpt out/pretrain --task retrieval
    python evaluate.py --ckpt out/pretrain --task readout
    # which test words the training transcripts never had, and how many of each kind come out right
    python evaluate.py --ckpt out/finetune-asr --data open --seen-in demo/corpus/sentences_train.jsonl
    # one recording
    python evaluate.py --ckpt out/finetune-qa --audio my.wav --question "Who does Klara meet?"
    python evaluate.py --ckpt out/finetune-mix --audio my.wav --task st --tgt-lang de
    python evaluate.py --ckpt out/finetune-mix --audio my.wav --prompt "What is said in this audio?"

Generation is greedy, batched with left padding, and stops at the LLM's end-of-turn token, at a
length cap that follows the input (--max-new-tokens auto: 16 tokens + 8 per second of audio for
ASR/ST, 32 for QA), or when the answer starts to loop (--loop-repeats 3: it ends in 3 copies of the
same few tokens; one is kept). The authors' setting: --max-new-tokens 200 --loop-repeats 0. As the
authors, an answer ends at its first newline. ASR from a projector trained with a CTC alignment (the
demo's recipe) is decoded instead by a joint CTC / LLM beam search, --batch-size utterances side by side
(--joint-ctc auto; model.SpeechLLM.generate_joint; docs/alignment.md). The table (with how many answers the cap or the guard
cut), a few hypotheses next to their references, and a JSON file of everything (default
<ckpt>/eval-<task>.json).

Sections: metrics | retrieval (stage 1) | generation | the command line.
"""

import argparse
import json
import math
import re
import string
from collections import Counter
from pathlib import Path

import jiwer
import soundfile as sf
import torch
from sacrebleu.metrics import BLEU, CHRF

import common
import contrastive
import demokit
from data import (
    INSTRUCTIONS,
    LANGUAGES,
    SAMPLE_RATE,
    Collator,
    UserError,
    check_audio,
    load_audio,
    need_transcripts,
    read_manifest,
    task_examples,
    to_device,
)
from model import SpeechLLM

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


def seen_word_recall(hypotheses, references, seen):
    """ASR against the words of the training transcripts (`seen`, --seen-in): the share of
    reference words never seen there, and the share of each kind the hypotheses get right (aligned
    as jiwer aligns them for the WER). A recogniser that spells only words it has heard gets the
    unseen ones nearly never right, so their share bounds its WER from below."""
    right, total = {True: 0, False: 0}, {True: 0, False: 0}
    for ref, hyp in zip(references, hypotheses):
        out = jiwer.process_words(
            ref, hyp, reference_transform=WER_TEXT, hypothesis_transform=WER_TEXT
        )
        correct = {i for chunk in out.alignments[0] if chunk.type == "equal"
                   for i in range(chunk.ref_start_idx, chunk.ref_end_idx)}  # fmt: skip
        for i, word in enumerate(out.references[0]):
            total[word in seen] += 1
            right[word in seen] += i in correct
    recall = lambda kind: 100 * right[kind] / total[kind] if total[kind] else None  # noqa: E731
    return {
        "unseen_words": 100 * total[False] / (total[True] + total[False]),
        "recall_seen": recall(True),
        "recall_unseen": recall(False),
    }


def words_of(manifest):
    """The set of words (WER-normalised) of a manifest's transcripts."""
    return {word for row in read_manifest(manifest) for word in WER_TEXT(row["text"])[0]}


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
# What the LLM hears: any projector read out without the LLM (SpeechLLM.read_out), and its WER


def evaluate_readout(model, rows, batch_size, device, dtype):
    """The greedy CTC readout of each utterance (each projector output's nearest token embedding or
    the blank, collapsed), scored as ASR. Meaningful for a projector trained with CTC; for any other
    it shows how near the LLM's own embeddings its outputs lie."""
    need_transcripts(rows, "the readout")
    collate = Collator(model.encoder.feature_extractor)
    hypotheses = []
    for i in range(0, len(rows), batch_size):
        # outside autocast: the log-mel
        batch = to_device(collate(rows[i : i + batch_size]), device)
        with common.autocast(device, dtype):
            hypotheses += model.read_out(batch)
    references = [row["text"] for row in rows]
    outputs = [
        {"audio": r["audio"], "hypothesis": h, "references": [r["text"]]}
        for r, h in zip(rows, hypotheses)
    ]
    return {
        "task": "readout",
        "n": len(rows),
        "metrics": word_error_rates(hypotheses, references),
        "outputs": outputs,
    }


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


# The length cap on a generated answer (--max-new-tokens auto). Greedy decoding of a weak model can
# run on past the sentence until the cap, so the cap follows the input: a transcript or translation
# is at most a few tokens per second of speech (English speech is ~3-4 tokens/s, German text takes
# ~1.5x the tokens of English), a spoken-QA answer is a short span. The authors: 200 tokens for
# everything.
CAP_TOKENS = 16  # asr/st: this many tokens ...
CAP_TOKENS_PER_SECOND = 8  # ... plus this many per second of audio
QA_CAP_TOKENS = 32


def answer_cap(task, seconds, max_new_tokens="auto"):
    """The token cap for one answer: max_new_tokens if it is a number, else the rule above."""
    if max_new_tokens != "auto":
        return int(max_new_tokens)
    return (
        QA_CAP_TOKENS if task == "qa" else math.ceil(CAP_TOKENS + CAP_TOKENS_PER_SECOND * seconds)
    )


def longest_first(examples, batch_size):
    """The examples' indices in batches, longest audio first (little padding in each batch)."""
    order = sorted(range(len(examples)), key=lambda i: -examples[i].get("duration", 0))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def generate_answers(
    model,
    examples,
    batch_size,
    max_new_tokens,
    device,
    dtype,
    progress=True,
    loop_repeats=0,
    stop_reasons=False,
):
    """Greedy answers for every example (batched, longest first to keep the padding small), in
    input order.
    max_new_tokens: a number, or "auto" (answer_cap). With stop_reasons, also why each answer ended
    (end of turn, the cap, or the loop guard: model.generate)."""
    from tqdm import tqdm

    collate = Collator(model.encoder.feature_extractor)
    answers, reasons = [None] * len(examples), [None] * len(examples)
    model.eval()
    for idx in tqdm(longest_first(examples, batch_size), desc="generate", disable=not progress):
        caps = [
            answer_cap(examples[i].get("task"), examples[i].get("duration", 0), max_new_tokens)
            for i in idx
        ]
        instructions = [examples[i]["instruction"] for i in idx]
        # scripts/toplines.py: a text's token embeddings for the speech
        read = "heard" in examples[idx[0]]
        # collated outside autocast: the log-mel must stay float32
        batch = None if read else to_device(collate([examples[i] for i in idx]), device)
        with common.autocast(device, dtype):
            if read:
                heard, heard_mask = embed_texts(model, [examples[i]["heard"] for i in idx], device)
                out, why = model.generate_from(
                    heard, heard_mask, instructions, caps, loop_repeats, stop_reasons=True
                )
            else:
                out, why = model.generate(
                    batch, instructions, caps, loop_repeats, stop_reasons=True
                )
        for i, text, reason in zip(idx, out, why):
            # as the authors (stop string "\n")
            answers[i], reasons[i] = text.split("\n")[0].strip(), reason
    return (answers, reasons) if stop_reasons else answers


# --joint-ctc auto: this weight for a projector trained with a CTC alignment (docs/alignment.md)
JOINT_CTC = 0.5


def joint_ctc_weight(args, model):
    """--joint-ctc as a number: auto is JOINT_CTC for a CTC-aligned projector, else 0 (the LLM
    alone, as the paper decodes)."""
    weight = getattr(args, "joint_ctc", 0)  # scripts/toplines.py has no such flag
    if weight == "auto":
        return JOINT_CTC if model.ctc_aligned else 0.0
    return weight


def joint_answers(model, examples, weight, args, device, dtype):
    """ASR with --joint-ctc: model.generate_joint over batches of --batch-size utterances (longest
    first, as generate_answers), in input order: the LLM's beam search, every hypothesis also scored
    by the projector's CTC prefix probability. Returns (answers, why each ended)."""
    from tqdm import tqdm

    collate = Collator(model.encoder.feature_extractor)
    answers, reasons = [None] * len(examples), [None] * len(examples)
    model.eval()
    for idx in tqdm(longest_first(examples, args.batch_size), desc="joint ctc"):
        batch = to_device(collate([examples[i] for i in idx]), device)
        caps = [answer_cap("asr", examples[i].get("duration", 0), args.max_new_tokens) for i in idx]
        instructions = [examples[i]["instruction"] for i in idx]
        with common.autocast(device, dtype):
            texts, why = model.generate_joint(batch, instructions, weight, args.beam, caps)
        for i, text, reason in zip(idx, texts, why):
            answers[i], reasons[i] = text.split("\n")[0].strip(), reason
    return answers, reasons


def embed_texts(model, texts, device):
    """The LLM's own token embeddings of each text, right-padded: [B, T, D] and a mask [B, T]."""
    ids = [
        model.tokenizer(t, add_special_tokens=False).input_ids or [model.tokenizer.pad_token_id]
        for t in texts
    ]
    lengths = torch.tensor([len(i) for i in ids], device=device)
    padded = torch.nn.utils.rnn.pad_sequence([torch.tensor(i) for i in ids], batch_first=True).to(
        device
    )
    return model.embed_tokens(padded), torch.arange(padded.shape[1], device=device)[None] < lengths[
        :, None
    ]


def evaluate_task(model, task, rows, args, device, dtype):
    """Generate and score one task on the rows of a manifest; returns the results as a dict."""
    examples = task_examples(rows, task)
    return score(
        model, task, unique_questions(examples) if task == "qa" else examples, args, device, dtype
    )


def score(model, task, examples, args, device, dtype, hypotheses=None):
    """Answers to the examples (unless given: greedy, or for ASR the joint CTC / LLM search), their
    metrics, how each ended, and every output."""
    reasons = ["end"] * len(examples)
    joint = joint_ctc_weight(args, model) if task == "asr" else 0
    if hypotheses is None and joint:
        hypotheses, reasons = joint_answers(model, examples, joint, args, device, dtype)
    elif hypotheses is None:
        hypotheses, reasons = generate_answers(model, examples, args.batch_size,
                                               args.max_new_tokens, device, dtype,
                                               loop_repeats=args.loop_repeats,
                                               stop_reasons=True)  # fmt: skip
    references = [ex["references"] if task == "qa" else ex["references"][0] for ex in examples]
    decoding = {
        "max_new_tokens": args.max_new_tokens,
        "loop_repeats": args.loop_repeats,
        **({"joint_ctc": joint, "beam": args.beam} if joint else {}),
        "stopped": {why: reasons.count(why) for why in ("end", "cap", "loop")},
    }
    outputs = [
        {"audio": ex["audio"], "instruction": ex["instruction"], "hypothesis": h,
         "references": ex["references"], "stop": why}
        for ex, h, why in zip(examples, hypotheses, reasons)
    ]  # fmt: skip
    metrics = compute_metrics(task, hypotheses, references)
    return {
        "task": task,
        "n": len(examples),
        "metrics": metrics,
        "decoding": decoding,
        "outputs": outputs,
    }


# -----------------------------------------------------------------------------
# The command line


def add_decoding_flags(p):
    """The batch size and the decoding rule, shared with scripts/toplines.py."""
    p.add_argument(
        "--data",
        help="test manifest; default: the demo's test split of the task; open: its open test",
    )
    common.add_demo_corpus_flag(p)
    p.add_argument("--limit", type=common.positive_int, help="score only the first N utterances")
    p.add_argument(
        "--batch-size", type=common.positive_int, default=8, help="utterances per generation batch"
    )
    p.add_argument(
        "--max-new-tokens", type=max_tokens, default="auto", help="a number, or auto (see above)"
    )
    p.add_argument(
        "--loop-repeats",
        type=common.non_negative_int,
        default=3,
        help="stop at N copies of a span (0: off)",
    )
    p.add_argument(
        "--show",
        type=common.non_negative_int,
        default=5,
        help="sample hypotheses to print next to their references",
    )


def get_args(argv=None):
    p = common.parser(__doc__)
    p.add_argument(
        "--ckpt", required=True, help="a checkpoint folder from pretrain.py or finetune.py"
    )
    tasks = ["asr", "st", "qa", "all", "retrieval", "readout"]
    p.add_argument(
        "--task", choices=tasks, help="default: the checkpoint's task, retrieval after stage 1"
    )
    add_decoding_flags(p)
    p.add_argument(
        "--layers", help="retrieval: emb | all | a comma list (default: the checkpoint's)"
    )
    p.add_argument(
        "--joint-ctc",
        type=joint_weight,
        default="auto",
        help="ASR: beam search scoring W * the CTC prefix log-prob + (1 - W) * the LLM's; 0: the "
        f"LLM alone, greedy; auto: {JOINT_CTC} for a CTC-aligned projector, else 0",
    )
    p.add_argument("--beam", type=common.positive_int, default=4, help="with --joint-ctc")
    p.add_argument(
        "--seen-in",
        help="ASR, readout: a manifest (e.g. the training split); adds the share of test words "
        "never in its transcripts and how many of each kind are right",
    )
    p.add_argument("--out", help="results JSON (default: <ckpt>/eval-<task>.json)")
    g = p.add_argument_group("one recording")
    g.add_argument("--audio", help="answer for this recording (any format and sample rate)")
    g.add_argument("--question", help="with --audio --task qa: the question about the recording")
    g.add_argument("--tgt-lang", default="de", help="with --audio --task st: the target language")
    g.add_argument("--prompt", help="with --audio: any instruction instead of a task's")
    common.add_system_flags(p, training=False)
    args = p.parse_args(argv)
    common.check_checkpoint(args.ckpt)  # a damaged checkpoint is one line
    if args.audio:
        check_audio(args.audio)  # readable, and at least one encoder frame long
    return args


def joint_weight(value):
    return value if value == "auto" else common.unit_interval(value)


def max_tokens(value):
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive number, got {value!r}")
    return int(value)


def default_task(meta):
    if "task" not in meta:  # stage 1 writes no task
        return "retrieval"
    return "all" if meta["task"] == "mix" else meta["task"]


def split_manifest(data, task, size):
    """--data: a manifest, or (default) the demo corpus's test split of the task, or "open" its open
    test."""
    if data not in (None, "open"):
        return data
    return demokit.manifests(
        "asr" if task in ("retrieval", "readout") else task, data or "test", size
    )[0]


def answer_one(model, args, task, device, dtype):
    """--audio: print the model's answer for one recording."""
    if args.prompt:
        instruction = args.prompt
    elif task == "asr":
        instruction = INSTRUCTIONS["asr"]
    elif task == "st":
        instruction = INSTRUCTIONS["st"].format(
            language=LANGUAGES.get(args.tgt_lang, args.tgt_lang)
        )
    elif task == "qa":
        if not args.question:
            raise UserError("--task qa with --audio needs --question")
        instruction = INSTRUCTIONS["qa"].format(question=args.question)
    else:
        raise UserError(f"--audio: pass --task asr|st|qa or a free --prompt (not --task {task})")
    if not Path(args.audio).is_file():
        raise UserError(f"--audio {args.audio}: no such file")
    try:
        sf.info(args.audio)
    except Exception as e:  # soundfile raises its own error types for unreadable files
        raise UserError(
            f"--audio {args.audio}: not a readable audio file ({e}). "
            "WAV, FLAC, OGG (Vorbis, Opus) and MP3 are read "
            "at any sample rate and channel count; "
            "convert other formats first, e.g. `ffmpeg -i my.m4a my.wav`"
        ) from None
    batch = to_device(
        Collator(model.encoder.feature_extractor)([{"audio": args.audio, "key": args.audio}]),
        device,
    )
    cap = answer_cap(task, len(load_audio(args.audio)) / SAMPLE_RATE, args.max_new_tokens)
    joint = joint_ctc_weight(args, model) if task == "asr" and not args.prompt else 0
    with common.autocast(device, dtype):
        if joint:
            answer = model.generate_joint(batch, [instruction], joint, args.beam, cap)[0][0]
        else:
            answer = model.generate(batch, [instruction], cap, args.loop_repeats)[0]
    print(answer if args.prompt else answer.split("\n")[0].strip())
    return answer


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
    stopped = result.get("decoding", {}).get("stopped")
    if stopped:  # generated answers (not the readout)
        print(
            f"  answers ended by the end-of-turn token: {stopped['end']}, "
            f"cut by the length cap: {stopped['cap']}, "
            f"by the loop guard: {stopped['loop']} "
            f"(--max-new-tokens {result['decoding']['max_new_tokens']}, "
            f"--loop-repeats {result['decoding']['loop_repeats']})"
        )
    if result.get("decoding", {}).get("joint_ctc"):
        print(
            f"  joint CTC / LLM beam search: --joint-ctc {result['decoding']['joint_ctc']}, "
            f"--beam {result['decoding']['beam']} (no loop guard)"
        )
    for out in result["outputs"][:show]:
        print(f"  ref: {' | '.join(out['references'])}\n  hyp: {out['hypothesis']}")


def main(argv=None):
    args = get_args(argv)
    _, _, device = common.setup(args.device, seed=0)
    dtype = common.resolve_dtype(args.dtype, device)
    model, meta = SpeechLLM.from_checkpoint(args.ckpt, dtype)
    model = model.to(device).eval()
    task = args.task or default_task(meta)
    if args.audio:
        return answer_one(model, args, task, device, dtype)

    if task == "all" and args.data:
        raise UserError(
            "--task all scores each task on its own demo test split; with --data, name one --task"
        )
    results = {}
    for each in ("asr", "st", "qa") if task == "all" else (task,):
        data = split_manifest(args.data, each, args.demo_corpus)
        rows = read_manifest(data)[: args.limit]
        if each == "retrieval":
            layers = retrieval_layers(args.layers, meta, model.num_layers)
            centers = common.load_centers(args.ckpt, layers)
            metrics = evaluate_retrieval(
                model, rows, layers, args.batch_size, device, dtype, centers
            )
            result = {"task": each, "n": len(rows), "metrics": metrics}
        elif each == "readout":
            result = evaluate_readout(model, rows, args.batch_size, device, dtype)
        else:
            result = evaluate_task(model, each, rows, args, device, dtype)
        if args.seen_in and each in ("asr", "readout"):
            hypotheses = [o["hypothesis"] for o in result["outputs"]]
            references = [o["references"][0] for o in result["outputs"]]
            result["metrics"].update(
                seen_word_recall(hypotheses, references, words_of(args.seen_in))
            )
        results[each] = {"ckpt": str(args.ckpt), "data": data, **result}
        print_results(results[each], args.show)
    if len(results) > 1:
        summary = [f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in r["metrics"].items()
                                           if isinstance(v, float))
                   for name, r in results.items()]  # fmt: skip
        print("\nsummary:  " + "   ".join(summary))
    open_test = "-open" if args.data == "open" else ""
    out = Path(args.out or Path(args.ckpt) / f"eval-{task}{open_test}.json")
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
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, ensure_ascii=False))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    common.run_main(main)
