"""Worker for test_data_parallel: one rank of a gloo data-parallel actor step.

Usage: python -m tests.dp_worker OUT_PATH   (RANK/WORLD_SIZE/MASTER_* set by the test)
"""

import sys

import torch

from miles_lib.algorithms import AlgorithmConfig
from miles_lib.train import distributed as dist_utils
from miles_lib.train.actor import Actor
from miles_lib.train.config import TrainConfig
from tests.helpers_tiny import batch_from, rollout, tiny_model


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    rank, world = dist_utils.init_from_env(torch.device("cpu"))
    model = tiny_model()
    batch = batch_from(rollout(model))  # every rank builds the same global batch ...
    S = batch.input_ids_SL.shape[0]
    share = S // world
    local = batch.select(slice(rank * share, (rank + 1) * share))  # ... and trains on its share
    dist_utils.shard_model(model)
    actor = Actor(model, TrainConfig(lr=1e-3, micro_batch_size=3, grad_clip=1.0), AlgorithmConfig())
    for _ in range(2):
        actor.train_step(local, 1.0)
    state = dist_utils.full_model_state(model)
    if rank == 0:
        torch.save(state, out_path)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
