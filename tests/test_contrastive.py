"""Tests of contrastive.py against obviously-correct slow references (CPU, a few seconds).

    python -m pytest -q tests/test_contrastive.py

The references are written like the authors' code: unpad each example, mean, normalise, similarity matrix,
cross-entropy with the diagonal as targets, one layer at a time; geomloss per (text, speech) pair.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import contrastive as C
from contrastive import (contrastive_loss, cos_logits, info_nce, masked_mean, pool, retrieval_accuracy,
                         select_layers, sinkhorn_divergence, wasserstein_logits)

# -----------------------------------------------------------------------------
# Random ragged batches and the slow references


def ragged(L=3, B=4, T=10, D=16, min_len=1, seed=0, dtype=torch.float32, grad=False):
    """L layers of [B, T, D] states (a list, like transformers' hidden_states) and a right-padded bool mask
    with random lengths in [min_len, T]; the last example has exactly one valid position."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, T + 1, (B,), generator=g)
    lengths[-1] = 1
    mask = torch.arange(T)[None, :] < lengths[:, None]
    layers = [torch.randn(B, T, D, generator=g).to(dtype).requires_grad_(grad) for _ in range(L)]
    return layers, mask


def authors_cos(text_layers, text_mask, speech_layers, speech_mask, temperature=0.1, symmetric=False, center=False):
    """Per layer: unpad every example, mean over its tokens, L2-normalise, similarity / temperature,
    cross-entropy over the speech columns with the diagonal as targets. Returns (sum, per-layer list)."""
    per_layer = []
    for text, speech in zip(text_layers, speech_layers):
        t = torch.stack([x[m].float().mean(0) for x, m in zip(text.detach(), text_mask)])
        s = torch.stack([x[m].float().mean(0) for x, m in zip(speech, speech_mask)])
        if center:
            t, s = t - t.mean(0), s - s.mean(0)
        sim = F.normalize(t, dim=1) @ F.normalize(s, dim=1).T / temperature
        target = torch.arange(len(sim))
        loss = F.cross_entropy(sim, target)
        if symmetric:
            loss = (loss + F.cross_entropy(sim.T, target)) / 2
        per_layer.append(loss)
    return sum(per_layer), per_layer


def all_layers_diameter(text_layers, text_mask, speech_layers, speech_mask):
    """The diameter that starts the batched call's epsilon schedule: over all layers' normalised tokens."""
    t, s = (F.normalize(torch.stack(list(x)).detach().float(), dim=-1) for x in (text_layers, speech_layers))
    return C._diameter(t, text_mask, s, speech_mask)


def pairwise_sinkhorn(text_layers, text_mask, speech_layers, speech_mask, temperature=0.1):
    """Logits from one sinkhorn_divergence call per (layer, text, speech) pair, with the same epsilon
    schedule as the batched call (same diameter, the largest over the layers), so the two must agree to
    rounding."""
    diameter = all_layers_diameter(text_layers, text_mask, speech_layers, speech_mask)
    logits = []
    for text, speech in zip(text_layers, speech_layers):
        t, s = F.normalize(text.detach().float(), dim=-1), F.normalize(speech.float(), dim=-1)
        rows = [torch.cat([sinkhorn_divergence(t[i:i + 1], text_mask[i:i + 1], s[j:j + 1], speech_mask[j:j + 1],
                                               diameter=diameter)[0] for j in range(len(s))]) for i in range(len(t))]
        logits.append(-torch.stack(rows) / temperature)
    return torch.stack(logits)


def close(a, b, rtol=1e-5, atol=1e-6):
    return torch.allclose(a, b, rtol=rtol, atol=atol)


# -----------------------------------------------------------------------------
# Layer selection


@pytest.mark.parametrize("spec, num_layers, expected", [
    ("all", 32, [0, 5, 10, 15, 20, 25, 32]),  # the authors' hard-coded list for Llama-3.1-8B
    ("all", 30, [0, 5, 10, 15, 20, 25, 30]),  # SmolLM2-135M
    ("all", 10, [0, 5, 10]),
    ("all", 4, [0, 4]),
    ("all", 1, [0, 1]),
    ("emb", 32, [0]),
    ("0,3,7", 10, [0, 3, 7]),
    (" 2, 10 ", 10, [2, 10]),
    ("5", 5, [5]),
])
def test_select_layers(spec, num_layers, expected):
    assert select_layers(spec, num_layers) == expected


@pytest.mark.parametrize("spec, num_layers", [
    ("0,11", 10), ("-1,2", 10), ("3,1", 10), ("0,0", 10), ("a,b", 10), ("", 10), ("all,5", 10), ("0,,3", 10), ("all", 0),
])
def test_select_layers_rejects_bad_specs(spec, num_layers):
    with pytest.raises(ValueError):
        select_layers(spec, num_layers)


# -----------------------------------------------------------------------------
# Pooling


def test_masked_mean_list_stacked_and_loop():
    layers, _ = ragged(L=2, B=5, T=7)
    mask = torch.rand(5, 7, generator=torch.Generator().manual_seed(1)) < 0.5  # holes, not just right padding
    mask[:, 3] = True
    mask[0] = False
    mask[0, 6] = True  # a single valid position at the end
    out = masked_mean(layers, mask)
    assert out.shape == (2, 5, 16) and out.dtype == torch.float32
    assert torch.equal(out, masked_mean(torch.stack(layers), mask))
    ref = torch.stack([torch.stack([h[b][mask[b]].mean(0) for b in range(5)]) for h in layers])
    assert close(out, ref)
    assert torch.equal(out[:, 0], torch.stack(layers)[:, 0, 6])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_mean_of_runs_reads_only_the_runs(dtype):
    """Masks whose valid steps form one run per row (right padding; the sink position dropped; an empty
    row) take the span path: the values and gradients of the slow loop, and padding is never read."""
    layers, mask = ragged(L=3, B=5, T=9, dtype=dtype, seed=23)
    mask[1, 0] = False  # a run that starts later (the sink token left out of the pool)
    mask[2] = False  # no valid step
    assert C._valid_spans(mask) is not None
    states = torch.stack(layers).requires_grad_()
    poisoned = states.detach().clone()
    poisoned[:, ~mask] = float("nan")  # padding that is read would show
    assert not masked_mean(poisoned, mask).isnan().any()
    out = masked_mean(states, mask)
    assert out.dtype == torch.float32 and torch.equal(out[:, 2], torch.zeros(3, 16))
    ref = torch.stack([torch.stack([h[b][mask[b]].float().mean(0) if mask[b].any() else torch.zeros(16) for b in range(5)])
                       for h in states.unbind(0)])
    assert close(out, ref)
    assert close(out, masked_mean([h.detach() for h in layers], mask))  # a list of layers: the same
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (grad,) = torch.autograd.grad((out * weights).sum(), states)
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), states)
    assert grad.dtype == dtype and close(grad.float(), ref_grad.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)
    assert torch.equal(grad[:, ~mask], torch.zeros_like(grad[:, ~mask]))


def test_valid_spans():
    mask = torch.tensor([[1, 1, 0], [0, 1, 1], [0, 0, 0]], dtype=torch.bool)
    assert C._valid_spans(mask) == [(0, 2), (1, 3), (0, 0)]
    assert C._valid_spans(torch.tensor([[1, 0, 1]], dtype=torch.bool)) is None  # a hole: the general path


def test_pool_normalizes_and_empty_rows_are_zero():
    layers, mask = ragged(L=2, B=3, T=5)
    mask[1] = False
    pooled = pool(layers, mask)
    assert close(pooled[:, [0, 2]].norm(dim=-1), torch.ones(2, 2))
    assert torch.equal(pooled[:, 1], torch.zeros(2, 16))  # no valid step: 0, not NaN
    assert torch.equal(pool(layers, mask, normalize=False), masked_mean(layers, mask))


def test_bad_arguments():
    layers, mask = ragged()
    with pytest.raises(ValueError):
        masked_mean(layers, mask[:, :-1])
    with pytest.raises(ValueError):
        pool(layers, mask, kernel="cuda")
    with pytest.raises(ValueError):
        contrastive_loss(layers, mask, layers, mask, sim="dot")
    with pytest.raises(ValueError):
        contrastive_loss(layers, mask, layers[:2], mask)


# -----------------------------------------------------------------------------
# The cosine loss


def test_cos_loss_matches_authors_loop_values_and_gradients():
    text, text_mask = ragged(T=9, seed=1, grad=True)
    speech, speech_mask = ragged(T=20, seed=2, grad=True)
    total, per_layer = contrastive_loss(text, text_mask, speech, speech_mask)
    ref_total, ref_per_layer = authors_cos(text, text_mask, speech, speech_mask)
    assert per_layer.shape == (3,) and close(per_layer, torch.stack(ref_per_layer))
    assert close(total, ref_total) and close(total, per_layer.sum())
    grads = torch.autograd.grad(total, speech)
    ref_grads = torch.autograd.grad(ref_total, speech)
    for g, r in zip(grads, ref_grads):
        assert close(g, r, atol=1e-7)
    # the text side is frozen: detached inside the loss, so no gradient path reaches it
    assert all(g is None for g in torch.autograd.grad(total, text, allow_unused=True))


def test_list_and_stacked_inputs_give_the_same_loss():
    text, text_mask = ragged(T=9, seed=3)
    speech, speech_mask = ragged(T=20, seed=4)
    for sim in ("cos", "wasserstein"):
        a = contrastive_loss(text, text_mask, speech, speech_mask, sim=sim)[1]
        b = contrastive_loss(torch.stack(text), text_mask, torch.stack(speech), speech_mask, sim=sim)[1]
        assert close(a, b)


@pytest.mark.parametrize("sim", ["cos", "wasserstein"])
def test_padded_positions_never_matter(sim):
    text, text_mask = ragged(T=9, seed=5)
    speech, speech_mask = ragged(T=20, seed=6)
    garbage = lambda h, m: torch.where(m[..., None], h, 1e4 * torch.randn_like(h))  # noqa: E731
    speech = [h.requires_grad_() for h in speech]
    noisy = [garbage(h, speech_mask).detach().requires_grad_() for h in speech]
    clean_loss = contrastive_loss(text, text_mask, speech, speech_mask, sim=sim)[0]
    noisy_loss = contrastive_loss([garbage(h, text_mask) for h in text], text_mask, noisy, speech_mask, sim=sim)[0]
    assert close(clean_loss, noisy_loss)
    for g_clean, g_noisy in zip(torch.autograd.grad(clean_loss, speech), torch.autograd.grad(noisy_loss, noisy)):
        assert close(g_clean, g_noisy, atol=1e-7)
        assert torch.equal(g_noisy[~speech_mask], torch.zeros_like(g_noisy[~speech_mask]))


@pytest.mark.parametrize("symmetric, center", [(True, False), (False, True), (True, True)])
def test_symmetric_and_center_match_the_reference(symmetric, center):
    text, text_mask = ragged(T=9, seed=7)
    speech, speech_mask = ragged(T=20, seed=8, grad=True)
    total, per_layer = contrastive_loss(text, text_mask, speech, speech_mask, symmetric=symmetric, center=center)
    ref_total, ref_per_layer = authors_cos(text, text_mask, speech, speech_mask, symmetric=symmetric, center=center)
    assert close(per_layer, torch.stack(ref_per_layer))
    for g, r in zip(torch.autograd.grad(total, speech), torch.autograd.grad(ref_total, speech)):
        assert close(g, r, atol=1e-7)


def test_cached_pooled_text_equals_the_full_path():
    text, text_mask = ragged(T=9, seed=9)
    speech, speech_mask = ragged(T=20, seed=10, grad=True)
    full = contrastive_loss(text, text_mask, speech, speech_mask, return_logits=True)
    cached = contrastive_loss(masked_mean(text, text_mask), None, speech, speech_mask, return_logits=True)
    for a, b in zip(full, cached):
        assert close(a, b)
    for g, r in zip(torch.autograd.grad(full[0], speech), torch.autograd.grad(cached[0], speech)):
        assert close(g, r, atol=1e-7)
    with pytest.raises(ValueError, match="wasserstein"):
        contrastive_loss(masked_mean(text, text_mask), None, speech, speech_mask, sim="wasserstein")


def test_bf16_inputs_use_float32_math():
    text, text_mask = ragged(T=9, seed=11, dtype=torch.bfloat16)
    speech, speech_mask = ragged(T=20, seed=12, dtype=torch.bfloat16, grad=True)
    as_fp32 = [h.detach().float().requires_grad_() for h in speech]
    for sim in ("cos", "wasserstein"):
        total, per_layer, logits = contrastive_loss(text, text_mask, speech, speech_mask, sim=sim, return_logits=True)
        assert total.dtype == per_layer.dtype == logits.dtype == torch.float32
        ref = contrastive_loss([h.float() for h in text], text_mask, as_fp32, speech_mask, sim=sim)[0]
        assert close(total, ref)  # the same numbers as casting the inputs up front: no bf16 arithmetic
        grads = torch.autograd.grad(total, speech)
        assert all(g.dtype == torch.bfloat16 for g in grads)
        for g, r in zip(grads, torch.autograd.grad(ref, as_fp32)):
            assert close(g.float(), r.bfloat16().float(), rtol=1e-2, atol=1e-6)


# -----------------------------------------------------------------------------
# The Sinkhorn divergence and the Wasserstein loss


def test_sinkhorn_basic_properties():
    x, x_mask = ragged(L=1, B=3, T=8, D=8, min_len=2, seed=13)
    x = F.normalize(x[0], dim=-1)
    S = sinkhorn_divergence(x, x_mask, x, x_mask)
    assert S.shape == (3, 3)
    assert S.diagonal().abs().max() < 1e-4  # S(a, a) = 0: that is what debiasing buys
    assert close(S, S.T, atol=1e-4)  # symmetric up to the solver's convergence
    assert (S[~torch.eye(3, dtype=torch.bool)] > 0.1).all()
    with pytest.raises(ValueError):
        empty = x_mask.clone()
        empty[0] = False
        sinkhorn_divergence(x, empty, x, x_mask)


def test_logsumexp_read_off_log_softmax_equals_torch():
    z = 500 * torch.randn(4, 6, 50, generator=torch.Generator().manual_seed(21))  # terms hundreds apart
    z[..., 7:] = float("-inf")  # padding (packed to the right: the first entry stays finite)
    assert close(C._logsumexp(z, -1), torch.logsumexp(z.double(), -1).float(), rtol=0, atol=1e-4)  # ~ulp(500)
    assert close(C._logsumexp(z.transpose(1, 2), 1), torch.logsumexp(z.double(), -1).float(), rtol=0, atol=1e-4)


def test_buckets_hold_every_sets_valid_tokens_first_in_order():
    x = torch.arange(2 * 3 * 5 * 1, dtype=torch.float).view(2, 3, 5, 1)  # [layers, sets, steps, D]
    mask = torch.tensor([[0, 1, 0, 1, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    buckets = C._buckets(x, mask, waste=1.0)  # one bucket per length: sets 2 (1 token), 0 (2), 1 (3)
    assert [group for group, _, _ in buckets] == [[2], [0], [1]]
    assert [xb[1, :, :, 0].tolist() for _, xb, _ in buckets] == [[[29]], [[16, 18]], [[20, 21, 22]]]
    group, xb, mb = C._buckets(x, mask, waste=float("inf"))[0]  # all in one: padding repeats the first token
    assert group == [2, 0, 1] and mb.tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert xb[1, :, :, 0].tolist() == [[29, 29, 29], [16, 18, 16], [20, 21, 22]]


def test_wasserstein_batched_equals_a_per_pair_loop():
    text, text_mask = ragged(T=9, D=12, seed=14)
    speech, speech_mask = ragged(T=20, D=12, seed=15, grad=True)
    total, per_layer, logits = contrastive_loss(text, text_mask, speech, speech_mask, sim="wasserstein", return_logits=True)
    ref_logits = pairwise_sinkhorn(text, text_mask, speech, speech_mask)
    assert close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert close(per_layer, info_nce(ref_logits), rtol=1e-4)
    ref_total = info_nce(ref_logits).sum()
    for g, r in zip(torch.autograd.grad(total, speech), torch.autograd.grad(ref_total, speech)):
        assert close(g, r, rtol=1e-3, atol=1e-5)


def test_length_buckets():
    assert C._length_buckets([5, 40, 6, 38, 5]) == [[0, 4, 2], [3, 1]]  # sorted by length, cut where padding grows
    assert C._length_buckets([7, 3, 9], waste=math.inf) == [[1, 0, 2]]  # one bucket: plain padding
    assert C._length_buckets([4, 4, 5], waste=1.0) == [[0, 1], [2]]  # only equal lengths share a bucket


def test_sinkhorn_buckets_change_nothing_but_the_speed():
    """Padding each block of pairs only to its own longest sets must give the numbers of padding everything."""
    text, text_mask = ragged(L=2, B=5, T=11, D=8, seed=21)
    speech, speech_mask = ragged(L=2, B=6, T=30, D=8, seed=22, grad=True)

    def divergences(waste):
        t, s = F.normalize(torch.stack(text), dim=-1), F.normalize(torch.stack(speech), dim=-1)
        return sinkhorn_divergence(t, text_mask, s, speech_mask, waste=waste)

    padded = divergences(math.inf)
    for waste in (1.0, 1.3):
        bucketed = divergences(waste)
        assert close(bucketed, padded, rtol=1e-5, atol=1e-6)
        for g, r in zip(torch.autograd.grad(bucketed.sum(), speech), torch.autograd.grad(padded.sum(), speech, retain_graph=True)):
            assert close(g, r, rtol=1e-4, atol=1e-6)


def test_sinkhorn_reads_no_padding_whatever_the_pattern():
    """Valid steps scattered anywhere (in order) and NaN at padding: the divergences and gradients of right padding."""
    text, text_mask = ragged(L=2, B=4, T=9, D=8, seed=23)
    speech, speech_mask = ragged(L=2, B=5, T=20, D=8, seed=24)
    t, s = F.normalize(torch.stack(text), dim=-1), F.normalize(torch.stack(speech), dim=-1).requires_grad_()
    right = sinkhorn_divergence(t, text_mask, s, speech_mask)
    g = torch.Generator().manual_seed(25)
    scattered, holes = torch.full_like(s, float("nan")), torch.zeros_like(speech_mask)
    for j, n in enumerate(speech_mask.sum(1).tolist()):
        steps = torch.randperm(20, generator=g)[:n].sort().values  # n random steps, in order
        scattered[:, j, steps], holes[j, steps] = s[:, j, :n], True
    scattered_div = sinkhorn_divergence(t, text_mask, scattered, holes)
    assert close(scattered_div, right, rtol=1e-5, atol=1e-6)
    (g_right,), (g_scattered,) = torch.autograd.grad(right.sum(), s), torch.autograd.grad(scattered_div.sum(), s)
    assert close(g_scattered, g_right, rtol=1e-5, atol=1e-6)


def test_unit_vectors_gradient_equals_f_normalize():
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(C._UnitVectors.apply, (x,))
    g = torch.randn(3, 5, 7, dtype=torch.float64)
    (ours,), (ref,) = torch.autograd.grad(C._UnitVectors.apply(x), x, g), torch.autograd.grad(F.normalize(x, dim=-1), x, g)
    assert close(ours, ref, rtol=1e-10, atol=1e-12)


def clustered(n, D, seed, centers=3, jitter=0.03):
    """n unit vectors around a few centres: neighbours within the Sinkhorn blur, so that the transport
    plans (OT(a, a)'s included) are not trivial permutations and gradients test something."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centers, D, generator=g)
    x = c[torch.randint(0, centers, (n,), generator=g)] + jitter * torch.randn(n, D, generator=g)
    return F.normalize(x, dim=-1)


def test_sinkhorn_value_and_gradient_match_geomloss():
    geomloss = pytest.importorskip("geomloss")
    x = clustered(12, 8, seed=19)[None].requires_grad_()
    y = clustered(25, 8, seed=20)[None].requires_grad_()
    ours = sinkhorn_divergence(x, torch.ones(1, 12, dtype=torch.bool), y, torch.ones(1, 25, dtype=torch.bool))[0, 0]
    x2, y2 = x.detach()[0].requires_grad_(), y.detach()[0].requires_grad_()
    ref = geomloss.SamplesLoss("sinkhorn", p=2, blur=0.05)(x2, y2)
    assert close(ours, ref)
    for g, r in zip(torch.autograd.grad(ours, (x, y)), torch.autograd.grad(ref, (x2, y2))):
        assert close(g[0], r, rtol=1e-3, atol=1e-6)


def geomloss_logits(geomloss, text, text_mask, speech, speech_mask, same_diameter):
    """The authors' loop: one SamplesLoss call per (layer, text, speech) pair, tokens L2-normalised in
    float32. same_diameter: start every pair's epsilon schedule where our batched call starts it."""
    d = all_layers_diameter(text, text_mask, speech, speech_mask) if same_diameter else None
    logits = []
    for t, s in zip(text, speech):
        t, s = F.normalize(t.float(), dim=-1), F.normalize(s.float(), dim=-1)
        sinkhorn = geomloss.SamplesLoss("sinkhorn", p=2, blur=0.05, diameter=d)
        logits.append(torch.stack([torch.stack([-sinkhorn(t[i][text_mask[i]], s[j][speech_mask[j]]) / 0.1
                                                for j in range(len(s))]) for i in range(len(t))]))
    return torch.stack(logits)


def test_wasserstein_matches_geomloss():
    geomloss = pytest.importorskip("geomloss")
    text, text_mask = ragged(L=2, B=3, T=9, D=16, seed=16)
    speech, speech_mask = ragged(L=2, B=3, T=20, D=16, seed=17, grad=True)
    logits = wasserstein_logits(text, text_mask, speech, speech_mask)
    # exactly the authors' calls: each pair anneals from its own diameter, we from the batch's: within 2%
    ref = geomloss_logits(geomloss, text, text_mask, speech, speech_mask, same_diameter=False)
    assert ((logits - ref).abs() / ref.abs()).max() < 0.02
    # the same schedule: the same numbers and the same gradients
    ref = geomloss_logits(geomloss, text, text_mask, speech, speech_mask, same_diameter=True)
    assert close(logits, ref, rtol=1e-4, atol=1e-4)
    for g, r in zip(torch.autograd.grad(info_nce(logits).sum(), speech), torch.autograd.grad(info_nce(ref).sum(), speech)):
        assert close(g, r, rtol=1e-3, atol=1e-5)


# -----------------------------------------------------------------------------
# InfoNCE, logits, retrieval


def test_info_nce_and_cos_logits_against_cross_entropy():
    logits = torch.randn(2, 5, 5, generator=torch.Generator().manual_seed(18))
    target = torch.arange(5)
    assert close(info_nce(logits), torch.stack([F.cross_entropy(x, target) for x in logits]))
    both = torch.stack([(F.cross_entropy(x, target) + F.cross_entropy(x.T, target)) / 2 for x in logits])
    assert close(info_nce(logits, symmetric=True), both)
    t, s = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    assert close(cos_logits(t, s, temperature=0.5), F.cosine_similarity(t[:, :, None], s[:, None], dim=-1) / 0.5)


def test_retrieval_accuracy():
    logits = torch.tensor([[[5.0, 0.0, 0.0],
                            [0.0, 5.0, 9.0],
                            [0.0, 0.0, 1.0]]])  # speech column 2's best text is row 1: 2 of 3 right
    assert close(retrieval_accuracy(logits), torch.tensor([2 / 3]))
    assert close(retrieval_accuracy(torch.eye(4)[None].repeat(2, 1, 1)), torch.ones(2))
