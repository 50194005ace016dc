"""FP8 checkpoints in the HF block-quantized layout (DeepSeek-V3 / Qwen3-FP8): tensor transforms.

Layout. Every decoder projection weight (q/k/v/o_proj, dense and expert gate/up/down_proj) is
stored as
    <name>.weight            float8_e4m3fn [out, in]
    <name>.weight_scale_inv  float32 [ceil(out/128), ceil(in/128)]     w = weight * scale_inv per block
(``scale_inv`` is the dequantization multiplier, i.e. our block scale s = amax/448). Embeddings,
lm_head, norms and the MoE routers (``mlp.gate``) stay in high precision. ``config.json`` gets
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                            "activation_scheme": "dynamic", "modules_to_not_convert": [...]}
Dims that are not multiples of 128 get partial edge blocks (quantized over the zero-padded block).

File I/O: ``miles_lib.model.hf_io`` calls ``dequantize_hf_checkpoint`` after reading (registered
as the "fp8" dequantizer when this module is imported), and
``checkpoint.convert_training_to_hf(..., fp8=...)`` writes with ``quantize_state_dict_fp8`` and
``fp8_quantization_config``.
Re-quantizing a dequantized FP8 weight gives back the same e4m3 codes (the block maximum maps to
448 again; the scale may move by one fp32 ulp), so FP8 -> master weights -> FP8 keeps the stored
values (with pow2 scales a block may come back as (2q, s/2): the same values).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from miles_lib.errors import CheckpointError
from miles_lib.precision.fp8 import BLOCK, FP8, Fp8Config, quantize_blockwise

SCALE_SUFFIX = "weight_scale_inv"
_QUANTIZED = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")


def fp8_quantization_config(moe_layers: list[int] = ()) -> dict:
    """The ``quantization_config`` entry of config.json (``moe_layers``: their routers stay high precision)."""
    keep = ["lm_head"] + [f"model.layers.{i}.mlp.gate" for i in moe_layers]
    return {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [BLOCK, BLOCK],
            "activation_scheme": "dynamic", "modules_to_not_convert": keep}


def is_quantized_name(name: str) -> bool:
    return bool(_QUANTIZED.search(name))


def quantize_weight_fp8(w: torch.Tensor, pow2_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (e4m3 [out, in], scale_inv fp32 [ceil(out/128), ceil(in/128)])."""
    O, I = w.shape
    wp = F.pad(w.float(), (0, -I % BLOCK, 0, -O % BLOCK))
    q, s = quantize_blockwise(wp, BLOCK, BLOCK, pow2_scales)
    return q[:O, :I].contiguous(), s.contiguous()


def dequantize_weight_fp8(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                          name: str = "weight") -> torch.Tensor:
    O, I = q.shape
    want = (-(-O // BLOCK), -(-I // BLOCK))
    if tuple(scale_inv.shape) != want:
        raise CheckpointError(f"{name}: {SCALE_SUFFIX} has shape {list(scale_inv.shape)}, expected {list(want)} "
                              f"for a [{O}, {I}] weight with 128x128 blocks")
    s = scale_inv.float().repeat_interleave(BLOCK, 0)[:O].repeat_interleave(BLOCK, 1)[:, :I]
    return (q.float() * s).to(dtype)


def quantize_state_dict_fp8(hf_tensors: dict[str, torch.Tensor], cfg: Fp8Config | None = None
                            ) -> dict[str, torch.Tensor]:
    """HF tensors -> the same names with projection weights in e4m3 plus their ``weight_scale_inv``."""
    cfg = cfg or Fp8Config()
    out: dict[str, torch.Tensor] = {}
    for name, t in hf_tensors.items():
        if is_quantized_name(name) and t.dim() == 2:
            q, s = quantize_weight_fp8(t, cfg.pow2_scales)
            out[name] = q
            out[name[: -len("weight")] + SCALE_SUFFIX] = s
        else:
            out[name] = t
    return out


def split_fp8_state_dict(hf_tensors: dict[str, torch.Tensor], source: str = "checkpoint"
                         ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(high-precision tensors, {weight name: (e4m3 weight, scale_inv)}) — the engine's keep-quantized form."""
    plain, quant = {}, {}
    for name, t in hf_tensors.items():
        if name.endswith(SCALE_SUFFIX):
            wname = name[: -len(SCALE_SUFFIX)] + "weight"
            if wname not in hf_tensors:
                raise CheckpointError(f"{source}: {name} has no weight {wname}")
            continue
        if t.dtype == FP8:
            sname = name[: -len("weight")] + SCALE_SUFFIX
            if sname not in hf_tensors:
                raise CheckpointError(f"{source}: FP8 tensor {name} has no {sname}; an FP8 checkpoint stores "
                                      "one block scale tensor per quantized weight")
            quant[name] = (t, hf_tensors[sname])
        else:
            plain[name] = t
    return plain, quant


def dequantize_state_dict_fp8(hf_tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16,
                              source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """FP8 block-quantized HF tensors -> plain tensors (weights dequantized to ``dtype``, scales dropped)."""
    plain, quant = split_fp8_state_dict(hf_tensors, source)
    for name, (q, s) in quant.items():
        plain[name] = dequantize_weight_fp8(q, s, dtype, f"{source}: {name}")
    return {name: plain[name] for name in hf_tensors if name in plain}


def dequantize_hf_checkpoint(hf_config: dict, hf_tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                             source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Loader hook: tensors unchanged without a ``quantization_config``; a supported FP8 one is
    dequantized to ``dtype``; any other quantization is rejected with what is supported."""
    qc = hf_config.get("quantization_config")
    if not qc:
        return hf_tensors
    problems = []
    if qc.get("quant_method") != "fp8":
        problems.append(f"quant_method={qc.get('quant_method')!r}")
    if qc.get("fmt", "e4m3") != "e4m3":
        problems.append(f"fmt={qc.get('fmt')!r}")
    if list(qc.get("weight_block_size") or []) != [BLOCK, BLOCK]:
        problems.append(f"weight_block_size={qc.get('weight_block_size')!r}")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        problems.append(f"activation_scheme={qc.get('activation_scheme')!r}")
    if problems:
        raise CheckpointError(f"{source}: unsupported quantization_config ({', '.join(problems)}); supported: "
                              "quant_method 'fp8', fmt 'e4m3', weight_block_size [128, 128], activation_scheme "
                              "'dynamic' — dequantize the checkpoint first")
    return dequantize_state_dict_fp8(hf_tensors, dtype, source)


def register_fp8_loader() -> None:
    """Let ``hf_io`` load HF FP8 checkpoints (done when this module is imported; idempotent)."""
    from miles_lib.model.hf_io import register_dequantizer
    register_dequantizer("fp8", dequantize_hf_checkpoint)


register_fp8_loader()
