"""The Triton pooling kernel of contrastive_fast.py against its PyTorch pooling (forward and
backward).

    # on the CPU through TRITON_INTERPRET=1 (conftest.py)
    python -m pytest -q tests/test_triton.py
    # the larger shapes too (several tiles per row)
    python -m pytest -q -m slow tests/test_triton.py

Skipped when triton is not installed (`pip install -r requirements-triton.txt`). The interpreter
runs every program instance in numpy, so the shapes stay tiny.
"""

import os

import pytest
import torch

triton = pytest.importorskip("triton")

import contrastive_fast  # noqa: E402
from contrastive_fast import contrastive_loss, masked_mean, triton_masked_mean  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"
if DEVICE == "cpu" and not INTERPRETED:
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)


def ragged(L, B, T, D, seed, dtype=torch.float32):
    """Fresh random [L, B, T, D] states with a ragged right-padded mask: random lengths, one row
    with a single valid position, one row with none (pools to 0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(L, B, T, D, generator=g).to(dtype)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0], lengths[-1] = 1, 0
    mask = torch.arange(T)[None] < lengths[:, None]
    return x.to(DEVICE), mask.to(DEVICE)


def check_parity(L, B, T, D, seed, dtype=torch.float32):
    x, mask = ragged(L, B, T, D, seed, dtype)
    x_triton, x_torch = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = triton_masked_mean(x_triton, mask), masked_mean(x_torch, mask)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    grad_out = torch.randn_like(ref)
    (g,) = torch.autograd.grad(out, x_triton, grad_out)
    (r,) = torch.autograd.grad(ref, x_torch, grad_out)
    assert g.dtype == x.dtype and g.shape == x.shape
    # bf16: the interpreter's fp32 -> bf16 cast truncates instead of rounding, so allow one bf16 ulp
    tol = dict(rtol=2**-7, atol=1e-6) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.float(), r.float(), **tol)
    assert (g[:, ~mask] == 0).all()  # exactly zero at padding


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pooling_forward_backward_parity(dtype):
    check_parity(L=3, B=4, T=9, D=40, seed=0, dtype=dtype)


def test_pooling_several_tiles_per_row(monkeypatch):
    monkeypatch.setattr(contrastive_fast, "BLOCK_T", 8)
    monkeypatch.setattr(contrastive_fast, "BLOCK_D", 16)
    check_parity(
        L=2, B=3, T=37, D=40, seed=1
    )  # 5 time tiles and 3 feature blocks, the last ones partial


@pytest.mark.slow
def test_pooling_and_loss_at_larger_shapes():
    # the real tile sizes with several tiles per row: 5 time tiles of 32, 3 feature blocks of 128
    check_parity(L=3, B=4, T=150, D=300, seed=2)
    check_parity(L=3, B=4, T=150, D=300, seed=3, dtype=torch.bfloat16)
    text, text_mask = ragged(3, 6, 40, 300, seed=4)
    speech, speech_mask = ragged(3, 6, 150, 300, seed=5)
    text_mask[:, 0] = speech_mask[:, 0] = True
    losses = [
        contrastive_loss(text, text_mask, speech, speech_mask, kernel=k)[1]
        for k in ("torch", "triton")
    ]
    torch.testing.assert_close(losses[0], losses[1])


def test_list_and_strided_inputs():
    x, mask = ragged(2, 3, 9, 16, seed=3)
    assert torch.equal(triton_masked_mean(list(x), mask), triton_masked_mean(x, mask))
    wide = torch.randn(3, 2, 9, 32, device=DEVICE).transpose(
        0, 1
    )  # non-contiguous [L, B, T, D] view
    torch.testing.assert_close(
        triton_masked_mean(wide[..., ::2], mask), masked_mean(wide[..., ::2], mask)
    )


def test_padding_is_never_read():
    x, mask = ragged(2, 3, 9, 16, seed=4)
    poisoned = torch.where(mask[None, :, :, None], x, float("nan"))
    torch.testing.assert_close(triton_masked_mean(poisoned, mask), masked_mean(x, mask))


@pytest.mark.parametrize("center", [False, True])
def test_full_loss_triton_equals_torch(center):
    text, text_mask = ragged(3, 4, 7, 32, seed=5)
    speech, speech_mask = ragged(3, 4, 12, 32, seed=6)
    text_mask[:, 0] = speech_mask[:, 0] = True  # every utterance has at least one token here
    results = {}
    for kernel in ("torch", "triton"):
        s = speech.clone().requires_grad_()
        total, per_layer = contrastive_loss(
            text, text_mask, s, speech_mask, center=center, kernel=kernel
        )
        results[kernel] = (total, per_layer, torch.autograd.grad(total, s)[0])
    for a, b in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_auto_kernel():
    x, mask = ragged(2, 3, 9, 16, seed=7)
    torch.testing.assert_close(
        masked_mean(x, mask, kernel="triton"), masked_mean(x, mask, kernel="torch")
    )
    torch.testing.assert_close(
        masked_mean(x, mask, kernel="auto"), masked_mean(x, mask)
    )  # torch on the CPU, Triton on a GPU
