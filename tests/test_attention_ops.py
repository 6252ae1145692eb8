"""The plain-PyTorch context operators (semseg.models.ops) against mmcv's: PSAMask against a
direct loop transcription of mmcv's CPU kernel (mmcv/ops/csrc/pytorch/cpu/psamask.cpp), forward
and backward, both modes, odd sizes; criss-cross attention against mmcv 2.x's own code."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import load_script, needs_cuda

from semseg.models.ops import CrissCrossAttention, PSAMask, psa_mask

# (N, H, W, mask_h, mask_w): odd maps, masks wider and narrower than them, even masks.
PSA_SIZES = [(2, 5, 7, 9, 13), (1, 3, 5, 3, 3), (2, 4, 6, 7, 5), (1, 6, 3, 4, 6)]


def _window(h: int, w: int, hf: int, wf: int, mh: int, mw: int):
    """The kernel's effective mask region for pixel (h, w) and the half sizes."""
    half_h, half_w = (mh - 1) // 2, (mw - 1) // 2
    rows = range(max(0, half_h - h), min(mh, hf + half_h - h))
    cols = range(max(0, half_w - w), min(mw, wf + half_w - w))
    return rows, cols, half_h, half_w


def kernel_forward(mask: torch.Tensor, mode: str, mh: int, mw: int) -> torch.Tensor:
    """psamask_collect_forward / psamask_distribute_forward, loop for loop."""
    n_, _, hf, wf = mask.shape
    src = mask.reshape(-1)
    out = torch.zeros(n_ * hf * wf * hf * wf, dtype=mask.dtype)
    for n in range(n_):
        for h in range(hf):
            for w in range(wf):
                rows, cols, half_h, half_w = _window(h, w, hf, wf, mh, mw)
                for hidx in rows:
                    for widx in cols:
                        other = (hidx + h - half_h) * wf + (widx + w - half_w)
                        here = h * wf + w
                        if mode == "collect":
                            dst = (n * hf * wf + other) * hf * wf + here
                        else:
                            dst = (n * hf * wf + here) * hf * wf + other
                        out[dst] = src[((n * mh * mw + hidx * mw + widx) * hf + h) * wf + w]
    return out.view(n_, hf * wf, hf, wf)


def kernel_backward(grad: torch.Tensor, mode: str, mh: int, mw: int) -> torch.Tensor:
    """psamask_collect_backward / psamask_distribute_backward, loop for loop."""
    n_, _, hf, wf = grad.shape
    src = grad.reshape(-1)
    out = torch.zeros(n_ * mh * mw * hf * wf, dtype=grad.dtype)
    for n in range(n_):
        for h in range(hf):
            for w in range(wf):
                rows, cols, half_h, half_w = _window(h, w, hf, wf, mh, mw)
                for hidx in rows:
                    for widx in cols:
                        other = (hidx + h - half_h) * wf + (widx + w - half_w)
                        here = h * wf + w
                        if mode == "collect":
                            at = (n * hf * wf + other) * hf * wf + here
                        else:
                            at = (n * hf * wf + here) * hf * wf + other
                        out[((n * mh * mw + hidx * mw + widx) * hf + h) * wf + w] = src[at]
    return out.view(n_, mh * mw, hf, wf)


@pytest.mark.parametrize("mode", ["collect", "distribute"])
@pytest.mark.parametrize("size", PSA_SIZES, ids=lambda s: "x".join(map(str, s)))
def test_psa_mask_forward_and_gradient_equal_mmcv_kernel(mode: str, size: tuple) -> None:
    n, h, w, mh, mw = size
    gen = torch.Generator().manual_seed(0)
    mask = torch.randn(n, mh * mw, h, w, generator=gen, dtype=torch.float64, requires_grad=True)
    out = psa_mask(mask, mode, (mh, mw))
    expected = kernel_forward(mask.detach(), mode, mh, mw)
    assert torch.equal(out, expected)
    covers_the_map = mh >= 2 * h - 1 and mw >= 2 * w - 1  # else zeros beyond the window
    assert (expected != 0).any() and bool((expected == 0).any()) != covers_the_map
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad(out, mask, grad_out)
    assert torch.equal(grad, kernel_backward(grad_out, mode, mh, mw))


@pytest.mark.parametrize("size", PSA_SIZES, ids=lambda s: "x".join(map(str, s)))
def test_reference_script_psamask_is_the_kernel(size: tuple) -> None:
    """scripts/mmseg_reference.py's PSAMask (the kernel with its window loops as slices), which
    the mmseg fixtures were made with, equals the loop transcription."""
    n, h, w, mh, mw = size
    mask = torch.randn(n, mh * mw, h, w, generator=torch.Generator().manual_seed(1))
    kernel = load_script("mmseg_reference").psamask_kernel
    for mode in ("collect", "distribute"):
        assert torch.equal(kernel(mask, mode, (mh, mw)), kernel_forward(mask, mode, mh, mw))


def test_psa_mask_distribute_is_collect_transposed() -> None:
    """mmseg's compact form: distribute's map is collect's with the two positions swapped."""
    mask = torch.randn(2, 25, 4, 6)
    collect = psa_mask(mask, "collect", (5, 5)).view(2, 24, 24)
    distribute = psa_mask(mask, "distribute", (5, 5)).view(2, 24, 24)
    assert torch.equal(distribute, collect.transpose(1, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_psa_mask_in_low_precision_moves_values_exactly(dtype: torch.dtype) -> None:
    mask = torch.randn(1, 35, 5, 3)
    for mode in ("collect", "distribute"):
        low = PSAMask(mode, (5, 7))(mask.to(dtype))
        assert low.dtype == dtype
        assert torch.equal(low, psa_mask(mask, mode, (5, 7)).to(dtype))


def test_psa_mask_bad_input_is_one_clear_line() -> None:
    with pytest.raises(ValueError, match=r"not mask_size \(3, 3\)"):
        psa_mask(torch.zeros(1, 8, 2, 2), "collect", (3, 3))
    with pytest.raises(ValueError, match="psa_type must be one of"):
        PSAMask("both", (3, 3))


def mmcv_criss_cross(module: CrissCrossAttention, x: torch.Tensor) -> torch.Tensor:
    """mmcv 2.x's CrissCrossAttention.forward (mmcv/ops/cc_attention.py), line for line."""
    H = x.shape[2]
    query, key, value = module.query_conv(x), module.key_conv(x), module.value_conv(x)
    neg_inf_diag = torch.diag(torch.tensor(float("-inf")).to(x.device).repeat(H), 0)
    energy_H = torch.einsum("bchw,bciw->bwhi", query, key) + neg_inf_diag
    energy_H = energy_H.transpose(1, 2)
    energy_W = torch.einsum("bchw,bchj->bhwj", query, key)
    attn = F.softmax(torch.cat([energy_H, energy_W], dim=-1), dim=-1)
    out = torch.einsum("bciw,bhwi->bchw", value, attn[..., :H])
    out += torch.einsum("bchj,bhwj->bchw", value, attn[..., H:])
    return (module.gamma(out) + x).contiguous()


def test_criss_cross_attention_equals_mmcv() -> None:
    torch.manual_seed(0)
    module = CrissCrossAttention(16)
    assert module.gamma.scale.item() == 0.0  # mmcv's Scale(0.)
    x = torch.randn(2, 16, 7, 5, requires_grad=True)
    assert torch.equal(module(x), x)  # gamma 0: the input
    with torch.no_grad():
        module.gamma.scale.fill_(0.7)
    ours, ref = module(x), mmcv_criss_cross(module, x)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    assert (ours - x).abs().max() > 0.1
    g = torch.randn_like(ours)
    torch.testing.assert_close(
        torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(ref, x, g)[0], rtol=0, atol=1e-6
    )
    assert [n for n, _ in module.named_parameters()] == [
        "query_conv.weight", "query_conv.bias", "key_conv.weight", "key_conv.bias",
        "value_conv.weight", "value_conv.bias", "gamma.scale",
    ]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_criss_cross_attention_under_autocast(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    module = CrissCrossAttention(16)
    with torch.no_grad():
        module.gamma.scale.fill_(1.0)
    x = torch.randn(1, 16, 6, 9)
    with torch.autocast("cpu", dtype=dtype):
        low = module(x)
    assert torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), module(x), rtol=0.05, atol=0.05)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ops_on_cuda(dtype: torch.dtype) -> None:
    mask = torch.randn(2, 35, 5, 6)
    for mode in ("collect", "distribute"):
        on_gpu = psa_mask(mask.cuda().to(dtype), mode, (5, 7)).cpu()
        assert torch.equal(on_gpu, psa_mask(mask.to(dtype), mode, (5, 7)))
    torch.manual_seed(0)
    module = CrissCrossAttention(16)
    x = torch.randn(1, 16, 6, 9)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        out = module.cuda()(x.cuda())
    torch.testing.assert_close(out.float().cpu(), module.cpu()(x), rtol=0.05, atol=0.05)
