"""
evaluate.py: score a trained projector with the metrics the field uses.

    python evaluate.py --ckpt out/finetune-qa                 # its task on the demo's test split (QA: EM / F1)
    python evaluate.py --ckpt out/finetune-mix --task all     # ASR (WER), ST (BLEU / chrF) and QA, each on its test split
    python evaluate.py --ckpt runs/ft --task st --data mustc_en-de_test.jsonl --batch-size 16
    python evaluate.py --ckpt out/pretrain --task retrieval   # stage 1: speech->text R@1 per contrastive layer
    python evaluate.py --ckpt out/finetune-qa --audio my.wav --question "Who does Klara meet?"   # one recording
    python evaluate.py --ckpt out/finetune-mix --audio my.wav --task st --tgt-lang de
    python evaluate.py --ckpt out/finetune-mix --audio my.wav --prompt "What is said in this audio?"

Generation is greedy, batched with left padding, and stops at the LLM's end-of-turn token or after
--max-new-tokens (the authors: 200); as the authors, an answer ends at its first newline. The table, a few
hypotheses next to their references, and a JSON file of everything (default <ckpt>/eval-<task>.json).

Sections: metrics | retrieval (stage 1) | generation | the command line.
"""

import argparse
import json
import re
import string
from collections import Counter
from pathlib import Path

import jiwer
import torch
from sacrebleu.metrics import BLEU, CHRF

import common
from contrastive import cos_logits, masked_mean, retrieval_r1, select_layers
from data import INSTRUCTIONS, LANGUAGES, Collator, read_manifest, task_examples, to_device
from model import SpeechLLM

# -----------------------------------------------------------------------------
# Metrics, in percent: WER for ASR, BLEU and chrF for ST, SQuAD EM and F1 for spoken QA


def compute_metrics(task, hypotheses, references):
    """task: asr | st | qa. references: one string per hypothesis, or a list of gold strings per hypothesis
    (QA: the best-matching gold answer counts; ST: several reference translations, same number for all;
    ASR: the first one)."""
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


# The authors' WER normalisation (jiwer): lower-case, strip all Unicode punctuation ("don't" -> "dont"),
# collapse and strip spaces; then words.
WER_TEXT = jiwer.Compose([jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(),
                          jiwer.Strip(), jiwer.ReduceToListOfListOfWords()])


def word_error_rates(hypotheses, references):
    """wer: corpus-level (all errors / all reference words), the usual number.
    wer_mean: the mean of the per-utterance WERs, which is what the authors report."""
    wer = lambda refs, hyps: jiwer.wer(refs, hyps, reference_transform=WER_TEXT, hypothesis_transform=WER_TEXT)  # noqa: E731
    per_utterance = [wer(r, h) for r, h in zip(references, hypotheses)]
    return {"wer": 100 * wer(list(references), list(hypotheses)), "wer_mean": 100 * sum(per_utterance) / len(per_utterance)}


def bleu_chrf(hypotheses, golds):
    """sacrebleu's corpus BLEU (13a tokenisation, case-sensitive: its defaults, as the authors) and chrF,
    with the signature strings that say exactly how they were computed."""
    if len({len(g) for g in golds}) != 1:
        raise ValueError("ST: every hypothesis needs the same number of reference translations")
    streams = [list(refs) for refs in zip(*golds)]  # sacrebleu wants one list per reference "stream"
    bleu, chrf = BLEU(), CHRF()
    return {"bleu": bleu.corpus_score(hypotheses, streams).score, "chrf": chrf.corpus_score(hypotheses, streams).score,
            "bleu_signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature())}


def squad_normalize(text):
    """The official SQuAD v1.1 answer normalisation: lower-case, drop ASCII punctuation, drop the articles
    a/an/the, collapse whitespace."""
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
    em = [max(float(squad_normalize(h) == squad_normalize(g)) for g in gs) for h, gs in zip(hypotheses, golds)]
    f1 = [max(squad_f1(h, g) for g in gs) for h, gs in zip(hypotheses, golds)]
    return {"em": 100 * sum(em) / len(em), "f1": 100 * sum(f1) / len(f1)}


# -----------------------------------------------------------------------------
# Retrieval: is each utterance's own transcript the nearest among all transcripts? (stage 1)


@torch.no_grad()
def pooled_pairs(model, examples, layers, batch_size=16, device="cpu", autocast=None):
    """Mean-pooled hidden states at `layers` of every (speech, transcript) pair: two [L, N, D] tensors."""
    collate = Collator(model.encoder.feature_extractor, model.tokenizer)
    speech_pooled, text_pooled = [], []
    was_training = model.training
    model.eval()
    for i in range(0, len(examples), batch_size):
        batch = to_device(collate(examples[i : i + batch_size]), device)
        with autocast or torch.autocast("cpu", enabled=False):
            speech, speech_mask, speech_pool_mask, text, text_mask, text_pool_mask = model.contrastive_inputs(batch)
            speech_pooled.append(masked_mean(model.hidden_states(speech, speech_mask, layers), speech_pool_mask))
            text_pooled.append(masked_mean(model.hidden_states(text, text_mask, layers), text_pool_mask))
    model.train(was_training)
    return torch.cat(text_pooled, 1), torch.cat(speech_pooled, 1)


CENTERS = "centers.safetensors"  # written next to the projector by `pretrain.py --center`


def save_centers(folder, text_mean, speech_mean, layers, items):
    """Store the per-layer means [L, D] of the pooled text and speech states over `items` training pairs."""
    from safetensors.torch import save_file

    tmp = Path(folder) / f"{CENTERS}.tmp"
    save_file({"text": text_mean.float().contiguous().cpu(), "speech": speech_mean.float().contiguous().cpu()}, str(tmp),
              metadata={"layers": json.dumps(layers), "items": str(items)})
    tmp.replace(Path(folder) / CENTERS)  # atomic: a reader never sees half a file


def load_centers(folder, layers):
    """(text_mean, speech_mean) stored by pretraining for exactly these layers, else None."""
    from safetensors import safe_open

    path = Path(folder) / CENTERS
    if not path.exists():
        return None
    with safe_open(str(path), "pt") as f:
        if json.loads(f.metadata()["layers"]) != list(layers):
            return None
        return f.get_tensor("text"), f.get_tensor("speech")


def evaluate_retrieval(model, rows, layers, batch_size, device, dtype, centers=None):
    """R@1 per layer in percent on the first utterances of a manifest: plain, centred by the set's own
    means, and (when the checkpoint stored them) centred by the training means (see cos_logits' center)."""
    text, speech = pooled_pairs(model, rows, layers, batch_size, device, common.autocast(device, dtype))
    metrics = {"layers": layers, "r1": (100 * retrieval_r1(cos_logits(text, speech))).tolist(),
               "r1_centred": (100 * retrieval_r1(cos_logits(text, speech, center=True))).tolist(), "chance": 100 / len(rows)}
    if centers is not None:
        metrics["r1_centred_train"] = (100 * retrieval_r1(cos_logits(text, speech, center=centers))).tolist()
    return metrics


# -----------------------------------------------------------------------------
# Generation: the answers of a fine-tuned model


def unique_questions(examples):
    """Spoken-SQuAD lists a question once per gold answer; as the authors, score each question once against
    all its gold answers. (They key on the question text alone; we key on recording + question, so the
    same question about two different passages stays two questions.)"""
    merged = {}
    for ex in examples:
        key = (ex["audio"], ex["instruction"])
        if key in merged:
            merged[key]["references"] += [r for r in ex["references"] if r not in merged[key]["references"]]
        else:
            merged[key] = {**ex, "references": list(ex["references"])}
    return list(merged.values())


def generate_answers(model, examples, batch_size, max_new_tokens, device, dtype, progress=True):
    """Greedy answers for every example (batched, longest first to keep the padding small), in input order."""
    from tqdm import tqdm

    collate = Collator(model.encoder.feature_extractor)
    order = sorted(range(len(examples)), key=lambda i: -examples[i].get("duration", 0))
    answers = [None] * len(examples)
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress):
        idx = order[start : start + batch_size]
        batch = to_device(collate([examples[i] for i in idx]), device)
        with common.autocast(device, dtype):
            out = model.generate(batch, [examples[i]["instruction"] for i in idx], max_new_tokens)
        for i, text in zip(idx, out):
            answers[i] = text.split("\n")[0].strip()  # as the authors (stop string "\n")
    return answers


def evaluate_task(model, task, rows, args, device, dtype):
    """Generate and score one task on the rows of a manifest; returns the results as a dict."""
    examples = task_examples(rows, task)
    if task == "qa":
        examples = unique_questions(examples)
    hypotheses = generate_answers(model, examples, args.batch_size, args.max_new_tokens, device, dtype)
    references = [ex["references"] if task == "qa" else ex["references"][0] for ex in examples]
    metrics = compute_metrics(task, hypotheses, references)
    outputs = [{"audio": ex["audio"], "instruction": ex["instruction"], "hypothesis": h, "references": ex["references"]}
               for ex, h in zip(examples, hypotheses)]
    return {"task": task, "n": len(examples), "metrics": metrics, "outputs": outputs}


# -----------------------------------------------------------------------------
# The command line


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a checkpoint folder (projector.safetensors + meta.json) from pretrain.py or finetune.py")
    p.add_argument("--task", choices=["asr", "st", "qa", "all", "retrieval"], default=None,
                   help="default: the checkpoint's fine-tuning task (all for a mix), retrieval for a stage-1 checkpoint")
    p.add_argument("--data", default=None, help="test manifest (default: the demo corpus's test split for the task)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N utterances")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=200, help="cap on the generated answer (the authors: 200)")
    p.add_argument("--layers", default=None, help="retrieval: emb | all | a comma list (default: the checkpoint's contrastive layers)")
    p.add_argument("--show", type=int, default=5, help="sample hypotheses to print next to their references")
    p.add_argument("--out", default=None, help="results JSON (default: <ckpt>/eval-<task>.json)")
    # one recording
    p.add_argument("--audio", default=None, help="answer for this one recording (any format and sample rate) instead of a test set")
    p.add_argument("--question", default=None, help="with --audio --task qa: the question about the recording")
    p.add_argument("--tgt-lang", default="de", help="with --audio --task st: the target language (de, fr, it, es, ...)")
    p.add_argument("--prompt", default=None, help="with --audio: any instruction instead of a task's")
    # system
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16")
    return p.parse_args(argv)


def default_task(meta):
    if "task" not in meta:  # stage 1 writes no task
        return "retrieval"
    return "all" if meta["task"] == "mix" else meta["task"]


def default_data(task):
    import prepare_demo

    return str(prepare_demo.corpus_path() / f"{'qa' if task == 'qa' else 'sentences'}_test.jsonl")


def answer_one(model, args, device, dtype):
    """--audio: print the model's answer for one recording."""
    if args.prompt:
        instruction = args.prompt
    elif args.task == "asr":
        instruction = INSTRUCTIONS["asr"]
    elif args.task == "st":
        instruction = INSTRUCTIONS["st"].format(language=LANGUAGES.get(args.tgt_lang, args.tgt_lang))
    elif args.task == "qa":
        if not args.question:
            raise SystemExit("--task qa with --audio needs --question")
        instruction = INSTRUCTIONS["qa"].format(question=args.question)
    else:
        raise SystemExit(f"--audio: pass --task asr|st|qa or a free --prompt (not --task {args.task})")
    if not Path(args.audio).is_file():
        raise SystemExit(f"--audio {args.audio}: no such file")
    batch = to_device(Collator(model.encoder.feature_extractor)([{"audio": args.audio, "key": args.audio}]), device)
    with common.autocast(device, dtype):
        answer = model.generate(batch, [instruction], args.max_new_tokens)[0]
    print(answer if args.prompt else answer.split("\n")[0].strip())
    return answer


def print_results(result, show):
    task, metrics = result["task"], result["metrics"]
    print(f"\n{task}: {result['n']} {'questions' if task == 'qa' else 'utterances'} from {result['data']}")
    if task == "retrieval":
        train = metrics.get("r1_centred_train")
        print(f"  {'layer':>5}  {'R@1':>6}  {'centred':>8}" + (f"  {'centred (train means)':>21}" if train else "")
              + f"   (speech->text, %, chance {metrics['chance']:.2f}; centred: by this set's means)")
        for i, (layer, r1, centred) in enumerate(zip(metrics["layers"], metrics["r1"], metrics["r1_centred"])):
            print(f"  {layer:>5}  {r1:6.2f}  {centred:8.2f}" + (f"  {train[i]:21.2f}" if train else ""))
        return
    for name, value in metrics.items():
        print(f"  {name:<16} {value:.2f}" if isinstance(value, float) else f"  {name:<16} {value}")
    for out in result["outputs"][:show]:
        print(f"  ref: {' | '.join(out['references'])}\n  hyp: {out['hypothesis']}")


def main(argv=None):
    args = get_args(argv)
    _, _, device = common.setup(args.device, seed=0)
    dtype = common.resolve_dtype(args.dtype, device)
    model, meta = SpeechLLM.from_checkpoint(args.ckpt, dtype)
    model = model.to(device).eval()
    args.task = args.task or default_task(meta)
    if args.audio:
        return answer_one(model, args, device, dtype)

    if args.task == "all" and args.data:
        raise SystemExit("--task all scores each task on its own demo test split; with --data, name one --task")
    results = {}
    for task in ("asr", "st", "qa") if args.task == "all" else (args.task,):
        data = args.data or default_data(task)
        rows = read_manifest(data)[: args.limit]
        if task == "retrieval":
            layers = select_layers(args.layers, model.num_layers) if args.layers else meta.get("layers") or select_layers("all", model.num_layers)
            metrics = evaluate_retrieval(model, rows, layers, args.batch_size, device, dtype, load_centers(args.ckpt, layers))
            result = {"task": task, "n": len(rows), "metrics": metrics}
        else:
            result = evaluate_task(model, task, rows, args, device, dtype)
        results[task] = {"ckpt": str(args.ckpt), "data": data, **result}
        print_results(results[task], args.show)
    if len(results) > 1:
        print("\nsummary:  " + "   ".join(f"{task}: " + ", ".join(f"{k} {v:.2f}" for k, v in r["metrics"].items() if isinstance(v, float))
                                      for task, r in results.items()))
    out = Path(args.out or Path(args.ckpt) / f"eval-{args.task}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results if args.task == "all" else results[args.task], indent=2, ensure_ascii=False))
    print(f"\nwrote {out}")
    return results


if __name__ == "__main__":
    main()
