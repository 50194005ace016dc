"""One rank of a data-parallel GRPO cycle (test_data_parallel). Args: CONFIG_JSON SRC DST STEPS."""

import sys

import torch

from miles_lib.cycle import run_cycle
from miles_lib.pipeline_config import GRPOConfig

if __name__ == "__main__":
    torch.set_num_threads(1)
    run_cycle(GRPOConfig.from_json(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), progress=False)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
