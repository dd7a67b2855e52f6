"""contrastive_fast.py: the same numbers as the reference contrastive.py (values and gradients,
every option), and its speed machinery checked piece by piece (CPU, a few seconds).

    python -m pytest -q tests/test_contrastive_fast.py

Both files are also checked against the slow per-example loops and geomloss in
tests/test_contrastive.py; the Triton kernel against the PyTorch pooling in tests/test_triton.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from test_contrastive import close, ragged  # the same random ragged batches

import contrastive
import contrastive_fast as fast

# -----------------------------------------------------------------------------
# Fast == reference


def with_holes(mask, seed):
    """The mask with random holes, each row keeping at least its first valid step (any padding
    pattern)."""
    keep = torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed)) < 0.7
    keep[torch.arange(len(mask)), mask.int().argmax(1)] = True
    return mask & keep


@pytest.mark.parametrize("holes", [False, True], ids=["right-padded", "holes"])
@pytest.mark.parametrize("symmetric, center", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("sim", ["cos", "wasserstein"])
def test_fast_loss_equals_the_reference(sim, symmetric, center, holes):
    text, text_mask = ragged(T=9, seed=31)
    speech, speech_mask = ragged(T=20, seed=32)
    if holes:
        text_mask, speech_mask = with_holes(text_mask, 33), with_holes(speech_mask, 34)
    results = []
    for impl in (contrastive, fast):
        s = [h.clone().requires_grad_() for h in speech]
        total, per_layer, logits = impl.contrastive_loss(
            text,
            text_mask,
            s,
            speech_mask,
            sim=sim,
            symmetric=symmetric,
            center=center,
            return_logits=True,
        )
        results.append((total, per_layer, logits, *torch.autograd.grad(total, s)))
    # Sinkhorn's float32 log-sum-exp iterations sum in an order that depends on the CPU's vector width:
    # its gradients (~0.3) differ by ~1e-6 between the two implementations on an AVX-512 machine
    atol = 1e-5 if sim == "wasserstein" else 1e-6
    for a, b in zip(*results):
        assert close(a, b, rtol=1e-5, atol=atol)


def test_fast_equals_the_reference_stacked_bf16_sink_and_cached_text():
    """The model's form: one stacked bf16 [L, B, T, D] tensor, the sink step left out of the pool;
    and the cached text side (text_pooled)."""
    text, text_mask = ragged(T=9, seed=35, dtype=torch.bfloat16)
    speech, speech_mask = ragged(T=20, seed=36, dtype=torch.bfloat16)
    text_mask[:, 0], speech_mask[:, 0] = False, False
    text_mask[:, 1], speech_mask[:, 1] = True, True
    text, speech = torch.stack(text), torch.stack(speech)
    pooled = [impl.masked_mean(text, text_mask) for impl in (contrastive, fast)]
    assert close(*pooled)
    for kwargs in (
        {"sim": "cos"},
        {"sim": "wasserstein"},
        {"sim": "cos", "text_pooled": pooled[0]},
    ):
        results = []
        for impl in (contrastive, fast):
            s = speech.clone().requires_grad_()
            t, t_mask = (None, None) if "text_pooled" in kwargs else (text, text_mask)
            total, per_layer = impl.contrastive_loss(t, t_mask, s, speech_mask, **kwargs)
            (grad,) = torch.autograd.grad(total, s)
            assert grad.dtype == torch.bfloat16
            results.append((total, per_layer, grad.float()))
        for a, b in zip(*results):
            # bf16 gradients (~0.3): one rounding, and near zero an absolute 1e-5 (the sums' order
            # depends on the CPU's vector width)
            grad = a.dim() == 4
            assert close(a, b, rtol=1e-2 if grad else 1e-5, atol=1e-5 if grad else 1e-6)


@pytest.mark.parametrize("given_diameter", [False, True])
def test_fast_sinkhorn_equals_the_reference(given_diameter):
    text, text_mask = ragged(L=2, B=4, T=9, D=8, seed=37)
    speech, speech_mask = ragged(L=2, B=5, T=20, D=8, seed=38)
    t, s = F.normalize(torch.stack(text), dim=-1), F.normalize(torch.stack(speech), dim=-1)
    kwargs = {"diameter": 2.0} if given_diameter else {}
    results = []
    for impl in (contrastive, fast):
        x = s.clone().requires_grad_()
        S = impl.sinkhorn_divergence(t, text_mask, x, with_holes(speech_mask, 39), **kwargs)
        results.append((S, *torch.autograd.grad(S.sum(), x)))
    (S, grad), (S_fast, grad_fast) = results
    assert close(S_fast, S, rtol=1e-5, atol=1e-6)
    assert close(
        grad_fast, grad, rtol=1e-4, atol=1e-5
    )  # sums of all 20 pairs' gradients: float32 round-off


def test_bad_kernel():
    layers, mask = ragged()
    with pytest.raises(ValueError):
        fast.masked_mean(layers, mask, kernel="cuda")
    with pytest.raises(ValueError):
        fast.contrastive_loss(layers, mask, layers, mask, kernel="cuda")


# -----------------------------------------------------------------------------
# The pieces: span pooling, log-sum-exp, length buckets, unit vectors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_mean_of_runs_reads_only_the_runs(dtype):
    """Masks whose valid steps form one run per row (right padding; the sink position dropped; an
    empty row) take the span path: the values and gradients of the slow loop, and padding is never
    read."""
    layers, mask = ragged(L=3, B=5, T=9, dtype=dtype, seed=23)
    mask[1, 0] = False  # a run that starts later (the sink token left out of the pool)
    mask[2] = False  # no valid step
    assert fast._valid_spans(mask) is not None
    states = torch.stack(layers).requires_grad_()
    poisoned = states.detach().clone()
    poisoned[:, ~mask] = float("nan")  # padding that is read would show
    assert not fast.masked_mean(poisoned, mask).isnan().any()
    out = fast.masked_mean(states, mask)
    assert out.dtype == torch.float32 and torch.equal(out[:, 2], torch.zeros(3, 16))
    ref = torch.stack(
        [
            torch.stack(
                [
                    h[b][mask[b]].float().mean(0) if mask[b].any() else torch.zeros(16)
                    for b in range(5)
                ]
            )
            for h in states.unbind(0)
        ]
    )
    assert close(out, ref)
    assert close(
        out, fast.masked_mean([h.detach() for h in layers], mask)
    )  # a list of layers: the same
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (grad,) = torch.autograd.grad((out * weights).sum(), states)
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), states)
    assert grad.dtype == dtype and close(
        grad.float(), ref_grad.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5
    )
    assert torch.equal(grad[:, ~mask], torch.zeros_like(grad[:, ~mask]))


def test_valid_spans():
    mask = torch.tensor([[1, 1, 0], [0, 1, 1], [0, 0, 0]], dtype=torch.bool)
    assert fast._valid_spans(mask) == [(0, 2), (1, 3), (0, 0)]
    assert (
        fast._valid_spans(torch.tensor([[1, 0, 1]], dtype=torch.bool)) is None
    )  # a hole: the general path


def test_logsumexp_read_off_log_softmax_equals_torch():
    z = 500 * torch.randn(
        4, 6, 50, generator=torch.Generator().manual_seed(21)
    )  # terms hundreds apart
    z[..., 7:] = float("-inf")  # padding (packed to the right: the first entry stays finite)
    assert close(
        fast._logsumexp(z, -1), torch.logsumexp(z.double(), -1).float(), rtol=0, atol=1e-4
    )  # ~ulp(500)
    assert close(
        fast._logsumexp(z.transpose(1, 2), 1),
        torch.logsumexp(z.double(), -1).float(),
        rtol=0,
        atol=1e-4,
    )


def test_buckets_hold_every_sets_valid_tokens_first_in_order():
    x = torch.arange(2 * 3 * 5 * 1, dtype=torch.float).view(2, 3, 5, 1)  # [layers, sets, steps, D]
    mask = torch.tensor([[0, 1, 0, 1, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    buckets = fast._buckets(
        x, mask, waste=1.0
    )  # one bucket per length: sets 2 (1 token), 0 (2), 1 (3)
    assert [group for group, _, _ in buckets] == [[2], [0], [1]]
    assert [xb[1, :, :, 0].tolist() for _, xb, _ in buckets] == [[[29]], [[16, 18]], [[20, 21, 22]]]
    group, xb, mb = fast._buckets(x, mask, waste=float("inf"))[
        0
    ]  # all in one: padding repeats the first token
    assert group == [2, 0, 1] and mb.tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert xb[1, :, :, 0].tolist() == [[29, 29, 29], [16, 18, 16], [20, 21, 22]]


def test_length_buckets():
    assert fast._length_buckets([5, 40, 6, 38, 5]) == [
        [0, 4, 2],
        [3, 1],
    ]  # sorted by length, cut where padding grows
    assert fast._length_buckets([7, 3, 9], waste=math.inf) == [
        [1, 0, 2]
    ]  # one bucket: plain padding
    assert fast._length_buckets([4, 4, 5], waste=1.0) == [
        [0, 1],
        [2],
    ]  # only equal lengths share a bucket


def test_sinkhorn_buckets_change_nothing_but_the_speed():
    """Padding each block of pairs only to its own longest sets must give the numbers of padding
    everything."""
    text, text_mask = ragged(L=2, B=5, T=11, D=8, seed=21)
    speech, speech_mask = ragged(L=2, B=6, T=30, D=8, seed=22, grad=True)

    def divergences(waste):
        t, s = F.normalize(torch.stack(text), dim=-1), F.normalize(torch.stack(speech), dim=-1)
        return fast.sinkhorn_divergence(t, text_mask, s, speech_mask, waste=waste)

    padded = divergences(math.inf)
    for waste in (1.0, 1.3):
        bucketed = divergences(waste)
        assert close(bucketed, padded, rtol=1e-5, atol=1e-6)
        for g, r in zip(
            torch.autograd.grad(bucketed.sum(), speech),
            torch.autograd.grad(padded.sum(), speech, retain_graph=True),
        ):
            assert close(g, r, rtol=1e-4, atol=1e-6)


def test_unit_vectors_gradient_equals_f_normalize():
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fast._UnitVectors.apply, (x,))
    g = torch.randn(3, 5, 7, dtype=torch.float64)
    (ours,), (ref,) = (
        torch.autograd.grad(fast._UnitVectors.apply(x), x, g),
        torch.autograd.grad(F.normalize(x, dim=-1), x, g),
    )
    assert close(ours, ref, rtol=1e-10, atol=1e-12)
