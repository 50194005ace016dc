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
