"""
extras/joint.py: joint CTC / LLM decoding of ASR (evaluate.py --joint-ctc), an addition.

The LLM writes the transcript one token at a time, and each candidate is also scored by how likely
the projector's CTC paths (extras/ctc.py) are to begin with the prefix it makes (Watanabe et al.,
2017's hybrid CTC/attention decoding): the LLM adds its knowledge of English, the CTC side keeps it
to the words spoken. Each hypothesis scores ctc_weight * log P_ctc(prefix) + (1 - ctc_weight) *
log P_llm. At weight 0 and beam 1 it is the LLM's greedy answer (tests/extras/test_alignment.py).

    python evaluate.py --ckpt out/finetune-asr --joint-ctc 0.7 --beam 8

Sections: CTC prefix scores of one utterance | one utterance's beam (JointSearch) | the batched
search over the LLM (generate_joint) | evaluate.py's batches (joint_answers).
"""

import math

import torch

from common import unwrap
from extras.ctc import ctc_logits, embedding_table

# -----------------------------------------------------------------------------
# CTC prefix scores of one utterance. r_n / r_b [S]: the prefix's probability of having been emitted
# by position t with t itself a token (n) or a blank (b), in logs.


def ctc_empty_prefix(log_probs, blank_id):
    """The state (r_n, r_b) of the empty prefix, from log_probs [S, V + 1] of one utterance."""
    return torch.full_like(log_probs[:, 0], -math.inf), log_probs[:, blank_id].cumsum(0)


def ctc_prefix_scores(log_probs, blank_id, r_n, r_b, last, empty, candidates):
    """Extend H prefixes by each of C candidate tokens.
    log_probs [S, V + 1] (one utterance's valid positions); r_n, r_b [H, S]: the prefixes' states;
    last [H]: each prefix's last token (any value where empty [H] is True); candidates [C].
    Returns (log P(the CTC labelling starts with prefix + c) [H, C], r_n [H, C, S], r_b [H, C, S])."""
    x_c = log_probs[:, candidates].T  # [C, S]
    x_blank = log_probs[:, blank_id]  # [S]
    # a repeat of the last token needs a blank between the two: its r_n path cannot continue
    repeat = candidates[None, :] == last[:, None]  # [H, C]
    phi = torch.logaddexp(r_b[:, None], r_n[:, None].masked_fill(repeat[..., None], -math.inf))
    S = len(log_probs)
    new_n = torch.full((len(r_n), len(candidates), S), -math.inf, device=log_probs.device)
    new_b = torch.full_like(new_n, -math.inf)
    new_n[:, :, 0] = torch.where(empty[:, None], x_c[None, :, 0], -math.inf)
    for t in range(1, S):
        new_n[:, :, t] = torch.logaddexp(new_n[:, :, t - 1], phi[:, :, t - 1]) + x_c[None, :, t]
        new_b[:, :, t] = torch.logaddexp(new_b[:, :, t - 1], new_n[:, :, t - 1]) + x_blank[t]
    # c first emitted at position t, after the prefix ended before t; anything may follow
    starts = torch.cat([new_n[:, :, :1], phi[:, :, :-1] + x_c[None, :, 1:]], dim=-1)
    return starts.logsumexp(-1), new_n, new_b


def ctc_final_scores(r_n, r_b):
    """log P(the CTC labelling is exactly the prefix) [H]: the prefix ends the utterance."""
    return torch.logaddexp(r_n[:, -1], r_b[:, -1])


def ctc_candidates(log_probs, blank_id, per_position=10):
    """The tokens joint decoding considers for one utterance: the `per_position` most probable at
    any position (a token outside them has a CTC prefix probability too small to win)."""
    top = log_probs.topk(per_position, dim=-1).indices.unique()
    return top[top != blank_id]


# -----------------------------------------------------------------------------
# One utterance's beam


class JointSearch:
    """One utterance's side of the joint CTC / LLM beam search (generate_joint): its CTC
    log-probabilities [S, V + 1], the tokens it considers (the `per_position` most probable under
    CTC at any position: ctc_candidates; the end of turn is scored as the end), its live
    hypotheses with their CTC prefix states, and the finished ones."""

    def __init__(self, log_probs, blank_id, eot, cap, per_position=10):
        self.log_probs, self.blank_id, self.eot, self.cap = log_probs, blank_id, eot, cap
        candidates = ctc_candidates(log_probs, blank_id, per_position)
        self.candidates = candidates[candidates != eot]
        self.r_n, self.r_b = (r[None] for r in ctc_empty_prefix(log_probs, blank_id))
        self.tokens, self.scores, self.ctc_scores = [[]], torch.zeros(1), torch.zeros(1)
        self.finished = []  # (score, tokens)

    def step(self, llm_lp, ctc_weight, beam):
        """Extend every live hypothesis by every candidate, or end it, given the LLM's next-token
        log-probabilities for each [H, V]; keep the best `beam`. Returns which of the H hypotheses
        the new live ones grew from, in their order (none: the search is over)."""
        last = torch.tensor([t[-1] if t else -1 for t in self.tokens])
        empty = torch.tensor([not t for t in self.tokens])
        prefix, new_n, new_b = ctc_prefix_scores(
            self.log_probs, self.blank_id, self.r_n, self.r_b, last, empty, self.candidates
        )
        ends = ctc_final_scores(self.r_n, self.r_b)
        # [H, C + 1]: each hypothesis extended by each candidate, then ended
        llm_part = torch.cat([llm_lp[:, self.candidates], llm_lp[:, self.eot, None]], 1)
        ctc_part = torch.cat([prefix, ends[:, None]], 1) - self.ctc_scores[:, None]
        total = self.scores[:, None] + (1 - ctc_weight) * llm_part
        if ctc_weight:  # (0 x an impossible prefix's -inf would be nan)
            total = total + ctc_weight * ctc_part
        keep = []
        for flat in total.flatten().topk(min(beam, total.numel())).indices.tolist():
            h, c = divmod(flat, total.shape[1])
            if c == len(self.candidates):
                self.finished.append((total[h, c].item(), self.tokens[h]))
            else:
                keep.append((h, c))
        alive_best = max((total[h, c].item() for h, c in keep), default=-math.inf)
        # every step only lowers a score: no live hypothesis can overtake a finished better one
        if not keep or (self.finished and max(self.finished)[0] >= alive_best):
            return []
        rows, cols = torch.tensor([h for h, _ in keep]), torch.tensor([c for _, c in keep])
        self.tokens = [self.tokens[h] + [self.candidates[c].item()] for h, c in keep]
        self.scores, self.ctc_scores = total[rows, cols], prefix[rows, cols]
        self.r_n, self.r_b = new_n[rows, cols], new_b[rows, cols]
        if (
            len(self.tokens[0]) >= self.cap
        ):  # the cap: the best live hypothesis stands if none ended
            return []
        return rows.tolist()

    def result(self):
        """(the best hypothesis's token ids, "end"), or at the cap with none finished the best live
        one's, "cap")."""
        if not self.finished:
            return self.tokens[0], "cap"
        return max(self.finished)[1], "end"


# -----------------------------------------------------------------------------
# The batched search over the LLM


@torch.no_grad()
def generate_joint(model, batch, instructions, ctc_weight, beam=4, max_new_tokens=200,
                   per_position=10):  # fmt: skip
    """Joint CTC / LLM beam search for every utterance of a collated batch, the CTC side from the
    utterance's projector outputs over the embedding table, the LLM side reading them as generate()
    does. Each utterance keeps its own beam (JointSearch); one LLM forward a step extends every live
    hypothesis of every utterance (the LLM's weights are read once a step, however many rows;
    docs/speed.md). max_new_tokens: one cap, or one per utterance. Returns (texts, why each ended:
    "end" or "cap")."""
    from extras.ctc import compress, temperature_of

    speech, speech_mask = model.encode_speech(batch)
    table, eot = embedding_table(model), model.prompt_ids(instructions[0])[2]
    blank = unwrap(model.projector).blank
    caps = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(speech)
    searches = []
    for i, cap in enumerate(caps):
        logits = ctc_logits(speech[i, speech_mask[i]], table, blank, temperature_of(model))
        log_probs = logits.log_softmax(-1).cpu()  # a few positions: the CTC side runs on the CPU
        searches.append(JointSearch(log_probs, len(table), eot, cap, per_position))

    if model.additions.get("compress"):
        speech, speech_mask = compress(model, speech, speech_mask)
    embeds, mask, _ = model.chat_batch(speech, speech_mask, instructions)
    mask = mask.long()
    # left padding: each row counts its positions from its own first token
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model.llm(inputs_embeds=embeds.to(model.llm.dtype), attention_mask=mask,
                    position_ids=positions, use_cache=True, logits_to_keep=1)  # fmt: skip
    cache, position = out.cache, positions[:, -1]
    owners = list(range(len(searches)))  # the search each LLM row extends, in row order
    while True:
        llm_lp = out.logits[:, -1].float().log_softmax(-1).cpu()
        rows, tokens, new_owners = [], [], []
        for i in sorted(set(owners)):  # each search sees its own rows, extends and prunes them
            mine = [r for r, owner in enumerate(owners) if owner == i]
            kept = searches[i].step(llm_lp[mine], ctc_weight, beam)
            rows += [mine[h] for h in kept]  # the rows the kept hypotheses grew from
            tokens += [hypothesis[-1] for hypothesis in searches[i].tokens[: len(kept)]]
            new_owners += [i] * len(kept)
        if not rows:
            break
        rows = torch.tensor(rows, device=embeds.device)
        cache.reorder_cache(rows)
        mask = torch.cat([mask[rows], mask.new_ones(len(rows), 1)], 1)
        position, owners = position[rows] + 1, new_owners
        step = torch.tensor(tokens, device=embeds.device)[:, None]
        out = model.llm(input_ids=step, attention_mask=mask, position_ids=position[:, None],
                        cache=cache, use_cache=True)  # fmt: skip
        cache = out.cache
    decode = lambda ids: model.tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    results = [search.result() for search in searches]
    return [decode(ids) for ids, _ in results], [why for _, why in results]
