"""
extras/ctc.py: the token-level alignment this project adds beside the paper (docs/alignment.md).

Every projector output is scored against every row of the frozen LLM's input-embedding table plus
one learned blank vector (cosine / temperature), and CTC trains the speech positions to spell the
transcript's tokens in order, with blanks in between. No LLM pass: the embedding table is the
output layer of a CTC recogniser whose features are the very vectors the LLM reads. The blank is
the last class (index V, the vocabulary size), a parameter this file registers on the projector
(add_blank), so it is saved with it. The same scores read the projector out without the LLM
(read_out) and shorten what the LLM reads to about one vector per token (compress).

    python pretrain.py --loss contrastive+ctc          # stage 1: the paper's loss + this one
    python finetune.py --task asr --compress --ctc-weight 1
    python evaluate.py --ckpt out/pretrain --task readout

Where the root calls it (each line marked `# extras: ctc`): pretrain.py (the blank, the loss term,
the readout at each dev evaluation), finetune.py (the blank, the loss term and compression),
evaluate.py through extras/decoding.py.

Sections: the blank on the projector | the CTC loss over the embedding table | readout and
compression | what the scripts call.
"""

import contextlib
import math
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import unwrap
from contrastive import float32_math
from data import Collator, need_transcripts, to_device

# -----------------------------------------------------------------------------
# The blank: one vector beside the LLM's token embeddings, part of the projector


def add_blank(model, trains=True):
    """Register the CTC blank on the projector (once; a checkpoint's blank is then loaded into it).
    Frozen unless a CTC objective trains it."""
    projector = unwrap(model.projector)
    if not hasattr(projector, "blank"):
        dim = projector.out.out_features
        blank = torch.randn(dim, device=projector.out.weight.device) * 0.02
        projector.register_parameter("blank", nn.Parameter(blank, requires_grad=False))
    projector.blank.requires_grad_(projector.blank.requires_grad or trains)
    return projector.blank


def embedding_table(model):
    """The frozen LLM's input-embedding table [V, D]: the alignment's classes."""
    return model.llm.get_input_embeddings().weight


# -----------------------------------------------------------------------------
# The CTC loss over the embedding table


_UNIT_ROWS = {}  # unit_rows' one table: a weak reference to it, its version, its rows


def unit_rows(embedding_table):
    """The frozen table's rows L2-normalised in float32, without a gradient: computed once per
    table and kept while the table lives and is unchanged (normalising 49k-128k rows at every
    call was a tenth of a stage-2 step)."""
    known = _UNIT_ROWS.get("table")
    same = known is not None and known() is embedding_table
    if not (same and _UNIT_ROWS["version"] == embedding_table._version):
        with torch.no_grad(), float32_math():
            rows = F.normalize(embedding_table.detach().float(), dim=-1)
        _UNIT_ROWS.update(
            table=weakref.ref(embedding_table), version=embedding_table._version, rows=rows
        )
    return _UNIT_ROWS["rows"]


def ctc_logits(speech, embedding_table, blank, temperature=0.05, product_dtype=torch.float32,
               rows=None):  # fmt: skip
    """[B, S, D] -> [B, S, V + 1]: cosine / temperature against every token embedding (or the
    table's `rows` only), then the blank (the last class). Float32 with autocast off (a log-softmax
    over a 49k-128k vocabulary in bf16 loses the small probabilities CTC needs), unless
    product_dtype asks for the product in bf16: the logits then come in bf16, for a float32
    log-softmax. The frozen table never gets a gradient; the blank is scored apart, so that only
    its own row gets one (not a [V, D] gradient of which all but one row is thrown away)."""
    with float32_math():
        classes = unit_rows(embedding_table)
        classes = (classes if rows is None else classes[rows]).to(product_dtype)
        queries = (F.normalize(speech.float(), dim=-1) / temperature).to(product_dtype)
        blank = F.normalize(blank.float(), dim=-1).to(product_dtype)
        return torch.cat([queries @ classes.T, (queries @ blank)[..., None]], dim=-1)


def autocast_dtype(device):
    """The dtype autocast runs matrix products in on this device; float32 when it is off."""
    on = torch.is_autocast_enabled(device.type)
    return torch.get_autocast_dtype(device.type) if on else torch.float32


def ctc_classes(token_ids, token_mask, vocab_size, num_classes):
    """The vocabulary rows one CTC step scores when it scores num_classes of them, not all: every
    token of the batch's transcripts, then rows drawn uniformly from the rest up to num_classes
    (fresh each step, from torch's seeded generator). Returns the row ids [C] and what to add to
    each row's logit: 0 for a transcript's token, log(rest / drawn) for a drawn row, which stands
    for that many rows, so that the drawn rows' sum estimates the whole rest's (sampled softmax)."""
    targets = token_ids[token_mask].unique()
    rest = torch.ones(vocab_size, dtype=torch.bool, device=token_ids.device)
    rest[targets] = False
    rest = rest.nonzero().squeeze(1)
    drawn = rest[
        torch.randperm(len(rest), device=rest.device)[: max(0, num_classes - len(targets))]
    ]
    log_weight = torch.zeros(len(targets) + len(drawn), device=token_ids.device)
    log_weight[len(targets) :] = math.log(len(rest) / max(1, len(drawn)))
    return torch.cat([targets, drawn]), log_weight


def ctc_alignment_loss(
    speech, speech_mask, token_ids, token_mask, embedding_table, blank, temperature=0.05,
    num_classes=0, keep_logits=False,
):  # fmt: skip
    """CTC loss of the transcripts' tokens [B, T] (mask [B, T]) given the projector outputs
    [B, S, D] (mask [B, S], valid positions first): PyTorch's 'mean', each utterance's loss divided
    by its target length, then averaged. A transcript with more tokens than speech positions cannot
    align: 0, not inf. Under autocast the product with the vocabulary runs in its dtype, as an
    LLM's output layer does; the rest stays float32. num_classes > 0 scores that many rows of the
    table, not all of them (ctc_classes): a step costs in proportion to the rows it scores.
    keep_logits: return (loss, the logits [B, S, C + 1]), for compression to reuse."""
    rows, log_weight = None, None
    if 0 < num_classes < len(embedding_table):
        rows, log_weight = ctc_classes(token_ids, token_mask, len(embedding_table), num_classes)
        position = torch.zeros(len(embedding_table), dtype=torch.long, device=rows.device)
        position[rows] = torch.arange(len(rows), device=rows.device)
        token_ids = position[token_ids]  # vocabulary ids -> ids among the rows scored
        log_weight = F.pad(log_weight, (0, 1))  # the blank stands for itself
    logits = ctc_logits(
        speech, embedding_table, blank, temperature, autocast_dtype(speech.device), rows
    )
    if log_weight is not None:
        logits = logits.float() + log_weight
    log_probs = logits.log_softmax(-1, dtype=torch.float32)
    lengths, target_lengths = speech_mask.sum(-1), token_mask.sum(-1)
    loss = F.ctc_loss(log_probs.transpose(0, 1), token_ids, lengths, target_lengths,
                      blank=logits.shape[-1] - 1, zero_infinity=True)  # fmt: skip
    return (loss, logits) if keep_logits else loss


# -----------------------------------------------------------------------------
# Readout and compression


def ctc_runs(path, blank_id):
    """One best path (class ids; -1 = padding) -> [(token id, start, end)]: CTC's collapse (repeats
    merged, blanks dropped), keeping where each token's run sits."""
    runs, previous = [], None
    for i, c in enumerate(path):
        if c not in (blank_id, -1):
            if c == previous:
                runs[-1][2] = i + 1
            else:
                runs.append([c, i, i + 1])
        previous = c
    return [tuple(run) for run in runs]


@torch.no_grad()
def ctc_paths(speech, speech_mask, embedding_table, blank, logits=None):
    """The best class of every position as lists, -1 at padding (the temperature cannot change
    it). logits: the float32 logits over every row already computed for these positions (the CTC
    loss's), to read the paths off instead of scoring the vocabulary again."""
    if logits is None:
        logits = ctc_logits(speech, embedding_table, blank)
    return logits.argmax(-1).masked_fill(~speech_mask, -1).tolist()


def ctc_readout(speech, speech_mask, embedding_table, blank):
    """Greedy CTC decoding: one list of token ids per utterance (decode it with the LLM's
    tokenizer)."""
    paths = ctc_paths(speech, speech_mask, embedding_table, blank)
    return [[token for token, _, _ in ctc_runs(path, len(embedding_table))] for path in paths]


def ctc_compress(speech, speech_mask, embedding_table, blank, logits=None):
    """About one vector per token: blank positions dropped, each run of one token replaced by the
    mean of its vectors (the gradient reaches all of them). Returns (speech [B, S', D], mask
    [B, S']), valid positions first. An utterance with no token keeps the mean of its positions, so
    no row is empty. logits: as ctc_paths."""
    rows = []
    for b, path in enumerate(ctc_paths(speech, speech_mask, embedding_table, blank, logits)):
        runs = ctc_runs(path, len(embedding_table))
        if runs:
            rows.append(torch.stack([speech[b, start:end].mean(0) for _, start, end in runs]))
        else:
            rows.append(speech[b][speech_mask[b]].mean(0, keepdim=True))
    lengths = torch.tensor([len(row) for row in rows], device=speech.device)
    compressed = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    return compressed, torch.arange(compressed.shape[1], device=speech.device)[None] < lengths[
        :, None
    ]


# -----------------------------------------------------------------------------
# What the scripts call


def temperature_of(model):
    """The temperature the projector's alignment was trained with (meta.json's additions)."""
    return model.additions.get("ctc", {}).get("temperature", 0.05)


def loss(model, speech, speech_mask, batch, temperature=0.05, num_classes=0, keep_logits=False):
    """The alignment's loss for a collated batch (its transcripts' tokens: batch["text_ids"])."""
    table, blank = embedding_table(model), unwrap(model.projector).blank
    ids, mask = batch["text_ids"], batch["text_mask"]
    return ctc_alignment_loss(
        speech, speech_mask, ids, mask, table, blank, temperature, num_classes, keep_logits
    )


def compress(model, speech, speech_mask, logits=None):
    """What the LLM reads with --compress: about one vector per token (ctc_compress)."""
    table, blank = embedding_table(model), unwrap(model.projector).blank
    return ctc_compress(speech, speech_mask, table, blank, logits)


@torch.no_grad()
def read_out(model, batch):
    """What the projector spells, without the LLM: each output's nearest token embedding or the
    blank, collapsed as CTC does (greedy), decoded to text. One string per utterance."""
    was_training = model.training
    speech, speech_mask = model.eval().encode_speech(batch)
    model.train(was_training)
    ids = ctc_readout(speech, speech_mask, embedding_table(model), add_blank(model, trains=False))
    return [model.tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in ids]


def setup_pretrain(model, args):
    """pretrain.py --loss ...ctc: the blank trains with the projector; meta.json records the
    alignment (evaluate.py then decodes ASR jointly)."""
    add_blank(model)
    model.additions["ctc"] = {"temperature": args.ctc_temperature}


def pretrain_term(model, speech, speech_mask, batch, args):
    """stage 1's CTC term, weighted, and what to log of it."""
    ctc = loss(model, speech, speech_mask, batch, args.ctc_temperature, args.ctc_classes)
    return args.ctc_weight * ctc, {"ctc": ctc.item()}


def print_read_out(model, rows, collate, device, write, autocast=contextlib.nullcontext):
    """At a dev evaluation: what the projector spells so far for two dev utterances. autocast():
    the run's context, around the model only (the log-mel must stay float32)."""
    batch = to_device(collate(rows[:2]), device)
    with autocast():
        heard = read_out(model, batch)
    for row, text in zip(rows[:2], heard):
        write(f"  said: {row['text']}\n  read: {text}")


def finetune_inputs(model, speech, speech_mask, batch, args, with_ctc=True):
    """stage 2 with --ctc-weight and/or --compress: (the weighted CTC term, what the LLM reads)."""
    term, logits = 0.0, None
    if with_ctc and args.ctc_weight:
        ctc, logits = loss(
            model, speech, speech_mask, batch, args.ctc_temperature, args.ctc_classes, True
        )
        term = args.ctc_weight * ctc
        every_row = logits.shape[-1] == len(embedding_table(model)) + 1
        # compression reads its paths off the loss's logits where they score every row in float32
        logits = logits.detach() if every_row and logits.dtype == torch.float32 else None
    if args.compress:
        speech, speech_mask = compress(model, speech, speech_mask, logits)
    return term, speech, speech_mask


def evaluate_readout(model, rows, batch_size, device, dtype):
    """The greedy CTC readout of each utterance, scored as ASR (evaluate.py --task readout).
    Meaningful for a projector trained with CTC; for any other it shows how near the LLM's own
    embeddings its outputs lie."""
    import common
    from evaluate import word_error_rates

    need_transcripts(rows, "the readout")
    collate = Collator(model.encoder.feature_extractor)
    hypotheses = []
    for i in range(0, len(rows), batch_size):
        batch = to_device(
            collate(rows[i : i + batch_size]), device
        )  # outside autocast: the log-mel
        with common.autocast(device, dtype):
            hypotheses += read_out(model, batch)
    outputs = [{"audio": r["audio"], "hypothesis": h, "references": [r["text"]]}
               for r, h in zip(rows, hypotheses)]  # fmt: skip
    metrics = word_error_rates(hypotheses, [row["text"] for row in rows])
    return {"task": "readout", "n": len(rows), "metrics": metrics, "outputs": outputs}
