"""Tests of the loss against obviously-correct slow references (CPU, a few seconds): the reference
contrastive.py, and the same functions of contrastive_fast.py (`impl`; its internals and its direct
parity with the reference: tests/test_contrastive_fast.py).

    python -m pytest -q tests/test_contrastive.py

The references are written like the authors' code: unpad each example, mean, normalise, similarity
matrix, cross-entropy with the diagonal as targets, one layer at a time; geomloss per (text, speech)
pair.
"""

import pytest
import torch
import torch.nn.functional as F

import contrastive
import contrastive_fast
from contrastive import center_pooled, cos_logits, info_nce, retrieval_r1, select_layers

# the public functions both files have: contrastive_loss, masked_mean, sinkhorn_divergence,
# wasserstein_logits
IMPLS = pytest.mark.parametrize("impl", [contrastive, contrastive_fast], ids=["reference", "fast"])

# -----------------------------------------------------------------------------
# Random ragged batches and the slow references


def ragged(L=3, B=4, T=10, D=16, min_len=1, seed=0, dtype=torch.float32, grad=False):
    """L layers of [B, T, D] states (a list, like transformers' hidden_states) and a right-padded
    bool mask with random lengths in [min_len, T]; the last example has exactly one valid
    position."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, T + 1, (B,), generator=g)
    lengths[-1] = 1
    mask = torch.arange(T)[None, :] < lengths[:, None]
    layers = [torch.randn(B, T, D, generator=g).to(dtype).requires_grad_(grad) for _ in range(L)]
    return layers, mask


def authors_cos(
    text_layers,
    text_mask,
    speech_layers,
    speech_mask,
    temperature=0.1,
    symmetric=False,
    center=False,
):
    """Per layer: unpad every example, mean over its tokens, L2-normalise, similarity / temperature,
    cross-entropy over the speech columns with the diagonal as targets. Returns (sum, per-layer
    list)."""
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
    """The diameter that starts the batched call's epsilon schedule: over all layers' normalised
    tokens."""
    t, s = (
        F.normalize(torch.stack(list(x)).detach().float(), dim=-1)
        for x in (text_layers, speech_layers)
    )
    return contrastive._diameter(t, text_mask, s, speech_mask)


def pairwise_sinkhorn(impl, text_layers, text_mask, speech_layers, speech_mask, temperature=0.1):
    """Logits from one sinkhorn_divergence call per (layer, text, speech) pair, with the same
    epsilon schedule as the batched call (same diameter, the largest over the layers), so the two
    must agree to rounding."""
    diameter = all_layers_diameter(text_layers, text_mask, speech_layers, speech_mask)
    logits = []
    for text, speech in zip(text_layers, speech_layers):
        t, s = F.normalize(text.detach().float(), dim=-1), F.normalize(speech.float(), dim=-1)
        rows = [
            torch.cat(
                [
                    impl.sinkhorn_divergence(
                        t[i : i + 1],
                        text_mask[i : i + 1],
                        s[j : j + 1],
                        speech_mask[j : j + 1],
                        diameter=diameter,
                    )[0]
                    for j in range(len(s))
                ]
            )
            for i in range(len(t))
        ]
        logits.append(-torch.stack(rows) / temperature)
    return torch.stack(logits)


def close(a, b, rtol=1e-5, atol=1e-6):
    return torch.allclose(a, b, rtol=rtol, atol=atol)


# -----------------------------------------------------------------------------
# Layer selection


@pytest.mark.parametrize(
    "spec, num_layers, expected",
    [
        ("all", 32, [0, 5, 10, 15, 20, 25, 32]),  # the authors' hard-coded list for Llama-3.1-8B
        ("all", 30, [0, 5, 10, 15, 20, 25, 30]),  # SmolLM2-135M
        ("all", 10, [0, 5, 10]),
        ("all", 4, [0, 4]),
        ("all", 1, [0, 1]),
        ("emb", 32, [0]),
        ("0,3,7", 10, [0, 3, 7]),
        (" 2, 10 ", 10, [2, 10]),
        ("5", 5, [5]),
    ],
)
def test_select_layers(spec, num_layers, expected):
    assert select_layers(spec, num_layers) == expected


@pytest.mark.parametrize(
    "spec, num_layers",
    [
        ("0,11", 10),
        ("-1,2", 10),
        ("3,1", 10),
        ("0,0", 10),
        ("a,b", 10),
        ("", 10),
        ("all,5", 10),
        ("0,,3", 10),
        ("all", 0),
    ],
)
def test_select_layers_rejects_bad_specs(spec, num_layers):
    with pytest.raises(ValueError):
        select_layers(spec, num_layers)


# -----------------------------------------------------------------------------
# Pooling


@IMPLS
def test_masked_mean_list_stacked_and_loop(impl):
    layers, _ = ragged(L=2, B=5, T=7)
    mask = (
        torch.rand(5, 7, generator=torch.Generator().manual_seed(1)) < 0.5
    )  # holes, not just right padding
    mask[:, 3] = True
    mask[0] = False
    mask[0, 6] = True  # a single valid position at the end
    out = impl.masked_mean(layers, mask)
    assert out.shape == (2, 5, 16) and out.dtype == torch.float32
    assert torch.equal(out, impl.masked_mean(torch.stack(layers), mask))
    ref = torch.stack([torch.stack([h[b][mask[b]].mean(0) for b in range(5)]) for h in layers])
    assert close(out, ref)
    assert torch.equal(out[:, 0], torch.stack(layers)[:, 0, 6])


@IMPLS
def test_normalized_pool_and_empty_rows_are_zero(impl):
    layers, mask = ragged(L=2, B=3, T=5)
    mask[1] = False
    pooled = F.normalize(impl.masked_mean(layers, mask), dim=-1)
    assert close(pooled[:, [0, 2]].norm(dim=-1), torch.ones(2, 2))
    assert torch.equal(pooled[:, 1], torch.zeros(2, 16))  # no valid step: 0, not NaN


@IMPLS
def test_bad_arguments(impl):
    layers, mask = ragged()
    with pytest.raises(ValueError):
        impl.masked_mean(layers, mask[:, :-1])
    with pytest.raises(ValueError):
        impl.contrastive_loss(layers, mask, layers, mask, sim="dot")
    with pytest.raises(ValueError):
        impl.contrastive_loss(layers, mask, layers[:2], mask)
    with pytest.raises(
        ValueError, match="once"
    ):  # the text side twice: as states and as pooled vectors
        impl.contrastive_loss(
            layers, mask, layers, mask, text_pooled=impl.masked_mean(layers, mask)
        )


# -----------------------------------------------------------------------------
# The cosine loss


@IMPLS
def test_cos_loss_matches_authors_loop_values_and_gradients(impl):
    text, text_mask = ragged(T=9, seed=1, grad=True)
    speech, speech_mask = ragged(T=20, seed=2, grad=True)
    total, per_layer = impl.contrastive_loss(text, text_mask, speech, speech_mask)
    ref_total, ref_per_layer = authors_cos(text, text_mask, speech, speech_mask)
    assert per_layer.shape == (3,) and close(per_layer, torch.stack(ref_per_layer))
    assert close(total, ref_total) and close(total, per_layer.sum())
    grads = torch.autograd.grad(total, speech)
    ref_grads = torch.autograd.grad(ref_total, speech)
    for g, r in zip(grads, ref_grads):
        assert close(g, r, atol=1e-7)
    # the text side is frozen: detached inside the loss, so no gradient path reaches it
    assert all(g is None for g in torch.autograd.grad(total, text, allow_unused=True))


@IMPLS
def test_list_and_stacked_inputs_give_the_same_loss(impl):
    text, text_mask = ragged(T=9, seed=3)
    speech, speech_mask = ragged(T=20, seed=4)
    for sim in ("cos", "wasserstein"):
        a = impl.contrastive_loss(text, text_mask, speech, speech_mask, sim=sim)[1]
        b = impl.contrastive_loss(
            torch.stack(text), text_mask, torch.stack(speech), speech_mask, sim=sim
        )[1]
        assert close(a, b)


@IMPLS
@pytest.mark.parametrize("sim", ["cos", "wasserstein"])
def test_padded_positions_never_matter(impl, sim):
    text, text_mask = ragged(T=9, seed=5)
    speech, speech_mask = ragged(T=20, seed=6)
    garbage = lambda h, m: torch.where(m[..., None], h, 1e4 * torch.randn_like(h))  # noqa: E731
    speech = [h.requires_grad_() for h in speech]
    noisy = [garbage(h, speech_mask).detach().requires_grad_() for h in speech]
    clean_loss = impl.contrastive_loss(text, text_mask, speech, speech_mask, sim=sim)[0]
    noisy_loss = impl.contrastive_loss(
        [garbage(h, text_mask) for h in text], text_mask, noisy, speech_mask, sim=sim
    )[0]
    assert close(clean_loss, noisy_loss)
    for g_clean, g_noisy in zip(
        torch.autograd.grad(clean_loss, speech), torch.autograd.grad(noisy_loss, noisy)
    ):
        assert close(g_clean, g_noisy, atol=1e-7)
        assert torch.equal(g_noisy[~speech_mask], torch.zeros_like(g_noisy[~speech_mask]))


@IMPLS
@pytest.mark.parametrize("symmetric, center", [(True, False), (False, True), (True, True)])
def test_symmetric_and_center_match_the_reference(impl, symmetric, center):
    text, text_mask = ragged(T=9, seed=7)
    speech, speech_mask = ragged(T=20, seed=8, grad=True)
    total, per_layer = impl.contrastive_loss(
        text, text_mask, speech, speech_mask, symmetric=symmetric, center=center
    )
    ref_total, ref_per_layer = authors_cos(
        text, text_mask, speech, speech_mask, symmetric=symmetric, center=center
    )
    assert close(per_layer, torch.stack(ref_per_layer))
    for g, r in zip(torch.autograd.grad(total, speech), torch.autograd.grad(ref_total, speech)):
        assert close(g, r, atol=1e-7)


@IMPLS
def test_cached_pooled_text_equals_the_full_path(impl):
    text, text_mask = ragged(T=9, seed=9)
    speech, speech_mask = ragged(T=20, seed=10, grad=True)
    full = impl.contrastive_loss(text, text_mask, speech, speech_mask, return_logits=True)
    cached = impl.contrastive_loss(
        None,
        None,
        speech,
        speech_mask,
        return_logits=True,
        text_pooled=impl.masked_mean(text, text_mask),
    )
    for a, b in zip(full, cached):
        assert close(a, b)
    for g, r in zip(torch.autograd.grad(full[0], speech), torch.autograd.grad(cached[0], speech)):
        assert close(g, r, atol=1e-7)
    with pytest.raises(ValueError, match="wasserstein"):
        impl.contrastive_loss(
            None,
            None,
            speech,
            speech_mask,
            sim="wasserstein",
            text_pooled=impl.masked_mean(text, text_mask),
        )


@IMPLS
def test_bf16_inputs_use_float32_math(impl):
    text, text_mask = ragged(T=9, seed=11, dtype=torch.bfloat16)
    speech, speech_mask = ragged(T=20, seed=12, dtype=torch.bfloat16, grad=True)
    as_fp32 = [h.detach().float().requires_grad_() for h in speech]
    for sim in ("cos", "wasserstein"):
        total, per_layer, logits = impl.contrastive_loss(
            text, text_mask, speech, speech_mask, sim=sim, return_logits=True
        )
        assert total.dtype == per_layer.dtype == logits.dtype == torch.float32
        ref = impl.contrastive_loss(
            [h.float() for h in text], text_mask, as_fp32, speech_mask, sim=sim
        )[0]
        assert close(
            total, ref
        )  # the same numbers as casting the inputs up front: no bf16 arithmetic
        grads = torch.autograd.grad(total, speech)
        assert all(g.dtype == torch.bfloat16 for g in grads)
        for g, r in zip(grads, torch.autograd.grad(ref, as_fp32)):
            assert close(g.float(), r.bfloat16().float(), rtol=1e-2, atol=1e-6)


@IMPLS
def test_autocast_does_not_reach_the_loss_math(impl):
    """Under bf16 autocast (--dtype bfloat16, CPU or CUDA) a product of float32 tensors would run in
    bf16; the loss switches autocast off, so it gives the float32 numbers exactly."""
    text, text_mask = ragged(T=9, seed=11)
    speech, speech_mask = ragged(T=20, seed=12)
    for sim in ("cos", "wasserstein"):
        ref = impl.contrastive_loss(
            text, text_mask, speech, speech_mask, sim=sim, return_logits=True
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = impl.contrastive_loss(
                text, text_mask, speech, speech_mask, sim=sim, return_logits=True
            )
            pooled = impl.masked_mean(speech, speech_mask)
        assert all(torch.equal(a, b) for a, b in zip(got, ref)), sim
        assert torch.equal(pooled, impl.masked_mean(speech, speech_mask))


# -----------------------------------------------------------------------------
# The Sinkhorn divergence and the Wasserstein loss


@IMPLS
def test_sinkhorn_basic_properties(impl):
    x, x_mask = ragged(L=1, B=3, T=8, D=8, min_len=2, seed=13)
    x = F.normalize(x[0], dim=-1)
    S = impl.sinkhorn_divergence(x, x_mask, x, x_mask)
    assert S.shape == (3, 3)
    assert S.diagonal().abs().max() < 1e-4  # S(a, a) = 0: that is what debiasing buys
    assert close(S, S.T, atol=1e-4)  # symmetric up to the solver's convergence
    assert (S[~torch.eye(3, dtype=torch.bool)] > 0.1).all()
    with pytest.raises(ValueError):
        empty = x_mask.clone()
        empty[0] = False
        impl.sinkhorn_divergence(x, empty, x, x_mask)


@IMPLS
def test_wasserstein_batched_equals_a_per_pair_loop(impl):
    text, text_mask = ragged(T=9, D=12, seed=14)
    speech, speech_mask = ragged(T=20, D=12, seed=15, grad=True)
    total, per_layer, logits = impl.contrastive_loss(
        text, text_mask, speech, speech_mask, sim="wasserstein", return_logits=True
    )
    ref_logits = pairwise_sinkhorn(impl, text, text_mask, speech, speech_mask)
    assert close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert close(per_layer, info_nce(ref_logits), rtol=1e-4)
    ref_total = info_nce(ref_logits).sum()
    for g, r in zip(torch.autograd.grad(total, speech), torch.autograd.grad(ref_total, speech)):
        assert close(g, r, rtol=1e-3, atol=1e-5)


@IMPLS
def test_sinkhorn_reads_no_padding_whatever_the_pattern(impl):
    """Valid steps scattered anywhere (in order) and NaN at padding: the divergences and gradients
    of right padding."""
    text, text_mask = ragged(L=2, B=4, T=9, D=8, seed=23)
    speech, speech_mask = ragged(L=2, B=5, T=20, D=8, seed=24)
    t, s = (
        F.normalize(torch.stack(text), dim=-1),
        F.normalize(torch.stack(speech), dim=-1).requires_grad_(),
    )
    right = impl.sinkhorn_divergence(t, text_mask, s, speech_mask)
    g = torch.Generator().manual_seed(25)
    scattered, holes = torch.full_like(s, float("nan")), torch.zeros_like(speech_mask)
    for j, n in enumerate(speech_mask.sum(1).tolist()):
        steps = torch.randperm(20, generator=g)[:n].sort().values  # n random steps, in order
        scattered[:, j, steps], holes[j, steps] = s[:, j, :n], True
    scattered_div = impl.sinkhorn_divergence(t, text_mask, scattered, holes)
    assert close(scattered_div, right, rtol=1e-5, atol=1e-6)
    (g_right,), (g_scattered,) = (
        torch.autograd.grad(right.sum(), s),
        torch.autograd.grad(scattered_div.sum(), s),
    )
    assert close(g_scattered, g_right, rtol=1e-5, atol=1e-6)


def clustered(n, D, seed, centers=3, jitter=0.03):
    """n unit vectors around a few centres: neighbours within the Sinkhorn blur, so that the
    transport plans (OT(a, a)'s included) are not trivial permutations and gradients test
    something."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centers, D, generator=g)
    x = c[torch.randint(0, centers, (n,), generator=g)] + jitter * torch.randn(n, D, generator=g)
    return F.normalize(x, dim=-1)


@IMPLS
def test_sinkhorn_value_and_gradient_match_geomloss(impl):
    geomloss = pytest.importorskip("geomloss")
    x = clustered(12, 8, seed=19)[None].requires_grad_()
    y = clustered(25, 8, seed=20)[None].requires_grad_()
    ours = impl.sinkhorn_divergence(
        x, torch.ones(1, 12, dtype=torch.bool), y, torch.ones(1, 25, dtype=torch.bool)
    )[0, 0]
    x2, y2 = x.detach()[0].requires_grad_(), y.detach()[0].requires_grad_()
    ref = geomloss.SamplesLoss("sinkhorn", p=2, blur=0.05)(x2, y2)
    assert close(ours, ref)
    for g, r in zip(torch.autograd.grad(ours, (x, y)), torch.autograd.grad(ref, (x2, y2))):
        assert close(g[0], r, rtol=1e-3, atol=1e-6)


def geomloss_logits(geomloss, text, text_mask, speech, speech_mask, same_diameter):
    """The authors' loop: one SamplesLoss call per (layer, text, speech) pair, tokens L2-normalised
    in float32. same_diameter: start every pair's epsilon schedule where our batched call starts
    it."""
    d = all_layers_diameter(text, text_mask, speech, speech_mask) if same_diameter else None
    logits = []
    for t, s in zip(text, speech):
        t, s = F.normalize(t.float(), dim=-1), F.normalize(s.float(), dim=-1)
        sinkhorn = geomloss.SamplesLoss("sinkhorn", p=2, blur=0.05, diameter=d)
        logits.append(
            torch.stack(
                [
                    torch.stack(
                        [
                            -sinkhorn(t[i][text_mask[i]], s[j][speech_mask[j]]) / 0.1
                            for j in range(len(s))
                        ]
                    )
                    for i in range(len(t))
                ]
            )
        )
    return torch.stack(logits)


@IMPLS
def test_wasserstein_matches_geomloss(impl):
    geomloss = pytest.importorskip("geomloss")
    text, text_mask = ragged(L=2, B=3, T=9, D=16, seed=16)
    speech, speech_mask = ragged(L=2, B=3, T=20, D=16, seed=17, grad=True)
    logits = impl.wasserstein_logits(text, text_mask, speech, speech_mask)
    # exactly the authors' calls: each pair anneals from its own diameter, we from the batch's:
    # within 2%
    ref = geomloss_logits(geomloss, text, text_mask, speech, speech_mask, same_diameter=False)
    assert ((logits - ref).abs() / ref.abs()).max() < 0.02
    # the same schedule: the same numbers and the same gradients
    ref = geomloss_logits(geomloss, text, text_mask, speech, speech_mask, same_diameter=True)
    assert close(logits, ref, rtol=1e-4, atol=1e-4)
    for g, r in zip(
        torch.autograd.grad(info_nce(logits).sum(), speech),
        torch.autograd.grad(info_nce(ref).sum(), speech),
    ):
        assert close(g, r, rtol=1e-3, atol=1e-5)


# -----------------------------------------------------------------------------
# InfoNCE, logits, retrieval


def test_info_nce_and_cos_logits_against_cross_entropy():
    logits = torch.randn(2, 5, 5, generator=torch.Generator().manual_seed(18))
    target = torch.arange(5)
    assert close(info_nce(logits), torch.stack([F.cross_entropy(x, target) for x in logits]))
    both = torch.stack(
        [(F.cross_entropy(x, target) + F.cross_entropy(x.T, target)) / 2 for x in logits]
    )
    assert close(info_nce(logits, symmetric=True), both)
    t, s = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    assert close(
        cos_logits(t, s, temperature=0.5),
        F.cosine_similarity(t[:, :, None], s[:, None], dim=-1) / 0.5,
    )


def test_retrieval_r1():
    logits = torch.tensor(
        [[[5.0, 0.0, 0.0], [0.0, 5.0, 9.0], [0.0, 0.0, 1.0]]]
    )  # speech column 2's best text is row 1: 2 of 3 right
    assert close(retrieval_r1(logits), torch.tensor([2 / 3]))
    assert close(retrieval_r1(torch.eye(4)[None].repeat(2, 1, 1)), torch.ones(2))


def test_retrieval_r1_from_pooled_states_centred_or_not():
    """retrieval_r1(cos_logits(...)): for each utterance, is its own transcript the closest by
    cosine, with no centring, each side centred by its own means, or centred by given means (a
    per-example loop)."""
    g = torch.Generator().manual_seed(26)
    common = 5 * torch.randn(2, 1, 8, generator=g)  # a large shared direction, as LLM states have
    text, speech = (
        common + torch.randn(2, 12, 8, generator=g),
        common + torch.randn(2, 12, 8, generator=g),
    )
    speech[:, :6] = text[:, :6] + 0.3 * torch.randn(
        2, 6, 8, generator=g
    )  # 6 utterances close to their transcript
    means = (torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g))
    zero = torch.zeros(2, 8)
    for center, (t_mean, s_mean) in [
        (False, (zero, zero)),
        (True, (text.mean(1), speech.mean(1))),
        (means, means),
    ]:
        t, s = text - t_mean[:, None], speech - s_mean[:, None]
        nearest = [
            [
                max(range(12), key=lambda i: F.cosine_similarity(s[k, j], t[k, i], dim=0).item())
                for j in range(12)
            ]
            for k in range(2)
        ]
        expected = torch.tensor([sum(i == j for j, i in enumerate(row)) / 12 for row in nearest])
        assert close(retrieval_r1(cos_logits(text, speech, center=center)), expected)
    assert torch.equal(center_pooled(text), text - text.mean(1, keepdim=True))
    assert torch.equal(center_pooled(text, means[0]), text - means[0][:, None])
