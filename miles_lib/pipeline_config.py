"""Top-level GRPO configuration: the sections a cycle needs, loadable from YAML or a dict.

    GRPOConfig
      data:       DataConfig        prompt file, keys, chat template, bad-row policy
      rollout:    RolloutConfig     prompts per step, samples per prompt, sampling, dynamic sampling
      algorithm:  AlgorithmConfig   advantage estimator, policy loss, KL, off-policy correction
      train:      TrainConfig       optimizer, schedule, micro-batching, routing replay (R3)
      eval:       EvalConfig        held-out prompts, pass@k
      reward:     reward function name ("math", "exact_match") or "package.module:function"
      steps_per_cycle: GRPO steps a cycle (one cached Flyte task) runs
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from miles_lib.algorithms.config import AlgorithmConfig
from miles_lib.config import ConfigBase, check
from miles_lib.data.dataset import DataConfig
from miles_lib.errors import ConfigError
from miles_lib.precision.modes import PrecisionConfig
from miles_lib.train.config import TrainConfig


@dataclasses.dataclass
class RolloutConfig(ConfigBase):
    prompts_per_step: int = 16  # GRPO groups per training step
    n_samples_per_prompt: int = 8  # group size
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 16
    max_concurrent_seqs: int = 256  # engine cap on sequences decoded at once
    dynamic_sampling: bool = False  # drop zero-variance groups and over-sample to refill
    max_sampling_rounds: int = 4  # rollout rounds per step when dynamic sampling refills
    partial_rollout: bool = False  # stop once prompts_per_step groups finish; resume the rest next step
    over_sample_groups: int = 4  # extra groups in flight when partial_rollout is on
    compile_decode: bool = False  # torch.compile the engine's decode step (one-time compile cost)
    compile_prefill: bool = False  # torch.compile the engine's prefill forward (one-time compile cost)
    cuda_graphs: bool = False  # CUDA only: replay decode steps from CUDA graphs (single-process jobs)

    def __post_init__(self) -> None:
        s = "RolloutConfig"
        check(self.prompts_per_step > 0, s, "prompts_per_step", self.prompts_per_step, "> 0")
        check(self.n_samples_per_prompt > 0, s, "n_samples_per_prompt", self.n_samples_per_prompt, "> 0")
        check(self.temperature >= 0, s, "temperature", self.temperature, ">= 0 (0 = greedy)")
        check(0 < self.top_p <= 1, s, "top_p", self.top_p, "in (0, 1]")
        check(self.top_k >= 0, s, "top_k", self.top_k, ">= 0 (0 = off)")
        check(self.max_new_tokens > 0, s, "max_new_tokens", self.max_new_tokens, "> 0")
        check(self.max_concurrent_seqs > 0, s, "max_concurrent_seqs", self.max_concurrent_seqs, "> 0")
        check(self.max_sampling_rounds >= 1, s, "max_sampling_rounds", self.max_sampling_rounds, ">= 1")
        check(self.over_sample_groups >= 0, s, "over_sample_groups", self.over_sample_groups, ">= 0")


@dataclasses.dataclass
class EvalConfig(ConfigBase):
    path: str = "examples/data/eval.jsonl"
    max_prompts: int = 0  # 0 = all
    k: int = 8  # samples per prompt for pass@k (0 = greedy only)
    temperature: float = 1.0  # for the pass@k samples; pass@1 is greedy
    max_new_tokens: int = 16
    seed: int = 1234

    def __post_init__(self) -> None:
        s = "EvalConfig"
        check(self.max_prompts >= 0, s, "max_prompts", self.max_prompts, ">= 0 (0 = all)")
        check(self.k >= 0, s, "k", self.k, ">= 0")
        check(self.temperature > 0, s, "temperature", self.temperature, "> 0")
        check(self.max_new_tokens > 0, s, "max_new_tokens", self.max_new_tokens, "> 0")


@dataclasses.dataclass
class GRPOConfig(ConfigBase):
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = dataclasses.field(default_factory=AlgorithmConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    precision: PrecisionConfig = dataclasses.field(default_factory=PrecisionConfig)
    reward: str = "math"
    steps_per_cycle: int = 10
    seed: int = 0
    reference_checkpoint: str = ""  # π_ref for the KL loss (training checkpoint or HF folder/URI)

    def __post_init__(self) -> None:
        check(self.steps_per_cycle > 0, "GRPOConfig", "steps_per_cycle", self.steps_per_cycle, "> 0")
        if self.algorithm.kl_loss_coef > 0:
            check(bool(self.reference_checkpoint), "GRPOConfig", "reference_checkpoint",
                  self.reference_checkpoint, "set (the reference policy) when algorithm.kl_loss_coef > 0")
        check(self.algorithm.kl_in_reward_coef == 0, "GRPOConfig", "algorithm.kl_in_reward_coef",
              self.algorithm.kl_in_reward_coef, "0: the colocated loop computes advantages before the "
              "reference log-probs; use algorithm.kl_loss_coef for a KL penalty")
        check(bool(self.reward), "GRPOConfig", "reward", self.reward,
              "a reward name ('math', 'exact_match') or 'package.module:function'")

    @classmethod
    def from_yaml(cls, path: str) -> "GRPOConfig":
        import yaml

        from miles_lib.storage import read_bytes

        try:
            data = yaml.safe_load(read_bytes(path).decode())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config sections, got {type(data).__name__}")
        return cls.from_dict(data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "GRPOConfig":
        return cls.from_dict(json.loads(text))

    def override(self, **sections: dict[str, Any]) -> "GRPOConfig":
        """A copy with some fields replaced, e.g. ``cfg.override(train={"lr": 1e-4})``."""
        d = self.to_dict()
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(d.get(key), dict):
                d[key].update(value)
            else:
                d[key] = value
        return GRPOConfig.from_dict(d)
