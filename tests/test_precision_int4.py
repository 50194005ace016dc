"""INT4 QAT of MoE experts: fake quantization (STE), packing, Int4Experts vs the QAT forward, memory."""

import copy

import pytest
import torch

from miles_lib.errors import ConfigError
from miles_lib.model import ModelConfig, MoEForCausalLM
from miles_lib.model.moe import GroupedExperts
from miles_lib.precision import (Int4Config, Int4Experts, apply_int4_qat, apply_int4_rollout, fake_quant_int4,
                                 pack_int4, unpack_int4, unpack_int4_codes)

TINY128 = dict(vocab_size=64, hidden_size=128, num_attention_heads=4, num_key_value_heads=4, head_dim=32,
               num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128, intermediate_size=256,
               num_hidden_layers=2, mlp_only_layers=[1])


def test_fake_quant_hand_computed_codes_and_min_scale():
    w = torch.zeros(2, 32)
    w[0, :6] = torch.tensor([7.0, 3.5, 2.5, -1.2, 0.5, -7.0])  # amax 7 -> scale 1
    w[1, 0] = 3e-5  # amax/7 = 4.3e-6 < 1e-5 -> scale 1e-5, code round(3) = 3
    out = fake_quant_int4(w, group_size=32)
    assert out[0, :6].tolist() == [7.0, 4.0, 2.0, -1.0, 0.0, -7.0]  # round half to even: 3.5->4, 2.5->2, 0.5->0
    assert out[0, 6:].abs().max() == 0
    assert out[1, 0].item() == pytest.approx(3e-5, rel=1e-6) and out[1, 1:].abs().max() == 0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 256, generator=g)
    s = x.reshape(4, 2, 128).abs().amax(-1) / 7
    codes = fake_quant_int4(x, 128).reshape(4, 2, 128) / s[..., None]
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 7 + 1e-4
    assert 0.02 < ((fake_quant_int4(x, 128) - x).norm() / x.norm()).item() < 0.2  # 15 levels: it did quantize


def test_straight_through_gradient():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 64, 128, generator=g, requires_grad=True)
    c = torch.randn(3, 64, 128, generator=g)
    (fake_quant_int4(w, 32) * c).sum().backward()
    assert torch.equal(w.grad, c)


def test_pack_layout_hand_computed():
    w = torch.zeros(1, 32)
    w[0, :8] = torch.tensor([1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 7.0])  # scale 1, codes = w
    packed, scales = pack_int4(w, group_size=32)
    assert packed.dtype == torch.int32 and packed.shape == (1, 4) and scales.tolist() == [[1.0]]
    # nibble j of word 0 holds code j + 8: 9, 7, 8, 8, 8, 8, 8, 15 -> 0xF8888879 as int32
    assert packed[0, 0].item() == 0xF8888879 - 2 ** 32 and packed[0, 1].item() == 0x88888888 - 2 ** 32  # all codes 0
    assert unpack_int4_codes(packed)[0, :8].tolist() == [1, -1, 0, 0, 0, 0, 0, 7]


@pytest.mark.parametrize("group_size,scale_dtype,dtype", [(32, torch.float32, torch.float32),
                                                          (128, torch.float32, torch.bfloat16),
                                                          (32, torch.bfloat16, torch.bfloat16)])
def test_pack_unpack_round_trip_equals_fake_quant(group_size, scale_dtype, dtype):
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(4, 96, 256, generator=g) * 0.05).to(dtype)
    packed, scales = pack_int4(w, group_size, scale_dtype)
    assert packed.shape == (4, 96, 32) and scales.shape == (4, 96, 256 // group_size) and scales.dtype == scale_dtype
    assert torch.equal(unpack_int4(packed, scales, group_size, dtype), fake_quant_int4(w, group_size, scale_dtype))


def test_codes_round_trip_exactly():
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(-7, 8, (6, 128), generator=g, dtype=torch.int8)
    codes[:, 0] = 7  # pin every group's max at 7 so scale = 1 and the codes are the weights
    packed, scales = pack_int4(codes.float(), 128)
    assert torch.equal(scales, torch.ones(6, 1)) and torch.equal(unpack_int4_codes(packed), codes)


def test_expert_weight_memory_vs_bf16():
    torch.manual_seed(0)
    ex = GroupedExperts(num_experts=8, hidden=512, ffn=256).to(torch.bfloat16)
    bf16_bytes = sum(p.numel() * p.element_size() for p in ex.parameters())
    ratios = {}
    for g, sd in ((128, "float32"), (32, "bfloat16"), (32, "float32")):
        packed = Int4Experts.from_experts(ex, Int4Config(group_size=g, scale_dtype=sd))
        ratios[(g, sd)] = bf16_bytes / packed.weight_nbytes()
    assert ratios[(128, "float32")] == pytest.approx(2 / (0.5 + 4 / 128)) and ratios[(128, "float32")] >= 3.5  # 3.76x
    assert ratios[(32, "bfloat16")] == pytest.approx(2 / (0.5 + 2 / 32)) and ratios[(32, "bfloat16")] >= 3.5  # 3.56x
    assert ratios[(32, "float32")] < 3.5  # 3.2x: fp32 scales every 32 channels cost too much


@pytest.mark.parametrize("group_size,dtype", [(128, torch.float32), (32, torch.bfloat16)])
def test_int4_rollout_experts_match_qat_forward(group_size, dtype):
    model = MoEForCausalLM(ModelConfig(**TINY128)).init_weights(seed=0, std=0.05).to(dtype)
    cfg = Int4Config(group_size=group_size, scale_dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
    qat, rollout = copy.deepcopy(model), copy.deepcopy(model)
    assert apply_int4_qat(qat, cfg).converted == ["model.layers.0.mlp.experts"]
    apply_int4_rollout(rollout, cfg)
    assert isinstance(rollout.model.layers[0].mlp.experts, Int4Experts)
    assert not any("experts" in n for n, _ in rollout.named_parameters())  # bf16 expert weights are gone
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref, a, b = model(ids).logits.float(), qat(ids).logits.float(), rollout(ids).logits.float()
    assert (a - b).abs().max() <= 1e-3  # packed-int4 dequant forward == fake-quant forward
    assert (a - ref).abs().max() > 1e-4  # and int4 did change the experts
    qat(ids).logits.float().sum().backward()  # QAT trains: STE gradients reach the expert weights
    assert qat.model.layers[0].mlp.experts.gate_up_proj.grad.abs().sum() > 0


def test_config_validation():
    with pytest.raises(ConfigError, match="group_size"):
        Int4Config(group_size=64)
    with pytest.raises(ConfigError, match="scale_dtype"):
        Int4Config(scale_dtype="float16")
    with pytest.raises(ValueError, match="multiple of the group size"):
        fake_quant_int4(torch.randn(4, 48), 32)
