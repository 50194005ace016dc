"""Block-scaled FP8: quantization formats, GEMMs, the FP8 linear and grouped-expert gradients.

References are written out here (dequantize by repeating each block scale, multiply in fp32), not
taken from the library. GPU tests (``-m gpu``) check that the CUDA path quantizes bit-identically
and that cuBLAS / the Gluon and Triton grouped kernels match the same reference within the
accumulation precision of FP8 tensor cores (bound 1e-3 relative Frobenius; measured ~1.3e-4).
"""

import functools

import pytest
import torch

from miles_lib.precision import fp8, fp8_gemm
from miles_lib.precision.fp8_linear import (
    fp8_grouped_linear,
    fp8_linear,
    fp8_linear_shared_input,
    quantized_weights,
)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def deq(q, s):
    """Dequantize by expanding the block scales to q's shape (block shape from the shapes)."""
    br, bc = q.shape[-2] // s.shape[-2], q.shape[-1] // s.shape[-1]
    return q.float() * s.float().repeat_interleave(br, -2).repeat_interleave(bc, -1)


def grouped_ref(a, b_ENK, offs):
    out, start = [], 0
    for e, end in enumerate(offs.tolist()):
        out.append(a[start:end] @ b_ENK[e].T)
        start = end
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# quantization
# ---------------------------------------------------------------------------------------------
def test_hand_computed_block_scale_and_round_to_nearest_even():
    x = torch.zeros(1, 256)
    x[0, :4] = torch.tensor([896.0, 2.125, 2.375, -3.0])  # amax 896 -> s = 896/448 = 2 exactly
    x[0, 128] = 3.5  # second tile: s = 3.5/448 = 2^-7
    q, s = fp8.quantize_act_1x128(x)
    assert s.tolist() == [[2.0, 0.0078125]]
    # 2.125/2 = 1.0625 ties between e4m3 1.0 and 1.125 -> even mantissa 1.0; 2.375/2 = 1.1875 -> 1.25
    assert q[0, :4].float().tolist() == [448.0, 1.0, 1.25, -1.5] and q[0, 128].item() == 448.0
    assert q[0, 4:128].float().abs().max() == 0
    zero_q, zero_s = fp8.quantize_weight_128x128(torch.zeros(128, 128))
    assert zero_s.item() == 1.0 and zero_q.float().abs().max() == 0


def test_pow2_scales_round_up_to_powers_of_two():
    s = fp8.block_scale(torch.tensor([448.0, 449.0, 3.0, 0.0]), pow2_scales=True)
    assert s.tolist() == [1.0, 2.0, 0.0078125, 1.0]  # 3/448 = 0.0067 -> 2^-7


def test_block_shapes_round_trip_error_and_padding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 384, generator=g)
    x[:128, :128] *= 100  # one block with a much larger range
    q, s = fp8.quantize_weight_128x128(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 3) and s.dtype == torch.float32
    assert s[0, 0] == x[:128, :128].abs().max() * (1.0 / 448)
    assert 0.005 < rel(deq(q, s), x) < 0.05  # e4m3 keeps 3 mantissa bits
    assert fp8.quantize_act_1x128(x)[1].shape == (256, 3)
    w3 = torch.randn(3, 256, 128, generator=g)
    q3, s3 = fp8.quantize_weight_128x128(w3)
    assert s3.shape == (3, 2, 1) and torch.equal(q3[1].view(torch.uint8), fp8.quantize_weight_128x128(w3[1])[0].view(torch.uint8))
    # 128x1 tiles, transposed, tokens padded 200 -> 256 with zeros
    y = torch.randn(200, 256, generator=g)
    qt, st = fp8.quantize_act_128x1_t(y)
    assert qt.shape == (256, 256) and st.shape == (256, 2)
    assert qt[:, 200:].float().abs().max() == 0
    assert st[5, 1] == y[128:, 5].abs().max() * (1.0 / 448)
    assert rel(deq(qt, st)[:, :200], y.T) < 0.05
    with pytest.raises(ValueError, match="multiples of 128"):
        fp8.quantize_act_1x128(torch.randn(4, 100))
    with pytest.raises(ValueError, match="multiples of 128"):
        fp8.quantize_weight_128x128(torch.randn(100, 128))


# ---------------------------------------------------------------------------------------------
# FP8 linear (CPU emulation)
# ---------------------------------------------------------------------------------------------
def test_fp8_linear_forward_and_grads_match_the_dequantized_reference():
    g = torch.Generator().manual_seed(1)
    M, K, N = 200, 512, 384  # M not a multiple of 128: the wgrad operands are padded
    x = torch.randn(M, K, generator=g, requires_grad=True)
    w = torch.randn(N, K, generator=g, requires_grad=True)
    y = fp8_linear(x, w)
    xd, wd = x.detach(), w.detach()
    assert rel(y.detach(), deq(*fp8.quantize_blockwise(xd, 1, 128)) @ deq(*fp8.quantize_blockwise(wd, 128, 128)).T) <= 1e-5
    err = rel(y.detach(), xd @ wd.T)
    assert 0.005 < err < 0.06, err  # e4m3 rounding (~3-4% on Gaussian data), and it did quantize
    dy = torch.randn(M, N, generator=g)
    y.backward(dy)
    qw, sw = fp8.quantize_blockwise(wd, 128, 128)
    dx_ref = deq(*fp8.quantize_blockwise(dy, 1, 128)) @ deq(qw, sw)  # W's blocks, transposed
    assert rel(x.grad, dx_ref) <= 1e-5
    dyt = deq(*fp8.quantize_blockwise(torch.cat([dy, torch.zeros(56, N)]).T, 1, 128))  # 128x1 tiles
    xt = deq(*fp8.quantize_blockwise(torch.cat([xd, torch.zeros(56, K)]).T, 1, 128))
    assert rel(w.grad, dyt @ xt.T) <= 1e-5
    assert 0.005 < rel(x.grad, dy @ wd) < 0.08
    assert 0.005 < rel(w.grad, dy.T @ xd) < 0.08


def test_fp8_linear_wgrad_on_128x128_grad_blocks_matches_its_reference():
    g = torch.Generator().manual_seed(11)
    M, K, N = 200, 256, 384
    x = torch.randn(M, K, generator=g, requires_grad=True)
    w = torch.randn(N, K, generator=g, requires_grad=True)
    dy = torch.randn(M, N, generator=g) * torch.logspace(-2, 1, N)  # channel ranges differ within a block
    fp8_linear(x, w, wgrad_grad_blocks="128x128").backward(dy)
    xd = x.detach()
    dyt_blocks = fp8.quantize_blockwise(torch.cat([dy, torch.zeros(56, N)]).T, 128, 128)
    assert dyt_blocks[1].shape == (3, 2)
    assert same_values(fp8.quantize_act_128x128_t(dy), dyt_blocks)
    xt = deq(*fp8.quantize_blockwise(torch.cat([xd, torch.zeros(56, K)]).T, 1, 128))
    assert rel(w.grad, deq(*dyt_blocks) @ xt.T) <= 1e-5
    x_grad, w_grad = x.grad, w.grad
    x.grad = w.grad = None
    fp8_linear(x, w).backward(dy)
    assert torch.equal(x_grad, x.grad)  # dgrad is the same 1x128 x 128x128 GEMM either way
    err_blocks, err_tiles = rel(w_grad, dy.T @ xd), rel(w.grad, dy.T @ xd)
    assert 0.005 < err_tiles < err_blocks < 0.1, (err_tiles, err_blocks)  # coarser scales, larger error
    with pytest.raises(ValueError, match="wgrad_grad_blocks"):
        fp8_linear(x, w, wgrad_grad_blocks="1x128")
    with pytest.raises(ValueError, match="wgrad_grad_blocks"):
        fp8.Fp8Config(wgrad_grad_blocks="64x64")


def test_fp8_linear_bf16_master_weight_bias_and_inference_path():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 256, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(128, 256, generator=g) * 0.05).bfloat16().requires_grad_()
    b = torch.randn(128, generator=g).bfloat16().requires_grad_()
    y = fp8_linear(x, w, b)
    assert y.shape == (3, 5, 128) and y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert x.grad.dtype == w.grad.dtype == torch.bfloat16 and torch.equal(b.grad, (2 * y.float()).sum((0, 1)).bfloat16())
    with torch.no_grad():
        y2 = fp8_linear(x, w, b)
    assert torch.equal(y2, y.detach())  # the no-grad path computes the same forward
    assert rel(y.detach(), x.detach().float() @ w.detach().float().T + b.detach().float()) < 0.06


def test_fp8_grouped_linear_matches_per_expert_reference_with_empty_experts():
    g = torch.Generator().manual_seed(3)
    E, K, N = 4, 256, 384
    counts = [70, 0, 130, 56]  # an empty expert and groups that straddle 128-token tiles
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    M = sum(counts)
    x = torch.randn(M, K, generator=g, requires_grad=True)
    w = torch.randn(E, N, K, generator=g, requires_grad=True)
    y = fp8_grouped_linear(x, w, offs)
    xd, wd = x.detach(), w.detach()
    xq = deq(*fp8.quantize_blockwise(xd, 1, 128))
    wq = deq(*fp8.quantize_blockwise(wd, 128, 128))
    assert rel(y.detach(), grouped_ref(xq, wq, offs)) <= 1e-5
    assert 0.005 < rel(y.detach(), grouped_ref(xd, wd, offs)) < 0.06
    dy = torch.randn(M, N, generator=g)
    y.backward(dy)
    dyq = deq(*fp8.quantize_blockwise(dy, 1, 128))
    assert rel(x.grad, grouped_ref(dyq, wq.transpose(1, 2), offs)) <= 1e-5
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end == start:
            assert w.grad[e].abs().max() == 0  # an expert without tokens gets no gradient
        else:  # each expert's wgrad operands in its own 128-token tiles, as if it were alone
            dyt = deq(*fp8.quantize_act_128x1_t(dy[start:end]))
            xt = deq(*fp8.quantize_act_128x1_t(xd[start:end]))
            assert rel(w.grad[e], dyt @ xt.T) <= 1e-5
        start = end


def test_expert_aligned_wgrad_operands():
    """quantize_act_dual_grouped: the 1x128 half is quantize_act_1x128; the transposed half puts
    each expert at a 128-aligned column, quantized exactly as that expert's rows alone, zeros
    after it; empty experts take no columns."""
    g = torch.Generator().manual_seed(5)
    counts = [70, 0, 130, 256, 1]
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(sum(counts), 256, generator=g) * torch.logspace(-2, 2, 256)
    assert fp8.aligned_expert_offsets(offs).tolist() == [128, 128, 384, 640, 768]
    rowwise, (qt, st) = fp8.quantize_act_dual_grouped(x, offs)
    assert same_values(rowwise, fp8.quantize_act_1x128(x))
    assert qt.shape == (256, 128 * (4 + 5)) and st.shape == (256, 9)
    start = 0
    for end, col in zip(offs.tolist(), [0, 128, 128, 384, 640]):
        if end > start:
            alone = fp8.quantize_act_128x1_t(x[start:end])
            width = alone[0].shape[1]
            assert same_values((qt[:, col:col + width], st[:, col // 128:(col + width) // 128]), alone)
            assert (qt[:, col + end - start:col + width].float() == 0).all()
        start = end
    with pytest.raises(ValueError, match="offs_E"):
        fp8.quantize_act_dual_grouped(x, offs[None])
    for bad in ([70, 60, 200, 456, 457], [70, 70, 200, 456, 450]):  # decreasing; not ending at M
        with pytest.raises(ValueError, match="non-decreasing cumulative expert ends"):
            fp8.quantize_act_dual_grouped(x, torch.tensor(bad, dtype=torch.int32))


# ---------------------------------------------------------------------------------------------
# GPU: bit-identical quantization, cuBLAS and Triton within FP8 tensor-core accumulation error
# ---------------------------------------------------------------------------------------------
GPU_BOUND = 1e-3  # relative Frobenius vs the fp32 reference on the same quantized operands


def _shared_vs_separate(x, ws, bs, dy_parts, **recipe):
    """(outputs, x.grad, weight grads, bias grads) of fp8_linear_shared_input and of one fp8_linear
    per weight, on fresh leaves."""
    results = []
    for shared in (True, False):
        xa = x.detach().clone().requires_grad_()
        wa = [w.detach().clone().requires_grad_() for w in ws]
        ba = [None if b is None else b.detach().clone().requires_grad_() for b in bs]
        ys = (fp8_linear_shared_input(xa, wa, ba, **recipe) if shared else
              [fp8_linear(xa, w, b, **recipe) for w, b in zip(wa, ba)])
        sum((y.float() * d).sum() for y, d in zip(ys, dy_parts)).backward()
        results.append(([y.detach() for y in ys], xa.grad, [w.grad for w in wa],
                        [None if b is None else b.grad for b in ba]))
    return results


@pytest.mark.parametrize("recipe", [{}, {"pow2_scales": True, "wgrad_grad_blocks": "128x128"}])
def test_shared_input_linears_equal_one_linear_each(recipe):
    """q/k/v-like projections of one x as one stacked FP8 linear: the same quantized operands per
    output column, so outputs and gradients equal the separate linears' to fp32 summation order."""
    g = torch.Generator().manual_seed(21)
    M, K = 200, 256  # M not a multiple of 128: the wgrad operands are padded
    x = torch.randn(2, M // 2, K, generator=g)
    ws = [torch.randn(n, K, generator=g) * s for n, s in ((256, 1.0), (128, 30.0), (128, 0.01))]
    bs = [torch.randn(256, generator=g), None, torch.randn(128, generator=g)]
    dy = [torch.randn(2, M // 2, w.shape[0], generator=g) * s for w, s in zip(ws, (1.0, 1e-3, 50.0))]
    (ys, dx, dws, dbs), (ys_ref, dx_ref, dws_ref, dbs_ref) = _shared_vs_separate(x, ws, bs, dy, **recipe)
    for y, y_ref in zip(ys, ys_ref):
        assert y.shape == y_ref.shape and rel(y, y_ref) <= 1e-6
    assert rel(dx, dx_ref) <= 1e-6  # one dgrad GEMM summing the three contributions in fp32
    for d, d_ref in zip(dws, dws_ref):
        assert d.shape == d_ref.shape and rel(d, d_ref) <= 1e-6
    assert torch.equal(dbs[0], dbs_ref[0]) and dbs[1] is None and torch.equal(dbs[2], dbs_ref[2])
    xd = x.detach().reshape(M, K)
    assert 0.005 < rel(ys[1].reshape(M, -1), xd @ ws[1].T) < 0.06  # and it did quantize
    with torch.no_grad():  # the inference path: the same forward
        assert all(torch.equal(a, b) for a, b in zip(fp8_linear_shared_input(x, ws, bs, **recipe), ys))


def test_shared_input_output_left_unused_gets_zero_weight_grad():
    """An output no loss reads (its grad arrives as None) counts as a zero grad: its weight gets a
    zero gradient (one linear alone would get None), the others are as if it were absent."""
    g = torch.Generator().manual_seed(24)
    x = torch.randn(130, 256, generator=g)
    ws = [torch.randn(n, 256, generator=g) for n in (128, 256, 128)]
    dy = [torch.randn(130, w.shape[0], generator=g) for w in ws]
    dy[1] = torch.zeros_like(dy[1])
    _, (_, dx_ref, dws_ref, _) = _shared_vs_separate(x, ws, [None] * 3, dy)
    xa = x.clone().requires_grad_()
    wa = [w.clone().requires_grad_() for w in ws]
    q, _, v = fp8_linear_shared_input(xa, wa, [None] * 3)
    ((q * dy[0]).sum() + (v * dy[2]).sum()).backward()  # the middle output is never used
    assert torch.equal(wa[1].grad, torch.zeros_like(ws[1]))
    assert rel(xa.grad, dx_ref) <= 1e-6 and rel(wa[0].grad, dws_ref[0]) <= 1e-6 and rel(wa[2].grad, dws_ref[2]) <= 1e-6


def test_shared_input_weight_stack_is_cached_until_any_weight_changes():
    g = torch.Generator().manual_seed(22)
    ws = tuple(torch.nn.Parameter(torch.randn(n, 256, generator=g)) for n in (256, 128))
    (q1, s1), (qt1, st1) = quantized_weights(ws, False, for_dgrad=True)
    ref = fp8.quantize_weight_128x128(torch.cat([w.detach() for w in ws]), with_transpose=True)
    assert same_values((q1, s1), ref[0]) and same_values((qt1, st1), ref[1])
    assert quantized_weights(ws, False)[0] is q1  # a hit, also for the forward-only request
    with torch.no_grad():
        ws[1].mul_(2)  # the second weight's optimizer step
    q2, s2 = quantized_weights(ws, False)
    assert q2 is not q1 and same_values((q2, s2), fp8.quantize_weight_128x128(torch.cat([w.detach() for w in ws])))
    assert not hasattr(ws[1], "_fp8_shared_cache") and not hasattr(ws[0], "_fp8_cache")  # one copy, on ws[0]
    with pytest.raises(ValueError, match="in-features"):
        fp8_linear_shared_input(torch.randn(4, 256), [ws[0], torch.randn(128, 384)], [None, None])
    with pytest.raises(ValueError, match="one bias"):
        fp8_linear_shared_input(torch.randn(4, 256), list(ws), [None])


@pytest.mark.gpu
@pytest.mark.parametrize("t_blocks", ["128x1", "128x128"])
def test_gpu_stacked_dual_quantization_equals_quantizing_the_concatenation(t_blocks):
    from miles_lib.precision import triton_fp8
    g = torch.Generator().manual_seed(25)
    for M in (200, 256):
        xs = [(torch.randn(M, n, generator=g) * s).bfloat16().cuda() for n, s in ((256, 1.0), (128, 1e3), (128, 1e-3))]
        for pow2 in (False, True):
            ref = triton_fp8.quantize_dual(torch.cat(xs, 1), pow2, t_blocks=t_blocks)
            got = fp8.quantize_act_dual_stacked(xs, pow2, t_blocks)
            assert same_bits(got[0], ref[0]) and same_bits(got[1], ref[1]), (M, pow2)
            if t_blocks == "128x128":
                assert torch.equal(got[1][1]._cublas_padded, ref[1][1]._cublas_padded)
            cpu = fp8.quantize_act_dual_stacked([x.cpu() for x in xs], pow2, t_blocks)
            assert all(same_values(tuple(t.cpu() for t in a), b) for a, b in zip(got, cpu))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_shared_input_linears_match_separate_and_cpu(dtype):
    """On cuBLAS the stacked GEMM may take another kernel than the separate ones: equal within the
    FP8 accumulation bound, and the same as the CPU emulation."""
    g = torch.Generator().manual_seed(23)
    x = torch.randn(300, 512, generator=g).to(dtype)
    ws = [torch.randn(n, 512, generator=g).to(dtype) for n in (512, 128, 128)]
    bs = [None, torch.randn(128, generator=g).to(dtype), None]
    dy = [torch.randn(300, w.shape[0], generator=g).to(dtype) for w in ws]
    tol = GPU_BOUND if dtype == torch.float32 else 8e-3
    cuda = _shared_vs_separate(x.cuda(), [w.cuda() for w in ws], [b if b is None else b.cuda() for b in bs],
                               [d.cuda() for d in dy], wgrad_grad_blocks="128x128")
    cpu = _shared_vs_separate(x, ws, bs, dy, wgrad_grad_blocks="128x128")
    for (ys, dx, dws, _), (ys_c, dx_c, dws_c, _) in zip(cuda, cpu):
        for got, ref in zip([*ys, dx, *dws], [*ys_c, dx_c, *dws_c]):
            assert rel(got.cpu(), ref) < tol
    (ys, dx, dws, _), (ys_s, dx_s, dws_s, _) = cuda
    for got, ref in zip([*ys, dx, *dws], [*ys_s, dx_s, *dws_s]):
        assert rel(got, ref) < tol


@pytest.mark.gpu
@pytest.mark.parametrize("pow2", [False, True])
def test_gpu_quantization_is_bitwise_equal_to_cpu(pow2):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(520, 1024, generator=g) * torch.logspace(-3, 3, 1024)  # varied ranges per tile
    w = torch.randn(2, 768, 1024, generator=g)
    for fn, t in ((fp8.quantize_act_1x128, x), (fp8.quantize_weight_128x128, w), (fp8.quantize_act_128x1_t, x),
                  (fp8.quantize_act_1x128, x.bfloat16())):
        qc, sc = fn(t, pow2)
        qg, sg = fn(t.cuda(), pow2)
        assert torch.equal(qc.view(torch.uint8), qg.cpu().view(torch.uint8)), fn.__name__
        assert torch.equal(sc, sg.cpu()), fn.__name__
    for part_c, part_g in zip(fp8.quantize_act_dual(x, pow2), fp8.quantize_act_dual(x.cuda(), pow2)):
        assert torch.equal(part_c[0].view(torch.uint8), part_g[0].cpu().view(torch.uint8))
        assert torch.equal(part_c[1], part_g[1].cpu())
    # the weight and its dgrad transpose from one kernel; the cuBLAS copy of the scales padded with 1
    for wt in (w, w[0, :, :640].contiguous(), w[1, :384].bfloat16()):
        for (qc, sc), (qg, sg) in zip(fp8.quantize_weight_128x128(wt, pow2, True),
                                      fp8.quantize_weight_128x128(wt.cuda(), pow2, True)):
            assert torch.equal(qc.view(torch.uint8), qg.cpu().view(torch.uint8)) and torch.equal(sc, sg.cpu())
            padded = sg._cublas_padded.cpu()
            assert padded.shape[-1] % 4 == 0 and torch.equal(padded[..., : sc.shape[-1]], sc)
            assert (padded[..., sc.shape[-1]:] == 1).all()


def test_weight_and_its_dgrad_transpose_share_blocks():
    w = torch.randn(2, 256, 640, generator=torch.Generator().manual_seed(9))
    (q, s), (qt, st) = fp8.quantize_weight_128x128(w, with_transpose=True)
    assert torch.equal(q.view(torch.uint8), fp8.quantize_weight_128x128(w)[0].view(torch.uint8))
    assert qt.shape == (2, 640, 256) and st.shape == (2, 5, 2)
    assert torch.equal(qt.view(torch.uint8), q.transpose(1, 2).view(torch.uint8)) and torch.equal(st, s.transpose(1, 2))
    ref_t = fp8.quantize_weight_128x128(w.transpose(1, 2).contiguous())  # blocks of W^T: same scales, same bytes
    assert torch.equal(qt.view(torch.uint8), ref_t[0].view(torch.uint8)) and torch.equal(st, ref_t[1])


def test_dual_quantization_setting_falls_back_to_the_reference_on_cpu(monkeypatch):
    monkeypatch.setattr(fp8, "_DUAL_IMPL", "fused")
    x = torch.randn(200, 256, generator=torch.Generator().manual_seed(7))
    (q, s), (qt, st) = fp8.quantize_act_dual(x)
    for (a, sa), (b, sb) in (((q, s), fp8.quantize_act_1x128(x)), ((qt, st), fp8.quantize_act_128x1_t(x))):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)) and torch.equal(sa, sb)
    with pytest.raises(ValueError, match="multiples of 128"):
        fp8.quantize_act_dual(torch.randn(4, 100))


def same_values(a, b):
    """(q, s) pairs with the same q bytes and scale values (torch.equal also compares shapes)."""
    return torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)) and torch.equal(a[1], b[1])


def same_bits(a, b):
    """same_values and the same scale strides (the GPU kernels' scales are outer-dim-major, the
    CPU reference's row-major)."""
    return same_values(a, b) and a[1].stride() == b[1].stride()


@pytest.mark.gpu
@pytest.mark.parametrize("pow2", [False, True])
def test_gpu_fused_dual_and_fast_division_are_bitwise_equal_to_two_kernels_and_cpu(pow2, monkeypatch):
    from miles_lib.precision import triton_fp8
    g = torch.Generator().manual_seed(8)
    for M, K, dtype in ((512, 1024, torch.bfloat16), (520, 384, torch.bfloat16), (200, 256, torch.float32)):
        x = (torch.randn(M, K, generator=g) * torch.logspace(-30, 30, K)).to(dtype)
        x[3, :128] = 0  # an all-zero block (s = 1)
        x[5, 7] = -0.0
        x[9] *= 1e-38  # subnormal scales
        cpu = (fp8.quantize_blockwise(x, 1, 128, pow2), fp8.quantize_blockwise(fp8.pad_rows(x, 128).t(), 1, 128, pow2))
        xc = x.cuda()
        two = (triton_fp8.quantize_1x128(xc, pow2, fast_div=False),
               triton_fp8.quantize_128x1_t(xc, pow2, fast_div=False))
        for got, ref in zip(two, cpu):
            assert same_values(tuple(t.cpu() for t in got), ref), (M, K, dtype)
        for fast_div in (False, True):
            outs = {"1x128": (triton_fp8.quantize_1x128(xc, pow2, block_m=64, num_warps=8, fast_div=fast_div), two[1]),
                    "128x1_t": (two[0], triton_fp8.quantize_128x1_t(xc, pow2, block_k=128, num_warps=8,
                                                                     fast_div=fast_div))}
            for sub, warps, regs, rows in ((64, 4, None, 128), (32, 4, None, 128), (128, 8, None, 128),
                                           (64, 4, None, 32), (128, 8, None, 64), (None, 8, 128, 128),
                                           (None, 16, None, 128)):
                outs[f"dual paired_sub={sub} warps={warps} row_sub={rows}"] = triton_fp8.quantize_dual(
                    xc, pow2, paired_sub=sub, num_warps=warps, max_registers=regs, fast_div=fast_div, row_sub=rows)
            for name, out in outs.items():
                assert same_bits(out[0], two[0]) and same_bits(out[1], two[1]), (M, K, dtype, fast_div, name)
        monkeypatch.setattr(fp8, "_DUAL_IMPL", "fused")
        for got, ref in zip(fp8.quantize_act_dual(xc, pow2), two):
            assert same_bits(got, ref)
        monkeypatch.setattr(fp8, "_DUAL_IMPL", "two_kernels")


@pytest.mark.gpu
@pytest.mark.parametrize("pow2", [False, True])
def test_gpu_dual_with_128x128_transposed_blocks_is_bitwise_equal_to_cpu(pow2):
    from miles_lib.precision import triton_fp8
    g = torch.Generator().manual_seed(12)
    for M, K, dtype in ((512, 1024, torch.bfloat16), (520, 384, torch.bfloat16), (200, 256, torch.float32)):
        x = (torch.randn(M, K, generator=g) * torch.logspace(-30, 30, K)).to(dtype)
        x[:128, :128] = 0  # an all-zero block (s = 1)
        x[130:140] *= 1e-38  # subnormal values next to normal ones in a block
        cpu = (fp8.quantize_blockwise(x, 1, 128, pow2), fp8.quantize_act_128x128_t(x, pow2))
        for sub, warps, rows in ((64, 4, 128), (32, 4, 128), (128, 8, 128), (64, 4, 32)):
            for fast_div in (False, True):
                got = triton_fp8.quantize_dual(x.cuda(), pow2, paired_sub=sub, num_warps=warps, fast_div=fast_div,
                                               t_blocks="128x128", row_sub=rows)
                for part_g, part_c in zip(got, cpu):
                    assert same_values(tuple(t.cpu() for t in part_g), part_c), (M, K, dtype, sub, fast_div)
                padded = got[1][1]._cublas_padded.cpu()
                assert padded.shape[-1] % 4 == 0 and torch.equal(padded[:, : cpu[1][1].shape[1]], cpu[1][1])
                assert (padded[:, cpu[1][1].shape[1]:] == 1).all()
        got = fp8.quantize_act_dual(x.cuda(), pow2, "128x128")
        assert all(same_values(tuple(t.cpu() for t in a), b) for a, b in zip(got, cpu))
        assert same_values(tuple(t.cpu() for t in fp8.quantize_act_128x128_t(x.cuda(), pow2)), cpu[1])


@pytest.mark.gpu
def test_gpu_fast_division_is_exact_for_every_bf16_block():
    from miles_lib.precision import triton_fp8
    x = fp8.every_bf16_block()
    assert same_values(tuple(t.cpu() for t in triton_fp8.quantize_1x128(x.cuda(), False, fast_div=True)),
                       fp8.quantize_blockwise(x, 1, 128))
    xt = fp8.pad_rows(x, 128).t().contiguous().cuda()  # the same blocks as 128x1 columns
    assert same_bits(triton_fp8.quantize_128x1_t(xt, False, fast_div=True),
                     triton_fp8.quantize_128x1_t(xt, False, fast_div=False))
    fast, rn = triton_fp8.quantize_dual(xt, False, fast_div=True), triton_fp8.quantize_dual(xt, False, fast_div=False)
    assert same_bits(fast[0], rn[0]) and same_bits(fast[1], rn[1])
    # power-of-two scales: the multiply by the exact reciprocal against the CPU division
    assert same_values(tuple(t.cpu() for t in triton_fp8.quantize_1x128(x.cuda(), True)),
                       fp8.quantize_blockwise(x, 1, 128, True))
    pow2 = triton_fp8.quantize_dual(xt, True)
    assert same_values(tuple(t.cpu() for t in pow2[1]), fp8.quantize_blockwise(xt.cpu().t(), 1, 128, True))


@pytest.mark.gpu
def test_gpu_cublas_gemms_match_reference():
    assert fp8_gemm.cublas_blockwise("cuda", rowwise_b=False) is not None, "cuBLAS 1x128 x 128x128 unavailable"
    assert fp8_gemm.cublas_blockwise("cuda", rowwise_b=True) is not None, "cuBLAS 1x128 x 1x128 unavailable"
    g = torch.Generator().manual_seed(5)
    for M in (512, 200):
        x = torch.randn(M, 1024, generator=g).cuda()
        w = torch.randn(768, 1024, generator=g).cuda()
        qx, sx = fp8.quantize_act_1x128(x)
        qw, sw = fp8.quantize_weight_128x128(w)
        ref = deq(qx, sx) @ deq(qw, sw).T
        assert rel(fp8_gemm.fp8_mm(qx, sx, qw, sw), ref) < GPU_BOUND
        assert rel(fp8_gemm.fp8_mm(qx, sx, qw, sw, torch.bfloat16), ref) < 5e-3  # + bf16 output rounding
        dy = torch.randn(M, 768, generator=g).cuda()  # wgrad: dW = dy^T x over 128x1 token tiles
        qxt, sxt = fp8.quantize_act_128x1_t(x)
        qdyt, sdyt = fp8.quantize_act_128x1_t(dy)
        assert rel(fp8_gemm.fp8_mm(qdyt, sdyt, qxt, sxt), deq(qdyt, sdyt) @ deq(qxt, sxt).T) < GPU_BOUND
        _, (qdyb, sdyb) = fp8.quantize_act_dual(dy, True, "128x128")  # wgrad on dy's 128x128 blocks
        ref_b = deq(qdyb, sdyb) @ deq(qxt, sxt).T
        assert rel(fp8_gemm.fp8_mm(qdyb, sdyb, qxt, sxt), ref_b) < GPU_BOUND
        assert rel(fp8_gemm.fp8_mm(qdyb, sdyb, qxt, sxt, torch.bfloat16), ref_b) < 5e-3


@pytest.mark.gpu
@pytest.mark.parametrize("counts,K,N", [([100, 0, 150, 50], 512, 256),  # an empty expert
                                        ([1, 63, 0, 200, 129, 64], 128, 384),  # one K slab, odd sizes
                                        ([5], 256, 128),  # fewer rows than one warpgroup's 64
                                        ([0, 0, 700], 384, 256),  # experts 0, 1 empty
                                        ([300, 200], 1920, 256)])  # 15 K slabs: unrolled chunks of 8, 4, 2, 1
def test_gpu_gluon_grouped_mm_matches_reference(counts, K, N):
    """The sm90 Gluon grouped kernel (fprop / dgrad) against the dequantized per-expert reference,
    fp32 and bf16 output; every row of every expert is written (the output block is freed NaNs
    first, which the caching allocator hands back)."""
    if not fp8_gemm.gluon_available():
        pytest.skip("no sm90 GPU with Triton Gluon")
    from miles_lib.precision import gluon_fp8
    g = torch.Generator().manual_seed(7)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(int(offs[-1]), K, generator=g).cuda()
    w = torch.randn(len(counts), N, K, generator=g).cuda()
    qx, sx = fp8.quantize_act_1x128(x)
    qw, sw = fp8.quantize_weight_128x128(w)
    ref = grouped_ref(deq(qx, sx), deq(qw, sw), offs)
    for stages in (2, gluon_fp8.STAGES):
        del_nan = torch.full((x.shape[0], N), float("nan"), device="cuda")
        del del_nan
        out = gluon_fp8.grouped_mm(qx, sx, qw, sw, offs.cuda(), torch.float32, stages=stages)
        assert rel(out, ref) < GPU_BOUND, stages
    assert rel(gluon_fp8.grouped_mm(qx, sx, qw, sw, offs.cuda(), torch.bfloat16), ref) < 5e-3
    assert rel(gluon_fp8.grouped_mm(qx, sx, qw, sw, offs.cuda(), torch.float32, num_programs=3), ref) < GPU_BOUND
    for split in (False, True):  # each slab's product in two column halves, or whole
        for stages, nprog, dtype, bound in ((2, 3, torch.float32, GPU_BOUND), (gluon_fp8.STAGES, None, torch.bfloat16, 5e-3)):
            out = gluon_fp8.grouped_mm(qx, sx, qw, sw, offs.cuda(), dtype, stages=stages, num_programs=nprog, split=split)
            assert rel(out, ref) < bound, (split, stages, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("counts,N,K", [([100, 0, 150, 50], 256, 512),  # an empty expert inside
                                        ([1, 63, 0, 200, 129, 64], 384, 128),  # slabs shared by experts
                                        ([300], 128, 256),  # one expert, a partial last slab
                                        ([0, 0, 256, 0], 256, 128),  # aligned; empty experts at the ends
                                        ([1100, 5, 700], 128, 256)])  # long experts
def test_gpu_gluon_grouped_wgrad_matches_reference(counts, N, K):
    """The sm90 Gluon grouped wgrad (128x1 tiles along the tokens, slabs shared by two experts
    masked per expert) against the dequantized per-expert reference; empty experts get zeros."""
    if not fp8_gemm.gluon_available():
        pytest.skip("no sm90 GPU with Triton Gluon")
    from miles_lib.precision import gluon_fp8
    g = torch.Generator().manual_seed(8)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    dy = torch.randn(int(offs[-1]), N, generator=g).cuda()
    x = torch.randn(int(offs[-1]), K, generator=g).cuda()
    qdyt, sdyt = fp8.quantize_act_128x1_t(dy)
    qxt, sxt = fp8.quantize_act_128x1_t(x)
    ref = fp8_gemm.grouped_fp8_wgrad_reference(qdyt, sdyt, qxt, sxt, offs.cuda())
    for e, c in enumerate(counts):
        if c == 0:
            assert ref[e].abs().max() == 0
    for stages in (2, gluon_fp8.STAGES):
        del_nan = torch.full((len(counts), N, K), float("nan"), device="cuda")
        del del_nan
        out = gluon_fp8.grouped_wgrad(qdyt, sdyt, qxt, sxt, offs.cuda(), torch.float32, stages=stages)
        assert rel(out, ref) < GPU_BOUND, stages
    assert rel(gluon_fp8.grouped_wgrad(qdyt, sdyt, qxt, sxt, offs.cuda(), torch.bfloat16), ref) < 5e-3
    out = gluon_fp8.grouped_wgrad(qdyt, sdyt, qxt, sxt, offs.cuda(), torch.float32, num_programs=3)
    assert rel(out, ref) < GPU_BOUND
    # the expert-aligned operands fp8_grouped_linear uses: no slab shared, nothing masked
    _, (qdya, sdya) = fp8.quantize_act_dual_grouped(dy, offs.cuda())
    _, (qxa, sxa) = fp8.quantize_act_dual_grouped(x, offs.cuda())
    offs_a = fp8.aligned_expert_offsets(offs.cuda())
    ref_a = fp8_gemm.grouped_fp8_wgrad_reference(qdya, sdya, qxa, sxa, offs_a)
    for stages, nprog in ((2, 3), (gluon_fp8.STAGES, None)):
        out = gluon_fp8.grouped_wgrad(qdya, sdya, qxa, sxa, offs_a, torch.float32, stages=stages, num_programs=nprog)
        assert rel(out, ref_a) < GPU_BOUND, stages
        for e, c in enumerate(counts):
            if c == 0:
                assert out[e].abs().max() == 0
    assert rel(fp8_gemm.grouped_fp8_wgrad(qdya, sdya, qxa, sxa, offs_a, torch.bfloat16), ref_a) < 5e-3


@pytest.mark.gpu
@pytest.mark.parametrize("pow2", [False, True])
def test_gpu_expert_aligned_operands_are_bitwise_equal_to_cpu(pow2):
    """quantize_act_dual_grouped's kernel (the paired dual quantization over the experts' own
    128-row tiles) against the CPU emulation, on every column an expert uses."""
    g = torch.Generator().manual_seed(6)
    counts = [70, 0, 130, 256, 1, 129, 0]
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(sum(counts), 384, generator=g) * torch.logspace(-3, 3, 384)
    cpu = fp8.quantize_act_dual_grouped(x, offs, pow2)
    gpu = fp8.quantize_act_dual_grouped(x.cuda(), offs.cuda(), pow2)
    assert same_values(cpu[0], tuple(t.cpu() for t in gpu[0]))
    used = int(fp8.aligned_expert_offsets(offs)[-1])
    assert gpu[1][0].shape == cpu[1][0].shape and gpu[1][1].shape == cpu[1][1].shape
    assert same_values((cpu[1][0][:, :used], cpu[1][1][:, :used // 128]),
                       (gpu[1][0][:, :used].cpu(), gpu[1][1][:, :used // 128].cpu()))


@pytest.mark.gpu
def test_gpu_transpose_matches_torch():
    from miles_lib.precision import triton_fp8
    g = torch.Generator().manual_seed(14)
    for R, C, dtype in ((2048, 7168, torch.bfloat16), (300, 200, torch.float32), (65, 130, torch.bfloat16)):
        x = torch.randn(R, C, generator=g).to("cuda", dtype)
        assert torch.equal(triton_fp8.transpose(x), x.t().contiguous()), (R, C, dtype)


def test_fp8_mm_reads_block_sizes_from_scale_shapes_and_rejects_two_block_operands():
    g = torch.Generator().manual_seed(13)
    a, b = torch.randn(256, 384, generator=g), torch.randn(128, 384, generator=g)
    for (ra, rb) in ((1, 128), (128, 1), (1, 1)):
        qa, sa = fp8.quantize_blockwise(a, ra, 128)
        qb, sb = fp8.quantize_blockwise(b, rb, 128)
        assert torch.equal(fp8_gemm.fp8_mm(qa, sa, qb, sb), deq(qa, sa) @ deq(qb, sb).T)
    qa, sa = fp8.quantize_blockwise(a, 128, 128)
    qb, sb = fp8.quantize_blockwise(b, 128, 128)
    with pytest.raises(ValueError, match="not both 128x128"):
        fp8_gemm.fp8_mm(qa, sa, qb, sb)
    with pytest.raises(ValueError, match="does not match"):
        fp8_gemm.fp8_mm(qa, sa[:, :2], qb, sb)


@pytest.mark.gpu
@pytest.mark.parametrize("use_gluon", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_fp8_linear_and_grouped_match_cpu_emulation(dtype, use_gluon, monkeypatch):
    """The whole autograd path on CUDA (cuBLAS dense; grouped on the Gluon kernels where they run,
    and on the Triton kernels) vs the CPU emulation."""
    monkeypatch.setattr(fp8_gemm, "_USE_GLUON", use_gluon)
    g = torch.Generator().manual_seed(6)
    tol = GPU_BOUND if dtype == torch.float32 else 8e-3
    x = torch.randn(300, 512, generator=g).to(dtype)
    w = torch.randn(256, 512, generator=g).to(dtype)
    dy = torch.randn(300, 256, generator=g).to(dtype)
    counts = [100, 0, 150, 50]
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    wg = torch.randn(4, 256, 512, generator=g).to(dtype)
    fp8_linear_2d = functools.partial(fp8_linear, wgrad_grad_blocks="128x128")
    for fn, args in ((fp8_linear, (x, w)), (fp8_linear_2d, (x, w)), (fp8_grouped_linear, (x, wg, offs))):
        outs = []
        for dev in ("cpu", "cuda"):
            a = [t.detach().clone().to(dev).requires_grad_(t.is_floating_point()) for t in args]
            y = fn(*a)
            y.backward(dy.to(dev))
            outs.append([y.detach().cpu(), a[0].grad.cpu(), a[1].grad.cpu()])
        for c, gp in zip(*outs):
            assert rel(gp, c) < tol, getattr(fn, "__name__", "fp8_linear 128x128")
