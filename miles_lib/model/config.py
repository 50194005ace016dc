"""ModelConfig: the architecture of a decoder, read from / written to a HF ``config.json``.

One config covers Qwen3-MoE (``qwen3_moe``), dense Qwen3 (``qwen3``) and Llama (``llama``):
  * MoE layers: layer i is sparse iff num_experts > 0, i not in mlp_only_layers and
    (i + 1) % decoder_sparse_step == 0 (the Qwen3-MoE rule);
  * qk_norm: per-head RMSNorm on q and k before RoPE (Qwen3 family; Llama has none).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from miles_lib.config import ConfigBase, check
from miles_lib.errors import CheckpointError

SUPPORTED_MODEL_TYPES = ("qwen3_moe", "qwen3", "llama")


@dataclasses.dataclass
class ModelConfig(ConfigBase):
    model_type: str = "qwen3_moe"
    vocab_size: int = 256
    hidden_size: int = 128
    intermediate_size: int = 256  # dense MLP width (dense layers / dense models)
    moe_intermediate_size: int = 128  # per-expert MLP width
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    num_experts: int = 8  # 0 -> dense model
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = dataclasses.field(default_factory=list)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = True
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        s = "ModelConfig"
        check(self.model_type in SUPPORTED_MODEL_TYPES, s, "model_type", self.model_type,
              f"one of {SUPPORTED_MODEL_TYPES}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings",
                     "decoder_sparse_step"):
            v = getattr(self, name)
            check(isinstance(v, int) and v > 0, s, name, v, "a positive integer")
        check(self.num_attention_heads % self.num_key_value_heads == 0, s, "num_key_value_heads",
              self.num_key_value_heads, f"a divisor of num_attention_heads={self.num_attention_heads}")
        check(self.head_dim % 2 == 0, s, "head_dim", self.head_dim, "even (RoPE rotates pairs)")
        check(isinstance(self.num_experts, int) and self.num_experts >= 0, s, "num_experts",
              self.num_experts, ">= 0 (0 = dense)")
        if self.num_experts > 0:
            check(1 <= self.num_experts_per_tok <= self.num_experts, s, "num_experts_per_tok",
                  self.num_experts_per_tok, f"in [1, num_experts={self.num_experts}]")
            check(self.moe_intermediate_size > 0, s, "moe_intermediate_size",
                  self.moe_intermediate_size, "a positive integer")
        if self.num_experts == 0 or len(self.moe_layer_indices()) < self.num_hidden_layers:
            check(self.intermediate_size > 0, s, "intermediate_size", self.intermediate_size,
                  "a positive integer (the model has dense MLP layers)")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        check(not bad, s, "mlp_only_layers", self.mlp_only_layers,
              f"layer indices in [0, {self.num_hidden_layers})")
        check(self.rms_norm_eps > 0, s, "rms_norm_eps", self.rms_norm_eps, "> 0")
        check(self.rope_theta > 0, s, "rope_theta", self.rope_theta, "> 0")
        check(self.hidden_act == "silu", s, "hidden_act", self.hidden_act, "'silu' (SwiGLU)")
        check(self.torch_dtype in ("float32", "bfloat16", "float16"), s, "torch_dtype",
              self.torch_dtype, "float32, bfloat16 or float16")

    # ---- derived structure -------------------------------------------------------------
    def is_moe_layer(self, layer_idx: int) -> bool:
        return (self.num_experts > 0 and layer_idx not in self.mlp_only_layers
                and (layer_idx + 1) % self.decoder_sparse_step == 0)

    def moe_layer_indices(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_indices())

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    # ---- HF config.json ----------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build from a HF ``config.json`` dict (transformers 4.x and 5.x spellings)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"{source}: unsupported model_type {model_type!r}; supported: "
                f"{list(SUPPORTED_MODEL_TYPES)} (HF Qwen3MoeForCausalLM / Qwen3ForCausalLM / "
                "LlamaForCausalLM layouts)")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise CheckpointError(
                f"{source}: rope_type {rope_type!r} is not supported (only default RoPE); "
                "remove rope scaling from the config or convert the model first")
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        heads = hf["num_attention_heads"]
        is_moe = model_type == "qwen3_moe"
        num_experts = (hf.get("num_experts", hf.get("num_local_experts", 0)) or 0) if is_moe else 0
        dtype = hf.get("dtype", hf.get("torch_dtype", "float32")) or "float32"
        try:
            return cls(
                model_type=model_type,
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                intermediate_size=hf.get("intermediate_size", 0) or 0,
                moe_intermediate_size=hf.get("moe_intermediate_size", 0) if is_moe else 0,
                num_hidden_layers=hf["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=hf.get("num_key_value_heads") or heads,
                head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
                num_experts=num_experts,
                num_experts_per_tok=hf.get("num_experts_per_tok", 1) if is_moe else 1,
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                decoder_sparse_step=hf.get("decoder_sparse_step", 1) or 1,
                mlp_only_layers=list(hf.get("mlp_only_layers") or []),
                rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=float(theta),
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                attention_bias=bool(hf.get("attention_bias", False)),
                qk_norm=model_type in ("qwen3", "qwen3_moe"),
                hidden_act=hf.get("hidden_act", "silu"),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=hf.get("eos_token_id"),
                pad_token_id=hf.get("pad_token_id"),
                torch_dtype=str(dtype).replace("torch.", ""),
            )
        except KeyError as e:
            raise CheckpointError(f"{source}: required key {e.args[0]!r} is missing") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF ``config.json`` dict (loadable by transformers 4.51+ and 5.x)."""
        arch = {"qwen3_moe": "Qwen3MoeForCausalLM", "qwen3": "Qwen3ForCausalLM",
                "llama": "LlamaForCausalLM"}[self.model_type]
        d: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "hidden_act": self.hidden_act,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.torch_dtype,
        }
        if self.model_type == "qwen3_moe":
            d.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                     moe_intermediate_size=self.moe_intermediate_size,
                     norm_topk_prob=self.norm_topk_prob,
                     decoder_sparse_step=self.decoder_sparse_step,
                     mlp_only_layers=list(self.mlp_only_layers))
        return d
