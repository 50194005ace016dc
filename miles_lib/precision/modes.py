"""Precision modes of a GRPO job: which GEMMs the trainer and the rollout engine run.

    mode          trainer forward/backward          rollout engine                     weight sync
    off           high precision (fp32/bf16)        the trainer's module               zero-copy
    fp8           block-scaled FP8 (Fp8Linear,      the trainer's module: the SAME     zero-copy
                  FP8 grouped experts)              FP8 GEMMs ("unified FP8")
    fp8_rollout   high precision                    its own copy converted to FP8      bucketed copy
                                                    (the usual "bf16 train / FP8 rollout")
    int4_qat      experts on fake-quantized int4    its own copy whose experts hold    bucketed copy,
                  weights (straight-through grads)  packed int4 + scales (Int4Experts) re-packed per sync

In ``fp8`` and ``fp8_rollout`` the engine quantizes each weight once per weight sync: quantized
weights are cached on the weight tensor and reused until the tensor changes (``fp8_linear``).
Norms, router, embeddings and lm_head stay in high precision in every mode. The trainer-vs-rollout
log-prob gap these modes produce is in the step metrics (``train_rollout_logprob_abs_diff``).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from miles_lib.config import ConfigBase, check
from miles_lib.precision.convert import ConversionReport, apply_fp8, apply_int4_qat, apply_int4_rollout
from miles_lib.precision.fp8 import Fp8Config
from miles_lib.precision.int4 import Int4Config

PRECISION_MODES = ("off", "fp8", "fp8_rollout", "int4_qat")


@dataclasses.dataclass
class PrecisionConfig(ConfigBase):
    mode: str = "off"  # one of PRECISION_MODES (table in the module docstring)
    fp8: Fp8Config = dataclasses.field(default_factory=Fp8Config)
    int4: Int4Config = dataclasses.field(default_factory=Int4Config)

    def __post_init__(self) -> None:
        check(self.mode in PRECISION_MODES, "PrecisionConfig", "mode", self.mode, f"one of {list(PRECISION_MODES)}")

    @property
    def separate_rollout_model(self) -> bool:
        """The engine needs its own copy of the weights (it runs other GEMMs than the trainer)."""
        return self.mode in ("fp8_rollout", "int4_qat")


def _require_converted(report: ConversionReport, what: str) -> ConversionReport:
    if not report.converted:
        why = "; ".join(f"{k}: {v}" for k, v in list(report.skipped.items())[:3]) or "no eligible layers"
        raise ValueError(f"precision {what}: nothing in the model can be converted ({why}); "
                         "use precision.mode='off' for this model")
    return report


def apply_training_precision(model: nn.Module, cfg: PrecisionConfig) -> ConversionReport | None:
    """Convert the trainer's module in place (before sharding / building the optimizer)."""
    if cfg.mode == "fp8":
        return _require_converted(apply_fp8(model, cfg.fp8), "fp8")
    if cfg.mode == "int4_qat":
        return _require_converted(apply_int4_qat(model, cfg.int4), "int4_qat")
    return None


def apply_rollout_precision(model: nn.Module, cfg: PrecisionConfig) -> ConversionReport | None:
    """Convert an engine-side model copy in place (its weights then come through ``update_weights``)."""
    if cfg.mode in ("fp8", "fp8_rollout"):
        return _require_converted(apply_fp8(model, cfg.fp8), cfg.mode)
    if cfg.mode == "int4_qat":
        return _require_converted(apply_int4_rollout(model, cfg.int4), "int4_qat rollout")
    return None
