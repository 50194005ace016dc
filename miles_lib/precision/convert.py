"""Apply low precision to a built model: small ordered converters (the model never imports precision).

    apply_fp8(model, Fp8Config())          q/k/v/o and dense-MLP nn.Linear -> Fp8Linear (same
                                           parameters), MoE experts' grouped GEMM -> FP8 grouped
    apply_int4_qat(model, Int4Config())    MoE experts' grouped GEMM runs on fake-quantized int4
                                           weights (straight-through gradients)
    apply_int4_rollout(model, Int4Config()) MoE experts -> Int4Experts (packed int4 + scales); for
                                           the rollout engine, drops the high-precision expert weights
    convert_model(model, [("fp8", {...}), ...])   the same, chosen by name, in order

Router, norms, embeddings and lm_head always stay in high precision. Layers whose dims are not
multiples of 128 (FP8) or of the group size (INT4) are left alone and reported as skipped. FP8
experts and INT4 experts are exclusive (converting experts twice is an error).
"""

from __future__ import annotations

import dataclasses
import functools
import re

from torch import nn

from miles_lib.errors import ConfigError
from miles_lib.model.moe import GroupedExperts, grouped_linear
from miles_lib.precision.fp8 import Fp8Config
from miles_lib.precision.fp8_linear import Fp8Linear, fp8_grouped_linear
from miles_lib.precision.int4 import Int4Config, Int4Experts, int4_qat_linear_fn

_LINEAR_KIND = [("attention", re.compile(r"layers\.\d+\.self_attn\.(q|k|v|o)_proj$")),
                ("dense_mlp", re.compile(r"layers\.\d+\.mlp\.(gate|up|down)_proj$"))]


@dataclasses.dataclass
class ConversionReport:
    converted: list[str] = dataclasses.field(default_factory=list)  # module names
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # module name -> why


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _experts(model: nn.Module) -> list[tuple[str, GroupedExperts]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, GroupedExperts)]


def _eligible_experts(model: nn.Module, multiple: int, what: str, report: ConversionReport):
    """The experts whose hidden and ffn dims are multiples of ``multiple``; the others are recorded
    in ``report.skipped``."""
    for name, ex in _experts(model):
        E, F2, D = ex.gate_up_proj.shape
        if D % multiple or (F2 // 2) % multiple:
            report.skipped[name] = f"hidden {D} / expert ffn {F2 // 2} not multiples of {what}"
            continue
        yield name, ex


def _claim_experts(name: str, experts: GroupedExperts, what: str) -> None:
    if experts.linear_fn is not grouped_linear:
        raise ConfigError(f"{name}: the experts already run {getattr(experts.linear_fn, '__name__', experts.linear_fn)}"
                          f"; cannot also apply {what} (FP8 experts and INT4 experts are exclusive)")


def apply_fp8(model: nn.Module, cfg: Fp8Config | None = None) -> ConversionReport:
    cfg = cfg or Fp8Config()
    report = ConversionReport()
    for name, mod in list(model.named_modules()):
        kind = next((k for k, pat in _LINEAR_KIND if pat.search(name)), None)
        if kind is None or kind not in cfg.modules or not isinstance(mod, nn.Linear) or isinstance(mod, Fp8Linear):
            continue
        if mod.in_features % 128 or mod.out_features % 128:
            report.skipped[name] = f"[{mod.out_features}, {mod.in_features}] not multiples of 128"
            continue
        _set_module(model, name, Fp8Linear.from_linear(mod, cfg.pow2_scales, cfg.wgrad_grad_blocks, cfg.share_input))
        report.converted.append(name)
    if "experts" in cfg.modules:
        for name, ex in _eligible_experts(model, 128, "128", report):
            _claim_experts(name, ex, "FP8")
            ex.linear_fn = functools.partial(fp8_grouped_linear, pow2_scales=cfg.pow2_scales)
            report.converted.append(name)
    return report


def apply_int4_qat(model: nn.Module, cfg: Int4Config | None = None) -> ConversionReport:
    cfg = cfg or Int4Config()
    report = ConversionReport()
    for name, ex in _eligible_experts(model, cfg.group_size, f"group_size {cfg.group_size}", report):
        _claim_experts(name, ex, "INT4 QAT")
        ex.linear_fn = int4_qat_linear_fn(cfg)
        report.converted.append(name)
    return report


def apply_int4_rollout(model: nn.Module, cfg: Int4Config | None = None) -> ConversionReport:
    """Replace every GroupedExperts by Int4Experts holding the packed weights (inference only)."""
    cfg = cfg or Int4Config()
    report = ConversionReport()
    for name, ex in _eligible_experts(model, cfg.group_size, f"group_size {cfg.group_size}", report):
        _set_module(model, name, Int4Experts.from_experts(ex, cfg))
        report.converted.append(name)
    return report


CONVERTERS = {"fp8": (Fp8Config, apply_fp8), "int4_qat": (Int4Config, apply_int4_qat),
              "int4_rollout": (Int4Config, apply_int4_rollout)}


def convert_model(model: nn.Module, specs: list[tuple[str, dict | object | None]]) -> dict[str, ConversionReport]:
    """Apply converters by name, in order: specs = [(name, config dict or config object or None)]."""
    reports = {}
    for name, cfg in specs:
        if name not in CONVERTERS:
            raise ConfigError(f"unknown precision converter {name!r}; valid: {sorted(CONVERTERS)}")
        cfg_cls, fn = CONVERTERS[name]
        if cfg is None or isinstance(cfg, dict):
            cfg = cfg_cls.from_dict(cfg)
        reports[name] = fn(model, cfg)
    return reports
