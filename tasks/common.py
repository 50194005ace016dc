"""Shared pieces of the Flyte tasks: images, resources, artifact paths."""

from __future__ import annotations

import os

from flytekit import Resources
from flytekit.types.directory import FlyteDirectory

from containers.images import CPU_IMAGE, GPU_IMAGE  # noqa: F401  (referenced by the tasks)

# Registration-time settings (a task's resources and Elastic config are fixed when it is registered):
NPROC_PER_NODE = int(os.environ.get("MILES_NPROC_PER_NODE", "1"))
NNODES = int(os.environ.get("MILES_NNODES", "1"))
GPUS_PER_NODE = int(os.environ.get("MILES_GPUS_PER_NODE", "0"))

CPU_RESOURCES = Resources(cpu="2", mem="8Gi")
TRAIN_RESOURCES = (Resources(cpu="8", mem="64Gi", gpu=str(GPUS_PER_NODE)) if GPUS_PER_NODE
                   else Resources(cpu="2", mem="16Gi"))
CACHE_VERSION = "1"


def uri_of(d: FlyteDirectory) -> str:
    """The storage URI a FlyteDirectory stands for (s3://... or a local path), never a download."""
    return d.remote_source or d.path


def artifact_uri(storage_root: str, run_name: str, *parts: str) -> str:
    from miles_lib import storage

    root = storage_root if storage.is_remote(storage_root) else os.path.abspath(storage_root)
    return storage.join(root, run_name, *parts)
