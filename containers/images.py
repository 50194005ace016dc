"""Container images the tasks run in (ImageSpec; built by `pyflyte run --remote` / `pyflyte register`).

Locally (`pyflyte run` without --remote) no image is built: tasks run in this Python environment.
Override the registry with MILES_IMAGE_REGISTRY (e.g. ghcr.io/my-org).
"""

from __future__ import annotations

import os

from flytekit import ImageSpec

REGISTRY = os.environ.get("MILES_IMAGE_REGISTRY", "localhost:30000")
COMMON = ["flytekit>=1.16", "flytekitplugins-kfpytorch", "s3fs", "safetensors", "tokenizers", "pandas",
          "pyarrow", "fsspec", "tqdm", "pyyaml", "matplotlib"]

CPU_IMAGE = ImageSpec(
    name="miles-flyte-cpu", registry=REGISTRY, python_version="3.11",
    packages=["torch==2.13.0", *COMMON],
    pip_extra_index_url=["https://download.pytorch.org/whl/cpu"],
    source_root=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    env={"PYTHONPATH": "/root"},
)

GPU_IMAGE = ImageSpec(
    name="miles-flyte-gpu", registry=REGISTRY, python_version="3.12",
    base_image="nvidia/cuda:12.8.0-cudnn-runtime-ubuntu24.04",
    packages=["torch==2.11.0", "triton", *COMMON],
    source_root=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    env={"PYTHONPATH": "/root"},
)
