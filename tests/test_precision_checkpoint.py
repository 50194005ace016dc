"""FP8 checkpoint tensors in the HF layout (weight e4m3 + weight_scale_inv fp32 per 128x128 block)."""

import copy

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from miles_lib.errors import CheckpointError
from miles_lib.model import ModelConfig, MoEForCausalLM
from miles_lib.model.hf_keys import hf_to_internal, internal_to_hf
from miles_lib.precision import (Fp8Config, apply_fp8, dequantize_hf_checkpoint, dequantize_state_dict_fp8,
                                 fp8_quantization_config, quantize_state_dict_fp8, split_fp8_state_dict)
from miles_lib.precision.fp8_checkpoint import quantize_weight_fp8

TINY128 = dict(vocab_size=64, hidden_size=128, num_attention_heads=4, num_key_value_heads=4, head_dim=32,
               num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128, intermediate_size=256,
               num_hidden_layers=2, mlp_only_layers=[1])


def tiny_hf():
    model = MoEForCausalLM(ModelConfig(**TINY128)).init_weights(seed=0, std=0.05)
    return model, internal_to_hf(model.state_dict(), model.config)


def test_which_tensors_are_quantized_and_their_layout():
    model, hf = tiny_hf()
    q = quantize_state_dict_fp8(hf)
    scaled = sorted(n[: -len("_scale_inv")] for n in q if n.endswith("weight_scale_inv"))
    want = sorted(n for n in hf if n.endswith("_proj.weight"))  # q/k/v/o, dense and expert gate/up/down
    assert scaled == want and len(want) == 2 * 4 + 3 + 4 * 3
    for name in want:
        assert q[name].dtype == torch.float8_e4m3fn and q[name].shape == hf[name].shape
        O, I = hf[name].shape
        assert q[name + "_scale_inv"].dtype == torch.float32 and q[name + "_scale_inv"].shape == (O // 128, I // 128)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.gate.weight",
                 "model.norm.weight", "model.layers.0.self_attn.q_norm.weight"):
        assert q[name] is hf[name]
    # dequant = weight * scale_inv per block, scale_inv = block amax / 448
    w = hf["model.layers.0.mlp.experts.2.down_proj.weight"]
    qw, s = q["model.layers.0.mlp.experts.2.down_proj.weight"], q["model.layers.0.mlp.experts.2.down_proj.weight_scale_inv"]
    assert s[0, 0] == w.abs().max() * (1.0 / 448)
    assert torch.equal(dequantize_state_dict_fp8(q, torch.float32)["model.layers.0.mlp.experts.2.down_proj.weight"],
                       qw.float() * s[0, 0])


def test_partial_edge_blocks_and_safetensors_round_trip():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(200, 300, generator=g)
    q, s = quantize_weight_fp8(w)
    assert q.shape == (200, 300) and s.shape == (2, 3)
    assert s[1, 2] == w[128:, 256:].abs().max() * (1.0 / 448)
    back = st_load(st_save({"x.weight": q, "x.weight_scale_inv": s}))  # F8_E4M3 survives safetensors
    assert back["x.weight"].dtype == torch.float8_e4m3fn and torch.equal(back["x.weight"].view(torch.uint8), q.view(torch.uint8))
    deq = dequantize_state_dict_fp8(back, torch.float32)["x.weight"]
    assert 0.005 < ((deq - w).norm() / w.norm()).item() < 0.05 and set(dequantize_state_dict_fp8(back)) == {"x.weight"}


def test_requantizing_a_dequantized_checkpoint_gives_the_same_weights():
    """amax/s rounds to 448 again, so the codes come back; the scale may move by an ulp. With pow2
    scales a block whose maximum code is 224 comes back as (2q, s/2): other codes, same values."""
    model, hf = tiny_hf()
    for pow2 in (False, True):
        q1 = quantize_state_dict_fp8(hf, Fp8Config(pow2_scales=pow2))
        w1 = dequantize_state_dict_fp8(q1, torch.float32)
        q2 = quantize_state_dict_fp8(w1, Fp8Config(pow2_scales=pow2))
        w2 = dequantize_state_dict_fp8(q2, torch.float32)
        for name, t in q1.items():
            if t.dtype == torch.float8_e4m3fn and pow2:
                assert torch.equal(w1[name], w2[name]), name  # exact powers of two: the same values
            elif t.dtype == torch.float8_e4m3fn:
                assert torch.equal(t.view(torch.uint8), q2[name].view(torch.uint8)), name
            elif name.endswith("scale_inv") and not pow2:
                torch.testing.assert_close(q2[name], t, rtol=2.5e-7, atol=0)  # within one fp32 ulp


def test_fp8_model_on_checkpoint_weights_equals_fp8_model_on_master_weights():
    """Unified FP8: a model loaded from the FP8 checkpoint runs the same FP8 GEMMs on the same codes."""
    model, hf = tiny_hf()
    loaded = copy.deepcopy(model)
    deq = dequantize_hf_checkpoint({"quantization_config": fp8_quantization_config([0])},
                                   quantize_state_dict_fp8(hf), torch.float32)
    loaded.load_state_dict(hf_to_internal(deq, model.config))
    apply_fp8(model)
    apply_fp8(loaded)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(ids, return_routing=True), loaded(ids, return_routing=True)
    assert torch.equal(a.routed_experts, b.routed_experts)
    assert (a.logits - b.logits).abs().max() <= 1e-5 * a.logits.abs().max()


def test_loader_hook_and_bad_checkpoints():
    model, hf = tiny_hf()
    assert dequantize_hf_checkpoint({"model_type": "qwen3_moe"}, hf, torch.bfloat16) is hf
    qc = fp8_quantization_config([0])
    assert {k: qc[k] for k in ("quant_method", "fmt", "weight_block_size", "activation_scheme")} == {
        "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
    assert qc["modules_to_not_convert"] == ["lm_head", "model.layers.0.mlp.gate"]
    q = quantize_state_dict_fp8(hf)
    out = dequantize_hf_checkpoint({"quantization_config": qc}, q, torch.bfloat16)
    assert list(out) == list(hf) and out["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    plain, quant = split_fp8_state_dict(q)
    assert set(quant) == {n for n in hf if n.endswith("_proj.weight")} and set(plain) | set(quant) == set(hf)
    with pytest.raises(CheckpointError, match="weight_block_size"):
        dequantize_hf_checkpoint({"quantization_config": {**qc, "weight_block_size": [1, 128]}}, q, torch.bfloat16)
    with pytest.raises(CheckpointError, match="quant_method='awq'"):
        dequantize_hf_checkpoint({"quantization_config": {"quant_method": "awq"}}, q, torch.bfloat16)
    missing = {k: v for k, v in q.items() if k != "model.layers.1.mlp.up_proj.weight_scale_inv"}
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight has no"):
        dequantize_state_dict_fp8(missing)
    bad = {**q, "model.layers.1.mlp.up_proj.weight_scale_inv": torch.ones(1, 1)}
    with pytest.raises(CheckpointError, match=r"expected \[2, 1\]"):
        dequantize_state_dict_fp8(bad)
