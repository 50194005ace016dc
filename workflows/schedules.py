"""Nightly retraining: a launch plan with a cron schedule.

The retrain workflow starts from the newest *good* checkpoint under the storage root (manifest
present, every checksum verified — see miles_lib.checkpoint.latest_good_checkpoint), or from the
base model when there is none yet, and trains on a fresh prompt file.

    pyflyte register workflows/schedules.py      # then activate the launch plan in the console
"""

from __future__ import annotations

from datetime import datetime

from flytekit import CronSchedule, LaunchPlan, task, workflow
from flytekit.types.directory import FlyteDirectory

from miles_lib.checkpoint import convert_hf_to_training, latest_good_checkpoint
from miles_lib.pipeline_config import GRPOConfig
from tasks.common import CPU_IMAGE, artifact_uri
from tasks.eval_tasks import evaluate
from tasks.pipeline_tasks import load_config, summarize
from workflows.grpo import DEFAULT_CONFIG, DEFAULT_MODEL, run_cycles

NIGHTLY_ROOT = "s3://miles-flyte/runs"


@task(container_image=CPU_IMAGE, cache=False)
def resume_point(storage_root: str, base_model: str, run_name: str) -> FlyteDirectory:
    """The newest verified checkpoint under ``storage_root`` (never cached: it changes nightly)."""
    found = latest_good_checkpoint(storage_root)
    if found is None:
        found = convert_hf_to_training(base_model, artifact_uri(storage_root, run_name, "cycle-000", "checkpoint"))
    return FlyteDirectory(path=found)


@task(container_image=CPU_IMAGE, cache=False)
def run_name_for(prefix: str, kickoff_time: datetime) -> str:
    """One artifact folder per night, so a run never overwrites the checkpoint it resumes from."""
    return f"{prefix}-{kickoff_time:%Y%m%d-%H%M}"


@task(container_image=CPU_IMAGE, cache=False)
def with_prompts(config: GRPOConfig, prompts: str) -> GRPOConfig:
    """The config with its training prompt file replaced by tonight's."""
    return config.override(data={"path": prompts})


@workflow
def retrain(storage_root: str = NIGHTLY_ROOT, prompts: str = "s3://miles-flyte/prompts/latest.jsonl",
            base_model: str = DEFAULT_MODEL, config: str = DEFAULT_CONFIG, num_cycles: int = 1,
            run_prefix: str = "nightly", kickoff_time: datetime = datetime(2026, 1, 1)) -> dict[str, float]:
    cfg = with_prompts(config=load_config(path=config), prompts=prompts)
    run_name = run_name_for(prefix=run_prefix, kickoff_time=kickoff_time)
    start = resume_point(storage_root=storage_root, base_model=base_model, run_name=run_name)
    base = evaluate(checkpoint=start, config=cfg, tag="before", storage_root=storage_root, run_name=run_name)
    final_ckpt, metrics = run_cycles(checkpoint=start, config=cfg, num_cycles=num_cycles,
                                     storage_root=storage_root, run_name=run_name)
    final = evaluate(checkpoint=final_ckpt, config=cfg, tag="after", storage_root=storage_root, run_name=run_name)
    return summarize(base=base.summary, final=final.summary, metrics=metrics, storage_root=storage_root,
                     run_name=run_name)


nightly_retrain = LaunchPlan.get_or_create(
    workflow=retrain,
    name="miles_flyte_nightly_retrain",
    schedule=CronSchedule(schedule="0 2 * * *", kickoff_time_input_arg="kickoff_time"),  # 02:00 UTC
    default_inputs={"storage_root": NIGHTLY_ROOT, "num_cycles": 1},
)
