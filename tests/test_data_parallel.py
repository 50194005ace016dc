import os
import socket
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world: int, out: str) -> None:
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.dp_worker", out], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out_text, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out_text[-3000:]


def test_two_process_fsdp_update_equals_single_process(tmp_path):
    _run(1, str(tmp_path / "one.pt"))
    _run(2, str(tmp_path / "two.pt"))
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=0)
    # and the update did something
    from tests.helpers_tiny import tiny_model
    init = tiny_model().state_dict()
    assert any((one[k] - init[k]).abs().max() > 1e-4 for k in one)


def _run_cycle(world, cfg_json, src, dst):
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.dp_cycle_worker", cfg_json, src, dst, "2"],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    for p in procs:
        out_text, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out_text[-3000:]


def test_two_rank_grpo_cycle_splits_groups_and_matches_one_rank(tmp_path):
    from miles_lib.checkpoint import load_training_checkpoint
    from tests.helpers_tiny import tiny_base_checkpoint, write_prompts
    from tests.test_loop import small_config

    base = tiny_base_checkpoint(tmp_path)
    cfg = small_config(write_prompts(tmp_path / "p.jsonl"), train={"lr": 1e-4, "micro_batch_size": 4})
    _run_cycle(1, cfg.to_json(), base, str(tmp_path / "one"))
    _run_cycle(2, cfg.to_json(), base, str(tmp_path / "two"))
    one = load_training_checkpoint(str(tmp_path / "one")).model_state
    two = load_training_checkpoint(str(tmp_path / "two")).model_state
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=0)
