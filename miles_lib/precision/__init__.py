"""Low precision: block-scaled FP8 (e4m3) quantization and linear layers."""

from miles_lib.precision.fp8 import (BLOCK, FP8_MAX, dequantize_blockwise, fp8_linear, fp8_matmul_reference,
                                     quantize_act_1x128, quantize_blockwise, quantize_weight_128x128)

__all__ = ["BLOCK", "FP8_MAX", "dequantize_blockwise", "fp8_linear", "fp8_matmul_reference",
           "quantize_act_1x128", "quantize_blockwise", "quantize_weight_128x128"]
