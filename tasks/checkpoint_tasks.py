"""convert_checkpoint: HF model folder/URI -> training checkpoint in the storage root."""

from __future__ import annotations

from flytekit import task
from flytekit.types.directory import FlyteDirectory

from miles_lib.checkpoint import convert_hf_to_training
from tasks.common import CACHE_VERSION, CPU_IMAGE, CPU_RESOURCES, artifact_uri


@task(cache=True, cache_version=CACHE_VERSION, requests=CPU_RESOURCES, container_image=CPU_IMAGE)
def convert_checkpoint(model: str, storage_root: str, run_name: str) -> FlyteDirectory:
    """HF checkpoint (config.json + safetensors + tokenizer) -> DCP training checkpoint, manifest last."""
    out = artifact_uri(storage_root, run_name, "cycle-000", "checkpoint")
    return FlyteDirectory(path=convert_hf_to_training(model, out))
