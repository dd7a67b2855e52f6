"""
contrastive.py: the paper's all-layer contrastive loss, written out by hand to be read top to
bottom, and at its end the token-level alignment this project adds beside it (CTC over the LLM's
embeddings).

The speech side (projector outputs) and the text side (the transcript's token embeddings) both go
through the frozen LLM. At a few of its hidden states ("layers") every speech utterance in the batch
is compared with every transcript, and an InfoNCE loss asks each transcript to pick out its own
utterance:

    layers   "emb" = [0] (the input embeddings only, no LLM pass needed), or "all" = 0, every 5th
             layer, and the output after the final norm: [0, 5, 10, 15, 20, 25, 32] for Llama-3.1-8B
             (32 layers). Index 0 = input embeddings, index k = output of decoder layer k, index
             num_layers = after the final norm (transformers' `hidden_states` convention).
    score    "cos":         S[i, j] = < normalize(mean_t text_i), normalize(mean_t speech_j) > / tau
             "wasserstein": S[i, j] = -SinkhornDivergence({normalized text_i tokens},
                                                           {normalized speech_j tokens}) / tau
             (means and token sets over valid positions only; padding never counts). The Sinkhorn
             divergence follows geomloss's SamplesLoss("sinkhorn", p=2, blur=0.05), which the
             authors call once per pair; here all B x B pairs are solved in one batched computation.
    loss     per layer: cross-entropy of each text ROW against the speech COLUMNS, the diagonal
             being the positive pair (text -> speech only, as the authors; symmetric=True adds
             speech -> text). total = plain sum over the layers (not the mean). tau = 0.1, fixed.

Only the speech side learns: the text side has no trainable parameter, so it is detached (and may
even be pooled once and cached: text_pooled=). All the loss math runs in float32 whatever the
model's dtype, with autocast switched off (float32_math); the one exception is the CTC's product
with the whole vocabulary, which follows autocast as an LLM's output layer does (ctc_alignment_loss).

This file is the reference: plain PyTorch, nothing in it exists for speed. contrastive_fast.py has
the same functions with the same signatures and the same numbers, faster (what pretrain.py runs
unless given --loss-impl reference); tests/test_contrastive_fast.py holds the two equal.

    import torch
    from contrastive import contrastive_loss, select_layers
    layers = select_layers("all", num_layers=32)  # [0, 5, 10, 15, 20, 25, 32]
    text, text_mask = torch.randn(7, 4, 12, 64), torch.ones(4, 12, dtype=torch.bool)  # [L, B, T, D]
    speech = torch.randn(7, 4, 50, 64, requires_grad=True)
    speech_mask = torch.ones(4, 50, dtype=torch.bool)
    total, per_layer = contrastive_loss(text, text_mask, speech, speech_mask)  # scalar, [L]
    total.backward()  # gradients reach the speech side only

Sections: which layers | masked mean pooling | centring, cosine logits and retrieval | batched
Sinkhorn divergence | InfoNCE and the full loss.
"""

import contextlib
import math

import torch
import torch.nn.functional as F


@contextlib.contextmanager
def float32_math():
    """Autocast off, as a `with` block or a decorator. Under bf16 autocast (--dtype bfloat16) even a
    product of float32 tensors runs in bf16, whose 3 significant digits would blur the pooled sums
    and the logits (cosines / 0.1)."""
    with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
        yield


# -----------------------------------------------------------------------------
# Which layers


def select_layers(spec, num_layers):
    """Hidden-state indices for a layer spec: "emb" -> [0]; "all" -> 0, every 5th index up to
    num_layers - 5, then num_layers (32 -> [0, 5, 10, 15, 20, 25, 32], the authors' hard-coded list;
    30 -> [0, 5, ..., 25, 30]; 4 -> [0, 4]); or an explicit increasing comma list such as
    "0,3,7"."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    spec = spec.strip()
    if spec == "emb":
        return [0]
    if spec == "all":
        # the authors' list skips 30 for a 32-layer model: the last "every 5th" stays >= 5 below the
        # top
        return [0] + list(range(5, num_layers - 4, 5)) + [num_layers]
    try:
        layers = [int(part) for part in spec.split(",")]
    except ValueError:
        raise ValueError(
            f"layer spec {spec!r}: expected 'emb', 'all' or a comma list of integers like '0,3,7'"
        ) from None
    if any(not 0 <= i <= num_layers for i in layers):
        raise ValueError(
            f"layer spec {spec!r}: indices must lie in 0..{num_layers} "
            f"(0 = embeddings, {num_layers} = after the final norm)"
        )
    if any(a >= b for a, b in zip(layers, layers[1:])):
        raise ValueError(f"layer spec {spec!r}: indices must be increasing and unique")
    return layers


# -----------------------------------------------------------------------------
# Masked mean pooling: the mean over the valid time steps of every selected layer


def _stacked(states):
    """The selected hidden states as one [L, B, T, D] tensor, from that tensor or from a list of L
    [B, T, D] tensors (the form transformers' output_hidden_states returns)."""
    states = torch.stack(list(states)) if isinstance(states, (list, tuple)) else states
    if states.dim() != 4:
        raise ValueError(
            "states must be [L, B, T, D] or a list of [B, T, D] tensors, "
            f"got shape {tuple(states.shape)}"
        )
    return states


@float32_math()
def masked_mean(states, mask):
    """Mean over the valid time steps, every layer at once: states [L, B, T, D] (or a list of L
    [B, T, D]), bool mask [B, T] (True = counts) -> float32 [L, B, D]. Padding is replaced by 0
    before the sum, so whatever it holds never counts; a row with no valid step pools to 0 instead
    of NaN."""
    states = _stacked(states)
    if mask.shape != states.shape[1:3]:
        raise ValueError(
            f"mask {tuple(mask.shape)} does not match states [B, T] = {tuple(states.shape[1:3])}"
        )
    kept = torch.where(mask[:, :, None], states.float(), 0.0)  # [L, B, T, D]
    count = mask.sum(1, keepdim=True).clamp(min=1)  # [B, 1]
    return kept.sum(2) / count


# -----------------------------------------------------------------------------
# Centring, cosine logits ("cos" in the authors' run names, "average" in their code) and retrieval


def center_pooled(pooled, mean=None):
    """Pooled states [L, N, D] minus a per-layer mean [L, D], by default their own mean over the N
    items. The pooled states of an LLM share a large common direction that makes every cosine close
    to 1; subtracting it leaves what tells the items apart (the demo's --center)."""
    mean = pooled.mean(1) if mean is None else mean.to(pooled)
    return pooled - mean[:, None]


def cos_logits(text_pooled, speech_pooled, temperature=0.1, center=False):
    """[L, B, B] cosine similarities / temperature between UNnormalised pooled states [L, B, D]:
    rows = text, columns = speech. center: False (the paper) | True (each side minus its own batch
    mean per layer) | (text_mean, speech_mean), each [L, D] (minus given means: the training means
    stored by --center, which a single retrieval query needs, having no set to average over)."""
    t, s = text_pooled.float(), speech_pooled.float()
    if center is True:
        t, s = center_pooled(t), center_pooled(s)
    elif center is not False and center is not None:
        t, s = center_pooled(t, center[0]), center_pooled(s, center[1])
    return F.normalize(t, dim=-1) @ F.normalize(s, dim=-1).transpose(1, 2) / temperature


def retrieval_r1(logits):
    """Speech -> text R@1 per layer from logits [L, N, N] with rows = text and columns = speech (as
    cos_logits and contrastive_loss return them): the fraction of speech columns whose best-scoring
    text row is their own transcript. Tensor[L]; chance = 1/N. From pooled states:
    retrieval_r1(cos_logits(t, s))."""
    target = torch.arange(logits.shape[-1], device=logits.device)
    return (logits.argmax(1) == target).float().mean(-1)


def retrieval_table(text_pooled, speech_pooled, centers=None):
    """Speech -> text R@1 per layer [L] of pooled pairs [L, N, D]: plain, centred by the set's own
    means, and, given the stored training means (text, speech) [L, D], centred by those (what one
    query can use)."""
    table = {"plain": retrieval_r1(cos_logits(text_pooled, speech_pooled)),
             "centred": retrieval_r1(cos_logits(text_pooled, speech_pooled, center=True))}  # fmt: skip
    if centers is not None:
        table["centred_train"] = retrieval_r1(
            cos_logits(text_pooled, speech_pooled, center=centers)
        )
    return table


# -----------------------------------------------------------------------------
# Batched Sinkhorn divergence ("wasserstein" / "wasser" in the authors' code, which calls geomloss's
# SamplesLoss("sinkhorn", p=2, blur=0.05) once per (text, speech) pair)
#
# Each token set is a uniform measure over its valid tokens. As geomloss: the cost is C(x, y) =
# |x - y|^2 / 2 and the solver is the symmetric log-domain Sinkhorn loop with epsilon-scaling: the
# entropic temperature eps starts at diameter^2 and shrinks by scaling^2 per iteration down to
# blur^2, and each iteration averages the old and the new dual potentials. The divergence is
# debiased, so that S(a, a) = 0:
#     S(a, b) = OT(a, b) - OT(a, a) / 2 - OT(b, b) / 2,
#     OT(a, b) = <a, f> + <b, g>  (f, g: the potentials)
# Gradients, as geomloss: the loop runs without autograd, then one last Sinkhorn step from the
# frozen potentials is differentiated (at the optimum the potentials' own variation does not change
# the value: the envelope theorem). In that step x is seen only through f and y only through g,
# hence the detach()es.


def _epsilon_schedule(diameter, blur, scaling):
    """eps for each iteration (p = 2): diameter^2, then diameter^2 * scaling^(2k) while above
    blur^2, then blur^2. Few iterations (8-12 for unit vectors): the annealing is what makes them
    enough."""
    start, stop, step = 2 * math.log(diameter), 2 * math.log(blur), 2 * math.log(scaling)
    n = max(0, math.ceil((stop - start) / step))
    return [diameter**2] + [math.exp(start + k * step) for k in range(n)] + [blur**2]


def _diameter(x, x_mask, y, y_mask):
    """Diagonal of the bounding box of all valid points, x and y together (geomloss' starting
    scale); with leading dimensions (layers), the largest one, so that one schedule serves them
    all."""
    points = torch.cat([x[..., x_mask, :], y[..., y_mask, :]], -2)  # [..., valid tokens, D]
    return (points.amax(-2) - points.amin(-2)).norm(dim=-1).max().item()


def _log_weights(mask):
    """Uniform weights over the valid tokens, as logs: log(1/n) there, -inf at padding (weight
    0)."""
    n = mask.sum(1, keepdim=True).float()
    return torch.where(mask, -n.log(), float("-inf"))


def _half_sq_dist(x, y):
    """C[..., n, m] = |x[..., n, :] - y[..., m, :]|^2 / 2 for x [..., N, D] and y [..., M, D]
    (leading dimensions broadcast), from one matrix product: |x|^2 / 2 + |y|^2 / 2 - <x, y>."""
    return (x.pow(2).sum(-1)[..., :, None] + y.pow(2).sum(-1)[..., None, :]) / 2 - x @ y.transpose(
        -1, -2
    )


def _softmin(eps, C, h):
    """The soft minimum over the last axis of C [..., N, M]:
    -eps * log sum_m exp(h[..., m] - C[..., n, m] / eps), with h = the other side's log-weights +
    its potential / eps."""
    return -eps * torch.logsumexp(h[..., None, :] - C / eps, dim=-1)


def _entropic_ot(x, a_log, y, b_log, eps_list):
    """OT(a, b) = <a, f> + <b, g> between the token sets x [..., N, D] with log-weights a_log
    [..., N] and y [..., M, D] with b_log [..., M]; leading dimensions broadcast (all pairs of sets,
    all layers)."""
    # [..., N, M], [..., M, N]
    C_xy, C_yx = _half_sq_dist(x, y.detach()), _half_sq_dist(y, x.detach())
    with torch.no_grad():
        f, g = _softmin(eps_list[0], C_xy, b_log), _softmin(eps_list[0], C_yx, a_log)
        # both new potentials from the old ones, each averaged with its old value
        for eps in eps_list:
            f, g = (
                (f + _softmin(eps, C_xy, b_log + g / eps)) / 2,
                (g + _softmin(eps, C_yx, a_log + f / eps)) / 2,
            )
    eps = eps_list[-1]
    # the differentiated step
    f, g = _softmin(eps, C_xy, b_log + g / eps), _softmin(eps, C_yx, a_log + f / eps)
    return (a_log.exp() * f).sum(-1) + (b_log.exp() * g).sum(-1)


def sinkhorn_divergence(x, x_mask, y, y_mask, blur=0.05, scaling=0.5, diameter=None):
    """Debiased Sinkhorn divergence between every pair of token sets: x [..., Bx, N, D] with bool
    x_mask [Bx, N] against y [..., By, M, D] with y_mask [By, M] (any padding pattern); leading
    dimensions (the layers) share the masks. Returns [..., Bx, By] (float32 if the inputs are).
    Follows geomloss's SamplesLoss("sinkhorn", p=2, blur=blur, scaling=scaling); one epsilon
    schedule serves the whole batch, its diameter taken over all valid points (as geomloss does for
    a batch), unless `diameter` is given."""
    if not (x_mask.any(1).all() and y_mask.any(1).all()):
        raise ValueError("every token set needs at least one valid token")
    if diameter is None:
        diameter = _diameter(x.detach(), x_mask, y.detach(), y_mask)
    eps_list = _epsilon_schedule(diameter, blur, scaling)
    # padding: weight 0, and finite
    x, y = torch.where(x_mask[:, :, None], x, 0.0), torch.where(y_mask[:, :, None], y, 0.0)
    a_log, b_log = _log_weights(x_mask), _log_weights(y_mask)  # [Bx, N], [By, M]
    # every x set against every y set: x [..., Bx, 1, N, D] and y [..., 1, By, M, D] broadcast to
    # the pairs
    cross = _entropic_ot(
        x[..., :, None, :, :], a_log[:, None], y[..., None, :, :, :], b_log[None], eps_list
    )
    # [..., Bx]: OT(a, a) / 2, one problem per set
    self_x = _entropic_ot(x, a_log, x, a_log, eps_list) / 2
    self_y = _entropic_ot(y, b_log, y, b_log, eps_list) / 2  # [..., By]
    return cross - self_x[..., :, None] - self_y[..., None, :]


def wasserstein_logits(
    text_states, text_pool_mask, speech_states, speech_pool_mask, temperature=0.1
):
    """[L, B, B] logits -SinkhornDivergence(text_i, speech_j) / temperature per layer, every token
    vector L2-normalised first (float32), as the authors. Rows = text, columns = speech. All layers
    in one call."""
    text, speech = (F.normalize(_stacked(s).float(), dim=-1) for s in (text_states, speech_states))
    return -sinkhorn_divergence(text, text_pool_mask, speech, speech_pool_mask) / temperature


# -----------------------------------------------------------------------------
# InfoNCE and the full loss


def info_nce(logits, symmetric=False):
    """Per-layer InfoNCE, Tensor[L]: cross-entropy of every text row against the speech columns with
    its own speech (the diagonal) as the target. symmetric=True averages it with the speech -> text
    direction."""
    text_to_speech = -logits.log_softmax(-1).diagonal(dim1=1, dim2=2).mean(-1)
    if not symmetric:
        return text_to_speech
    speech_to_text = -logits.log_softmax(-2).diagonal(dim1=1, dim2=2).mean(-1)
    return (text_to_speech + speech_to_text) / 2


def _check_loss_arguments(sim, text_states, text_pool_mask, text_pooled, speech_states):
    """ValueError for a contrastive_loss call that cannot mean anything."""
    if sim not in ("cos", "wasserstein"):
        raise ValueError(f"sim must be 'cos' or 'wasserstein', got {sim!r}")
    if text_pooled is not None and (text_states is not None or text_pool_mask is not None):
        raise ValueError(
            "give the text side once: text_states with text_pool_mask, "
            "or text_pooled (then both None)"
        )
    if sim == "wasserstein" and text_pooled is not None:
        raise ValueError(
            "sim='wasserstein' compares token sets: "
            "it needs text_states and text_pool_mask, not text_pooled"
        )
    if len(text_states if text_pooled is None else text_pooled) != len(speech_states):
        raise ValueError("the text and the speech side need the same number of layers")


@float32_math()
def contrastive_loss(
    text_states,
    text_pool_mask,
    speech_states,
    speech_pool_mask,
    sim="cos",
    temperature=0.1,
    symmetric=False,
    center=False,
    return_logits=False,
    text_pooled=None,
    pool=masked_mean,
    wasserstein=wasserstein_logits,
):
    """The paper's loss summed over layers. *_states: [L, B, T, D] or a list of L [B, T, D] (any
    dtype); *_pool_mask: bool [B, T], True at the positions that count. sim: "cos" | "wasserstein";
    center: see cos_logits (cos only). Returns (total, per_layer [L]), and the logits [L, B, B] too
    when return_logits. The text side never gets a gradient.
    text_pooled: the text side already pooled, float32 [L, B, D] as masked_mean returns it, given
    INSTEAD of text_states and text_pool_mask (pass None for both); cos only (pretrain.py caches it
    per transcript).
    pool, wasserstein: drop-ins for masked_mean and wasserstein_logits with the same numbers
    (pretrain.py passes contrastive_fast.py's, faster)."""
    _check_loss_arguments(sim, text_states, text_pool_mask, text_pooled, speech_states)
    if sim == "cos":
        if text_pooled is None:
            with torch.no_grad():  # the text side has nothing to train: no graph, no gradient
                text_pooled = pool(text_states, text_pool_mask)
        logits = cos_logits(
            text_pooled.detach(), pool(speech_states, speech_pool_mask), temperature, center
        )
    else:
        logits = wasserstein(
            _stacked(text_states).detach(),
            text_pool_mask,
            speech_states,
            speech_pool_mask,
            temperature,
        )
    per_layer = info_nce(logits, symmetric)
    total = per_layer.sum()  # a plain sum over layers, as the authors (not a mean)
    return (total, per_layer, logits) if return_logits else (total, per_layer)
