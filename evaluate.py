"""
evaluate.py: score a trained projector.

    python evaluate.py --ckpt out/pretrain --task retrieval      # speech->text R@1 per contrastive layer
"""

import torch

from contrastive import masked_mean
from data import Collator, to_device

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
            speech, speech_mask, speech_pool, text, text_mask, text_pool = model.contrastive_inputs(batch)
            speech_pooled.append(masked_mean(model.hidden_states(speech, speech_mask, layers), speech_pool))
            text_pooled.append(masked_mean(model.hidden_states(text, text_mask, layers), text_pool))
    model.train(was_training)
    return torch.cat(text_pooled, 1), torch.cat(speech_pooled, 1)


def retrieval_r1(text_pooled, speech_pooled, center=False):
    """Speech->text R@1 per layer from pooled [L, N, D] states (cosine similarity; chance = 1/N).
    center=True first subtracts each side's mean over the N items (for models trained with --center)."""
    if center:
        text_pooled = text_pooled - text_pooled.mean(1, keepdim=True)
        speech_pooled = speech_pooled - speech_pooled.mean(1, keepdim=True)
    t = torch.nn.functional.normalize(text_pooled.float(), dim=-1)
    s = torch.nn.functional.normalize(speech_pooled.float(), dim=-1)
    nearest = (s @ t.transpose(1, 2)).argmax(-1)  # [L, N]: for each utterance, the closest transcript
    return (nearest == torch.arange(s.shape[1], device=s.device)).float().mean(-1)
