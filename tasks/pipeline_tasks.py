"""Small glue tasks of the pipeline: read the config, collect metrics, summarize with a Deck."""

from __future__ import annotations

import json

import flytekit
import pandas as pd
from flytekit import task

from miles_lib import storage
from miles_lib.local_pipeline import write_table
from miles_lib.pipeline_config import GRPOConfig
from tasks.common import CPU_IMAGE, artifact_uri
from tasks.report import curves_html, table_html


@task(container_image=CPU_IMAGE)
def load_config(path: str) -> GRPOConfig:
    """YAML -> validated GRPOConfig (its content, not the path, keys the caches downstream)."""
    return GRPOConfig.from_yaml(path)


@task(container_image=CPU_IMAGE, enable_deck=True)
def summarize(base: dict[str, float], final: dict[str, float], metrics: list[pd.DataFrame],
              storage_root: str, run_name: str) -> dict[str, float]:
    table = pd.concat(metrics, ignore_index=True) if metrics else pd.DataFrame()
    if not table.empty:
        write_table(table, artifact_uri(storage_root, run_name, "metrics.parquet"))
    summary = {"base_pass@1": base["pass@1"], "final_pass@1": final["pass@1"],
               "pass@1_gain_points": round(100 * (final["pass@1"] - base["pass@1"]), 2)}
    for k in base:
        if k.startswith("pass@") and k != "pass@1":
            summary[f"base_{k}"], summary[f"final_{k}"] = base[k], final.get(k, float("nan"))
    storage.atomic_write_text(artifact_uri(storage_root, run_name, "summary.json"), json.dumps(summary, indent=2))
    deck = flytekit.Deck("summary")
    deck.append(table_html(pd.DataFrame([summary])))
    deck.append(curves_html(table, ["reward_mean", "accuracy", "response_length_mean"], "reward / accuracy"))
    deck.append(curves_html(table, ["train_rollout_logprob_abs_diff", "train_rollout_k3_kl",
                                    "router_topk_mismatch_frac", "clip_frac"], "train-inference mismatch"))
    deck.append(table_html(table))
    print(f"[miles-flyte] artifacts: {artifact_uri(storage_root, run_name)}")
    print(f"[miles-flyte] pass@1 base {base['pass@1']:.3f} -> final {final['pass@1']:.3f} "
          f"({summary['pass@1_gain_points']:+.1f} points)")
    return summary
