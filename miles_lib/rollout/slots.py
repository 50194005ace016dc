"""Per-slot device state of the running sequences (everything but the KV cache).

Design note. The hot loop never walks the sequences in Python: what a step needs per sequence
lives in slot-indexed device tensors, and the running sequences occupy slots [0, B), so a step
reads ``buf[:B]`` views and writes with one ``index_copy_`` per buffer. Sequence position p of slot
b is the flat index ``b * L + p`` of an ``[S, L]`` buffer.

  cache_len [S]       tokens fed to the model so far (= position of the next token to feed)
  last      [S]       the last sampled token (fed by the next decode step)
  limit     [S]       token count at which the sequence is truncated (max_new_tokens / context)
  tokens    [S, L]    sampled token at its sequence position
  logp      [S, L]    its log-probability (sampling.py)
  uniforms  [S, L]    the request's uniform for each position (sampling.py)
  routes    [S, L, nL, K]  experts chosen when the token at that position was fed (R3)
  temperature / top_p / top_k [S], stops [S, M] (padded with -1)

Generated values stay on the device until a sequence leaves; then its slice is copied to the host
once (``read``).
"""

from __future__ import annotations

import dataclasses

import torch

from miles_lib.rollout.sampling import BatchSampling, SamplingParams


def routes_dtype(num_experts: int) -> torch.dtype:
    """Smallest integer dtype holding expert ids (the routing buffer is S * L * nL * K entries)."""
    return torch.uint8 if num_experts <= 256 else torch.int16 if num_experts <= 32767 else torch.int32


@dataclasses.dataclass
class SlotState:
    cache_len: torch.Tensor
    last: torch.Tensor
    limit: torch.Tensor
    tokens: torch.Tensor
    logp: torch.Tensor
    uniforms: torch.Tensor
    routes: torch.Tensor | None
    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor
    stops: torch.Tensor

    @classmethod
    def allocate(cls, num_slots: int, max_len: int, num_moe_layers: int, top_k: int, num_experts: int,
                 max_stops: int, device: torch.device) -> "SlotState":
        S, L = num_slots, max_len
        z = dict(device=device)
        return cls(
            cache_len=torch.zeros(S, dtype=torch.long, **z), last=torch.zeros(S, dtype=torch.long, **z),
            limit=torch.zeros(S, dtype=torch.long, **z), tokens=torch.zeros(S, L, dtype=torch.long, **z),
            logp=torch.zeros(S, L, dtype=torch.float32, **z), uniforms=torch.zeros(S, L, dtype=torch.float32, **z),
            routes=(torch.zeros(S, L, num_moe_layers, top_k, dtype=routes_dtype(num_experts), **z)
                    if num_moe_layers else None),
            temperature=torch.zeros(S, dtype=torch.float32, **z), top_p=torch.ones(S, dtype=torch.float32, **z),
            top_k=torch.zeros(S, dtype=torch.long, **z), stops=torch.full((S, max(1, max_stops)), -1, dtype=torch.long, **z))

    @property
    def num_slots(self) -> int:
        return self.tokens.shape[0]

    @property
    def max_len(self) -> int:
        return self.tokens.shape[1]

    def fits(self, num_slots: int, max_len: int, max_stops: int) -> bool:
        return self.num_slots >= num_slots and self.max_len >= max_len and self.stops.shape[1] >= max_stops

    def flat_index(self, pos_B: torch.Tensor, lo: int = 0) -> torch.Tensor:
        """Flat [S * L] index of (slot lo + b, position pos_B[b])."""
        rows = torch.arange(lo, lo + pos_B.shape[0], device=pos_B.device)
        return rows * self.max_len + pos_B

    def uniforms_at(self, flat_B: torch.Tensor) -> torch.Tensor:
        return self.uniforms.view(-1)[flat_B]

    def set_params(self, slot: int, p: SamplingParams, uniforms_L: torch.Tensor, limit: int) -> None:
        self.temperature[slot] = float(p.temperature)
        self.top_p[slot] = float(p.top_p)
        self.top_k[slot] = int(p.top_k)
        self.stops[slot] = -1
        if p.stop_token_ids:
            self.stops[slot, : len(p.stop_token_ids)] = torch.tensor(list(p.stop_token_ids))
        self.limit[slot] = limit
        L = self.max_len
        self.uniforms[slot, : min(L, uniforms_L.numel())] = uniforms_L[:L].to(self.uniforms.device)

    def sampling(self, lo: int, hi: int, params: list[SamplingParams]) -> BatchSampling:
        return BatchSampling(self.temperature[lo:hi], self.top_k[lo:hi], self.top_p[lo:hi],
                             all_greedy=all(p.greedy for p in params),
                             any_filter=any(p.top_k > 0 or p.top_p < 1 for p in params if not p.greedy))

    def record(self, lo: int, pos_B: torch.Tensor, flat_B: torch.Tensor, tokens_B: torch.Tensor,
               logp_B: torch.Tensor, check_stops: bool) -> torch.Tensor:
        """Store the tokens sampled for slots lo + b at positions ``pos_B`` (flat index ``flat_B``);
        returns done_B: a stop token was sampled or the sequence reached its token limit."""
        B = tokens_B.shape[0]
        self.tokens.view(-1).index_copy_(0, flat_B, tokens_B)
        self.logp.view(-1).index_copy_(0, flat_B, logp_B)
        self.last[lo: lo + B] = tokens_B
        done_B = pos_B + 1 >= self.limit[lo: lo + B]
        if check_stops:
            done_B |= (tokens_B[:, None] == self.stops[lo: lo + B]).any(-1)
        return done_B

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the state of slots ``src`` into slots ``dst`` (disjoint sets)."""
        for f in dataclasses.fields(self):
            buf = getattr(self, f.name)
            if buf is not None:
                buf.index_copy_(0, dst, buf.index_select(0, src))

    def read(self, slot: int, start: int, end: int) -> tuple[list[int], list[float], torch.Tensor | None]:
        """Host copies of the tokens and log-probs at positions [start, end) and the routing rows of
        the fed positions [0, end - 1)."""
        toks = self.tokens[slot, start:end].tolist()
        lps = self.logp[slot, start:end].tolist()
        routes = None if self.routes is None else self.routes[slot, : end - 1].to("cpu", torch.int32)
        return toks, lps, routes
