"""evaluate: pass@1 (greedy) and pass@k (sampled) of a checkpoint on the eval prompts, with a Deck."""

from __future__ import annotations

import typing

import flytekit
import pandas as pd
from flytekit import task
from flytekit.types.directory import FlyteDirectory

from miles_lib.evaluation import evaluate_checkpoint
from miles_lib.local_pipeline import write_table
from miles_lib.pipeline_config import GRPOConfig
from tasks.common import CACHE_VERSION, CPU_IMAGE, CPU_RESOURCES, artifact_uri, uri_of
from tasks.report import table_html

EvalResult = typing.NamedTuple("EvalResult", [("table", pd.DataFrame), ("summary", dict[str, float])])


@task(cache=True, cache_version=CACHE_VERSION, requests=CPU_RESOURCES, container_image=CPU_IMAGE,
      enable_deck=True)
def evaluate(checkpoint: FlyteDirectory, config: GRPOConfig, tag: str, storage_root: str,
             run_name: str) -> EvalResult:
    table, summary = evaluate_checkpoint(uri_of(checkpoint), config)
    write_table(table, artifact_uri(storage_root, run_name, f"eval-{tag}.parquet"))
    deck = flytekit.Deck(f"eval {tag}")
    deck.append("<h3>summary</h3>" + table_html(pd.DataFrame([summary])))
    deck.append("<h3>per prompt</h3>" + table_html(table))
    return EvalResult(table=table, summary=summary)
