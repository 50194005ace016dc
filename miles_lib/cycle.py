"""A GRPO cycle as one call: load a training checkpoint, run K steps, write the next checkpoint.

This is what a Flyte ``grpo_cycle`` task runs. The checkpoint written at the end holds everything
the next cycle resumes from — weights, optimizer moments, LR-schedule position, RNG states, the
prompt-data position, the weight version and the GRPO config — and is complete (manifest written
last) before ``run_cycle`` returns its URI.

Data parallelism: launched with WORLD_SIZE > 1 (torchrun / Elastic), every rank loads the
checkpoint, the trainer is sharded with FSDP2, each rank rolls out its share of the step's prompt
groups (groups r, r + W, ... with global seeds) on its own engine copy and trains on them, and rank 0
writes the checkpoint. Step metrics are those of rank 0's share.
"""

from __future__ import annotations

import dataclasses
import logging

import pandas as pd
import torch

from miles_lib.checkpoint import load_training_checkpoint, save_training_checkpoint
from miles_lib.data.dataset import PromptBatcher, PromptDataset
from miles_lib.errors import ConfigError
from miles_lib.loop import GRPOState, rng_state, run_steps, set_rng_state
from miles_lib.model import MoEForCausalLM
from miles_lib.model.tokenizer import Tokenizer
from miles_lib.pipeline_config import GRPOConfig
from miles_lib.precision.modes import apply_rollout_precision, apply_training_precision
from miles_lib.rollout import RolloutEngine
from miles_lib.train import distributed as dist_utils
from miles_lib.train.actor import Actor

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclasses.dataclass
class CycleResult:
    checkpoint_uri: str
    metrics: pd.DataFrame  # one row per step
    samples: pd.DataFrame  # the rollouts trained on, one row per sample


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("TrainConfig.device='cuda' but CUDA is not available; use 'cpu' or 'auto'")
    return torch.device(name)


def load_policy(uri: str) -> MoEForCausalLM:
    """Weights from a training checkpoint (manifest.json) or a HF folder (config.json)."""
    from miles_lib import storage
    from miles_lib.checkpoint import MANIFEST

    if storage.exists(storage.join(uri, MANIFEST)):
        ckpt = load_training_checkpoint(uri)
        model = MoEForCausalLM(ckpt.model_config)
        model.load_state_dict(ckpt.model_state)
        return model
    return MoEForCausalLM.from_pretrained(uri)


def _same_prompt_data(extra: dict, cfg: GRPOConfig, num_rows: int) -> bool:
    saved = (extra.get("grpo_config") or {}).get("data", {})
    return saved.get("path") == cfg.data.path and extra["batcher"].get("num_rows") == num_rows


def load_state(checkpoint_uri: str, cfg: GRPOConfig | None = None) -> GRPOState:
    """Build a running GRPO job from a training checkpoint (converted HF model or a cycle output).

    ``cfg`` defaults to the config stored in the checkpoint by the previous cycle.
    """
    ckpt = load_training_checkpoint(checkpoint_uri)
    extra = ckpt.extra or {}
    if cfg is None:
        if "grpo_config" not in extra:
            raise ValueError(f"{checkpoint_uri}: holds no GRPO config (a converted base checkpoint); pass cfg")
        cfg = GRPOConfig.from_dict(extra["grpo_config"])
    device = resolve_device(cfg.train.device)
    rank, world = dist_utils.init_from_env(device)
    if world > 1 and (cfg.rollout.prompts_per_step % world or cfg.rollout.dynamic_sampling):
        raise ValueError(f"data parallel over {world} ranks needs rollout.prompts_per_step "
                         f"({cfg.rollout.prompts_per_step}) divisible by {world} and dynamic_sampling off "
                         "(every rank must train on the same number of samples)")
    torch.manual_seed(cfg.train.seed)
    model = MoEForCausalLM(ckpt.model_config)
    model.load_state_dict(ckpt.model_state)
    model.to(device=device, dtype=DTYPES[cfg.train.dtype])
    tokenizer = Tokenizer.from_files(ckpt.side_files, source=checkpoint_uri)
    dataset = PromptDataset(cfg.data)
    batcher = PromptBatcher(dataset, batch_size=cfg.rollout.prompts_per_step)  # seed: cfg.data.seed
    apply_training_precision(model, cfg.precision)
    if world > 1 or cfg.precision.separate_rollout_model:
        # the engine's own copy: its weights arrive through bucketed weight syncs
        engine_model = MoEForCausalLM(ckpt.model_config)
        engine_model.load_state_dict(ckpt.model_state)
        engine_model.to(device=device, dtype=DTYPES[cfg.train.dtype]).requires_grad_(False)
        apply_rollout_precision(engine_model, cfg.precision)
    else:
        engine_model = model  # colocated, zero-copy weight sync (unified FP8 runs the same GEMMs)
    if world > 1:
        dist_utils.shard_model(model)
    ref_model = None
    if cfg.algorithm.kl_loss_coef > 0:
        ref_model = load_policy(cfg.reference_checkpoint).to(device=device, dtype=DTYPES[cfg.train.dtype]).eval()
        ref_model.requires_grad_(False)
    actor = Actor(model, cfg.train, cfg.algorithm, ref_model=ref_model)
    if cfg.rollout.cuda_graphs and (world > 1 or torch.device(device).type != "cuda"):
        raise ConfigError(f"rollout.cuda_graphs needs a single-process CUDA job (device {device}, {world} "
                          f"processes); set it to false")
    engine = RolloutEngine(engine_model, max_concurrent_seqs=cfg.rollout.max_concurrent_seqs,
                           compile_decode=cfg.rollout.compile_decode,
                           compile_prefill=cfg.rollout.compile_prefill, cuda_graphs=cfg.rollout.cuda_graphs)
    state = GRPOState(cfg=cfg, model=model, tokenizer=tokenizer, actor=actor, engine=engine,
                      batcher=batcher)
    if "actor" in extra:  # resuming a cycle output: restore the whole job state
        actor.load_state_dict(extra["actor"])
        if _same_prompt_data(extra, cfg, len(dataset)):
            batcher.load_state_dict(extra["batcher"])
        else:  # retraining on a fresh prompt file: its order starts from the beginning
            log.info("prompt data changed since %s was written; starting %s from its first batch",
                     checkpoint_uri, cfg.data.path)
        set_rng_state(extra["rng"])
        state.step = int(extra["step"])
        state.weight_version = int(extra["weight_version"])
    engine.mark_weights_updated(state.weight_version)
    return state


def save_state(state: GRPOState, out_uri: str) -> str:
    """Write the job state as a training checkpoint (rank 0 writes; all ranks take part)."""
    full = dist_utils.full_model_state(state.model)
    extra = {"actor": state.actor.state_dict(), "batcher": state.batcher.state_dict(),
             "rng": rng_state(), "step": state.step, "weight_version": state.weight_version,
             "grpo_config": state.cfg.to_dict()}
    if dist_utils.world()[0] == 0:
        save_training_checkpoint(out_uri, full, state.model.config, step=state.step, extra=extra,
                                 tokenizer=state.tokenizer)
    if dist_utils.world()[1] > 1:
        torch.distributed.barrier()
    return out_uri


def run_cycle(cfg: GRPOConfig, checkpoint_uri: str, out_uri: str, num_steps: int | None = None,
              progress: bool = True, on_step=None) -> CycleResult:
    state = load_state(checkpoint_uri, cfg)
    metrics, samples = run_steps(state, num_steps or cfg.steps_per_cycle, progress=progress, on_step=on_step)
    save_state(state, out_uri)
    return CycleResult(out_uri, metrics, samples)
