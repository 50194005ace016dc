"""The whole pipeline in plain Python (no Flyte): convert -> evaluate(base) -> N cycles -> evaluate(final).

    python -m miles_lib.local_pipeline --config examples/configs/tiny_grpo.yaml \\
        --model examples/tiny-moe --root runs/local --cycles 3

Artifacts (local folder or s3:// root): checkpoints per cycle, metrics and eval tables as parquet,
and summary.json. The Flyte workflow (workflows/grpo.py) runs the same library calls as cached tasks.
"""

from __future__ import annotations

import argparse
import io
import json
import time

import pandas as pd

from miles_lib import storage
from miles_lib.checkpoint import convert_hf_to_training
from miles_lib.cycle import run_cycle
from miles_lib.evaluation import evaluate_checkpoint
from miles_lib.pipeline_config import GRPOConfig


def write_table(df: pd.DataFrame, uri: str) -> str:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    storage.atomic_write_bytes(uri, buf.getvalue())
    return uri


def run_local_pipeline(model_uri: str, cfg: GRPOConfig, root: str, num_cycles: int,
                       progress: bool = True) -> dict:
    t0 = time.time()
    ckpt = convert_hf_to_training(model_uri, storage.join(root, "cycle-000", "checkpoint"))
    base_table, base = evaluate_checkpoint(ckpt, cfg)
    write_table(base_table, storage.join(root, "eval-base.parquet"))
    metrics = []
    for k in range(1, num_cycles + 1):
        res = run_cycle(cfg, ckpt, storage.join(root, f"cycle-{k:03d}", "checkpoint"), progress=progress)
        res.metrics.insert(0, "cycle", k)
        write_table(res.metrics, storage.join(root, f"cycle-{k:03d}", "metrics.parquet"))
        write_table(res.samples, storage.join(root, f"cycle-{k:03d}", "samples.parquet"))
        metrics.append(res.metrics)
        ckpt = res.checkpoint_uri
    final_table, final = evaluate_checkpoint(ckpt, cfg)
    write_table(final_table, storage.join(root, "eval-final.parquet"))
    summary = {"base": base, "final": final, "final_checkpoint": ckpt, "root": root,
               "pass@1_gain_points": round(100 * (final["pass@1"] - base["pass@1"]), 2),
               "seconds": round(time.time() - t0, 1)}
    if metrics:
        write_table(pd.concat(metrics, ignore_index=True), storage.join(root, "metrics.parquet"))
    storage.atomic_write_text(storage.join(root, "summary.json"), json.dumps(summary, indent=2))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="examples/configs/tiny_grpo.yaml")
    ap.add_argument("--model", default="examples/tiny-moe")
    ap.add_argument("--root", default="runs/local")
    ap.add_argument("--cycles", type=int, default=3)
    args = ap.parse_args()
    summary = run_local_pipeline(args.model, GRPOConfig.from_yaml(args.config), args.root, args.cycles)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
