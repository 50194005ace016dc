"""The actor: old/reference log-prob recompute and the policy-gradient update.

One ``train_step`` on a rollout batch:
  1. old log-probs: a no-grad forward of the current weights over the rollout tokens (replaying the
     rollout's expert ids when R3 is on), in micro-batches; or the rollout's own log-probs when
     ``algorithm.use_rollout_logprobs_as_old`` bypasses the recompute.
  2. train-inference mismatch metrics (trainer vs rollout log-probs, router agreement) and the
     off-policy correction weights (TIS / MIS / IcePop ...) from rho_t = pi_train / pi_rollout.
  3. ``num_mini_batches`` optimizer steps; each accumulates micro-batch gradients of
     ``algorithms.compute_policy_loss`` normalized by the mini-batch's GLOBAL token count (so the
     update does not depend on micro-batch size or the number of data-parallel ranks), clips the
     global grad norm, and steps AdamW + the LR schedule. A non-finite loss or grad norm skips the
     optimizer step (weights and optimizer state untouched) and is counted in ``skipped_steps``.
"""

from __future__ import annotations

import math
import time

import torch

from miles_lib import algorithms
from miles_lib.algorithms.config import AlgorithmConfig
from miles_lib.train import distributed as dist_utils
from miles_lib.train.batch import TrainBatch
from miles_lib.train.config import TrainConfig
from miles_lib.train.logprobs import batched_logprobs, forward_logprobs
from miles_lib.train.schedule import lr_multiplier


def routing_agreement(rollout_SLnK: torch.Tensor, trainer_SLnK: torch.Tensor,
                      valid_SL: torch.Tensor) -> dict[str, float]:
    """Compare expert sets per (token, MoE layer) over valid positions.

    routing_mismatch_frac: fraction whose K-sets differ; routing_no_overlap_frac: fraction sharing
    no expert at all (DESIGN §5: a healthy R3 run keeps this < 1%).
    """
    a = rollout_SLnK.sort(-1).values
    b = trainer_SLnK.to(a.device).sort(-1).values
    valid = valid_SL.bool()[..., None].expand(a.shape[:-1])
    n = valid.sum().clamp(min=1)
    differ = (a != b).any(-1)
    overlap = (a[..., :, None] == b[..., None, :]).any(-1).any(-1)
    return {"routing_mismatch_frac": float((differ & valid).sum() / n),
            "routing_no_overlap_frac": float((~overlap & valid).sum() / n)}


class Actor:
    def __init__(self, model: torch.nn.Module, train_cfg: TrainConfig, algo_cfg: AlgorithmConfig,
                 ref_model: torch.nn.Module | None = None) -> None:
        self.model, self.cfg, self.algo, self.ref_model = model, train_cfg, algo_cfg, ref_model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=train_cfg.lr, betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
            eps=train_cfg.adam_eps, weight_decay=train_cfg.weight_decay, foreach=False)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(s, train_cfg))
        self.skipped_steps = 0

    # ---- state -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"optimizer": dist_utils.full_optimizer_state(self.model, self.optimizer),
                "scheduler": self.scheduler.state_dict(), "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        dist_utils.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.skipped_steps = int(state.get("skipped_steps", 0))

    # ---- one rollout batch -------------------------------------------------------------
    def train_step(self, batch: TrainBatch, temperature: float) -> dict[str, float]:
        """Update the policy on ``batch`` (this rank's share); returns scalar metrics."""
        t0 = time.perf_counter()
        cfg, algo = self.cfg, self.algo
        replay = cfg.routing_replay and batch.routed_experts_SLnK is not None
        mask = batch.response_mask_SL
        metrics: dict[str, float] = {}

        self.model.eval()  # no dropout exists; eval() documents that the recompute is deterministic
        old = batched_logprobs(self.model, batch, temperature, replay, cfg.micro_batch_size,
                               return_routing=batch.routed_experts_SLnK is not None)
        train_old_logp = old["logp"]
        if batch.routed_experts_SLnK is not None:
            valid = batch.attention_mask_SL
            used = routing_agreement(batch.routed_experts_SLnK, old["routed_experts"], valid)
            own = routing_agreement(batch.routed_experts_SLnK, old["router_topk"], valid)
            metrics["r3_used_routing_match"] = 1.0 - used["routing_mismatch_frac"]
            metrics["router_topk_mismatch_frac"] = own["routing_mismatch_frac"]
            metrics["router_topk_no_overlap_frac"] = own["routing_no_overlap_frac"]
        rollout_logp = batch.rollout_logp_SL
        if rollout_logp is not None:
            metrics.update(algorithms.mismatch_metrics(train_old_logp, rollout_logp, mask))
        old_logp = algorithms.choose_old_logp(train_old_logp, rollout_logp, algo)
        ref_logp = None
        if self.ref_model is not None and algo.kl_loss_coef > 0:
            ref_logp = batched_logprobs(self.ref_model, batch, temperature, replay,
                                        cfg.micro_batch_size)["logp"]
        is_weights, keep_mask, is_metrics = algorithms.off_policy_weights(
            train_old_logp, rollout_logp, mask, algo)
        metrics.update(is_metrics)

        self.model.train()
        S = batch.input_ids_SL.shape[0]
        mini = max(1, math.ceil(S / cfg.num_mini_batches))
        rank, world = dist_utils.world()
        sums: dict[str, float] = {}
        for start in range(0, S, mini):
            idx = slice(start, start + mini)
            kept = mask[idx] * keep_mask[idx]  # tokens masked by MIS / IcePop / geo-mean do not count
            counts = dist_utils.all_reduce_sum(torch.stack([kept.sum(), (kept.sum(-1) > 0).sum().float()]))
            mb_tokens, mb_seqs = float(counts[0]), float(counts[1])
            self.optimizer.zero_grad(set_to_none=True)
            loss_total = 0.0
            for ms in range(start, min(S, start + mini), cfg.micro_batch_size):
                midx = slice(ms, min(S, start + mini, ms + cfg.micro_batch_size))
                micro = batch.select(midx)
                out = forward_logprobs(self.model, micro, temperature, replay,
                                       return_entropy=algo.entropy_coef > 0)
                loss, m = algorithms.compute_policy_loss(
                    logp=out["logp"], old_logp=old_logp[midx], advantages=micro.advantages_SL,
                    mask=micro.response_mask_SL * keep_mask[midx], cfg=algo,
                    is_weights=is_weights[midx],
                    ref_logp=None if ref_logp is None else ref_logp[midx],
                    entropy=out.get("entropy"), global_num_tokens=max(mb_tokens, 1.0),
                    global_num_seqs=max(mb_seqs, 1.0))
                (loss * world).backward()
                loss_total += float(loss.detach())
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
            loss_total = float(dist_utils.all_reduce_sum(torch.tensor([loss_total]))[0])
            if not (math.isfinite(loss_total) and math.isfinite(grad_norm)):
                self.optimizer.zero_grad(set_to_none=True)
                self.skipped_steps += 1
                metrics["skipped_step"] = metrics.get("skipped_step", 0.0) + 1.0
                continue
            self.optimizer.step()
            self.scheduler.step()
            metrics["loss"] = metrics.get("loss", 0.0) + loss_total
            metrics["grad_norm"] = grad_norm
        n_micro = max(1, math.ceil(S / cfg.micro_batch_size))
        metrics.update({k: v / n_micro for k, v in sums.items()})
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        metrics.setdefault("skipped_step", 0.0)
        metrics["train_tokens"] = float(dist_utils.all_reduce_sum(mask.sum().reshape(1))[0])
        metrics["train_seconds"] = time.perf_counter() - t0
        return metrics
