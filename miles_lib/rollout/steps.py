"""The rollout engine's two forwards as single functions: eager, or each one compiled region.

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

The prefill forward (``prefill_forward``: n new sequences right-padded to T, their K/V into slots
[lo, lo + n), the LM head at each one's last real token) is compiled the same way with
``compile_prefill``; n, T and lo are dynamic, so admitting any batch reuses one graph.

On the CPU both compile with inductor's C++ wrapper (``cpp_wrapper``): the compiled region's
launcher is generated C++ instead of Python, which removes ~0.1-0.4 ms of host work per call at
the tiny model's sizes (bench/rollout_throughput.py).
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


def prefill_forward(model: torch.nn.Module, cache: SlotKVCache, ids: torch.Tensor, lo: int, last: torch.Tensor,
                    return_routing: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prefill ids [n, T] (right-padded) into slots [lo, lo + n); returns (logits [n, V] at the
    positions ``last`` [n], routing [n, T, nL, K] or None)."""
    n, T = ids.shape
    cache.begin_prefill(lo, n)
    pos = torch.arange(T, device=ids.device).expand(n, T)
    out = model(ids, position_ids=pos, kv_cache=cache, return_routing=return_routing, return_hidden=True,
                compute_logits=False)
    cache.end_step()
    logits = model.lm_head(out.hidden_states[torch.arange(n, device=ids.device), last])
    return logits, out.routed_experts


def compile_step(fn, device: torch.device):
    """``fn`` through torch.compile with dynamic sizes (compiled on first use, ~10-40 s on CPU);
    on the CPU with the C++ wrapper (see the module note)."""
    return torch.compile(fn, dynamic=True, options={"cpp_wrapper": True} if device.type == "cpu" else None)


def _bucket(n: int, cap: int, minimum: int) -> int:
    """Smallest power of two >= max(n, minimum), capped at ``cap``."""
    b = minimum
    while b < n:
        b *= 2
    return min(b, cap)


def pad_step(st: SlotState, B: int, window: int, sampling: BatchSampling) -> tuple[int, int, BatchSampling]:
    """(Bb, Wb, sampling over Bb rows) of the bucketed step that covers B rows and ``window`` keys;
    zeroes ``cache_len`` of the padded rows (free slots) so they stay inside their own slots."""
    Bb = _bucket(B, st.num_slots, 1)
    Wb = _bucket(window, st.max_len, 16)
    if Bb > B:
        st.cache_len[B:Bb].zero_()
    padded = BatchSampling(st.temperature[:Bb], st.top_k[:Bb], st.top_p[:Bb], sampling.all_greedy,
                           sampling.any_filter)
    return Bb, Wb, padded


class CudaGraphDecodeStep:
    """``step_fn`` (``decode_step``, eager or compiled) replayed from CUDA graphs: one graph launch
    per step instead of hundreds of kernel launches (the step is host-bound at small batch).

    A graph has fixed shapes, so the batch is padded to a power-of-two bucket Bb >= B and the window
    to a power-of-two Wb >= window (both capped by the buffers); one graph per (Bb, Wb, sampler flags).
    The padded rows are free slots: their ``cache_len`` is set to 0 before the replay (so every index
    they compute stays inside their own slot), their results are ignored, and prefill overwrites
    whatever they wrote before the slot is used. Attending over Wb >= window keys is exact: keys past a row's
    position are masked.

    Capturing runs the step once for warm-up (CUDA graphs need the allocator warmed up on a side
    stream); ``cache_len`` and ``last`` are restored afterwards, so the replay that follows is the
    step's only effect (the warm-up's K/V, token and routing writes are rewritten identically).
    Graphs hold the weights' addresses: in-place updates are seen, but anything cached in Python at
    capture time (e.g. FP8-quantized weights) is not, so the engine drops the graphs on every weight
    version change and whenever it re-allocates its buffers (``reset``); they are re-captured on
    first use.
    """

    def __init__(self, step_fn=decode_step) -> None:
        self.step_fn = step_fn
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.weight_version: int | None = None

    def reset(self) -> None:
        self.graphs.clear()
        self.pool = None

    def on_weights(self, version: int) -> None:
        """Drop the graphs if they were captured under another weight version."""
        if version != self.weight_version:
            self.reset()
            self.weight_version = version

    def __call__(self, model, cache: SlotKVCache, st: SlotState, B: int, window: int, sampling: BatchSampling,
                 check_stops: bool) -> torch.Tensor:
        Bb, Wb, padded = pad_step(st, B, window, sampling)
        key = (Bb, Wb, sampling.all_greedy, sampling.any_filter, check_stops)
        if key not in self.graphs:
            self.graphs[key] = self._capture(model, cache, st, Bb, Wb, padded, check_stops)
        graph, done_Bb = self.graphs[key]
        graph.replay()
        return done_Bb[:B]

    def _capture(self, model, cache, st, Bb, Wb, padded, check_stops):
        saved = st.cache_len[:Bb].clone(), st.last[:Bb].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step_fn(model, cache, st, Bb, Wb, padded, check_stops)  # warm-up
        torch.cuda.current_stream().wait_stream(side)
        st.cache_len[:Bb].copy_(saved[0])
        st.last[:Bb].copy_(saved[1])
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            done_Bb = self.step_fn(model, cache, st, Bb, Wb, padded, check_stops)
        return graph, done_Bb
