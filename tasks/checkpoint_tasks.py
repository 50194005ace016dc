"""convert_checkpoint: HF model -> training checkpoint; export_model: training checkpoint -> HF (bf16 or FP8)."""

from __future__ import annotations

from flytekit import task
from flytekit.types.directory import FlyteDirectory

from miles_lib.checkpoint import convert_hf_to_training, convert_training_to_hf
from tasks.common import CACHE_VERSION, CPU_IMAGE, CPU_RESOURCES, artifact_uri, uri_of


@task(cache=True, cache_version=CACHE_VERSION, requests=CPU_RESOURCES, container_image=CPU_IMAGE)
def convert_checkpoint(model: str, storage_root: str, run_name: str) -> FlyteDirectory:
    """HF checkpoint (config.json + safetensors + tokenizer) -> DCP training checkpoint, manifest last."""
    out = artifact_uri(storage_root, run_name, "cycle-000", "checkpoint")
    return FlyteDirectory(path=convert_hf_to_training(model, out))


EXPORT_FORMATS = ("hf", "hf-fp8")


@task(cache=True, cache_version=CACHE_VERSION, requests=CPU_RESOURCES, container_image=CPU_IMAGE)
def export_model(checkpoint: FlyteDirectory, storage_root: str, run_name: str, export_format: str) -> FlyteDirectory:
    """Training checkpoint -> HF folder for serving under <root>/<run>/export/<format>. ``hf-fp8``:
    block-quantized e4m3 projections with ``weight_scale_inv`` (the HF FP8 layout), loadable by
    ``MoEForCausalLM.from_pretrained``."""
    from miles_lib.precision import Fp8Config

    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"export_format={export_format!r} is invalid: must be one of {list(EXPORT_FORMATS)}")
    out = artifact_uri(storage_root, run_name, "export", export_format)
    fp8 = Fp8Config() if export_format == "hf-fp8" else None
    return FlyteDirectory(path=convert_training_to_hf(uri_of(checkpoint), out, fp8=fp8))
