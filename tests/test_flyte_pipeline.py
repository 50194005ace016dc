"""The Flyte surface: a tiny pipeline end to end, offline packaging, cache reuse after a failed
cycle, and S3 storage against a real S3-compatible server (moto) on 127.0.0.1."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYFLYTE = os.path.join(os.path.dirname(sys.executable), "pyflyte")
SMALL = """
data: {path: examples/data/train.jsonl}
rollout: {prompts_per_step: 4, n_samples_per_prompt: 4, max_new_tokens: 6}
train: {lr: 1.0e-4, micro_batch_size: 16}
eval: {path: examples/data/eval.jsonl, k: 2, max_new_tokens: 6, max_prompts: 8}
steps_per_cycle: 1
"""


def pipeline(tmp_path, root, *, cycles=2, env=None, run_name="t", timeout=300, extra=()):
    cfg = tmp_path / "small.yaml"
    cfg.write_text(SMALL)
    e = {**os.environ, "HOME": str(tmp_path / "home"), "FLYTE_LOCAL_CACHE_ENABLED": "false", **(env or {})}
    cmd = [PYFLYTE, "run", "workflows/grpo.py", "grpo_pipeline", "--config", str(cfg), "--num_cycles",
           str(cycles), "--storage_root", root, "--run_name", run_name, *extra]
    return subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


def test_tiny_pipeline_end_to_end(tmp_path):
    root = str(tmp_path / "artifacts")
    r = pipeline(tmp_path, root, extra=("--export_format", "hf-fp8"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "pass@1 base" in r.stdout
    run = os.path.join(root, "t")
    hf_cfg = json.load(open(os.path.join(run, "export", "hf-fp8", "config.json")))
    assert hf_cfg["quantization_config"]["quant_method"] == "fp8"  # the final policy, exported as HF FP8
    for rel in ("eval-base.parquet", "eval-final.parquet", "metrics.parquet", "summary.json",
                "cycle-000/checkpoint/manifest.json", "cycle-001/checkpoint/manifest.json",
                "cycle-002/checkpoint/manifest.json", "cycle-002/metrics.parquet", "cycle-002/samples.parquet"):
        assert os.path.exists(os.path.join(run, rel)), rel
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert {"base_pass@1", "final_pass@1", "pass@1_gain_points"} <= set(summary)


def test_killed_cycle_rerun_reuses_cached_cycles(tmp_path):
    root = str(tmp_path / "artifacts")
    env = {"FLYTE_LOCAL_CACHE_ENABLED": "true"}
    r = pipeline(tmp_path, root, env={**env, "MILES_KILL_IN_CYCLE": "2"})  # SIGKILL mid cycle 2
    assert r.returncode == -9, r.stdout[-2000:] + r.stderr[-2000:]
    c1 = os.path.join(root, "t", "cycle-001", "checkpoint", "manifest.json")
    assert os.path.exists(c1)
    assert not os.path.exists(os.path.join(root, "t", "cycle-002", "checkpoint", "manifest.json"))
    written = json.load(open(c1))["created_unix"]
    r = pipeline(tmp_path, root, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.load(open(c1))["created_unix"] == written  # cycle 1 came from the cache, not re-run
    assert os.path.exists(os.path.join(root, "t", "cycle-002", "checkpoint", "manifest.json"))


def test_workflows_and_launch_plans_package_offline(tmp_path):
    out = tmp_path / "pkg.tgz"
    r = subprocess.run([PYFLYTE, "--pkgs", "workflows", "package", "--image", "miles-flyte:test", "--output",
                        str(out), "--force"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    import tarfile

    names = tarfile.open(out).getnames()
    assert any("grpo_pipeline" in n for n in names)
    assert any("miles_flyte_nightly_retrain" in n for n in names)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_server(tmp_path):
    moto = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
    port = _free_port()
    proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"FLYTE_AWS_ENDPOINT": endpoint, "FLYTE_AWS_ACCESS_KEY_ID": "test", "FLYTE_AWS_SECRET_ACCESS_KEY": "test",
           "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    import boto3

    for _ in range(100):
        try:
            boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                         region_name="us-east-1").create_bucket(Bucket="miles")
            break
        except Exception:
            time.sleep(0.1)
    yield proc, env
    proc.kill()


def test_pipeline_on_s3_and_unreachable_store_fails_clearly(tmp_path, s3_server):
    proc, env = s3_server
    r = pipeline(tmp_path, "s3://miles/runs", env=env, cycles=1)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    import boto3

    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="test",
                      aws_secret_access_key="test", region_name="us-east-1")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="miles", Prefix="runs/t/")["Contents"]}
    for rel in ("eval-base.parquet", "eval-final.parquet", "metrics.parquet", "summary.json",
                "cycle-000/checkpoint/manifest.json", "cycle-001/checkpoint/manifest.json",
                "cycle-001/checkpoint/model/.metadata", "cycle-001/metrics.parquet", "cycle-001/samples.parquet"):
        assert f"runs/t/{rel}" in keys, rel
    proc.kill()
    proc.wait()
    t0 = time.time()
    r = pipeline(tmp_path, "s3://miles/runs", env=env, cycles=1, run_name="t2", timeout=240)
    assert r.returncode != 0
    assert "StorageError" in r.stdout + r.stderr and "s3://miles/runs/t2" in r.stdout + r.stderr
    assert time.time() - t0 < 200
