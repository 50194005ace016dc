"""Tensor-name mapping between HF checkpoints and ``MoEForCausalLM``'s state dict.

HF stores each expert separately (``mlp.experts.{e}.{gate,up,down}_proj.weight``, shapes [F, D],
[F, D], [D, F]); the model stacks them: ``mlp.experts.gate_up_proj`` [E, 2F, D] = cat(gate, up)
along dim 1 per expert, ``mlp.experts.down_proj`` [E, D, F]. The router weight is
``mlp.gate.weight`` in HF and ``mlp.gate.weight`` here. Every other name is identical. Tied
embeddings: HF may omit ``lm_head.weight``; the model shares the embedding.
"""

from __future__ import annotations

import re

import torch

from miles_lib.errors import CheckpointError
from miles_lib.model.config import ModelConfig

_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name a HF checkpoint of ``cfg`` holds, with its shape."""
    D, Hd = cfg.hidden_size, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, D),
                                          "model.norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, D)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (D,)
        shapes[p + "post_attention_layernorm.weight"] = (D,)
        shapes[p + "self_attn.q_proj.weight"] = (cfg.num_attention_heads * Hd, D)
        shapes[p + "self_attn.k_proj.weight"] = (cfg.num_key_value_heads * Hd, D)
        shapes[p + "self_attn.v_proj.weight"] = (cfg.num_key_value_heads * Hd, D)
        shapes[p + "self_attn.o_proj.weight"] = (D, cfg.num_attention_heads * Hd)
        if cfg.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (cfg.num_attention_heads * Hd,)
            shapes[p + "self_attn.k_proj.bias"] = (cfg.num_key_value_heads * Hd,)
            shapes[p + "self_attn.v_proj.bias"] = (cfg.num_key_value_heads * Hd,)
        if cfg.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (Hd,)
            shapes[p + "self_attn.k_norm.weight"] = (Hd,)
        if cfg.is_moe_layer(i):
            F = cfg.moe_intermediate_size
            shapes[p + "mlp.gate.weight"] = (cfg.num_experts, D)
            for e in range(cfg.num_experts):
                shapes[p + f"mlp.experts.{e}.gate_proj.weight"] = (F, D)
                shapes[p + f"mlp.experts.{e}.up_proj.weight"] = (F, D)
                shapes[p + f"mlp.experts.{e}.down_proj.weight"] = (D, F)
        else:
            F = cfg.intermediate_size
            shapes[p + "mlp.gate_proj.weight"] = (F, D)
            shapes[p + "mlp.up_proj.weight"] = (F, D)
            shapes[p + "mlp.down_proj.weight"] = (D, F)
    return shapes


def validate_hf_tensors(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise CheckpointError listing missing / unexpected / mis-shaped tensors."""
    want = expected_hf_shapes(cfg)
    have = dict(shapes)
    if cfg.tie_word_embeddings:
        have.pop("lm_head.weight", None)  # allowed either way when tied
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {missing[:20]}" + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {unexpected[:20]}" + (" ..." if len(unexpected) > 20 else ""))
    for name in sorted(set(want) & set(have)):
        if tuple(have[name]) != tuple(want[name]):
            problems.append(f"shape mismatch for {name}: expected {list(want[name])}, got {list(have[name])}")
    if problems:
        raise CheckpointError(f"{source}: checkpoint does not match its config.json: " + "; ".join(problems))


def hf_to_internal(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF names/layout -> model state dict (experts stacked). Input must already be validated."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[int, dict[str, list]] = {}
    for name, t in tensors.items():
        m = _EXPERT_RE.match(name)
        if m:
            layer, e, kind = int(m.group(1)), int(m.group(2)), m.group(3)
            experts.setdefault(layer, {}).setdefault(kind, [None] * cfg.num_experts)[e] = t
        elif name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        else:
            out[name] = t
    for layer, kinds in experts.items():
        p = f"model.layers.{layer}.mlp.experts."
        out[p + "gate_up_proj"] = torch.stack([torch.cat([g, u], 0) for g, u in zip(kinds["gate"], kinds["up"])])
        out[p + "down_proj"] = torch.stack(kinds["down"])
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def internal_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Model state dict -> HF names/layout (per-expert tensors, contiguous, no shared storage)."""
    out: dict[str, torch.Tensor] = {}
    F = cfg.moe_intermediate_size
    for name, t in state.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = t[e, :F].contiguous()
                out[f"{prefix}{e}.up_proj.weight"] = t[e, F:].contiguous()
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = t[e].contiguous()
        elif name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        else:
            out[name] = t.contiguous()
    return out
