"""MoEForCausalLM: a decoder in the HF Qwen3-MoE layout (dense Qwen3 / Llama when num_experts=0).

    h_0 = embed(input_ids)
    h_l' = h_l + attn_l(norm1_l(h_l))
    h_{l+1} = h_l' + mlp_l(norm2_l(h_l'))          mlp_l = MoEBlock (sparse layer) or SwiGLU
    logits = lm_head(norm(h_L))

The model knows nothing about training, precision or rollout; those apply themselves to a built
model (precision converters swap modules, the rollout engine passes a ``kv_cache``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from miles_lib.model.config import ModelConfig
from miles_lib.model.layers import Attention, KVCache, RMSNorm, RotaryEmbedding, SwiGLUMLP, causal_padding_mask
from miles_lib.model.moe import MoEBlock


@dataclasses.dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, T, V]
    routed_experts: torch.Tensor | None = None  # [B, T, num_moe_layers, K] int64
    hidden_states: torch.Tensor | None = None  # [B, T, D] final-normed, when asked
    router_topk: torch.Tensor | None = None  # [B, T, num_moe_layers, K] the routers' own top-k
    # (equals routed_experts unless routing was replayed; for routing-agreement metrics)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MoEBlock(cfg) if self.is_moe else SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, mask, kv_cache, replay_ids):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, kv_cache)
        x = self.post_attention_layernorm(h)
        if self.is_moe:
            y, ids, own = self.mlp(x, replay_ids)
            return h + y, ids, own
        return h + self.mlp(x), None, None


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)


class MoEForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.moe_layer_indices = config.moe_layer_indices()

    # ---- construction ------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02) -> "MoEForCausalLM":
        """Seeded random init (normal(0, std) matrices, unit norms) for models trained from scratch."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    @classmethod
    def from_pretrained(cls, path_or_uri: str, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> "MoEForCausalLM":
        from miles_lib.model.hf_io import load_pretrained
        return load_pretrained(path_or_uri, dtype=dtype, device=device)

    def save_pretrained(self, path_or_uri: str, max_shard_bytes: int | None = None) -> None:
        from miles_lib.model.hf_io import save_pretrained
        save_pretrained(self, path_or_uri, max_shard_bytes=max_shard_bytes)

    # ---- forward -----------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, routed_experts: torch.Tensor | None = None,
                return_routing: bool = False, kv_cache: KVCache | None = None,
                return_hidden: bool = False, compute_logits: bool = True) -> ModelOutput:
        """input_ids [B, T]; attention_mask [B, T] (1 = token, 0 = padding; left or right padding);
        position_ids default to the count of real tokens before each position; routed_experts
        [B, T, num_moe_layers, K] replays expert choices (R3). With ``kv_cache`` the cache owns
        masking and ``position_ids`` must be given.
        """
        B, T = input_ids.shape
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
            else:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if routed_experts is not None:
            want = (B, T, len(self.moe_layer_indices), self.config.num_experts_per_tok)
            if tuple(routed_experts.shape) != want:
                raise ValueError(f"routed_experts has shape {tuple(routed_experts.shape)}, "
                                 f"expected [B, T, num_moe_layers, top_k] = {list(want)}")
        h = self.model.embed_tokens(input_ids)
        if kv_cache is not None and kv_cache.rope_tables is not None:  # the engine's precomputed rows
            cos, sin = (t[position_ids].to(h.dtype) for t in kv_cache.rope_tables)
        else:
            cos, sin = self.model.rotary(position_ids, h.dtype)
        mask = None if kv_cache is not None else causal_padding_mask(attention_mask, B, T, h.device)
        routing, own_topk = [], []
        for layer in self.model.layers:
            replay = None
            if routed_experts is not None and layer.is_moe:
                replay = routed_experts[:, :, len(routing)]
            h, ids, own = layer(h, cos, sin, mask, kv_cache, replay)
            if ids is not None:
                routing.append(ids)
                own_topk.append(own)
        h = self.model.norm(h)
        logits = self.lm_head(h) if compute_logits else None
        routed = own = None
        if return_routing and routing:
            routed = torch.stack(routing, dim=2)
            own = routed if routed_experts is None else torch.stack(own_topk, dim=2)
        return ModelOutput(logits=logits, routed_experts=routed,
                           hidden_states=h if return_hidden else None, router_topk=own)
