"""
extras/decoding.py: evaluate.py's decoding beyond the paper's (the authors: greedy, 200 new tokens,
no guard, an answer ends at its first newline). An addition, the demo recipe's default:

    --max-new-tokens auto   a length cap that follows the audio: 16 tokens + 8 per second for ASR
                            and ST, 32 for QA (greedy decoding of a weak model runs on to the cap)
    --loop-repeats 3        stop an answer that ends in 3 copies of the same 1-12 tokens, keep one
    --joint-ctc auto        ASR from a CTC-aligned projector by joint CTC / LLM beam search
                            (extras/joint.py), --batch-size utterances side by side
    --task readout          what the projector spells without the LLM (extras/ctc.py)
    --seen-in MANIFEST      which test words the training transcripts never had, and how many of
                            each kind come out right

    python evaluate.py --ckpt out/finetune-asr --joint-ctc 0.7 --beam 8
    python evaluate.py --ckpt out/finetune-asr --data open --seen-in demo/corpus/sentences_train.jsonl

evaluate.py comes here (one line, marked `# extras: decoding`) when a flag or the checkpoint asks
for any of these; the metrics, the result's layout and the printing stay evaluate.py's.

Sections: length caps and the loop guard | greedy answers with them | joint answers | --seen-in |
what evaluate.py calls.
"""

import math

import jiwer
import torch
from tqdm import tqdm
from transformers import StoppingCriteria

import common
from data import Collator, task_examples, to_device

# -----------------------------------------------------------------------------
# Length caps that follow the audio, and the loop guard

# English speech is ~3-4 tokens/s, German text takes ~1.5x the tokens of English; a spoken-QA
# answer is a short span.
CAP_TOKENS = 16  # asr/st: this many tokens ...
CAP_TOKENS_PER_SECOND = 8  # ... plus this many per second of audio
QA_CAP_TOKENS = 32
JOINT_CTC = 0.5  # --joint-ctc auto: this weight for a CTC-aligned projector (docs/alignment.md)


def answer_cap(task, seconds, max_new_tokens="auto"):
    """The token cap for one answer: max_new_tokens if it is a number, else the rule above."""
    if max_new_tokens != "auto":
        return int(max_new_tokens)
    if task == "qa":
        return QA_CAP_TOKENS
    return math.ceil(CAP_TOKENS + CAP_TOKENS_PER_SECOND * seconds)


class Stops(StoppingCriteria):
    """A stopping criterion for transformers' generate: each sequence stops at its own length cap,
    or, with loop_repeats=k > 0, as soon as its last tokens are k copies of one span of 1-12 tokens
    (greedy decoding of a weak model loops: "in Dublin in Dublin in Dublin ..."). Records why
    (`reason`) and how many tokens to keep (`keep`), which model.generate_from reads."""

    MAX_PERIOD = 12

    def __init__(self, caps, loop_repeats=0, end_token=None):
        self.caps, self.repeats, self.end_token = caps, loop_repeats, end_token
        self.reason, self.keep = [None] * len(caps), [None] * len(caps)

    def __call__(self, input_ids, scores=None, **kwargs):
        done = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
        n = input_ids.shape[1]  # with inputs_embeds, input_ids holds only the generated tokens
        for i, ids in enumerate(input_ids.tolist()):
            if self.reason[i] is not None:
                done[i] = True
            elif ids[-1] == self.end_token:
                self.reason[i], done[i] = "end", True
            elif n >= self.caps[i]:
                self.reason[i], self.keep[i], done[i] = "cap", self.caps[i], True
            elif self.repeats and (period := loop_period(ids, self.repeats, self.MAX_PERIOD)):
                self.reason[i], self.keep[i] = "loop", n - (self.repeats - 1) * period
                done[i] = True
        return done


def loop_period(ids, repeats, max_period):
    """The shortest p <= max_period such that ids ends in `repeats` copies of its last p tokens,
    else 0."""
    for p in range(1, max_period + 1):
        if len(ids) >= repeats * p and all(
            ids[-p:] == ids[len(ids) - k * p : len(ids) - (k - 1) * p]
            for k in range(2, repeats + 1)
        ):
            return p
    return 0


# -----------------------------------------------------------------------------
# Greedy answers with the caps, the guard, compressed speech, or a text in the speech's place


def speech_for_llm(model, batch):
    """The projector's outputs as the LLM reads them (compressed, for a --compress checkpoint)."""
    speech, speech_mask = model.encode_speech(batch)
    if model.additions.get("compress"):
        from extras.ctc import compress

        speech, speech_mask = compress(model, speech, speech_mask)
    return speech, speech_mask


def embed_texts(model, texts, device):
    """The LLM's own token embeddings of each text, right-padded: [B, T, D] and a mask [B, T]
    (scripts/toplines.py: a text read where the speech would be)."""
    ids = [model.answer_ids(t) or [model.tokenizer.pad_token_id] for t in texts]  # plain text
    lengths = torch.tensor([len(i) for i in ids], device=device)
    padded = torch.nn.utils.rnn.pad_sequence([torch.tensor(i) for i in ids], batch_first=True)
    padded = padded.to(device)
    return model.embed_tokens(padded), torch.arange(padded.shape[1], device=device)[None] < lengths[:, None]  # fmt: skip


def generate_answers(model, examples, args, device, dtype, progress=True):
    """Greedy answers for every example with --max-new-tokens (a number or auto) and
    --loop-repeats, batched longest first, in input order. Returns (answers, why each ended)."""
    from evaluate import longest_first

    collate = Collator(model.encoder.feature_extractor)
    answers, reasons = [None] * len(examples), [None] * len(examples)
    model.eval()
    for idx in tqdm(
        longest_first(examples, args.batch_size), desc="generate", disable=not progress
    ):
        chunk = [examples[i] for i in idx]
        caps = [
            answer_cap(ex.get("task"), ex.get("duration", 0), args.max_new_tokens) for ex in chunk
        ]
        instructions = [ex["instruction"] for ex in chunk]
        # collated outside autocast: the log-mel must stay float32
        batch = None if "heard" in chunk[0] else to_device(collate(chunk), device)
        with common.autocast(device, dtype):
            if batch is None:  # scripts/toplines.py: a text's token embeddings for the speech
                speech, speech_mask = embed_texts(model, [ex["heard"] for ex in chunk], device)
            else:
                speech, speech_mask = speech_for_llm(model, batch)
            stops = Stops(caps, args.loop_repeats, model.prompt_ids(instructions[0])[2])
            texts, why = model.generate_from(speech, speech_mask, instructions, max(caps), stops)
        for i, text, reason in zip(idx, texts, why):
            answers[i], reasons[i] = text.split("\n")[0].strip(), reason  # as the authors
    return answers, reasons


# -----------------------------------------------------------------------------
# Joint answers (ASR)


def joint_ctc_weight(args, model):
    """--joint-ctc as a number: auto is JOINT_CTC for a CTC-aligned projector, else 0 (the LLM
    alone, as the paper decodes)."""
    weight = getattr(args, "joint_ctc", 0)  # scripts/toplines.py has no such flag
    if weight == "auto":
        return JOINT_CTC if "ctc" in model.additions else 0.0
    return weight


def joint_answers(model, examples, weight, args, device, dtype):
    """ASR with --joint-ctc: extras/joint.generate_joint over batches of --batch-size utterances
    (longest first), in input order. Returns (answers, why each ended)."""
    from evaluate import longest_first
    from extras.joint import generate_joint

    collate = Collator(model.encoder.feature_extractor)
    answers, reasons = [None] * len(examples), [None] * len(examples)
    model.eval()
    for idx in tqdm(longest_first(examples, args.batch_size), desc="joint ctc"):
        batch = to_device(collate([examples[i] for i in idx]), device)
        caps = [answer_cap("asr", examples[i].get("duration", 0), args.max_new_tokens) for i in idx]
        instructions = [examples[i]["instruction"] for i in idx]
        with common.autocast(device, dtype):
            texts, why = generate_joint(model, batch, instructions, weight, args.beam, caps)
        for i, text, reason in zip(idx, texts, why):
            answers[i], reasons[i] = text.split("\n")[0].strip(), reason
    return answers, reasons


# -----------------------------------------------------------------------------
# --seen-in: the test words the training transcripts never had


def seen_word_recall(hypotheses, references, seen):
    """ASR against the words of the training transcripts (`seen`): the share of reference words
    never seen there, and the share of each kind the hypotheses get right (aligned as jiwer aligns
    them for the WER). A recogniser that spells only words it has heard gets the unseen ones nearly
    never right, so their share bounds its WER from below."""
    from evaluate import WER_TEXT

    right, total = {True: 0, False: 0}, {True: 0, False: 0}
    for ref, hyp in zip(references, hypotheses):
        out = jiwer.process_words(ref, hyp, reference_transform=WER_TEXT,
                                  hypothesis_transform=WER_TEXT)  # fmt: skip
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
    """The set of words (WER-normalised) of a manifest's transcripts (every line must have one)."""
    from data import need_transcripts, read_manifest
    from evaluate import WER_TEXT

    rows = need_transcripts(read_manifest(manifest), f"--seen-in {manifest}")
    return {word for row in rows for word in WER_TEXT(row["text"])[0]}


# -----------------------------------------------------------------------------
# What evaluate.py calls


def evaluate(model, task, rows, args, device, dtype):
    """One task scored with the additions: the readout, or answers decoded as the flags ask (joint
    for ASR from a CTC-aligned projector), then --seen-in. The result as evaluate.score lays it
    out."""
    import evaluate as root

    # --seen-in is read first: a manifest that cannot serve is one line before minutes of decoding
    seen = words_of(args.seen_in) if args.seen_in and task in ("asr", "readout") else None
    if task == "readout":
        from extras.ctc import evaluate_readout

        result = evaluate_readout(model, rows, args.batch_size, device, dtype)
    else:
        examples = task_examples(rows, task)
        examples = root.unique_questions(examples) if task == "qa" else examples
        result = score(model, task, examples, args, device, dtype)
    if seen is not None:
        hypotheses = [o["hypothesis"] for o in result["outputs"]]
        references = [o["references"][0] for o in result["outputs"]]
        result["metrics"].update(seen_word_recall(hypotheses, references, seen))
    return result


def score(model, task, examples, args, device, dtype, hypotheses=None):
    """evaluate.score with this file's decoding (scripts/toplines.py passes its own hypotheses)."""
    import evaluate as root

    joint = joint_ctc_weight(args, model) if task == "asr" else 0
    reasons = ["end"] * len(examples)
    if hypotheses is None and joint:
        hypotheses, reasons = joint_answers(model, examples, joint, args, device, dtype)
    elif hypotheses is None:
        hypotheses, reasons = generate_answers(model, examples, args, device, dtype)
    decoding = {"max_new_tokens": args.max_new_tokens, "loop_repeats": args.loop_repeats,
                **({"joint_ctc": joint, "beam": args.beam} if joint else {})}  # fmt: skip
    return root.score(model, task, examples, args, device, dtype, hypotheses, reasons, decoding)


def answer_one(model, batch, instruction, task, seconds, args):
    """evaluate.py --audio: one recording's answer with this file's decoding."""
    cap = answer_cap(task, seconds, args.max_new_tokens)
    joint = joint_ctc_weight(args, model) if task == "asr" and not args.prompt else 0
    if joint:
        from extras.joint import generate_joint

        return generate_joint(model, batch, [instruction], joint, args.beam, cap)[0][0]
    speech, speech_mask = speech_for_llm(model, batch)
    stops = Stops([cap], args.loop_repeats, model.prompt_ids(instruction)[2])
    return model.generate_from(speech, speech_mask, [instruction], cap, stops)[0][0]
