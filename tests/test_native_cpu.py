"""The native CPU ops (miles_lib/model/native_cpu.py): the grouped GEMM and the fused experts forward
equal torch._grouped_mm's CPU loop and experts_forward (bitwise on one thread, to the last bits on
several) for any routing; decode attention within fp32 rounding of SDPA; input checks; compiled
code calls them."""

import shutil

import pytest
import torch

from miles_lib.model import native_cpu
from miles_lib.model.moe import _grouped_linear_eager, experts_forward, grouped_linear

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="building the extension needs a C++ compiler")


@pytest.fixture(scope="module", autouse=True)
def built():
    assert native_cpu.load(), native_cpu._state["error"]


def _assert_same(got, want, threads, case):
    """Bitwise on one thread. With more, the op runs each expert's GEMM on one thread while eager MKL
    may split one across threads, which rounds the last bits differently."""
    if threads == 1:
        assert torch.equal(got, want), case
    else:
        rtol, atol = (1e-2, 1e-2) if got.dtype == torch.bfloat16 else (1e-6, 1e-5)  # |values| up to ~40
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=str(case))


def _routing(counts):
    return torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_equal_to_grouped_mm(threads, dtype):
    g = torch.Generator().manual_seed(threads)
    cases = [[16, 15, 17, 16, 18, 14, 16, 16],  # decode-like
             [0, 0, 128, 0, 0, 0, 0, 0],  # one expert takes all
             [1, 0, 2, 0, 3, 0, 0, 1],  # tiny and empty experts
             [300, 211, 250, 260, 270, 249, 255, 253],  # prefill-like
             [0] * 8]  # no rows
    for _ in range(6):
        cases.append(torch.multinomial(torch.ones(8), 96, replacement=True, generator=g).bincount(minlength=8).tolist())
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for counts in cases:
            offs = _routing(counts)
            for out_dim in (256, 128):
                x = torch.randn(sum(counts), 128, generator=g).to(dtype)
                w = torch.randn(8, out_dim, 128, generator=g).to(dtype)
                got, want = native_cpu.grouped_linear(x, w, offs), _grouped_linear_eager(x, w, offs)
                assert got.shape == want.shape and got.dtype == dtype
                _assert_same(got, want, threads, (counts, out_dim))
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("offs, match", [
    ([4, 2, 6], "non-decreasing"),
    ([2, 4, 5], "must equal the row count"),
    ([2, 4], "offs must be int32"),
])
def test_bad_offsets_are_rejected(offs, match):
    x, w = torch.randn(6, 8), torch.randn(3, 4, 8)
    with pytest.raises(RuntimeError, match=match):
        native_cpu.grouped_linear(x, w, torch.tensor(offs, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="int32"):
        native_cpu.grouped_linear(x, w, torch.tensor([2, 4, 6]))


def test_compiled_code_calls_the_native_op():
    x, w = torch.randn(40, 32), torch.randn(4, 16, 32)
    offs = _routing([10, 0, 25, 5])
    f = torch.compile(lambda a, b, o: grouped_linear(a, b, o) * 2, dynamic=True, fullgraph=True)
    f(x, w, offs)  # compile outside the profile
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = f(x, w, offs)
    torch.testing.assert_close(got, _grouped_linear_eager(x, w, offs) * 2, rtol=1e-6, atol=1e-5)
    names = {e.name for e in prof.events()}
    assert "miles_cpu::grouped_linear" in names and "miles::grouped_linear" not in names


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_fused_experts_bitwise_equal_to_experts_forward(threads):
    g = torch.Generator().manual_seed(10 + threads)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for N, K, E, D, F in [(64, 2, 8, 128, 128), (1024, 2, 8, 128, 128), (7, 4, 16, 64, 32), (1, 1, 4, 32, 16),
                              (40, 3, 5, 48, 24)]:
            x = torch.randn(N, D, generator=g)
            ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
            if N >= 40:  # skewed routing: most pairs on expert 0, some experts empty
                ids[: N // 2, 0] = 0
                ids[: N // 2, 1:] = torch.arange(1, K)
            w = torch.rand(N, K, generator=g)
            gate_up, down = torch.randn(E, 2 * F, D, generator=g) * 0.05, torch.randn(E, D, F, generator=g) * 0.05
            got, want = native_cpu.moe_experts(x, ids, w, gate_up, down), experts_forward(x, ids, w, gate_up, down)
            _assert_same(got, want, threads, (N, K, E, D, F))
    finally:
        torch.set_num_threads(old)


def test_fused_experts_rejects_bad_input():
    x, w = torch.randn(4, 8), torch.rand(4, 2)
    gate_up, down = torch.randn(3, 8, 8), torch.randn(3, 8, 4)
    with pytest.raises(RuntimeError, match="expert id 3 out of range"):
        native_cpu.moe_experts(x, torch.tensor([[0, 1], [1, 2], [2, 3], [0, 2]]), w, gate_up, down)
    with pytest.raises(RuntimeError, match="float32"):
        native_cpu.moe_experts(x.double(), torch.zeros(4, 2, dtype=torch.long), w, gate_up, down)
    with pytest.raises(RuntimeError, match=r"gate_up \[E, 2F, D\]"):
        native_cpu.moe_experts(x, torch.zeros(4, 2, dtype=torch.long), w, gate_up, down[:, :, :3])


def test_compiled_experts_forward_is_one_native_call():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(33, 32, generator=g), torch.rand(33, 2, generator=g)
    ids = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(33)])
    gate_up, down = torch.randn(4, 48, 32, generator=g), torch.randn(4, 32, 24, generator=g)
    f = torch.compile(experts_forward, dynamic=True, fullgraph=True)
    f(x, ids, w, gate_up, down)  # compile outside the profile
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = f(x, ids, w, gate_up, down)
    torch.testing.assert_close(got, experts_forward(x, ids, w, gate_up, down), rtol=1e-6, atol=1e-6)
    names = [e.name for e in prof.events()]
    assert names.count("miles_cpu::moe_experts") == 1 and "miles_cpu::grouped_linear" not in names


@pytest.mark.parametrize("B, H, G, W", [(64, 4, 4, 40), (3, 8, 2, 17), (1, 4, 1, 1)])
def test_decode_attention_matches_sdpa(B, H, G, W):
    g = torch.Generator().manual_seed(B + W)
    K, V = torch.randn(B + 2, G, W + 5, 32, generator=g), torch.randn(B + 2, G, W + 5, 32, generator=g)
    pos = torch.randint(0, W, (B,), generator=g)
    pos[0] = W - 1  # one row attends to the whole window
    q = torch.randn(B, H, 1, 32, generator=g)
    mask = (torch.arange(W)[None] <= pos[:, None])[:, None, None, :]
    want = torch.nn.functional.scaled_dot_product_attention(q, K[:B, :, :W], V[:B, :, :W], attn_mask=mask,
                                                            enable_gqa=H != G)
    got = native_cpu.decode_attention(q, K[:B, :, :W], V[:B, :, :W], pos)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


def test_decode_attention_rejects_positions_outside_the_window():
    q, K = torch.randn(2, 4, 1, 16), torch.randn(2, 4, 8, 16)
    with pytest.raises(RuntimeError, match="pos 8 outside the window of 8 keys"):
        native_cpu.decode_attention(q, K, K, torch.tensor([3, 8]))
    with pytest.raises(RuntimeError, match="float32"):
        native_cpu.decode_attention(q.double(), K.double(), K.double(), torch.tensor([3, 7]))
