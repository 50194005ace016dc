"""RolloutEngine: batched generation with a KV cache, continuous batching and partial rollout.

The engine runs the same ``MoEForCausalLM`` code as the trainer (which is what makes train-inference
alignment achievable) and records, per generated token, its log-probability (sampling.py), the
weight version, and, per fed token, the experts every MoE layer chose (R3).

Scheduling loop (one iteration = one model forward):
  * admit: while slots are free and requests wait, prefill up to ``prefill_batch`` new sequences
    in one right-padded forward (resumed partial samples prefill their whole token history);
  * decode: one forward for every running sequence (one new token each);
  * retire: sequences that sampled a stop token (COMPLETED) or hit max_new_tokens / the context
    length (TRUNCATED) leave and free their slot for a waiting request.
``abort()`` (any thread) or ``target_groups`` (stop once that many prompt groups have all their
samples finished) ends the loop early; unfinished samples come back ABORTED with what they have.
Passing them to ``generate_samples`` again resumes them with their remaining token budget.

Memory cap: ``max_concurrent_seqs`` slots of ``max_seq_len`` positions are preallocated; with
``max_cache_bytes`` the slot count is lowered to fit.
"""

from __future__ import annotations

import dataclasses
import heapq
import threading

import torch

from miles_lib.rollout.kv_cache import SlotKVCache
from miles_lib.rollout.sampling import SamplingParams, sample_tokens
from miles_lib.types import Sample, Status


@dataclasses.dataclass
class _Seq:
    sample: Sample
    params: SamplingParams
    seed: int
    budget: int  # tokens this request may still generate
    routing: list[torch.Tensor]  # per fed token [nL, K] (int) rows, oldest first
    slot: int = -1
    generated: int = 0


class RolloutEngine:
    def __init__(self, model: torch.nn.Module, max_concurrent_seqs: int = 256, max_seq_len: int | None = None,
                 max_cache_bytes: int | None = None, prefill_batch: int = 64, seed: int = 0) -> None:
        self.model = model
        cfg = model.config
        self.vocab_size = cfg.vocab_size
        self.max_seq_len = min(max_seq_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        per_slot = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * self.max_seq_len * cfg.head_dim * p.element_size()
        slots = max_concurrent_seqs
        if max_cache_bytes is not None:
            slots = min(slots, max_cache_bytes // per_slot)
            if slots < 1:
                raise ValueError(f"max_cache_bytes={max_cache_bytes} cannot hold one sequence of "
                                 f"max_seq_len={self.max_seq_len} ({per_slot} bytes)")
        self.max_concurrent_seqs = slots
        self.prefill_batch = prefill_batch
        self.weight_version = 0
        self._abort = threading.Event()
        self._seed_gen = torch.Generator().manual_seed(seed)
        self._cache: SlotKVCache | None = None
        self.num_moe_layers = cfg.num_moe_layers
        self.top_k = cfg.num_experts_per_tok if cfg.num_experts else 0

    # ---- weights -----------------------------------------------------------------------
    def _invalidate_cache(self) -> None:
        self._cache = None

    def mark_weights_updated(self, version: int) -> None:
        """Zero-copy sync: the engine already runs the trainer's tensors; bump the version."""
        self.weight_version = int(version)
        self._invalidate_cache()

    @torch.no_grad()
    def update_weights(self, named_tensors, version: int) -> None:
        """Copy (name, tensor) pairs into the engine's weights in place and set ``version``."""
        params = dict(self.model.named_parameters())
        params.update(dict(self.model.named_buffers()))
        for name, t in (named_tensors.items() if isinstance(named_tensors, dict) else named_tensors):
            if name not in params:
                raise ValueError(f"update_weights: unknown tensor {name!r}")
            if tuple(params[name].shape) != tuple(t.shape):
                raise ValueError(f"update_weights: {name} has shape {tuple(t.shape)}, engine expects "
                                 f"{tuple(params[name].shape)}")
            params[name].copy_(t)
        self.weight_version = int(version)
        self._invalidate_cache()

    def abort(self) -> None:
        """Stop the running ``generate`` after the current forward (thread-safe)."""
        self._abort.set()

    # ---- requests ----------------------------------------------------------------------
    def _validate(self, i: int, tokens: list[int], params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"request {i}: params must be SamplingParams, got {type(params).__name__}")
        if len(tokens) == 0:
            raise ValueError(f"request {i}: empty prompt")
        if len(tokens) >= self.max_seq_len:
            raise ValueError(f"request {i}: prompt of {len(tokens)} tokens leaves no room in the context "
                             f"of {self.max_seq_len} tokens")
        bad = [t for t in tokens if not (isinstance(t, int) and 0 <= t < self.vocab_size)]
        if bad:
            raise ValueError(f"request {i}: token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        bad_stop = [t for t in params.stop_token_ids if not 0 <= t < self.vocab_size]
        if bad_stop:
            raise ValueError(f"request {i}: stop_token_ids {bad_stop} are outside the vocabulary")

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams | list[SamplingParams],
                 group_ids: list[int] | None = None, target_groups: int | None = None) -> list[Sample]:
        """Generate one response per prompt; returns Samples in input order."""
        n = len(prompt_token_ids)
        plist = params if isinstance(params, list) else [params] * n
        if len(plist) != n:
            raise ValueError(f"generate: {len(plist)} SamplingParams for {n} prompts")
        samples = [Sample(index=i, group_index=(group_ids[i] if group_ids else i),
                          tokens=[int(t) for t in toks], prompt=list(map(int, toks)))
                   for i, toks in enumerate(prompt_token_ids)]
        return self.generate_samples(samples, plist, target_groups=target_groups)

    def generate_samples(self, samples: list[Sample], params: SamplingParams | list[SamplingParams],
                         target_groups: int | None = None) -> list[Sample]:
        """Generate for ``samples`` — new ones, or ABORTED ones to resume — in place; returns them."""
        plist = params if isinstance(params, list) else [params] * len(samples)
        seqs = []
        for i, (s, p) in enumerate(zip(samples, plist)):
            self._validate(i, s.tokens, p)
            if s.status == Status.ABORTED or s.response_length > 0:  # resume a partial rollout
                budget = p.max_new_tokens - s.response_length
                routing = list(torch.as_tensor(s.rollout_routed_experts)) if s.rollout_routed_experts is not None else []
            else:
                s.response_length, s.rollout_log_probs, s.weight_versions = 0, [], []
                budget, routing = p.max_new_tokens, []
            s.rollout_log_probs = list(s.rollout_log_probs or [])
            s.weight_versions = list(s.weight_versions or [])
            seed = p.seed if p.seed is not None else int(torch.randint(0, 2**62, (1,), generator=self._seed_gen))
            if "seed" not in s.metadata:
                s.metadata["seed"] = seed
            seqs.append(_Seq(s, p, int(s.metadata["seed"]), budget, routing))
            if budget <= 0:
                self._finish(seqs[-1], Status.TRUNCATED)
        self._abort.clear()
        with torch.inference_mode():
            self._run([q for q in seqs if q.sample.status != Status.TRUNCATED or q.budget > 0], target_groups)
        return samples

    # ---- scheduling loop ---------------------------------------------------------------
    def _ensure_cache(self) -> SlotKVCache:
        if self._cache is None:
            c = self.model.config
            self._cache = SlotKVCache(c.num_hidden_layers, self.max_concurrent_seqs, self.max_seq_len,
                                      c.num_key_value_heads, c.head_dim, self.dtype, self.device)
            self._route_buf = torch.zeros(self.max_concurrent_seqs, self.max_seq_len,
                                          max(1, self.num_moe_layers), max(1, self.top_k),
                                          dtype=torch.int32, device=self.device)
        return self._cache

    def _run(self, seqs: list[_Seq], target_groups: int | None) -> None:
        cache = self._ensure_cache()
        waiting = list(seqs)
        running: list[_Seq] = []
        free = list(range(cache.num_slots))  # a min-heap: the lowest free slot is reused first,
        # which keeps running sequences in consecutive slots (K/V are then read through views)
        group_left: dict[int, int] = {}
        for q in seqs:
            group_left[q.sample.group_index] = group_left.get(q.sample.group_index, 0) + 1
        done_groups = 0
        state = None  # device tensors of the running set; rebuilt only when the set changes
        while waiting or running:
            if self._abort.is_set() or (target_groups is not None and done_groups >= target_groups):
                break
            if waiting and free:
                batch = []
                while waiting and free and len(batch) < self.prefill_batch:
                    q = waiting.pop(0)
                    q.slot = heapq.heappop(free)
                    batch.append(q)
                self._prefill(cache, batch)
                running += batch
                state = None
            else:
                if state is None:
                    state = self._batch_state(running)
                self._decode(cache, running, state)
            still = []
            for q in running:
                if q.sample.status in (Status.COMPLETED, Status.TRUNCATED):
                    heapq.heappush(free, q.slot)
                    group_left[q.sample.group_index] -= 1
                    done_groups += group_left[q.sample.group_index] == 0
                    state = None
                else:
                    still.append(q)
            running = sorted(still, key=lambda q: q.slot)
        for q in waiting + running:  # stopped early: hand back what was generated
            self._finish(q, Status.ABORTED)
        self._abort.clear()

    def _batch_state(self, seqs: list[_Seq]) -> dict:
        dev = self.device
        host_slots = [q.slot for q in seqs]
        params = [q.params for q in seqs]
        return {
            "slots": torch.tensor(host_slots, device=dev), "range": SlotKVCache.contiguous(host_slots),
            "temp": torch.tensor([p.temperature for p in params], device=dev, dtype=torch.float),
            "top_k": torch.tensor([p.top_k for p in params], device=dev),
            "top_p": torch.tensor([p.top_p for p in params], device=dev, dtype=torch.float),
            "seeds": torch.tensor([q.seed for q in seqs], device=dev),
            "any_filter": any(p.top_k > 0 or p.top_p < 1 for p in params),
            "all_greedy": all(p.temperature <= 0 for p in params),
            "last_tokens": torch.tensor([[q.sample.tokens[-1]] for q in seqs], device=dev),
        }

    def _forward(self, cache: SlotKVCache, ids: torch.Tensor, pos: torch.Tensor, last_idx: torch.Tensor):
        out = self.model(ids, position_ids=pos, kv_cache=cache, return_routing=self.num_moe_layers > 0,
                         return_hidden=True, compute_logits=False)
        cache.end_step()
        h_last = out.hidden_states[torch.arange(ids.shape[0], device=ids.device), last_idx]
        return self.model.lm_head(h_last), out.routed_experts

    def _prefill(self, cache: SlotKVCache, batch: list[_Seq]) -> None:
        lens = [len(q.sample.tokens) for q in batch]
        T = max(lens)
        ids = torch.zeros(len(batch), T, dtype=torch.long)
        for b, q in enumerate(batch):
            ids[b, : lens[b]] = torch.tensor(q.sample.tokens)
        ids = ids.to(self.device)
        lengths = torch.tensor(lens, device=self.device)
        state = self._batch_state(batch)
        cache.begin_prefill(state["slots"], lengths, T)
        pos = torch.arange(T, device=self.device).expand(len(batch), T)
        logits, routing = self._forward(cache, ids, pos, lengths - 1)
        if routing is not None:
            self._route_buf[state["slots"], :T] = routing.to(torch.int32)
            for q in batch:  # resumed samples keep the rows recorded when their tokens were generated
                if q.routing:
                    old = torch.stack(q.routing[: len(q.sample.tokens) - 1]).to(self.device, torch.int32)
                    self._route_buf[q.slot, : old.shape[0]] = old
        self._sample(batch, state, logits, lengths)

    def _decode(self, cache: SlotKVCache, running: list[_Seq], state: dict) -> None:
        window = max(len(q.sample.tokens) for q in running)  # cached positions + the new one
        slots = state["slots"]
        pos = cache.lengths[slots][:, None].clone()
        cache.begin_decode(slots, window, state["range"])
        logits, routing = self._forward(cache, state["last_tokens"], pos,
                                        torch.zeros(len(running), dtype=torch.long, device=self.device))
        if routing is not None:
            self._route_buf[slots, pos[:, 0]] = routing[:, 0].to(torch.int32)
        self._sample(running, state, logits, pos[:, 0] + 1)

    def _sample(self, seqs: list[_Seq], state: dict, logits: torch.Tensor, positions: torch.Tensor) -> None:
        tokens_d, logps_d = sample_tokens(logits, state["temp"], state["top_k"], state["top_p"], state["seeds"],
                                          positions, any_filter=state["any_filter"],
                                          all_greedy=state["all_greedy"])
        state["last_tokens"] = tokens_d[:, None]
        both = torch.stack([tokens_d.double(), logps_d.double()]).cpu()  # the one sync per step
        tokens, logps = both[0].long().tolist(), both[1].tolist()
        for q, tok, lp in zip(seqs, tokens, logps):
            s = q.sample
            s.tokens.append(tok)
            s.rollout_log_probs.append(lp)
            s.weight_versions.append(self.weight_version)
            s.response_length += 1
            q.generated += 1
            if tok in q.params.stop_token_ids:
                self._finish(q, Status.COMPLETED)
            elif q.generated >= q.budget or len(s.tokens) >= self.max_seq_len:
                self._finish(q, Status.TRUNCATED)

    def _finish(self, q: _Seq, status: Status) -> None:
        s = q.sample
        s.status = status
        n_rows = len(s.tokens) - 1
        if self.num_moe_layers and q.slot >= 0:  # rows live on the device until the sequence ends
            s.rollout_routed_experts = self._route_buf[q.slot, :n_rows].to("cpu", copy=True)
        elif self.num_moe_layers and q.routing:  # never scheduled again (aborted while waiting)
            s.rollout_routed_experts = torch.stack(q.routing[:n_rows]).to(torch.int32)
        elif self.num_moe_layers:
            s.rollout_routed_experts = torch.zeros(0, self.num_moe_layers, self.top_k, dtype=torch.int32)
        s.loss_mask = [1] * s.response_length
