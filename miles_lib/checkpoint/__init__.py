"""Training checkpoints (DCP shards + manifest) and HF <-> training conversion."""

from miles_lib.checkpoint.training import (
    MANIFEST,
    TrainingCheckpoint,
    convert_hf_to_training,
    convert_training_to_hf,
    latest_good_checkpoint,
    load_training_checkpoint,
    save_training_checkpoint,
    verify_checkpoint,
)

__all__ = ["MANIFEST", "TrainingCheckpoint", "convert_hf_to_training", "convert_training_to_hf",
           "latest_good_checkpoint", "load_training_checkpoint", "save_training_checkpoint",
           "verify_checkpoint"]
