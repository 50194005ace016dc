"""grpo_cycle: K colocated GRPO steps from a checkpoint, writing the next checkpoint + metrics.

Runs in-process with one worker; with MILES_NPROC_PER_NODE > 1 at registration the task is an
Elastic (torchrun) job whose ranks run miles_lib's FSDP2 data-parallel path (rank 0 returns).
"""

from __future__ import annotations

import os
import signal
import typing

import pandas as pd
from flytekit import task
from flytekit.types.directory import FlyteDirectory

from miles_lib.cycle import run_cycle
from miles_lib.local_pipeline import write_table
from miles_lib.pipeline_config import GRPOConfig
from tasks.common import (CACHE_VERSION, GPU_IMAGE, CPU_IMAGE, GPUS_PER_NODE, NNODES, NPROC_PER_NODE,
                          TRAIN_RESOURCES, artifact_uri, uri_of)

CycleResult = typing.NamedTuple("CycleResult", [("checkpoint", FlyteDirectory), ("metrics", pd.DataFrame)])

_elastic = None
if NPROC_PER_NODE > 1 or NNODES > 1:
    from flytekitplugins.kfpytorch import Elastic

    _elastic = Elastic(nnodes=NNODES, nproc_per_node=NPROC_PER_NODE)


def _fault_injection(cycle: int):
    """MILES_KILL_IN_CYCLE=k: SIGKILL this process after the first step of cycle k (recovery tests)."""
    if os.environ.get("MILES_KILL_IN_CYCLE") != str(cycle):
        return None

    def kill(step: int, row: dict) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    return kill


@task(cache=True, cache_version=CACHE_VERSION, requests=TRAIN_RESOURCES, task_config=_elastic,
      container_image=GPU_IMAGE if GPUS_PER_NODE else CPU_IMAGE, retries=1)
def grpo_cycle(checkpoint: FlyteDirectory, config: GRPOConfig, cycle: int, storage_root: str,
               run_name: str) -> CycleResult:
    out = artifact_uri(storage_root, run_name, f"cycle-{cycle:03d}", "checkpoint")
    res = run_cycle(config, uri_of(checkpoint), out, progress=False, on_step=_fault_injection(cycle))
    res.metrics.insert(0, "cycle", cycle)
    write_table(res.metrics, artifact_uri(storage_root, run_name, f"cycle-{cycle:03d}", "metrics.parquet"))
    write_table(res.samples, artifact_uri(storage_root, run_name, f"cycle-{cycle:03d}", "samples.parquet"))
    return CycleResult(checkpoint=FlyteDirectory(path=res.checkpoint_uri), metrics=res.metrics)
