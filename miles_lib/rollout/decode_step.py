"""One decode step of the rollout engine as a single function: eager, or one compiled region.

Design note. A decode step feeds every running sequence (slots [0, B)) its last token and samples
the next one. Everything the step does on the device lives in this function -- announcing the step
to the KV cache, the model forward, the LM head, sampling, and recording token / log-prob / routing
into the slot buffers -- so that ``torch.compile`` sees the whole step as ONE graph: no Python
between the model's ops, one guard check per step, elementwise work fused across the boundaries
of model / sampler / bookkeeping. This is the CPU counterpart of capturing the step in a CUDA
graph. The eager engine calls the very same function uncompiled, so both paths share every line.

    pos_B   = cache_len[:B]                        position of the token fed now
    hidden  = model(last[:B], pos_B, kv_cache)     (the cache writes K/V at pos_B)
    routes[b, pos_b] = experts chosen for that token (R3)
    token_b, logp_b = sample(lm_head(hidden_b), uniforms[b, pos_b + 1])
    tokens[b, pos_b + 1], logp[b, pos_b + 1] = token_b, logp_b;  cache_len[:B] = pos_B + 1
    done_b = token_b is a stop token  or  pos_b + 2 >= limit_b

Inputs that change from step to step (B, the attention window) are Python ints the compiler treats
as dynamic sizes; host-side flags (greedy batch, stop tokens present) pick between a few graphs.
"""

from __future__ import annotations

import torch

from miles_lib.rollout.kv_cache import SlotKVCache
from miles_lib.rollout.sampling import BatchSampling, sample_next
from miles_lib.rollout.slots import SlotState


def decode_step(model: torch.nn.Module, cache: SlotKVCache, st: SlotState, B: int, window: int,
                sampling: BatchSampling, check_stops: bool) -> torch.Tensor:
    """Run one decode step for slots [0, B) (window = max fed tokens + 1); returns done_B (bool)."""
    pos = st.cache_len[:B]
    cache.begin_decode(pos, window)
    out = model(st.last[:B, None], position_ids=pos[:, None], kv_cache=cache,
                return_routing=st.routes is not None, return_hidden=True, compute_logits=False)
    cache.end_step()
    logits = model.lm_head(out.hidden_states[:, 0])
    flat = st.flat_index(pos)
    if st.routes is not None:
        st.routes.view(-1, *st.routes.shape[2:]).index_copy_(0, flat, out.routed_experts[:, 0].to(st.routes.dtype))
    new_pos, new_flat = pos + 1, flat + 1  # where the sampled tokens go
    st.cache_len[:B] = new_pos
    tokens, logp = sample_next(logits, sampling, st.uniforms_at(new_flat))
    return st.record(0, new_pos, new_flat, tokens, logp, check_stops)


def compiled_decode_step():
    """``decode_step`` through torch.compile (dynamic sizes; compiled on first use, ~10-40 s on CPU)."""
    return torch.compile(decode_step, dynamic=True)
