"""Block-scaled FP8: quantization, the emulated GEMMs, the FP8 linear's gradients."""

import pytest
import torch

from miles_lib.precision import fp8


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_quantization_blocks_scales_and_round_trip():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 384, generator=g)
    x[:128, :128] *= 100  # one block with a much larger range
    x[128:, 256:] = 0  # an all-zero block
    q, s = fp8.quantize_weight_128x128(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 3) and s.dtype == torch.float32
    assert s[0, 0] == x[:128, :128].abs().max() * (1.0 / 448)
    assert s[1, 2] == 1.0 and fp8.dequantize_blockwise(q, s)[128:, 256:].abs().max() == 0
    assert q.float().abs().amax(dim=1).max() <= 448
    assert rel(fp8.dequantize_blockwise(q, s), x) < 0.05  # e4m3 keeps 3 mantissa bits
    qa, sa = fp8.quantize_act_1x128(x)
    assert sa.shape == (256, 3)
    _, s2 = fp8.quantize_blockwise(x, 128, 128, pow2_scales=True)
    assert torch.equal(torch.exp2(torch.log2(s2).round()), s2) and (s2 >= s).all()
    with pytest.raises(ValueError, match="multiples of 128"):
        fp8.quantize_act_1x128(torch.randn(4, 100))


def test_fp8_linear_matches_the_dequantized_reference_and_bounds_rounding_error():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 512, generator=g, requires_grad=True)
    w = torch.randn(384, 512, generator=g, requires_grad=True)
    y = fp8.fp8_linear(x, w)
    qx, sx = fp8.quantize_act_1x128(x.detach())
    qw, sw = fp8.quantize_weight_128x128(w.detach())
    assert rel(y.detach(), fp8.fp8_matmul_reference(qx, sx, qw, sw)) <= 1e-5  # same operands, fp32
    err = rel(y.detach(), x.detach() @ w.detach().T)
    assert 0.005 < err < 0.06, err  # e4m3 rounding (~3-4% on Gaussian data), and it did quantize
    dy = torch.randn(256, 384, generator=g)
    y.backward(dy)
    qdy, sdy = fp8.quantize_act_1x128(dy)
    dx_ref = fp8.fp8_matmul_reference(qdy, sdy, qw.t().contiguous(), sw.t().contiguous())
    assert rel(x.grad, dx_ref) <= 1e-5
    qdyt, sdyt = fp8.quantize_act_1x128(dy.t().contiguous())
    qxt, sxt = fp8.quantize_act_1x128(x.detach().t().contiguous())
    assert rel(w.grad, fp8.fp8_matmul_reference(qdyt, sdyt, qxt, sxt)) <= 1e-5
    assert 0.005 < rel(x.grad, dy @ w.detach()) < 0.08
    assert 0.005 < rel(w.grad, dy.T @ x.detach()) < 0.08


@pytest.mark.gpu
def test_gpu_quantization_is_bitwise_equal_to_cpu_and_cublas_matches_reference():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(512, 1024, generator=g)
    w = torch.randn(768, 1024, generator=g)
    for fn, t in ((fp8.quantize_act_1x128, x), (fp8.quantize_weight_128x128, w)):
        qc, sc = fn(t)
        qg, sg = fn(t.cuda())
        assert torch.equal(qc.view(torch.uint8), qg.cpu().view(torch.uint8)) and torch.equal(sc, sg.cpu())
    assert fp8.gpu_blockwise_available("cuda")
    qx, sx = fp8.quantize_act_1x128(x.cuda())
    qw, sw = fp8.quantize_weight_128x128(w.cuda())
    ref = fp8.fp8_matmul_reference(qx, sx, qw, sw)
    # fp32 accumulation on tensor cores, different order: bound 1e-3 relative
    assert rel(fp8.fp8_gemm(qx, sx, qw, sw), ref) < 1e-3
