"""Low precision: block-scaled FP8 (e4m3) training/rollout GEMMs, INT4 QAT of experts, FP8 checkpoints.

    fp8.py             quantization formats (1x128, 128x128, 128x1), Fp8Config
    fp8_gemm.py        FP8 GEMMs from quantized operands: reference, cuBLAS, grouped
    triton_fp8.py      CUDA kernels: fused quantization, grouped FP8 GEMMs (imported on demand)
    gluon_fp8.py       sm90 warp-specialized grouped FP8 GEMMs in Gluon (imported on demand)
    fp8_linear.py      Fp8Linear / fp8_linear / fp8_linear_shared_input (stacked projections of one
                       input) / fp8_grouped_linear (autograd, three FP8 GEMMs)
    int4.py            INT4 fake quantization (STE), packing, Int4Experts
    fp8_checkpoint.py  HF FP8 checkpoint tensors (weight + weight_scale_inv) <-> plain tensors
    modes.py           PrecisionConfig: off | fp8 (unified) | fp8_rollout | int4_qat for trainer + engine
    convert.py         apply_fp8 / apply_int4_qat / apply_int4_rollout on a built model
"""

from miles_lib.precision.convert import (CONVERTERS, ConversionReport, apply_fp8, apply_int4_qat,
                                         apply_int4_rollout, convert_model)
from miles_lib.precision.fp8 import (BLOCK, FP8_MAX, Fp8Config, dequantize_blockwise, quantize_act_1x128,
                                     quantize_act_128x1_t, quantize_blockwise, quantize_weight_128x128)
from miles_lib.precision.fp8_checkpoint import (dequantize_hf_checkpoint, dequantize_state_dict_fp8,
                                                fp8_quantization_config, quantize_state_dict_fp8,
                                                split_fp8_state_dict)
from miles_lib.precision.fp8_gemm import fp8_mm, fp8_mm_reference, grouped_fp8_mm, grouped_fp8_wgrad
from miles_lib.precision.fp8_linear import Fp8Linear, fp8_grouped_linear, fp8_linear, fp8_linear_shared_input
from miles_lib.precision.modes import (PRECISION_MODES, PrecisionConfig, apply_rollout_precision,
                                       apply_training_precision)
from miles_lib.precision.int4 import (Int4Config, Int4Experts, fake_quant_int4, pack_int4, unpack_int4,
                                      unpack_int4_codes)

__all__ = ["PRECISION_MODES", "PrecisionConfig", "apply_rollout_precision", "apply_training_precision", "BLOCK", "CONVERTERS", "ConversionReport", "FP8_MAX", "Fp8Config", "Fp8Linear", "Int4Config",
           "Int4Experts", "apply_fp8", "apply_int4_qat", "apply_int4_rollout", "convert_model",
           "dequantize_blockwise", "dequantize_hf_checkpoint", "dequantize_state_dict_fp8", "fake_quant_int4",
           "fp8_grouped_linear", "fp8_linear", "fp8_linear_shared_input", "fp8_mm", "fp8_mm_reference", "fp8_quantization_config",
           "grouped_fp8_mm", "grouped_fp8_wgrad", "pack_int4", "quantize_act_128x1_t", "quantize_act_1x128",
           "quantize_blockwise", "quantize_state_dict_fp8", "quantize_weight_128x128", "split_fp8_state_dict",
           "unpack_int4", "unpack_int4_codes"]
