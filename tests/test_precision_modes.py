"""Precision modes wired through the GRPO job: unified FP8, bf16-train/FP8-rollout, INT4 QAT,
the per-sync FP8 weight cache, and FP8 checkpoint export/load."""

import json

import pytest
import torch
from safetensors.torch import load_file

from miles_lib.checkpoint import convert_hf_to_training, convert_training_to_hf, load_training_checkpoint
from miles_lib.cycle import load_state
from miles_lib.errors import CheckpointError, ConfigError
from miles_lib.loop import grpo_step
from miles_lib.model import MoEForCausalLM
from miles_lib.pipeline_config import GRPOConfig
from miles_lib.precision import Fp8Config, Int4Experts, PrecisionConfig, apply_training_precision, pack_int4
from miles_lib.precision.fp8 import FP8, quantize_weight_128x128
from miles_lib.precision.fp8_linear import Fp8Linear, quantized_weight
from tests.helpers_tiny import tiny_model

TINY = "examples/tiny-moe"  # every GEMM dim is 128: FP8 and INT4 (groups of 128) apply everywhere


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    return convert_hf_to_training(TINY, str(tmp_path_factory.mktemp("base") / "ckpt"))


def small_cfg(mode: str) -> GRPOConfig:
    cfg = GRPOConfig.from_yaml("examples/configs/tiny_grpo.yaml")
    return cfg.override(rollout={"prompts_per_step": 16, "n_samples_per_prompt": 4},
                        train={"num_mini_batches": 1, "micro_batch_size": 64}, precision={"mode": mode})


def test_config_validation_and_yaml_section():
    with pytest.raises(ConfigError, match=r"PrecisionConfig.mode='fp4' is invalid"):
        PrecisionConfig(mode="fp4")
    with pytest.raises(ConfigError, match="unknown key"):
        GRPOConfig.from_dict({"precision": {"mode": "fp8", "fp8_scales": 1}})
    cfg = GRPOConfig.from_yaml("examples/configs/tiny_grpo_fp8.yaml")
    assert cfg.precision.mode == "fp8" and not cfg.precision.separate_rollout_model
    fast = GRPOConfig.from_yaml("examples/configs/tiny_grpo_fp8_fast.yaml").precision.fp8
    assert fast.pow2_scales and fast.wgrad_grad_blocks == "128x128"
    with pytest.raises(ConfigError, match="wgrad_grad_blocks"):
        GRPOConfig.from_dict({"precision": {"mode": "fp8", "fp8": {"wgrad_grad_blocks": "1x128"}}})
    assert GRPOConfig.from_yaml("examples/configs/tiny_grpo_int4_qat.yaml").precision.separate_rollout_model


def test_model_without_128_multiples_is_rejected_by_name():
    with pytest.raises(ValueError, match="precision fp8: nothing in the model can be converted"):
        apply_training_precision(tiny_model(), PrecisionConfig(mode="fp8"))


@pytest.fixture(scope="module")
def step_metrics(base_ckpt):
    out = {}
    for mode in ("off", "fp8", "fp8_rollout", "int4_qat"):
        state = load_state(base_ckpt, small_cfg(mode))
        out[mode] = (state, grpo_step(state))
    return out


def test_unified_fp8_engine_runs_the_trainers_fp8_module(step_metrics):
    state, _ = step_metrics["fp8"]
    assert state.engine.model is state.model  # zero-copy: the same Fp8Linear modules and FP8 experts
    assert isinstance(state.model.model.layers[0].self_attn.q_proj, Fp8Linear)
    state_r, _ = step_metrics["fp8_rollout"]
    assert state_r.engine.model is not state_r.model
    assert not isinstance(state_r.model.model.layers[0].self_attn.q_proj, Fp8Linear)
    assert isinstance(state_r.engine.model.model.layers[0].self_attn.q_proj, Fp8Linear)


def test_unified_fp8_mismatch_is_far_below_fp8_rollout_mismatch(step_metrics):
    gap = {m: metrics["train_rollout_logprob_abs_diff"] for m, (_, metrics) in step_metrics.items()}
    assert gap["off"] <= 1e-6
    assert gap["fp8"] < 1e-3  # measured ~2e-4: same FP8 GEMMs, only batching-order rounding flips
    assert gap["fp8_rollout"] > 5e-3  # measured ~2.5e-2: FP8 rounding of every GEMM
    assert gap["fp8"] * 20 < gap["fp8_rollout"]
    assert gap["int4_qat"] <= 1e-5  # packed int4 dequantizes to the fake-quant weights exactly


def test_int4_engine_repacks_the_trained_expert_weights(step_metrics):
    state, _ = step_metrics["int4_qat"]
    name = "model.layers.0.mlp.experts"
    experts = state.engine.model.get_submodule(name)
    assert isinstance(experts, Int4Experts)
    trained = state.model.get_submodule(name).gate_up_proj.detach()
    packed, scales = pack_int4(trained, 128)
    assert torch.equal(experts.gate_up_packed, packed) and torch.equal(experts.gate_up_scales, scales)
    bf16_bytes = sum(p.numel() * 2 for p in state.model.get_submodule(name).parameters())
    assert bf16_bytes / experts.weight_nbytes() >= 3.5
    with pytest.raises(ValueError, match="unknown expert weight"):
        experts.load_weight("gate_proj", trained)


def test_fp8_weight_cache_is_reused_until_the_weight_changes():
    w = torch.nn.Parameter(torch.randn(256, 128))
    q1, s1 = quantized_weight(w, False)
    q2, s2 = quantized_weight(w, False)
    assert q1 is q2 and s1 is s2
    with torch.no_grad():
        w.mul_(2)  # an optimizer step / weight sync bumps the version counter
    q3, s3 = quantized_weight(w, False)
    assert q3 is not q1
    qr, sr = quantize_weight_128x128(w.detach())
    assert torch.equal(q3.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s3, sr)
    fl = Fp8Linear.from_linear(torch.nn.Linear(128, 128, bias=False))
    with torch.inference_mode():  # the engine fills the cache; the trainer's backward then saves it
        fl(torch.randn(4, 128))
    fl(torch.randn(4, 128, requires_grad=True)).sum().backward()
    assert fl.weight.grad is not None


def test_fp8_export_loads_back_and_reimports(base_ckpt, tmp_path):
    out = convert_training_to_hf(base_ckpt, str(tmp_path / "hf-fp8"), fp8=Fp8Config())
    cfg = json.loads((tmp_path / "hf-fp8" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "fp8"
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    tensors = load_file(str(tmp_path / "hf-fp8" / "model.safetensors"))
    w = tensors["model.layers.0.mlp.experts.3.up_proj.weight"]
    assert w.dtype == FP8 and tensors["model.layers.0.mlp.experts.3.up_proj.weight_scale_inv"].shape == (1, 1)
    assert tensors["model.layers.0.mlp.gate.weight"].dtype == torch.float32  # router stays high precision
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32

    loaded = MoEForCausalLM.from_pretrained(out, dtype=torch.float32)
    master = load_training_checkpoint(base_ckpt).model_state
    up = loaded.model.layers[0].mlp.experts.gate_up_proj
    rel = (up - master["model.layers.0.mlp.experts.gate_up_proj"]).norm() / up.norm()
    assert 0.005 < rel < 0.06  # e4m3 rounding of the weights, nothing else
    assert torch.equal(loaded.model.embed_tokens.weight, master["model.embed_tokens.weight"])

    # FP8 -> training checkpoint -> FP8 again keeps the stored e4m3 codes
    again = convert_hf_to_training(out, str(tmp_path / "ckpt2"))
    assert "quantization_config" not in json.loads(load_training_checkpoint(again).side_files["config.json"])
    out2 = convert_training_to_hf(again, str(tmp_path / "hf-fp8-2"), fp8=Fp8Config())
    t2 = load_file(str(tmp_path / "hf-fp8-2" / "model.safetensors"))
    assert torch.equal(t2["model.layers.0.mlp.experts.3.up_proj.weight"].view(torch.uint8), w.view(torch.uint8))
    assert out2

    # a quantization method nobody registered is named, not silently loaded as garbage
    cfg["quantization_config"]["quant_method"] = "awq"
    (tmp_path / "hf-fp8" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quant_method='awq'"):
        MoEForCausalLM.from_pretrained(out)
