"""RolloutEngine: batched generation with a KV cache, continuous batching and partial rollout.

Design note. The engine runs the trainer's own ``MoEForCausalLM`` code (through the model's
``kv_cache`` hook), so the rollout log-probabilities and expert choices are those a teacher-forced
forward of the same weights computes, to fp32 rounding. One loop iteration is one model forward:

  * admit  -- while slots are free and requests wait: prefill up to ``prefill_batch`` sequences
              (at most ``max_prefill_tokens`` padded tokens) in one right-padded forward and sample
              their first token. A resumed partial sample prefills its whole token history.
  * decode -- otherwise: one forward feeding every running sequence its last token, sampler and
              bookkeeping included (steps.py: eager, one compiled graph with
              ``compile_decode``, or replayed from CUDA graphs with ``cuda_graphs``; the prefill
              forward is compiled with ``compile_prefill``).
  * retire -- a sequence that sampled a stop token (COMPLETED) or reached max_new_tokens or the
              context (TRUNCATED) leaves; the last running sequence moves into its slot, so the
              running ones always fill slots [0, B) (kv_cache.py, slots.py).

Per generated token the engine records its log-probability (sampling.py), the weight version, and,
per fed token, the experts each MoE layer chose (R3): ``rollout_routed_experts`` has one row per
token except the last (prompt positions included).

Partial rollout: ``abort()`` (any thread, or an ``on_step`` callback) or ``target_groups`` (stop
once that many groups have all their samples finished) ends the loop; unfinished samples come back
ABORTED with what they generated. ``generate_samples`` resumes them with the remaining budget;
their token stream continues exactly where it stopped (sampling is keyed by sequence position).

Weights: ``update_weights`` copies tensors in place, ``mark_weights_updated`` only bumps the
version (the engine runs the trainer's module). Either may be called between ``generate`` calls or
from another thread / ``on_step`` while one runs: it is applied between two steps, the KV cache is
invalidated (every running sequence is re-prefilled with the new weights) and the following tokens
carry the new version.

Memory: ``max_concurrent_seqs`` caps the running sequences; with ``max_cache_bytes`` the cap is
lowered so the slot buffers for ``max_seq_len`` positions fit. Buffers are allocated for what a
call needs (up to the caps) and reused by later calls; ``release_memory()`` frees them.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterable

import torch

from miles_lib.errors import ConfigError
from miles_lib.model import native_cpu
from miles_lib.rollout.steps import CudaGraphDecodeStep, compile_step, decode_step, prefill_forward
from miles_lib.rollout.kv_cache import SlotKVCache
from miles_lib.rollout.sampling import SamplingParams, request_uniforms, sample_next
from miles_lib.rollout.slots import SlotState, routes_dtype
from miles_lib.types import Sample, Status


@dataclasses.dataclass
class RolloutProgress:
    """What ``on_step`` receives after every engine step."""

    step: int
    running: int
    waiting: int
    finished: int
    finished_groups: int


@dataclasses.dataclass(eq=False)
class _Request:
    index: int  # position in the caller's list (named in errors)
    sample: Sample
    params: SamplingParams
    seed: int
    max_tokens: int  # len(tokens) at which the response is truncated
    uniforms: torch.Tensor | None = None
    slot: int = -1
    start_tokens: int = 0  # len(sample.tokens) at admission
    admit_step: int = 0  # decode-step counter at admission


class RolloutEngine:
    def __init__(self, model: torch.nn.Module, max_concurrent_seqs: int = 256, max_seq_len: int | None = None,
                 max_cache_bytes: int | None = None, prefill_batch: int = 64, max_prefill_tokens: int = 16384,
                 seed: int = 0, compile_decode: bool = False, compile_prefill: bool = False,
                 cuda_graphs: bool = False) -> None:
        cfg = model.config
        for name, v in (("max_concurrent_seqs", max_concurrent_seqs), ("prefill_batch", prefill_batch),
                        ("max_prefill_tokens", max_prefill_tokens)):
            if not (isinstance(v, int) and v > 0):
                raise ValueError(f"RolloutEngine: {name}={v!r} must be a positive integer")
        self.model, self.config = model, cfg
        self.max_seq_len = min(max_seq_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        if self.max_seq_len < 2:
            raise ValueError(f"RolloutEngine: max_seq_len={self.max_seq_len} leaves no room for a response")
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.num_moe_layers = cfg.num_moe_layers
        self.top_k = cfg.num_experts_per_tok if self.num_moe_layers else 0
        slots = max_concurrent_seqs
        if max_cache_bytes is not None:
            per_slot = self.bytes_per_slot(self.max_seq_len)
            rope = 2 * self.max_seq_len * cfg.head_dim * 4  # the cache's fp32 RoPE tables (kv_cache.py)
            slots = min(slots, max(0, max_cache_bytes - rope) // per_slot)
            if slots < 1:
                raise ValueError(f"RolloutEngine: max_cache_bytes={max_cache_bytes} cannot hold one sequence of "
                                 f"max_seq_len={self.max_seq_len} ({per_slot} bytes); raise it or lower max_seq_len")
        self.max_concurrent_seqs = slots
        self.prefill_batch, self.max_prefill_tokens = prefill_batch, max_prefill_tokens
        self.weight_version = 0
        self._kv_version = 0
        self._seed_gen = torch.Generator().manual_seed(seed)
        self._lock = threading.RLock()  # held for one step at a time; weight updates wait for it
        self._abort = threading.Event()
        self._busy = False
        # the whole decode step (model, sampler, bookkeeping) and / or the prefill forward as compiled
        # graphs (steps.py): a one-time compile (~10-40 s on CPU each) for faster CPU steps
        if (compile_decode or compile_prefill) and self.device.type == "cpu":
            native_cpu.load()  # the expert GEMMs as a native op in the compiled graphs (model/native_cpu.py)
        self._decode_step = compile_step(decode_step, self.device) if compile_decode else decode_step
        self._prefill_forward = compile_step(prefill_forward, self.device) if compile_prefill else prefill_forward
        # CUDA: replay decode steps from CUDA graphs (padded batch / window buckets; steps.py)
        self._graphs: CudaGraphDecodeStep | None = None
        if cuda_graphs:
            if self.device.type != "cuda":
                raise ValueError(f"RolloutEngine: cuda_graphs=True needs a model on a CUDA device, not {self.device}")
            self._graphs = CudaGraphDecodeStep(self._decode_step)
            self._decode_step = self._graphs
        self._cache: SlotKVCache | None = None
        self._state: SlotState | None = None

    def bytes_per_slot(self, max_len: int) -> int:
        """Device bytes one running sequence of ``max_len`` positions needs (KV + slot buffers)."""
        c = self.config
        kv = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * self.dtype.itemsize
        routes = self.num_moe_layers * self.top_k * routes_dtype(c.num_experts).itemsize
        return max_len * (kv + routes + 8 + 4 + 4)  # + tokens (int64), logp, uniforms

    # ---- weights -----------------------------------------------------------------------------
    @torch.no_grad()
    def update_weights(self, named_tensors: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                       version: int) -> None:
        """Copy (name, tensor) pairs into the engine's weights in place; later tokens carry ``version``."""
        items = named_tensors.items() if isinstance(named_tensors, dict) else named_tensors
        with self._lock:
            targets = dict(self.model.named_parameters())
            targets.update(self.model.named_buffers())
            for name, t in items:
                if name not in targets:
                    owner, _, leaf = name.rpartition(".")
                    mod = self._submodule(owner)
                    if mod is not None and hasattr(mod, "load_weight"):  # e.g. packed INT4 experts re-pack
                        mod.load_weight(leaf, t)
                        continue
                    some = ", ".join(sorted(targets)[:4])
                    raise ValueError(f"update_weights: unknown tensor {name!r} (the engine's model has e.g. {some})")
                if tuple(targets[name].shape) != tuple(t.shape):
                    raise ValueError(f"update_weights: {name} has shape {tuple(t.shape)}, the engine's model "
                                     f"expects {tuple(targets[name].shape)}")
                targets[name].copy_(t)
            self.mark_weights_updated(version)

    def _submodule(self, name: str) -> torch.nn.Module | None:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            return None

    def mark_weights_updated(self, version: int) -> None:
        """Zero-copy sync: the engine already runs the trainer's tensors; bump the version and
        invalidate the KV cache (running sequences are re-prefilled before their next token)."""
        with self._lock:
            self.weight_version = int(version)

    @contextlib.contextmanager
    def paused(self):
        """Hold generation between two steps (e.g. around a multi-bucket weight sync)."""
        with self._lock:
            yield self

    def abort(self) -> None:
        """Stop the ``generate`` call in progress after its current step (thread-safe); unfinished
        samples come back ABORTED. No effect when no call is running."""
        self._abort.set()

    def release_memory(self) -> None:
        """Free the KV cache and slot buffers (re-allocated by the next call)."""
        with self._lock:
            if self._busy:
                raise RuntimeError("release_memory: a generate call is running")
            self._cache = self._state = None
            if self._graphs is not None:
                self._graphs.reset()

    # ---- requests ----------------------------------------------------------------------------
    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams | list[SamplingParams],
                 group_ids: list[int] | None = None, target_groups: int | None = None,
                 on_step: Callable[[RolloutProgress], None] | None = None) -> list[Sample]:
        """One response per prompt, as Samples in input order (``index`` = position, ``group_index``
        = ``group_ids[i]`` or i). See ``generate_samples`` for ``target_groups`` and ``on_step``."""
        n = len(prompt_token_ids)
        if group_ids is not None and len(group_ids) != n:
            raise ValueError(f"generate: {len(group_ids)} group_ids for {n} prompts")
        samples = [Sample(index=i, group_index=int(group_ids[i]) if group_ids is not None else i,
                          prompt=list(toks), tokens=list(toks)) for i, toks in enumerate(prompt_token_ids)]
        return self.generate_samples(samples, params, target_groups=target_groups, on_step=on_step)

    def generate_samples(self, samples: list[Sample], params: SamplingParams | list[SamplingParams],
                         target_groups: int | None = None,
                         on_step: Callable[[RolloutProgress], None] | None = None) -> list[Sample]:
        """Generate for ``samples`` in place and return them: new ones (tokens = prompt) or partial ones
        (ABORTED, or any with response_length > 0) to resume with max_new_tokens - response_length
        tokens left. Finished samples (COMPLETED / TRUNCATED) are returned unchanged.

        target_groups: stop once this many groups (by ``group_index``) have all their samples
            finished; the rest come back ABORTED with what they generated so far.
        on_step: called with a RolloutProgress after every step (it may call ``abort()`` or update
            the weights).
        """
        n = len(samples)
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * n
        if len(plist) != n:
            raise ValueError(f"generate: {len(plist)} SamplingParams for {n} prompts")
        if target_groups is not None and not (isinstance(target_groups, int) and target_groups > 0):
            raise ValueError(f"generate: target_groups={target_groups!r} must be a positive integer or None")
        reqs = [self._make_request(i, s, p) for i, (s, p) in enumerate(zip(samples, plist))
                if s.status not in (Status.COMPLETED, Status.TRUNCATED)]
        with self._lock:
            if self._busy:
                raise RuntimeError("generate: this engine is already generating (one call at a time)")
            self._busy = True
            self._abort.clear()
        try:
            with torch.inference_mode():
                self._run(reqs, target_groups, on_step)
        finally:
            with self._lock:
                self._busy = False
                self._abort.clear()
        return samples

    def _make_request(self, i: int, s: Sample, p: SamplingParams) -> _Request:
        """Validate one request; errors name the prompt index and the problem."""
        if not isinstance(p, SamplingParams):
            raise ValueError(f"prompt {i}: params must be a SamplingParams, got {type(p).__name__}")
        try:
            p.validate()
        except ConfigError as e:
            raise ValueError(f"prompt {i}: invalid sampling params: {e}") from None
        V = self.config.vocab_size
        bad_stop = [t for t in p.stop_token_ids if t >= V]
        if bad_stop:
            raise ValueError(f"prompt {i}: stop_token_ids {bad_stop} are outside the vocabulary [0, {V})")
        toks = s.tokens
        if len(toks) == 0:
            raise ValueError(f"prompt {i}: empty prompt; give at least one token id")
        try:
            t = torch.as_tensor(toks)
        except (TypeError, ValueError, RuntimeError):
            t = None
        if t is None or t.dim() != 1 or t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            raise ValueError(f"prompt {i}: token ids must be a flat list of integers, got {str(toks)[:60]}")
        bad = ((t < 0) | (t >= V)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"prompt {i}: token ids {[int(t[j]) for j in bad[:5]]} at positions {bad[:5]} are "
                             f"outside the vocabulary [0, {V})")
        s.tokens = [int(x) for x in t.tolist()]
        resumed = s.response_length > 0
        if not resumed and len(s.tokens) >= self.max_seq_len:
            raise ValueError(f"prompt {i}: {len(s.tokens)} tokens leave no room for a response in the context "
                             f"of {self.max_seq_len} tokens (max_seq_len / max_position_embeddings); shorten it")
        if resumed:
            self._check_partial(i, s)
        else:
            s.response_length, s.rollout_log_probs, s.weight_versions = 0, [], []
            s.rollout_routed_experts = None
        seed = p.seed if p.seed is not None else s.metadata.get("seed")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._seed_gen))
        s.metadata["seed"] = int(seed)
        budget = p.max_new_tokens - s.response_length
        max_tokens = min(len(s.tokens) + max(budget, 0), self.max_seq_len)
        return _Request(i, s, p, int(seed), max_tokens)

    def _check_partial(self, i: int, s: Sample) -> None:
        R, n = s.response_length, len(s.tokens)
        problems = []
        if R >= n:
            problems.append(f"response_length={R} but only {n} tokens")
        if len(s.rollout_log_probs or []) != R:
            problems.append(f"{len(s.rollout_log_probs or [])} rollout_log_probs for {R} response tokens")
        if len(s.weight_versions or []) != R:
            problems.append(f"{len(s.weight_versions or [])} weight_versions for {R} response tokens")
        r = s.rollout_routed_experts
        if self.num_moe_layers and (r is None or tuple(r.shape) != (n - 1, self.num_moe_layers, self.top_k)):
            problems.append(f"rollout_routed_experts of shape {None if r is None else tuple(r.shape)}, expected "
                            f"{(n - 1, self.num_moe_layers, self.top_k)}")
        if problems:
            raise ValueError(f"prompt {i}: cannot resume this partial sample: " + "; ".join(problems))
        s.rollout_log_probs, s.weight_versions = list(s.rollout_log_probs), list(s.weight_versions)

    # ---- the scheduling loop -------------------------------------------------------------------
    def _run(self, reqs: list[_Request], target_groups: int | None,
             on_step: Callable[[RolloutProgress], None] | None) -> None:
        group_left = collections.Counter(r.sample.group_index for r in reqs)
        self._groups_done = self._finished = 0
        self._group_left = group_left
        waiting: collections.deque[_Request] = collections.deque()
        for r in reqs:
            if r.max_tokens <= len(r.sample.tokens):  # no budget or no context left
                self._finish(r, Status.TRUNCATED)
            else:
                waiting.append(r)
        if not waiting:
            return
        self._ensure_buffers(waiting)
        running: list[_Request] = []  # running[b] owns slot b
        self._decode_steps = step = 0
        with self._lock:
            self._kv_version = self.weight_version
        while waiting or running:
            with self._lock:
                if self._abort.is_set() or (target_groups is not None and self._groups_done >= target_groups):
                    break
                if self._kv_version != self.weight_version:  # weights changed: the cache is stale
                    for r in running:
                        self._writeback(r)
                    waiting.extendleft(reversed(running))
                    running = []
                    self._kv_version = self.weight_version
                if self._graphs is not None:
                    self._graphs.on_weights(self._kv_version)
                if waiting and len(running) < self._state.num_slots:
                    lo, done = self._prefill(waiting, running)
                else:
                    lo, done = 0, self._decode(running)
                running = self._retire(running, lo, done)
                step += 1
            if on_step is not None:
                on_step(RolloutProgress(step, len(running), len(waiting), self._finished, self._groups_done))
        for r in running:
            self._writeback(r)
        for r in list(running) + list(waiting):
            r.sample.status = Status.ABORTED
            r.sample.loss_mask = [1] * r.sample.response_length

    def _ensure_buffers(self, reqs: Iterable[_Request]) -> None:
        reqs = list(reqs)
        S = min(self.max_concurrent_seqs, len(reqs))
        L = max(r.max_tokens for r in reqs)
        M = max(1, max(len(r.params.stop_token_ids) for r in reqs))
        if self._state is not None and self._state.fits(S, L, M):
            return
        if self._state is not None:  # grow, never shrink, within the caps
            S, L, M = max(S, self._state.num_slots), max(L, self._state.max_len), max(M, self._state.stops.shape[1])
        c = self.config
        self._cache = self._state = None  # free the old buffers before allocating the new ones
        if self._graphs is not None:
            self._graphs.reset()
        self._cache = SlotKVCache(c.num_hidden_layers, S, L, c.num_key_value_heads, c.head_dim, self.dtype, self.device,
                                  rotary=self.model.model.rotary)
        self._state = SlotState.allocate(S, L, self.num_moe_layers, self.top_k, c.num_experts, M, self.device)

    def _prefill(self, waiting: collections.deque[_Request], running: list[_Request]) -> tuple[int, torch.Tensor]:
        """Admit waiting requests into slots [lo, lo + n) and sample their next token; (lo, done_n)."""
        st, lo = self._state, len(running)
        batch: list[_Request] = []
        T = 0
        while waiting and lo + len(batch) < st.num_slots and len(batch) < self.prefill_batch:
            t_next = max(T, len(waiting[0].sample.tokens))
            if batch and t_next * (len(batch) + 1) > self.max_prefill_tokens:
                break
            batch.append(waiting.popleft())
            T = t_next
        n = len(batch)
        ids = torch.zeros(n, T, dtype=torch.long)
        lens = torch.tensor([len(r.sample.tokens) for r in batch])
        for b, r in enumerate(batch):
            ids[b, : lens[b]] = torch.tensor(r.sample.tokens)
            if r.uniforms is None:
                r.uniforms = request_uniforms(r.seed, self.max_seq_len)
            st.set_params(lo + b, r.params, r.uniforms, r.max_tokens)
            r.slot, r.start_tokens, r.admit_step = lo + b, int(lens[b]), self._decode_steps
        ids, lens = ids.to(self.device), lens.to(self.device)
        logits, routing = self._prefill_forward(self.model, self._cache, ids, lo, lens - 1, self.num_moe_layers > 0)
        if routing is not None:
            st.routes[lo: lo + n, :T] = routing
            for r in batch:  # a resumed sample keeps the rows recorded when its tokens were generated
                if r.sample.rollout_routed_experts is not None:
                    old = r.sample.rollout_routed_experts
                    st.routes[r.slot, : old.shape[0]] = old.to(self.device, st.routes.dtype)
        st.cache_len[lo: lo + n] = lens
        running.extend(batch)
        self._on_set_change(running)
        flat = st.flat_index(lens, lo)
        sp = st.sampling(lo, lo + n, [r.params for r in batch])
        tokens, logp = sample_next(logits, sp, st.uniforms_at(flat))
        return lo, st.record(lo, lens, flat, tokens, logp, self._check_stops)

    def _decode(self, running: list[_Request]) -> torch.Tensor:
        """Feed every running sequence its last token; sample the next one (steps.py)."""
        window = self._max_offset + self._decode_steps  # = max over running of (fed tokens + 1)
        done = self._decode_step(self.model, self._cache, self._state, len(running), window,
                                 self._decode_sampling, self._check_stops)
        self._decode_steps += 1
        return done

    def _on_set_change(self, running: list[_Request]) -> None:
        """Refresh the host-side facts about the running set (only when it changes)."""
        self._max_offset = max((r.start_tokens + 1 - r.admit_step for r in running), default=0)
        self._check_stops = any(r.params.stop_token_ids for r in running)
        self._decode_sampling = self._state.sampling(0, len(running), [r.params for r in running])

    def _retire(self, running: list[_Request], lo: int, done_n: torch.Tensor) -> list[_Request]:
        """Write back finished sequences (slots lo + i for done_n[i]) and move the last running ones
        into their slots."""
        done = [lo + i for i in done_n.cpu().nonzero().flatten().tolist()]  # the one host sync per step
        if not done:
            return running
        B, leaving = len(running), set(done)
        for slot in done:
            r = running[slot]
            self._writeback(r)
            last = r.sample.tokens[-1]
            self._finish(r, Status.COMPLETED if last in r.params.stop_token_ids else Status.TRUNCATED)
        B_new = B - len(done)
        holes = [s for s in done if s < B_new]
        movers = [s for s in range(B_new, B) if s not in leaving]
        if holes:
            src = torch.tensor(movers, device=self.device)
            dst = torch.tensor(holes, device=self.device)
            window = max(self._tokens_now(running[s]) for s in movers)
            self._cache.move(src, dst, window)
            self._state.move(src, dst)
            for s, h in zip(movers, holes):
                running[h] = running[s]
                running[h].slot = h
        running = running[:B_new]
        self._on_set_change(running)
        return running

    def _tokens_now(self, r: _Request) -> int:
        """Tokens of a running request: its history, one sampled at admission, one per decode step."""
        return r.start_tokens + 1 + self._decode_steps - r.admit_step

    def _writeback(self, r: _Request) -> None:
        """Append what a running request generated since admission to its Sample."""
        s, n_now = r.sample, self._tokens_now(r)
        toks, lps, routes = self._state.read(r.slot, r.start_tokens, n_now)
        s.tokens.extend(toks)
        s.rollout_log_probs.extend(lps)
        s.weight_versions.extend([self._kv_version] * len(toks))
        s.response_length += len(toks)
        if routes is not None:
            s.rollout_routed_experts = routes
        r.slot = -1

    def _finish(self, r: _Request, status: Status) -> None:
        s = r.sample
        s.status = status
        s.loss_mask = [1] * s.response_length
        self._finished += 1
        self._group_left[s.group_index] -= 1
        if self._group_left[s.group_index] == 0:
            self._groups_done += 1
