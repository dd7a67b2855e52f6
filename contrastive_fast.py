"""
contrastive_fast.py: the functions of contrastive.py with the same signatures and the same numbers,
faster.

What the loss IS lives in contrastive.py (read that first); this file holds only what makes it fast:
less memory traffic when pooling, and fewer and cheaper operations in the Sinkhorn loop. pretrain.py
and bench.py use it (pretrain.py --loss-impl reference runs contrastive.py instead), and
tests/test_contrastive_fast.py holds both equal. The measurements behind the choices: docs/speed.md.

    masked_mean          each example's valid run of steps pooled by one matrix-vector product that
                         never reads the padding, with a hand-written backward that writes each
                         gradient element once; other mask patterns as one batched product;
                         kernel="triton": one Triton launch
    sinkhorn_divergence  the sets sorted by length and cut into buckets, each block of pairs padded
                         only to its own longest sets; one cost matrix for both potentials of a
                         pair; the log-sum-exp read off torch's fused log_softmax; the last step's
                         gradient from its softmax
    wasserstein_logits   the token normalisation with its backward written out
    contrastive_loss     contrastive.contrastive_loss with these swapped in; kernel= picks the
                         pooling kernel (cos)

Extra keyword arguments, fast path only: kernel ("torch" | "triton" | "auto") and the Sinkhorn's
waste.

Sections: masked mean pooling | the Sinkhorn divergence | the loss | an optional Triton kernel for
the pooling (forward + backward), used with kernel="triton".
"""

import contextlib
import functools
import os

import torch

import contrastive
from contrastive import (
    _diameter,
    _epsilon_schedule,
    _log_weights,
    float32_math,
)

try:  # Triton is optional: kernel="torch" (the default) needs only PyTorch.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

# -----------------------------------------------------------------------------
# Masked mean pooling: each example's valid run of steps, never reading the padding


def _as_layers(states):
    """A python list/tuple of L tensors [B, T, D], or one stacked tensor [L, B, T, D] -> list of
    [B, T, D]."""
    layers = list(states.unbind(0)) if torch.is_tensor(states) else list(states)
    if not layers or any(h.dim() != 3 for h in layers):
        raise ValueError("states must be a list of [B, T, D] tensors or one [L, B, T, D] tensor")
    return layers


def _mean_weights(mask):
    """[B, T] float32: 1/count at the valid positions, 0 at padding, so mean = sum_t weight[t] *
    h[t]. A row with no valid position pools to 0 instead of NaN."""
    m = mask.float()
    return m / m.sum(1, keepdim=True).clamp(min=1)


def _valid_spans(mask):
    """[(start, end)] per row when every row's valid steps form one run (right padding, or a dropped
    first position as with the sink token; an empty row gives (0, 0)); None when some row has
    holes."""
    count = mask.sum(1)
    start = torch.where(count > 0, mask.int().argmax(1), 0)  # first valid step
    spans = list(zip(start.tolist(), (start + count).tolist()))
    run = torch.arange(mask.shape[1], device=mask.device)[None]
    one_run = mask.equal((run >= start[:, None]) & (run < (start + count)[:, None]))
    return spans if one_run else None


class _SpanMean(torch.autograd.Function):
    """The mean over each example's valid run of steps, states [..., B, T, D] -> float32
    [..., B, D], for all leading dimensions (the layers) at once. It reads only the valid states
    (padding is never touched) and its backward writes every gradient element exactly once (1/n on
    the run, 0 elsewhere); autograd's own backward of B slices would build B zero-filled copies of
    the whole gradient and add them up."""

    @staticmethod
    def forward(ctx, states, spans):
        ctx.spans, ctx.shape, ctx.dtype = spans, states.shape, states.dtype
        means = states.new_zeros(
            *states.shape[:-2], states.shape[-1], dtype=torch.float32
        )  # [..., B, D]
        for b, (start, end) in enumerate(spans):
            if end > start:  # one matrix-vector product per example: [1, n] @ [..., n, D]
                run = states[..., b, start:end, :].float()
                means[..., b, :] = (
                    run.new_full((1, end - start), 1 / (end - start)) @ run
                ).squeeze(-2)
        return means

    @staticmethod
    def backward(ctx, grad_means):
        grad = grad_means.new_empty(ctx.shape, dtype=ctx.dtype)
        for b, (start, end) in enumerate(ctx.spans):
            grad[..., b, :start, :] = 0
            grad[..., b, end:, :] = 0
            if end > start:
                grad[..., b, start:end, :] = (grad_means[..., b, None, :] / (end - start)).to(
                    ctx.dtype
                )
        return grad, None


def _resolve_kernel(kernel, states):
    """'torch' | 'triton' | 'auto' (Triton when it is installed and the states live on a GPU)."""
    device = states.device if torch.is_tensor(states) else states[0].device
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if kernel == "auto":
        return "triton" if HAS_TRITON and device.type == "cuda" else "torch"
    if kernel == "triton":
        if not HAS_TRITON:
            raise RuntimeError("kernel='triton' needs `pip install -r requirements-triton.txt`")
        if device.type != "cuda" and not interpreted:
            raise RuntimeError(
                "kernel='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run it on the CPU, "
                "slowly)"
            )
        return "triton"
    if kernel != "torch":
        raise ValueError(f"kernel must be 'torch', 'triton' or 'auto', got {kernel!r}")
    return "torch"


@float32_math()
def masked_mean(states, mask, kernel="torch"):
    """contrastive.masked_mean: states list of L [B, T, D] or [L, B, T, D], bool mask [B, T] ->
    float32 [L, B, D]. kernel: "torch" | "triton" (one Triton launch over all layers) | "auto"
    (Triton when it is installed and the states live on a GPU). Padding must be finite on the torch
    path's masks with holes (it is multiplied by an exact 0); right padding and the Triton kernel
    never read it at all."""
    if _resolve_kernel(kernel, states) == "triton":
        return triton_masked_mean(states, mask)
    layers = _as_layers(states)  # (views: checks the shapes of either form)
    if mask.shape != layers[0].shape[:2]:
        raise ValueError(
            f"mask {tuple(mask.shape)} does not match states [B, T] = {tuple(layers[0].shape[:2])}"
        )
    spans = _valid_spans(mask)
    if spans is not None:  # the usual case: pool each example's run, never reading the padding
        return (
            _SpanMean.apply(states, spans)
            if torch.is_tensor(states)
            else torch.stack([_SpanMean.apply(h, spans) for h in layers])
        )
    # Any mask: a batched matrix-vector product reads every hidden state exactly once and never
    # builds a masked copy; padded positions are multiplied by an exact 0 (they must be finite,
    # which LLM states are).
    w = _mean_weights(mask).to(layers[0].device)[:, None, :]  # [B, 1, T]
    if torch.is_tensor(
        states
    ):  # [L, B, T, D] as ONE product, so the backward writes one [L, B, T, D] gradient
        L, B, T, D = (
            states.shape
        )  # (unbinding into layers would cost an extra copy to stack their gradients)
        return torch.bmm(w.repeat(L, 1, 1), states.float().reshape(L * B, T, D)).view(L, B, D)
    return torch.stack([torch.bmm(w, h.float()).squeeze(1) for h in layers])


# -----------------------------------------------------------------------------
# The Sinkhorn divergence: contrastive.sinkhorn_divergence's math (read its comments first), solved
# faster.
#
# Every iteration costs an exp over every (token, token) pair of every problem, so padding is wasted
# work: the sets are sorted by length and cut into buckets of similar lengths, and each (text
# bucket, speech bucket) block of pairs is one batched problem padded only to its own longest sets
# (the self terms, one problem per set, likewise per bucket). The layers share every problem's
# batch.


def _half_sq_dist(x, y):
    """C[..., i, j, n, m] = |x[i, n] - y[j, m]|^2 / 2 for x [..., I, N, D] and y [..., J, M, D]:
    every token of every x set against every token of every y set, from one matrix product
    (|x|^2/2 + |y|^2/2 - <x, y>)."""
    # I, J: set counts, as in the docstring
    (*lead, I, N, D), (J, M) = x.shape, y.shape[-3:-1]  # noqa: E741
    xy = (x.reshape(*lead, I * N, D) @ y.reshape(*lead, J * M, D).transpose(-1, -2)).view(
        *lead, I, N, J, M
    )
    return (
        x.pow(2).sum(-1)[..., :, None, :, None] + y.pow(2).sum(-1)[..., None, :, None, :]
    ) / 2 - xy.transpose(-3, -2)


def _half_sq_dist_within(x, x2):
    """C[..., i, n, m] = |x[i, n] - x2[i, m]|^2 / 2, set by set: [..., I, N, N] (x2 is x, detached
    or not)."""
    return (
        x.pow(2).sum(-1)[..., :, None] + x2.pow(2).sum(-1)[..., None, :]
    ) / 2 - x @ x2.transpose(-1, -2)


def _logsumexp(z, dim):
    """log sum exp over axis `dim`, for rows whose first entry is finite (token sets are packed to
    the left, see _packed_steps). Read off torch's fused log_softmax: log_softmax(z)_0 = z_0 -
    logsumexp(z), so logsumexp(z) = z_0 - log_softmax(z)_0: one fused pass instead of
    torch.logsumexp's separate max, subtract, exp and sum passes, and no slow exp on the many terms
    that underflow at eps = blur^2 (docs/speed.md). As accurate as float32 allows: the error is one
    rounding of |z_0 - max|, i.e. of C / eps, which the softmin multiplies back by eps."""
    return z.select(dim, 0) - torch.log_softmax(z, dim).select(dim, 0)


def _softmin(eps, C, log_w, potential=None, dim=-1):
    """The soft c-transform over axis `dim` of the costs C [..., N, M]: -eps * log sum_dim exp(h - C
    / eps), with h = log_w + potential / eps, the log-weights and the current potential of the side
    being summed over (shaped like C without its other token axis). Both potentials of a pair reduce
    the same C, one over M (dim -1), the other over N (dim -2): no transposed copy, and torch's
    log_softmax over dim -2 runs along the contiguous M, fast even when N is short.
    The potential never carries a gradient (it comes from the no-grad loop); C may (the last
    step)."""
    h = log_w if potential is None else torch.add(log_w, potential, alpha=1 / eps)
    z = torch.add(
        h.unsqueeze(-2 if dim == -1 else -1), C.detach(), alpha=-1 / eps
    )  # one fused pass for h - C/eps
    f = -eps * _logsumexp(z, dim)
    if not (torch.is_grad_enabled() and C.requires_grad):
        return f
    # d f_n / d C[n, m] = softmax_m(z)[n, m]. Attach that gradient to the value above (the added
    # term is 0): cheaper than autograd through a logsumexp, whose exp slows down on the many
    # underflowing terms.
    P = torch.softmax(z, dim)
    return f + (P * (C - C.detach())).sum(dim)


def _length_buckets(lengths, waste=1.15):
    """Set indices sorted by length, cut into runs ("buckets") whose padded size (count x longest)
    stays within `waste` x their real size. Returns a list of index lists, shortest sets first. More
    buckets mean less padding but more, smaller problems; the default was the fastest of the values
    tried (docs/speed.md)."""
    buckets, total = [[]], 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if buckets[-1] and (len(buckets[-1]) + 1) * lengths[i] > waste * (total + lengths[i]):
            buckets.append([])
            total = 0
        buckets[-1].append(i)
        total += lengths[i]
    return buckets


def _packed_steps(mask):
    """For token sets with bool mask [I, T] (any padding pattern): the steps [I, N] that list each
    set's valid tokens first, in order, and the packed mask [I, N] (N = the longest set). Every
    set's first slot is valid, which _logsumexp relies on; padding slots repeat it (finite values
    with weight 0: they change no value and get no gradient, and no padding is read, whatever it
    holds)."""
    counts = mask.sum(1)
    steps = mask.int().argsort(dim=1, descending=True, stable=True)[:, : int(counts.max())]
    packed_mask = torch.arange(steps.shape[1], device=mask.device) < counts[:, None]
    return torch.where(packed_mask, steps, steps[:, :1]), packed_mask


def _buckets(x, mask, waste):
    """[(set indices, packed states [..., n, N, D], packed mask [n, N])] for each bucket of sets of
    similar lengths (see _length_buckets), each packed to its own longest set. x [..., I, T, D],
    mask [I, T]. All buckets come from one gather (its backward: one scatter) of the flattened
    tokens."""
    groups = _length_buckets(mask.sum(1).tolist(), waste)
    T = mask.shape[1]
    indices, masks = [], []
    for group in groups:
        steps, packed_mask = _packed_steps(mask[group])
        indices.append((torch.tensor(group, device=mask.device)[:, None] * T + steps).flatten())
        masks.append(packed_mask)
    tokens = x.flatten(-3, -2)[..., torch.cat(indices), :]  # [..., all buckets' slots, D]
    pieces = tokens.split([len(index) for index in indices], -2)
    return [
        (group, piece.unflatten(-2, m.shape), m) for group, piece, m in zip(groups, pieces, masks)
    ]


def _ot_self(x, x_mask, eps_list):
    """<a, f_aa> for OT(x_i, x_i) of every set x_i: [..., I]. x [..., I, N, D] (packed), x_mask
    [I, N]."""
    a_log = _log_weights(x_mask)
    C = _half_sq_dist_within(
        x, x.detach()
    )  # x seen only through the first argument (the 1/2 of OT(a, a) / 2)
    with torch.no_grad():
        f = _softmin(eps_list[0], C, a_log)
        for eps in eps_list:
            f = torch.lerp(f, _softmin(eps, C, a_log, f), 0.5)  # (f + new f) / 2
    f = _softmin(eps_list[-1], C, a_log, f)  # the differentiated last step
    return (a_log.exp() * f).sum(-1)


def _ot_cross(x, x_mask, y, y_mask, eps_list):
    """<a, f> + <b, g> for OT(x_i, y_j) of every pair: [..., I, J]. x [..., I, N, D], y
    [..., J, M, D]."""
    a_log, b_log = (
        _log_weights(x_mask)[:, None, :],
        _log_weights(y_mask)[None, :, :],
    )  # [I, 1, N], [1, J, M]
    # The potentials f [..., I, J, N] and g [..., I, J, M] of every pair both come from C
    # [..., I, J, N, M]: f sums over y's tokens (dim -1) with y's weights and g; g over x's tokens
    # (dim -2) with x's and f. For the gradient, x may only be seen through f and y only through g:
    # hence the detach()es.
    C_g = _half_sq_dist(x.detach(), y)  # y's gradient path
    C_f = _half_sq_dist(x, y.detach()) if x.requires_grad else C_g.detach()
    with torch.no_grad():
        eps = eps_list[0]
        f, g = _softmin(eps, C_g, b_log, dim=-1), _softmin(eps, C_g, a_log, dim=-2)
        for (
            eps
        ) in eps_list:  # symmetric updates: both new potentials from the old ones, then averaged
            f, g = (
                torch.lerp(f, _softmin(eps, C_g, b_log, g, dim=-1), 0.5),
                torch.lerp(g, _softmin(eps, C_g, a_log, f, dim=-2), 0.5),
            )
    eps = eps_list[-1]
    f, g = (
        _softmin(eps, C_f, b_log, g, dim=-1),
        _softmin(eps, C_g, a_log, f, dim=-2),
    )  # the differentiated last step
    return (a_log.exp() * f).sum(-1) + (b_log.exp() * g).sum(-1)


def sinkhorn_divergence(x, x_mask, y, y_mask, blur=0.05, scaling=0.5, diameter=None, waste=1.15):
    """Debiased Sinkhorn divergence between every pair of token sets: x [..., Bx, N, D] with bool
    x_mask [Bx, N] against y [..., By, M, D] with y_mask [By, M] (any padding pattern); leading
    dimensions (layers) share the masks.
    Returns [..., Bx, By] (float32 if the inputs are). Follows geomloss's SamplesLoss("sinkhorn",
    p=2, blur=blur, scaling=scaling); one epsilon schedule serves the whole batch, its diameter
    taken over all valid points (as geomloss does for a batch), unless `diameter` is given. waste:
    see _length_buckets (1 = one bucket per distinct length; inf = no buckets, everything padded to
    the longest set)."""
    if not (x_mask.any(1).all() and y_mask.any(1).all()):
        raise ValueError("every token set needs at least one valid token")
    if diameter is None:
        diameter = _diameter(x.detach(), x_mask, y.detach(), y_mask)
    eps_list = _epsilon_schedule(diameter, blur, scaling)

    xs, ys = _buckets(x, x_mask, waste), _buckets(y, y_mask, waste)
    self_x = torch.cat(
        [_ot_self(xb, mb, eps_list) for _, xb, mb in xs], -1
    )  # [..., Bx] in bucket order
    self_y = torch.cat([_ot_self(yb, mb, eps_list) for _, yb, mb in ys], -1)
    cross = torch.cat(
        [
            torch.cat([_ot_cross(xb, xm, yb, ym, eps_list) for _, yb, ym in ys], -1)
            for _, xb, xm in xs
        ],
        -2,
    )
    S = cross - self_x[..., :, None] - self_y[..., None, :]
    x_order, y_order = [i for idx, _, _ in xs for i in idx], [j for idx, _, _ in ys for j in idx]
    x_back, y_back = (
        torch.tensor(x_order).argsort(),
        torch.tensor(y_order).argsort(),
    )  # bucket order -> input order
    return S[..., x_back.to(S.device), :][..., y_back.to(S.device)]


class _UnitVectors(torch.autograd.Function):
    """x / |x| over the last axis, as F.normalize (eps 1e-12), with its backward written out: the
    gradient of y = x / |x| is (g - y <y, g>) / |x|, three passes over the states instead of the
    eight that autograd makes through F.normalize's norm and division (docs/speed.md)."""

    @staticmethod
    def forward(ctx, x):
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)
        y = x / norm
        ctx.save_for_backward(y, norm)
        return y

    @staticmethod
    def backward(ctx, g):
        y, norm = ctx.saved_tensors
        return torch.addcmul(g, y, (g * y).sum(-1, keepdim=True), value=-1).div_(norm)


def wasserstein_logits(
    text_states, text_pool_mask, speech_states, speech_pool_mask, temperature=0.1
):
    """contrastive.wasserstein_logits: [L, B, B] = -SinkhornDivergence(text_i, speech_j) /
    temperature per layer on L2-normalised float32 tokens; rows = text, columns = speech. All layers
    in one call."""
    text, speech = (
        _UnitVectors.apply(torch.stack(_as_layers(s)).float()) for s in (text_states, speech_states)
    )
    return -sinkhorn_divergence(text, text_pool_mask, speech, speech_pool_mask) / temperature


# -----------------------------------------------------------------------------
# The loss: contrastive.contrastive_loss with the functions above swapped in


def contrastive_loss(*args, kernel="torch", **kwargs):
    """contrastive.contrastive_loss (the same arguments and results: see there) with this file's
    pooling (kernel: "torch" | "triton" | "auto", see masked_mean) and Wasserstein score."""
    pool = functools.partial(masked_mean, kernel=kernel)
    return contrastive.contrastive_loss(*args, pool=pool, wasserstein=wasserstein_logits, **kwargs)


# -----------------------------------------------------------------------------
# Optional Triton kernel: masked mean pooling of every layer in one launch, forward and backward.
#
# Why a kernel: pooling is pure memory traffic. For the paper's shapes the speech side alone is
# 7 layers x 10 utterances x ~250 steps x 4096 features; the kernel reads each hidden state once
# (and skips padding entirely), and its backward writes each gradient element once, with no
# temporary copies.
#
# Layout: the stacked states [L, B, T, D] (any strides), the pooling weights w [B, T] (float32,
# 1/count at valid steps, 0 at padding: the same weights as masked_mean), the output [L, B, D]
# float32. The L2 normalisation of the small [L, B, D] result is left to PyTorch (F.normalize in
# cos_logits): fusing it would need a whole D-row per program instance, giving up the parallelism
# over D-blocks for a tiny op.

if HAS_TRITON:

    @triton.jit
    def _pool_fwd_kernel(
        x_ptr,
        w_ptr,
        out_ptr,
        B,
        T,
        D,
        stride_l,
        stride_b,
        stride_t,
        stride_d,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # One program instance = one (layer, utterance) row and one block of BLOCK_D features; it
        # walks down the time axis BLOCK_T steps at a time, accumulating sum_t w[b, t] *
        # x[l, b, t, d] in fp32.
        row = tl.program_id(0).to(tl.int64)  # row = l * B + b; int64 so offsets cannot overflow
        layer, b = row // B, row % B
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            w = tl.load(w_ptr + b * T + t, mask=t < T, other=0.0)  # [BLOCK_T]
            # Masking: a padded step (w == 0) is never even loaded, so padding costs no bandwidth
            # and its contents (even NaN) cannot leak in; out-of-range t and d are masked the same
            # way.
            keep = (w != 0)[:, None] & d_ok[None, :]
            ptrs = (
                x_ptr
                + layer * stride_l
                + b * stride_b
                + t[:, None] * stride_t
                + d[None, :] * stride_d
            )
            x = tl.load(ptrs, mask=keep, other=0.0).to(
                tl.float32
            )  # any input dtype -> fp32 (bf16 too)
            acc += tl.sum(x * w[:, None], axis=0)
        tl.store(out_ptr + row * D + d, acc, mask=d_ok)

    @triton.jit
    def _pool_bwd_kernel(
        g_ptr, w_ptr, gx_ptr, B, T, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr
    ):
        # d mean / d x[l, b, t, :] = w[b, t], so grad_x[l, b, t, d] = w[b, t] * grad_out[l, b, d]:
        # the pooled gradient broadcast over the valid steps (divided by their count), exactly 0 at
        # padding. One program instance writes one [BLOCK_T, BLOCK_D] tile of the contiguous
        # gradient [L, B, T, D].
        row = tl.program_id(0).to(tl.int64)
        b = row % B
        t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        t_ok, d_ok = t < T, d < D
        g = tl.load(g_ptr + row * D + d, mask=d_ok, other=0.0)  # [BLOCK_D] fp32
        w = tl.load(w_ptr + b * T + t, mask=t_ok, other=0.0)  # [BLOCK_T]
        gx = w[:, None] * g[None, :]
        ptrs = gx_ptr + row * T * D + t[:, None] * D + d[None, :]
        tl.store(ptrs, gx.to(gx_ptr.dtype.element_ty), mask=t_ok[:, None] & d_ok[None, :])

    # Tile sizes. 128 contiguous features per tile: 256-512 bytes per time step, full coalesced
    # memory transactions. 32 time steps per tile: a [32, 128] fp32 tile is 32 registers per thread
    # with 4 warps, enough work per loop iteration to hide the loads' latency without spilling.
    # (Module constants so the tests can shrink them and cover several tiles per row with tiny
    # tensors.)
    BLOCK_T, BLOCK_D = 32, 128

    def _blocks(T, D):
        # capped at the tensor's size (powers of two, as tl.arange requires): tiny shapes stay cheap
        return min(BLOCK_T, triton.next_power_of_2(T)), min(BLOCK_D, triton.next_power_of_2(D))

    class _TritonMaskedMean(torch.autograd.Function):
        @staticmethod
        def forward(ctx, states, weights):  # states [L, B, T, D], weights [B, T] float32
            L, B, T, D = states.shape
            out = torch.empty(L, B, D, device=states.device, dtype=torch.float32)
            BLOCK_T, BLOCK_D = _blocks(T, D)
            grid = (L * B, triton.cdiv(D, BLOCK_D))
            with launch_device(states):
                _pool_fwd_kernel[grid](
                    states,
                    weights,
                    out,
                    B,
                    T,
                    D,
                    *states.stride(),
                    BLOCK_T=BLOCK_T,
                    BLOCK_D=BLOCK_D,
                )
            ctx.save_for_backward(weights)
            ctx.shape, ctx.dtype = states.shape, states.dtype
            return out

        @staticmethod
        def backward(ctx, grad_out):
            (weights,) = ctx.saved_tensors
            L, B, T, D = ctx.shape
            grad = torch.empty(ctx.shape, device=grad_out.device, dtype=ctx.dtype)
            BLOCK_T, BLOCK_D = _blocks(T, D)
            grid = (L * B, triton.cdiv(T, BLOCK_T), triton.cdiv(D, BLOCK_D))
            with launch_device(grad):
                _pool_bwd_kernel[grid](
                    grad_out.float().contiguous(), weights, grad, B, T, D,
                    BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D,
                )  # fmt: skip
            return grad, None


def launch_device(tensor):
    """Triton launches on the current CUDA device: make it the tensor's (`--device cuda:1` would
    otherwise run the kernel on GPU 0)."""
    return (
        torch.cuda.device(tensor.device)
        if tensor.device.type == "cuda"
        else contextlib.nullcontext()
    )


def triton_masked_mean(states, mask):
    """masked_mean as one Triton launch over all layers (with a Triton backward). A list of layers
    is stacked first (one copy); the model's hidden_states already returns the stacked [L, B, T, D]
    tensor."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    states = torch.stack(_as_layers(states)) if not torch.is_tensor(states) else states
    if states.dim() != 4 or mask.shape != states.shape[1:3]:
        raise ValueError(
            f"states must be [L, B, T, D] with mask [B, T]; got {tuple(states.shape)} and "
            f"{tuple(mask.shape)}"
        )
    weights = _mean_weights(mask).to(states.device).contiguous()
    return _TritonMaskedMean.apply(states, weights)
