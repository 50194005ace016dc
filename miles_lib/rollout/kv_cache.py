"""Preallocated slot KV cache implementing the model's ``KVCache.attend`` hook.

Each layer owns K and V buffers [num_slots, G, max_len, Hd]; a running sequence owns one slot and
its ``lengths[slot]`` cached positions. Two step kinds, set by the engine before each forward:

  prefill(slots, T): the step's T (right-padded) tokens are the sequences' first tokens; they are
      written to positions [0, T) and attend causally among themselves (key padding masked).
  decode(slots): one new token per sequence, written at position lengths[slot]; it attends to the
      slot's positions [0, lengths[slot]] (the rest of the gathered window is masked).

Shape legend: B sequences in the step, H query heads, G kv heads, T step length, S key window, Hd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SlotKVCache:
    def __init__(self, num_layers: int, num_slots: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_slots, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.num_slots, self.max_len = num_slots, max_len
        self._mode = "decode"
        self._slots = torch.zeros(0, dtype=torch.long, device=device)
        self._mask: torch.Tensor | None = None
        self._window = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def begin_prefill(self, slots: torch.Tensor, lengths: torch.Tensor, T: int) -> None:
        """Next forward: the first ``lengths[b]`` tokens of each slot (right-padded to T = max)."""
        dev = self.lengths.device
        self._mode, self._slots = "prefill", slots
        causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        keys = torch.arange(T, device=dev)[None, :] < lengths[:, None]
        self._mask = (causal[None] & keys[:, None, :]) | torch.eye(T, dtype=torch.bool, device=dev)[None]
        self._mask = self._mask[:, None]  # [B, 1, T, T]
        self._new_lengths = lengths

    @staticmethod
    def contiguous(host_slots: list[int]) -> slice | None:
        """The slots as a slice when they are consecutive (K/V are then viewed, not gathered)."""
        lo = host_slots[0]
        return slice(lo, lo + len(host_slots)) if host_slots == list(range(lo, lo + len(host_slots))) else None

    def begin_decode(self, slots: torch.Tensor, window: int, slot_range: slice | None) -> None:
        """Next forward: one token per slot at position lengths[slot]; ``window`` = max position + 1
        and ``slot_range`` (consecutive slots) are passed from host-side bookkeeping (no sync)."""
        self._mode, self._slots, self._range, self._window = "decode", slots, slot_range, window
        pos = self.lengths[slots]
        self._pos = pos
        self._rows = torch.arange(slots.numel(), device=slots.device)
        self._mask = (torch.arange(window, device=pos.device)[None, :] <= pos[:, None])[:, None, None, :]

    def end_step(self) -> None:
        if self._mode == "prefill":
            self.lengths[self._slots] = self._new_lengths
        else:
            self.lengths[self._slots] += 1

    def release(self, slots: torch.Tensor) -> None:
        self.lengths[slots] = 0

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        K, V, slots = self.k[layer_idx], self.v[layer_idx], self._slots
        gqa = q.shape[1] != k.shape[1]
        if self._mode == "prefill":
            T = k.shape[2]
            K[slots, :, :T] = k.to(K.dtype)
            V[slots, :, :T] = v.to(V.dtype)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self._mask, enable_gqa=gqa)
        pos = self._pos
        if self._range is not None:  # consecutive slots: write and read through views, no gather copy
            Kr, Vr = K[self._range], V[self._range]
            Kr[self._rows, :, pos] = k[:, :, 0].to(K.dtype)
            Vr[self._rows, :, pos] = v[:, :, 0].to(V.dtype)
            Kw, Vw = Kr[:, :, : self._window], Vr[:, :, : self._window]
        else:
            K[slots, :, pos] = k[:, :, 0].to(K.dtype)
            V[slots, :, pos] = v[:, :, 0].to(V.dtype)
            Kw = K[slots, :, : self._window]
            Vw = V[slots, :, : self._window]
        return F.scaled_dot_product_attention(q, Kw, Vw, attn_mask=self._mask, enable_gqa=gqa)
