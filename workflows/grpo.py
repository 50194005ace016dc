"""GRPO pipeline: convert -> evaluate(base) -> N cached cycles -> evaluate(final) -> summary, export.

    pyflyte run workflows/grpo.py grpo_pipeline                      # shipped tiny model, local
    pyflyte run workflows/grpo.py grpo_pipeline --num_cycles 5 --storage_root s3://bucket/runs
    pyflyte run --remote workflows/grpo.py grpo_pipeline --config my.yaml --model s3://bucket/hf-model
    pyflyte run workflows/grpo.py grpo_pipeline --config examples/configs/tiny_grpo_fp8.yaml --export_format hf-fp8

The final policy is exported as a HF folder under <root>/<run>/export/ (hf, or hf-fp8: block-FP8
weights + weight_scale_inv with ``export_format='hf-fp8'``).

Each cycle is cached on (config, input checkpoint, cycle index, storage root, run name): re-running
after a failure in cycle k reuses cycles < k and restarts k from checkpoint k-1.
"""

from __future__ import annotations

import pandas as pd
from flytekit import dynamic, workflow
from flytekit.types.directory import FlyteDirectory

from miles_lib.pipeline_config import GRPOConfig
from tasks.checkpoint_tasks import convert_checkpoint, export_model
from tasks.common import CPU_IMAGE
from tasks.eval_tasks import evaluate
from tasks.grpo_tasks import grpo_cycle
from tasks.pipeline_tasks import load_config, summarize

DEFAULT_MODEL = "examples/tiny-moe"
DEFAULT_CONFIG = "examples/configs/tiny_grpo.yaml"


@dynamic(container_image=CPU_IMAGE)
def run_cycles(checkpoint: FlyteDirectory, config: GRPOConfig, num_cycles: int, storage_root: str,
               run_name: str) -> tuple[FlyteDirectory, list[pd.DataFrame]]:
    metrics = []
    for k in range(1, num_cycles + 1):
        checkpoint, m = grpo_cycle(checkpoint=checkpoint, config=config, cycle=k, storage_root=storage_root,
                                   run_name=run_name)
        metrics.append(m)
    return checkpoint, metrics


@workflow
def grpo_pipeline(model: str = DEFAULT_MODEL, config: str = DEFAULT_CONFIG, num_cycles: int = 3,
                  storage_root: str = "runs/flyte", run_name: str = "tiny-grpo",
                  export_format: str = "hf") -> dict[str, float]:
    cfg = load_config(path=config)
    base_ckpt = convert_checkpoint(model=model, storage_root=storage_root, run_name=run_name)
    base = evaluate(checkpoint=base_ckpt, config=cfg, tag="base", storage_root=storage_root, run_name=run_name)
    final_ckpt, metrics = run_cycles(checkpoint=base_ckpt, config=cfg, num_cycles=num_cycles,
                                     storage_root=storage_root, run_name=run_name)
    final = evaluate(checkpoint=final_ckpt, config=cfg, tag="final", storage_root=storage_root, run_name=run_name)
    export_model(checkpoint=final_ckpt, storage_root=storage_root, run_name=run_name, export_format=export_format)
    return summarize(base=base.summary, final=final.summary, metrics=metrics, storage_root=storage_root,
                     run_name=run_name)
