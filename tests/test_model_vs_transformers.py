"""Our MoEForCausalLM against transformers' own models, saved by transformers itself."""

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig,
                          Qwen3MoeForCausalLM)

from miles_lib.model import MoEForCausalLM
from miles_lib.model.moe import experts_forward_loop

BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            head_dim=8, max_position_embeddings=128)
MOE_CASES = [
    dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, num_key_value_heads=2,
         norm_topk_prob=True, tie_word_embeddings=False),
    dict(num_experts=8, num_experts_per_tok=1, moe_intermediate_size=8, num_key_value_heads=1,
         norm_topk_prob=False, tie_word_embeddings=True),
    dict(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=16, num_key_value_heads=4,
         norm_topk_prob=True, tie_word_embeddings=True, decoder_sparse_step=2),
    dict(num_experts=5, num_experts_per_tok=2, moe_intermediate_size=12, num_key_value_heads=2,
         norm_topk_prob=False, tie_word_embeddings=False, mlp_only_layers=[0]),
]


def _perturbed(model, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def _inputs(vocab):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, 9:] = 0  # right padding
    return ids, mask


def _hf_routing(router_logits, K, B, T):
    probs = torch.stack([r.float().softmax(-1) for r in router_logits])  # [nL, B*T, E]
    ids = probs.topk(K, dim=-1).indices  # [nL, N, K]
    return ids.permute(1, 0, 2).reshape(B, T, len(router_logits), K)


@pytest.mark.parametrize("case", MOE_CASES, ids=lambda c: f"E{c['num_experts']}k{c['num_experts_per_tok']}")
def test_qwen3_moe_logits_and_routing_match_transformers(tmp_path, case):
    hf = _perturbed(Qwen3MoeForCausalLM(Qwen3MoeConfig(**BASE, **case)))
    hf.save_pretrained(tmp_path)
    ours = MoEForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids, mask = _inputs(BASE["vocab_size"])
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, output_router_logits=True)
        out = ours(ids, attention_mask=mask, return_routing=True)
    valid = mask.bool()
    assert (ref.logits - out.logits)[valid].abs().max() <= 1e-4
    hf_ids = _hf_routing(ref.router_logits, case["num_experts_per_tok"], *ids.shape)
    assert torch.equal(hf_ids[valid].sort(-1).values, out.routed_experts[valid].sort(-1).values)


@pytest.mark.parametrize("cls,cfg_cls", [(Qwen3ForCausalLM, Qwen3Config), (LlamaForCausalLM, LlamaConfig)])
def test_dense_models_match_transformers(tmp_path, cls, cfg_cls):
    hf = _perturbed(cls(cfg_cls(**BASE, num_key_value_heads=2)))
    hf.save_pretrained(tmp_path)
    ours = MoEForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert ours.config.num_experts == 0 and ours.config.qk_norm == (cls is Qwen3ForCausalLM)
    ids, mask = _inputs(BASE["vocab_size"])
    with torch.no_grad():
        diff = (hf(ids, attention_mask=mask).logits - ours(ids, attention_mask=mask).logits)[mask.bool()]
    assert diff.abs().max() <= 1e-4


def test_our_checkpoint_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    hf = _perturbed(Qwen3MoeForCausalLM(Qwen3MoeConfig(**BASE, **MOE_CASES[0])))
    hf.save_pretrained(tmp_path / "a")
    ours = MoEForCausalLM.from_pretrained(str(tmp_path / "a"))
    ours.save_pretrained(str(tmp_path / "b"), max_shard_bytes=30_000)
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "b")).eval()
    ids, _ = _inputs(BASE["vocab_size"])
    with torch.no_grad():
        assert (back(ids).logits - ours(ids).logits).abs().max() <= 1e-5


def test_bf16_forward_is_close_to_fp32(tmp_path):
    hf = _perturbed(Qwen3MoeForCausalLM(Qwen3MoeConfig(**BASE, **MOE_CASES[0])), std=0.05)
    hf.save_pretrained(tmp_path)
    m32 = MoEForCausalLM.from_pretrained(str(tmp_path))
    m16 = MoEForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    ids, _ = _inputs(BASE["vocab_size"])
    with torch.no_grad():
        a, b = m32(ids).logits, m16(ids).logits.float()
    assert (a - b).norm() / a.norm() < 0.05


def test_routing_replay_uses_given_experts_and_router_gets_gradients(tmp_path):
    hf = _perturbed(Qwen3MoeForCausalLM(Qwen3MoeConfig(**BASE, **MOE_CASES[0])))
    hf.save_pretrained(tmp_path)
    model = MoEForCausalLM.from_pretrained(str(tmp_path))
    ids, _ = _inputs(BASE["vocab_size"])
    with torch.no_grad():
        original = model(ids, return_routing=True).routed_experts
        for layer in model.model.layers:  # perturb the routers: natural routing changes
            if layer.is_moe:
                layer.mlp.gate.weight.add_(torch.randn_like(layer.mlp.gate.weight))
        natural = model(ids, return_routing=True).routed_experts
    assert not torch.equal(natural, original)
    out = model(ids, routed_experts=original, return_routing=True)
    assert torch.equal(out.routed_experts, original)
    out.logits.square().mean().backward()
    for layer in model.model.layers:
        if layer.is_moe:
            assert layer.mlp.gate.weight.grad is not None and layer.mlp.gate.weight.grad.abs().sum() > 0
    # the replayed block computes exactly the reference per-expert loop on those ids
    moe = model.model.layers[0].mlp
    x = torch.randn(20, BASE["hidden_size"])
    replay_ids = original[:, :, 0].reshape(-1, 2)[:20]  # layer 0's recorded ids for 20 tokens
    w, used, _ = moe.gate(x, replay_ids)
    assert torch.equal(used, replay_ids)
    torch.testing.assert_close(moe.experts(x, used, w), experts_forward_loop(moe.experts, x, used, w),
                               atol=1e-6, rtol=1e-5)


def test_replay_shape_is_checked(tmp_path):
    hf = Qwen3MoeForCausalLM(Qwen3MoeConfig(**BASE, **MOE_CASES[0]))
    hf.save_pretrained(tmp_path)
    model = MoEForCausalLM.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="routed_experts has shape"):
        model(torch.zeros(1, 4, dtype=torch.long), routed_experts=torch.zeros(1, 4, 1, 2, dtype=torch.long))


@pytest.mark.parametrize("counts", [[3, 0, 9, 8], [0, 0, 0, 5], [2, 2, 2, 2]])
def test_graph_capturable_grouped_linear_equals_the_loop(counts):
    """The host-sync-free grouped GEMM (used while a CUDA graph is captured) == the per-expert loop,
    empty experts included."""
    from miles_lib.model.moe import _grouped_linear_eager, _grouped_linear_masked
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(counts), 16, generator=g)
    w = torch.randn(len(counts), 12, 16, generator=g)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    torch.testing.assert_close(_grouped_linear_masked(x, w, offs), _grouped_linear_eager(x, w, offs), atol=1e-5, rtol=0)
