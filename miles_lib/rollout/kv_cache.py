"""Preallocated slot KV cache: the model's ``KVCache.attend`` hook for the rollout engine.

Design note. Every layer owns K and V buffers ``[S, G, L, Hd]`` (S slots, L positions), allocated
once and reused across steps and ``generate`` calls. A running sequence owns one slot; the engine
keeps the running sequences in the slots ``[0, B)`` (it moves the last one into a finished one's
slot), so every step works on plain views of the buffers -- no gather of the cache, no copy of
the history, no allocation that grows with the sequence. The engine announces each forward:

  prefill(lo, n): the step feeds n new sequences (right-padded to T) into slots [lo, lo + n);
      their keys go to positions [0, T) and queries attend causally within the step. Right
      padding never leaks into a real token's output (padding only follows real tokens); the
      padded positions' keys are overwritten before any later query can see them.
  decode(pos_B, W): one token per running slot b < B at position pos_B[b]; its key is written
      there (one ``index_copy_`` per layer for all rows), then the query attends to positions
      [0, pos_B[b]] of its slot, read through the view K[:B, :, :W] with W = max(pos) + 1 and the
      positions past the row's own length masked out.

Both steps call ``F.scaled_dot_product_attention`` (fp32 accumulation on every backend), with
``enable_gqa`` so the G kv heads are never repeated in memory -- except a decode step compiled on
the CPU in fp32, which calls the native ``miles_cpu::decode_attention`` (model/native_cpu.py): per
(sequence, head) the scores of keys [0, pos_b], a max-subtracted softmax and the weighted sum of the
values, in one pass over the window. Whole compiled engine at batch 64 (same process, 9 alternating
rounds, median engine / transformers ratio): native 2.23x, the earlier elementwise version that
inductor fused into one loop nest (with a staged query) 2.26x, SDPA 1.79x -- SDPA's CPU kernel
allocates and masks per call. The native pass was kept: it does not depend on inductor's fusion
and vectorization choices.

Shape legend: S slots, B running sequences, n prefill rows, H query heads, G kv heads, T step
length, L cache positions, W decode window (<= L), Hd head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from miles_lib.model import native_cpu


class SlotKVCache:
    def __init__(self, num_layers: int, num_slots: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, rotary: torch.nn.Module | None = None) -> None:
        shape = (num_slots, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots, self.max_len, self.n_kv = num_slots, max_len, n_kv_heads
        # RoPE cos / sin of every cache position, computed once: a forward gathers its rows rather than
        # evaluating cos / sin (which a compiled step would redo inside every layer's q / k kernels)
        self.rope_tables = None if rotary is None else rotary.table(max_len)
        # flat offset of (slot b, kv head g, position 0) in a buffer viewed as [S * G * L, Hd]
        self._row_base_SG = (torch.arange(num_slots * n_kv_heads, device=device) * max_len).view(num_slots, n_kv_heads)
        self._mode = "none"

    @property
    def nbytes(self) -> int:
        rope = list(self.rope_tables or ())
        return sum(t.numel() * t.element_size() for t in self.k + self.v + rope)

    # ---- step announcements (called by the engine before each forward) -------------------
    def begin_prefill(self, lo: int, n: int) -> None:
        self._mode, self._lo, self._n = "prefill", lo, n

    def begin_decode(self, pos_B: torch.Tensor, window: int) -> None:
        B = pos_B.shape[0]
        self._mode, self._B, self._window, self._pos = "decode", B, window, pos_B
        self._write_idx = (self._row_base_SG[:B] + pos_B[:, None]).reshape(-1)  # [B * G]
        keys_W = torch.arange(window, device=pos_B.device)
        self._mask = (keys_W[None, :] <= pos_B[:, None])[:, None, None, :]  # [B, 1, 1, W]

    def end_step(self) -> None:
        self._mode = "none"

    # ---- the model's hook ------------------------------------------------------------------
    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, H, T, Hd], k/v [B, G, T, Hd] (RoPE applied) -> [B, H, T, Hd]."""
        K, V = self.k[layer_idx], self.v[layer_idx]
        gqa = q.shape[1] != k.shape[1]
        if self._mode == "prefill":
            T, sl = k.shape[2], slice(self._lo, self._lo + self._n)
            K[sl, :, :T] = k
            V[sl, :, :T] = v
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)  # T = 1: the query sees its own key
        if self._mode != "decode":
            raise RuntimeError("SlotKVCache.attend called outside a prefill/decode step")
        Hd = K.shape[-1]
        K.view(-1, Hd).index_copy_(0, self._write_idx, k.reshape(-1, Hd).to(K.dtype))
        V.view(-1, Hd).index_copy_(0, self._write_idx, v.reshape(-1, Hd).to(V.dtype))
        B, W = self._B, self._window
        if torch.compiler.is_compiling() and native_cpu.fp32_ops_ok(q):
            return native_cpu.decode_attention(q, K[:B, :, :W], V[:B, :, :W], self._pos)
        return F.scaled_dot_product_attention(q, K[:B, :, :W], V[:B, :, :W], attn_mask=self._mask,
                                              enable_gqa=gqa)

    # ---- slot management ---------------------------------------------------------------------
    def move(self, src: torch.Tensor, dst: torch.Tensor, window: int) -> None:
        """Copy the first ``window`` positions of slots ``src`` into slots ``dst`` (disjoint)."""
        for buf in self.k + self.v:
            view = buf[:, :, :window]
            view.index_copy_(0, dst, view.index_select(0, src))
