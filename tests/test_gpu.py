"""CUDA checks (skipped without a GPU): model numerics, grouped experts, engine alignment."""

import pytest
import torch

from miles_lib.model.moe import experts_forward_loop
from miles_lib.rollout import RolloutEngine, SamplingParams
from tests.helpers_tiny import tiny_model

pytestmark = pytest.mark.gpu


def test_cuda_fp32_logits_match_cpu():
    m = tiny_model()
    ids = torch.randint(0, m.config.vocab_size, (3, 9))
    ref = m(ids, return_routing=True)
    out = m.to("cuda")(ids.cuda(), return_routing=True)
    torch.testing.assert_close(out.logits.cpu(), ref.logits, atol=1e-4, rtol=1e-4)
    assert (out.routed_experts.cpu() == ref.routed_experts).float().mean() > 0.99


def test_cuda_bf16_grouped_experts_match_loop():
    m = tiny_model(hidden_size=128, head_dim=32, moe_intermediate_size=128).to("cuda", torch.bfloat16)
    moe = m.model.layers[0].mlp
    x = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    w, ids, _ = moe.gate(x)
    fast = moe.experts(x, ids, w).float()
    ref = experts_forward_loop(moe.experts, x, ids, w).float()
    assert (fast - ref).norm() / ref.norm() < 2e-2


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_cuda_engine_logprobs_match_teacher_forcing(dtype, tol):
    m = tiny_model().to("cuda", dtype).eval()
    prompts = [torch.randint(0, m.config.vocab_size, (n,)).tolist() for n in (3, 5, 8, 4)]
    params = [SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8, seed=i) for i in range(4)]
    for s in RolloutEngine(m).generate(prompts, params):
        t = torch.tensor(s.tokens, device="cuda")[None]
        with torch.no_grad():
            out = m(t[:, :-1], return_routing=True)
        lp = out.logits.float().log_softmax(-1)[0, torch.arange(t.shape[1] - 1), t[0, 1:]][-s.response_length:]
        assert (lp.cpu() - torch.tensor(s.rollout_log_probs)).abs().max() <= tol
        if dtype == torch.float32:
            assert torch.equal(out.routed_experts[0].int().cpu(), s.rollout_routed_experts)


def _assert_matches_teacher_forcing(m, samples, tol, check_routing=True):
    for s in samples:
        t = torch.tensor(s.tokens, device="cuda")[None]
        with torch.no_grad():
            out = m(t[:, :-1], return_routing=True)
        lp = out.logits.float().log_softmax(-1)[0, torch.arange(t.shape[1] - 1), t[0, 1:]][-s.response_length:]
        assert (lp.cpu() - torch.tensor(s.rollout_log_probs)).abs().max() <= tol
        if check_routing:
            assert torch.equal(out.routed_experts[0].int().cpu(), s.rollout_routed_experts)


@pytest.mark.parametrize("compile_decode", [False, True])
def test_cuda_graph_decode_matches_teacher_forcing_and_eager(compile_decode):
    """Padded batch/window buckets, slot reuse (3 slots for 8 prompts), stop tokens, and a weight
    update between calls (graphs dropped and re-captured)."""
    m = tiny_model().to("cuda").eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, m.config.vocab_size, (n,), generator=g).tolist() for n in (3, 7, 5, 2, 9, 4, 6, 8)]
    params = [SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10, stop_token_ids=[1], seed=i)
              for i in range(len(prompts))]
    engine = RolloutEngine(m, max_concurrent_seqs=3, cuda_graphs=True, compile_decode=compile_decode)
    graphed = engine.generate(prompts, params)
    eager = RolloutEngine(m, max_concurrent_seqs=3).generate(prompts, params)
    _assert_matches_teacher_forcing(m, graphed, 1e-4)
    assert [s.tokens for s in graphed] == [s.tokens for s in eager]
    assert [s.status for s in graphed] == [s.status for s in eager]
    assert engine._graphs.graphs  # the steps really ran from graphs
    with torch.no_grad():
        m.model.layers[0].self_attn.q_proj.weight.mul_(1.5)
    engine.mark_weights_updated(1)
    again = engine.generate(prompts[:4], params[:4])
    _assert_matches_teacher_forcing(m, again, 1e-4)
    assert all(s.weight_versions == [1] * s.response_length for s in again)


def test_cuda_graph_decode_sees_fp8_weight_updates():
    """Unified FP8: the quantized weights are cached in Python; graphs must be re-captured after a
    weight update or they would replay the old FP8 weights."""
    from miles_lib.precision.modes import PrecisionConfig, apply_training_precision
    m = tiny_model(hidden_size=128, head_dim=32, moe_intermediate_size=128).to("cuda", torch.bfloat16).eval()
    apply_training_precision(m, PrecisionConfig(mode="fp8"))
    prompts = [torch.randint(0, m.config.vocab_size, (n,)).tolist() for n in (3, 5, 8, 4)]
    params = [SamplingParams(temperature=1.0, max_new_tokens=8, seed=i) for i in range(4)]
    engine = RolloutEngine(m, cuda_graphs=True)
    _assert_matches_teacher_forcing(m, engine.generate(prompts, params), 5e-2, check_routing=False)
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight.mul_(3.0)
    engine.mark_weights_updated(1)
    _assert_matches_teacher_forcing(m, engine.generate(prompts, params), 5e-2, check_routing=False)
