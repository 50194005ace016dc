"""Advantage estimators. One signature:

    fn(rewards_S, group_ids_S, mask_SR, cfg, kl_SR=None) -> advantages_SR   (0 outside mask)

S samples, R response positions; rewards are scalar per sample; group_ids tie the samples of one
prompt together. Estimators (config fields in parentheses):

grpo  (DeepSeekMath, Shao et al. 2024):     A_i = (R_i - mean_g R) / (std_g R + eps)       eps = grpo_std_eps
      std_g is the unbiased (n-1) sample std as in torch.std; a group of one sample, or of equal
      rewards, has A = 0.
dr_grpo  (Liu et al. 2025, "Understanding R1-Zero-Like Training"):  A_i = R_i - mean_g R
rloo  (Ahmadian et al. 2024):               A_i = R_i - mean_{j in g, j != i} R_j  = n/(n-1) (R_i - mean_g R)
reinforce_plus_plus  (Hu 2025):             r_t = -β_r kl_t + [t = last] R_i;  G_t = sum_{t'>=t} γ^{t'-t} r_t'
                                            A = whiten(G) over all masked tokens of the batch
reinforce_plus_plus_baseline:               as above with R_i replaced by R_i - mean_g R
   (β_r = kl_in_reward_coef, γ = gamma; whiten(x) = (x - mean) / (std + 1e-8), masked tokens only)
Every token of a response gets its sequence's advantage for the group estimators.
"""

from __future__ import annotations

import torch

from miles_lib.algorithms.config import AlgorithmConfig
from miles_lib.algorithms.registry import Registry

ADVANTAGES: Registry = Registry("advantage estimator")


def _group_stats(rewards_S: torch.Tensor, group_ids_S: torch.Tensor):
    """Per-sample (group mean, group unbiased std, group size)."""
    _, inv = torch.unique(group_ids_S, return_inverse=True)
    G = int(inv.max()) + 1
    r = rewards_S.double()
    count = torch.zeros(G, dtype=torch.double).index_add_(0, inv, torch.ones_like(r))
    mean = torch.zeros(G, dtype=torch.double).index_add_(0, inv, r) / count
    sq = torch.zeros(G, dtype=torch.double).index_add_(0, inv, (r - mean[inv]) ** 2)
    std = torch.where(count > 1, (sq / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(sq))
    return mean[inv], std[inv], count[inv]


def _broadcast(adv_S: torch.Tensor, mask_SR: torch.Tensor) -> torch.Tensor:
    return adv_S.to(mask_SR.dtype)[:, None] * mask_SR


@ADVANTAGES.register("grpo")
def grpo(rewards_S, group_ids_S, mask_SR, cfg: AlgorithmConfig, kl_SR=None):
    mean, std, count = _group_stats(rewards_S, group_ids_S)
    adv = torch.where(count > 1, (rewards_S.double() - mean) / (std + cfg.grpo_std_eps), torch.zeros_like(mean))
    return _broadcast(adv, mask_SR)


@ADVANTAGES.register("dr_grpo")
def dr_grpo(rewards_S, group_ids_S, mask_SR, cfg: AlgorithmConfig, kl_SR=None):
    mean, _, _ = _group_stats(rewards_S, group_ids_S)
    return _broadcast(rewards_S.double() - mean, mask_SR)


@ADVANTAGES.register("rloo")
def rloo(rewards_S, group_ids_S, mask_SR, cfg: AlgorithmConfig, kl_SR=None):
    mean, _, count = _group_stats(rewards_S, group_ids_S)
    r = rewards_S.double()
    loo_mean = (mean * count - r) / (count - 1).clamp(min=1)
    return _broadcast(torch.where(count > 1, r - loo_mean, torch.zeros_like(r)), mask_SR)


def _reinforce_returns(scalar_S, mask_SR, cfg: AlgorithmConfig, kl_SR):
    mask = mask_SR.double()
    rewards = torch.zeros_like(mask)
    if kl_SR is not None and cfg.kl_in_reward_coef > 0:
        rewards -= cfg.kl_in_reward_coef * kl_SR.double() * mask
    lengths = mask.sum(-1).long()
    last = (torch.arange(mask.shape[1])[None, :] * mask).argmax(-1)  # index of the last masked token
    has = lengths > 0
    rewards[has, last[has]] += scalar_S.double()[has]
    returns = torch.zeros_like(rewards)
    running = torch.zeros(mask.shape[0], dtype=torch.double)
    for t in reversed(range(mask.shape[1])):
        running = rewards[:, t] + cfg.gamma * running * mask[:, t].clamp(max=1)
        returns[:, t] = running
    returns = returns * mask
    n = mask.sum()
    if n < 2:
        return returns.to(mask_SR.dtype)
    mean = returns.sum() / n
    var = (((returns - mean) * mask) ** 2).sum() / (n - 1)
    return ((returns - mean) / (var.sqrt() + 1e-8) * mask).to(mask_SR.dtype)


@ADVANTAGES.register("reinforce_plus_plus")
def reinforce_plus_plus(rewards_S, group_ids_S, mask_SR, cfg: AlgorithmConfig, kl_SR=None):
    return _reinforce_returns(rewards_S, mask_SR, cfg, kl_SR)


@ADVANTAGES.register("reinforce_plus_plus_baseline")
def reinforce_plus_plus_baseline(rewards_S, group_ids_S, mask_SR, cfg: AlgorithmConfig, kl_SR=None):
    mean, _, _ = _group_stats(rewards_S, group_ids_S)
    return _reinforce_returns(rewards_S.double() - mean, mask_SR, cfg, kl_SR)


def compute_advantages(rewards_S, group_ids_S, mask_SR, cfg: AlgorithmConfig, kl_SR=None) -> torch.Tensor:
    return ADVANTAGES.get(cfg.advantage_estimator)(rewards_S, group_ids_S, mask_SR, cfg, kl_SR).float()
