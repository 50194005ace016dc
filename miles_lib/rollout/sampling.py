"""Sampling parameters and a vectorized, batch-invariant next-token sampler.

Design note.

* Per-request randomness. A request's random stream must not depend on which other requests share
  the batch, nor on when it was scheduled, aborted or resumed. Each request draws, once, a row of
  uniforms from its own ``torch.Generator`` (CPU Mersenne twister seeded with the request's seed):
  ``u[p]`` is the uniform used to sample the token at sequence position ``p``. The engine keeps the
  rows on the device and gathers ``u[b, pos_b]`` per step, so sampling itself is one vectorized
  call for the whole batch. Keying by position (not by step) makes a resumed partial rollout draw
  exactly what the uninterrupted one would have drawn; generating on the CPU makes the stream the
  same on every device.

* Inverse-CDF sampling. With ``z = logits / T`` and the kept set ``S`` (top-k and top-p, both
  prefixes of the tokens sorted by probability), the token is

      y = first j in sort order with  cumsum_{i<=j} p_i * [i in S]  >  u * sum_{i in S} p_i

  which is an exact draw from softmax(z) restricted to ``S`` and renormalized. Every operation is
  row-wise (softmax, stable sort, cumsum, searchsorted), so a row's result does not depend on the
  other rows. ``T = 0`` is greedy: ``y = argmax(logits)``.

* Log-probability (DESIGN §4): ``log_softmax(logits / T)[y]`` over the FULL vocabulary, whatever
  top-k/top-p did. For greedy requests (``T = 0``) the log-probability is taken at ``T = 1``, i.e.
  ``log_softmax(logits)[y]`` -- the quantity a trainer recomputes with temperature 1.

Shape legend: B rows (sequences) in the step, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import torch

from miles_lib.config import ConfigBase, check


@dataclasses.dataclass
class SamplingParams(ConfigBase):
    temperature: float = 1.0  # 0 = greedy (argmax); log-probs then use temperature 1
    top_p: float = 1.0  # nucleus: keep the most likely tokens until their mass reaches top_p, (0, 1]
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    max_new_tokens: int = 16  # response budget (a resumed sample counts what it already has)
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)  # end the response (COMPLETED)
    seed: int | None = None  # same seed + same params + same weights -> same tokens; None: engine draws

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError (a ValueError) naming the bad field; called again by the engine."""
        s = "SamplingParams"
        num = (int, float)
        check(isinstance(self.temperature, num) and not isinstance(self.temperature, bool)
              and self.temperature >= 0, s, "temperature", self.temperature, "a number >= 0 (0 = greedy)")
        check(isinstance(self.top_p, num) and not isinstance(self.top_p, bool) and 0 < self.top_p <= 1,
              s, "top_p", self.top_p, "in (0, 1]")
        check(_is_int(self.top_k) and self.top_k >= 0, s, "top_k", self.top_k, "an integer >= 0 (0 = off)")
        check(_is_int(self.max_new_tokens) and self.max_new_tokens > 0, s, "max_new_tokens",
              self.max_new_tokens, "a positive integer")
        check(isinstance(self.stop_token_ids, (list, tuple)) and all(_is_int(t) and t >= 0
                                                                     for t in self.stop_token_ids),
              s, "stop_token_ids", self.stop_token_ids, "a list of non-negative token ids")
        check(self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**63), s, "seed", self.seed,
              "None or an integer in [0, 2**63)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


_UNIFORM_CHUNK = 256


def request_uniforms(seed: int, length: int) -> torch.Tensor:
    """[length] float32 uniforms in [0, 1): u[p] samples the token at sequence position p.

    Drawn in fixed-size chunks from one generator, so u[p] does not depend on ``length``."""
    gen = torch.Generator().manual_seed(seed)
    n_chunks = -(-length // _UNIFORM_CHUNK)
    chunks = [torch.rand(_UNIFORM_CHUNK, generator=gen, dtype=torch.float32) for _ in range(n_chunks)]
    return torch.cat(chunks)[:length]


@dataclasses.dataclass
class BatchSampling:
    """Per-row sampling settings of one step, on the model's device, plus host-side shortcuts."""

    temperature_B: torch.Tensor  # float32, 0 = greedy
    top_k_B: torch.Tensor  # int64, 0 = off
    top_p_B: torch.Tensor  # float32
    all_greedy: bool  # skip the sampler entirely
    any_filter: bool  # some row uses top-k or top-p (needs the sort)


def sample_next(logits_BV: torch.Tensor, sp: BatchSampling, u_B: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [B] int64, log-probs [B] float32) for one step; ``u_B`` are the rows' uniforms."""
    logits = logits_BV.float()
    greedy_B = sp.temperature_B <= 0
    temp = torch.where(greedy_B, torch.ones_like(sp.temperature_B), sp.temperature_B)
    logp_BV = torch.log_softmax(logits / temp[:, None], dim=-1)
    if sp.all_greedy:
        tokens = logits.argmax(-1)
    else:
        tokens = _inverse_cdf(logp_BV, sp, u_B)
        tokens = torch.where(greedy_B, logits.argmax(-1), tokens)
    return tokens, logp_BV.gather(-1, tokens[:, None]).squeeze(-1)


def _inverse_cdf(logp_BV: torch.Tensor, sp: BatchSampling, u_B: torch.Tensor) -> torch.Tensor:
    B, V = logp_BV.shape
    if not sp.any_filter:  # no top-k / top-p: sample in vocabulary order
        cdf = logp_BV.exp().cumsum(-1)
        j = torch.searchsorted(cdf, (u_B * cdf[:, -1])[:, None], right=True).squeeze(-1)
        return j.clamp_(max=V - 1)
    sorted_logp, order = logp_BV.sort(dim=-1, descending=True, stable=True)
    p_sorted = sorted_logp.exp()
    rank = torch.arange(V, device=logp_BV.device)
    k_eff = torch.where(sp.top_k_B > 0, sp.top_k_B, torch.full_like(sp.top_k_B, V))
    cum = p_sorted.cumsum(-1)
    in_nucleus = ((cum - p_sorted) < sp.top_p_B[:, None]) | (sp.top_p_B[:, None] >= 1)  # mass before < top_p
    keep = (rank[None, :] < k_eff[:, None]) & in_nucleus
    keep[:, 0] = True  # the most likely token is always kept
    cdf = (p_sorted * keep).cumsum(-1)
    j = torch.searchsorted(cdf, (u_B * cdf[:, -1])[:, None], right=True).squeeze(-1)
    j = torch.minimum(j, keep.sum(-1) - 1)  # u * total rounding up to total
    return order.gather(-1, j[:, None]).squeeze(-1)
