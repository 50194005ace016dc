"""Training checkpoint: sharded ``torch.distributed.checkpoint`` model state + a manifest.

Folder layout (local path or fsspec URI):
    model/                DCP files of the model state dict (internal names, experts stacked)
    extra_state.pt        torch.save of the job state (optimizer moments, LR schedule, RNG, data
                          position, ...), when given
    hf/                   small side files carried verbatim for the HF export (config.json as read,
                          generation_config.json, tokenizer files)
    manifest.json         WRITTEN LAST: format version, step, model config, per-tensor sha256 of
                          the raw bytes with shape/dtype, sha256 of every other file

A folder without manifest.json is incomplete and is never loaded. Locally the whole folder is built
under a temporary name and renamed into place; on object stores the files are uploaded first and
the manifest last. Loading verifies every checksum; a mismatch names the tensor or file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
import uuid
import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed.checkpoint as dcp

from miles_lib import storage
from miles_lib.errors import CheckpointError
from miles_lib.model.config import ModelConfig

if TYPE_CHECKING:
    from miles_lib.precision.fp8 import Fp8Config

MANIFEST = "manifest.json"
FORMAT = "miles-training-checkpoint"
VERSION = 1
HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


@dataclasses.dataclass
class TrainingCheckpoint:
    model_state: dict[str, torch.Tensor]
    model_config: ModelConfig
    step: int
    extra: dict[str, Any] | None
    manifest: dict[str, Any]
    side_files: dict[str, bytes]


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _dcp_save(state: dict[str, torch.Tensor], folder: str) -> None:
    with warnings.catch_warnings():  # single-process save: DCP warns that no process group exists
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({k: v.detach().cpu().contiguous() for k, v in state.items()},
                 storage_writer=dcp.FileSystemWriter(folder, single_file_per_rank=True),
                 no_dist=True)  # the caller holds the full state; one writer, no collectives


def save_training_checkpoint(uri: str, model_state: dict[str, torch.Tensor], model_config: ModelConfig,
                             step: int, extra: dict[str, Any] | None = None, tokenizer=None,
                             side_files: dict[str, bytes] | None = None) -> str:
    """Write a complete checkpoint at ``uri`` (atomically; manifest last). Returns ``uri``."""
    if model_config.tie_word_embeddings:  # the LM head is the embedding; store it once
        model_state = {k: v for k, v in model_state.items() if k != "lm_head.weight"}
    files_side = dict(side_files or {})
    if tokenizer is not None:
        files_side.update(tokenizer.files())
    with tempfile.TemporaryDirectory(prefix="miles-ckpt-") as work:
        build = os.path.join(work, "ckpt")
        _dcp_save(model_state, os.path.join(build, "model"))
        if extra is not None:
            buf = io.BytesIO()
            torch.save(extra, buf)
            with open(os.path.join(build, "extra_state.pt"), "wb") as f:
                f.write(buf.getvalue())
        for name, data in files_side.items():
            os.makedirs(os.path.join(build, "hf"), exist_ok=True)
            with open(os.path.join(build, "hf", name), "wb") as f:
                f.write(data)
        file_sums = {}
        for root, _, names in os.walk(build):
            for n in names:
                full = os.path.join(root, n)
                with open(full, "rb") as f:
                    file_sums[os.path.relpath(full, build).replace(os.sep, "/")] = _sha(f.read())
        manifest = {
            "format": FORMAT, "version": VERSION, "step": int(step), "created_unix": time.time(),
            "model_config": model_config.to_hf_dict(),
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""),
                            "sha256": tensor_sha256(v)} for k, v in sorted(model_state.items())},
            "files": file_sums, "has_extra": extra is not None,
        }
        manifest_bytes = json.dumps(manifest, indent=1, sort_keys=True).encode()
        if storage.is_remote(uri):
            storage.remove(storage.join(uri, MANIFEST), recursive=False)  # invalidate an old one first
            for rel in sorted(file_sums):
                with open(os.path.join(build, rel), "rb") as f:
                    storage.atomic_write_bytes(storage.join(uri, rel), f.read())
            storage.atomic_write_bytes(storage.join(uri, MANIFEST), manifest_bytes)
        else:
            with open(os.path.join(build, MANIFEST), "wb") as f:
                f.write(manifest_bytes)
            _local_replace(build, os.path.abspath(uri))
    return uri


def _local_replace(src_dir: str, target: str) -> None:
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    staged = os.path.join(parent, f".{os.path.basename(target)}.tmp-{uuid.uuid4().hex[:8]}")
    shutil.copytree(src_dir, staged)  # same filesystem as target -> the renames are atomic
    storage.swap_in_dir(staged, target)


def read_manifest(uri: str) -> dict[str, Any]:
    path = storage.join(uri, MANIFEST)
    try:
        manifest = json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        raise CheckpointError(f"incomplete checkpoint: {uri} has no {MANIFEST} (it was not fully "
                              "written, or it is not a training checkpoint); re-run the step that writes it") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("version", 0) > VERSION:
        raise CheckpointError(f"{path}: format version {manifest['version']} is newer than this code ({VERSION})")
    return manifest


def _fetch_files(uri: str, manifest: dict, dest: str) -> None:
    for rel, digest in manifest["files"].items():
        try:
            data = storage.read_bytes(storage.join(uri, rel))
        except FileNotFoundError:
            raise CheckpointError(f"{uri}: file {rel} listed in the manifest is missing") from None
        if _sha(data) != digest:
            raise CheckpointError(f"{uri}: checksum mismatch for file {rel} (corrupt or modified)")
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        with open(os.path.join(dest, rel), "wb") as f:
            f.write(data)


def load_training_checkpoint(uri: str, device: torch.device | str | None = None) -> TrainingCheckpoint:
    manifest = read_manifest(uri)
    cfg = ModelConfig.from_hf_dict(manifest["model_config"], source=storage.join(uri, MANIFEST))
    with tempfile.TemporaryDirectory(prefix="miles-ckpt-") as work:
        _fetch_files(uri, manifest, work)
        state = {k: torch.empty(v["shape"], dtype=getattr(torch, v["dtype"]))
                 for k, v in manifest["tensors"].items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=dcp.FileSystemReader(os.path.join(work, "model")), no_dist=True)
        for name, meta in manifest["tensors"].items():
            if tensor_sha256(state[name]) != meta["sha256"]:
                raise CheckpointError(f"{uri}: checksum mismatch for tensor {name} (corrupt checkpoint)")
        extra = None
        if manifest.get("has_extra"):
            extra = torch.load(os.path.join(work, "extra_state.pt"), map_location="cpu", weights_only=False)
        side = {}
        hf_dir = os.path.join(work, "hf")
        if os.path.isdir(hf_dir):
            for n in os.listdir(hf_dir):
                with open(os.path.join(hf_dir, n), "rb") as f:
                    side[n] = f.read()
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    if device is not None:
        state = {k: v.to(device) for k, v in state.items()}
    return TrainingCheckpoint(state, cfg, int(manifest["step"]), extra, manifest, side)


def load_side_files(uri: str) -> dict[str, bytes]:
    """The verified small HF side files (config.json, tokenizer files, ...) of a checkpoint."""
    manifest = read_manifest(uri)
    out = {}
    for rel, digest in manifest["files"].items():
        if rel.startswith("hf/"):
            data = storage.read_bytes(storage.join(uri, rel))
            if _sha(data) != digest:
                raise CheckpointError(f"{uri}: checksum mismatch for file {rel} (corrupt or modified)")
            out[rel[3:]] = data
    return out


def verify_checkpoint(uri: str) -> bool:
    """True iff ``uri`` holds a complete checkpoint whose checksums all verify."""
    try:
        load_training_checkpoint(uri)
        return True
    except (CheckpointError, FileNotFoundError):
        return False


def latest_good_checkpoint(root: str, max_depth: int = 4) -> str | None:
    """The newest (by manifest creation time) checkpoint under ``root`` whose manifest exists and
    whose every checksum verifies; None if there is none. Half-written folders (no manifest) and
    corrupt ones are skipped."""
    fs, path = storage.open_fs(root)
    with storage.storage_errors(root, "list"):
        if not fs.exists(path):
            return None
        found = fs.find(path, maxdepth=max_depth)
    prefix = root.split("://", 1)[0] + "://" if storage.is_remote(root) else ""
    candidates = []
    for f in found:
        if f.rstrip("/").endswith("/" + MANIFEST):
            uri = prefix + f.rstrip("/")[: -len(MANIFEST) - 1]
            try:
                candidates.append((read_manifest(uri).get("created_unix", 0.0), uri))
            except CheckpointError:
                continue
    for _, uri in sorted(candidates, reverse=True):
        if verify_checkpoint(uri):
            return uri
    return None


def convert_hf_to_training(hf_uri: str, out_uri: str) -> str:
    """HF checkpoint -> training checkpoint (step 0). Tensors are kept bit for bit; an FP8
    checkpoint is dequantized to bfloat16 (its quantization_config is dropped from config.json)."""
    from miles_lib.precision.fp8_checkpoint import register_fp8_loader
    register_fp8_loader()  # an FP8 source checkpoint is dequantized on load
    from miles_lib.model.hf_io import load_hf_tensors, read_config
    from miles_lib.model.hf_keys import hf_to_internal

    cfg, hf_config = read_config(hf_uri)
    state = hf_to_internal(load_hf_tensors(hf_uri, cfg, hf_config=hf_config), cfg)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    side = {}
    for name in HF_SIDE_FILES:
        path = storage.join(hf_uri, name)
        if storage.exists(path):
            side[name] = storage.read_bytes(path)
    if "config.json" in side and "quantization_config" in json.loads(side["config.json"]):
        # a quantized source was dequantized on load: the training weights are high precision
        hf_cfg = json.loads(side["config.json"])
        del hf_cfg["quantization_config"]
        side["config.json"] = json.dumps(hf_cfg, indent=2).encode()
    return save_training_checkpoint(out_uri, state, cfg, step=0, side_files=side)


def convert_training_to_hf(ckpt_uri: str, out_uri: str, max_shard_bytes: int | None = None,
                           fp8: "Fp8Config | None" = None) -> str:
    """Training checkpoint -> HF folder. The original config.json / generation_config.json /
    tokenizer files are written back verbatim when the checkpoint carries them.

    ``fp8``: write the decoder projections block-quantized (e4m3 ``weight`` + fp32
    ``weight_scale_inv`` per 128x128 block, config.json gets the HF ``quantization_config``)."""
    from miles_lib.model.hf_io import SINGLE, _write_folder
    from miles_lib.model.hf_keys import internal_to_hf
    from safetensors.torch import save as st_save

    ckpt = load_training_checkpoint(ckpt_uri)
    tensors = internal_to_hf(ckpt.model_state, ckpt.model_config)
    files = {"config.json": json.dumps(ckpt.model_config.to_hf_dict(), indent=2).encode()}
    files.update(ckpt.side_files)
    if fp8 is not None:
        from miles_lib.precision.fp8_checkpoint import fp8_quantization_config, quantize_state_dict_fp8
        tensors = quantize_state_dict_fp8(tensors, fp8)
        hf_cfg = json.loads(files["config.json"])
        hf_cfg["quantization_config"] = fp8_quantization_config(ckpt.model_config.moe_layer_indices())
        files["config.json"] = json.dumps(hf_cfg, indent=2).encode()
    files[SINGLE] = st_save(tensors, metadata={"format": "pt"})
    if max_shard_bytes is not None:
        raise CheckpointError("convert_training_to_hf: sharded export goes through "
                              "MoEForCausalLM.save_pretrained(max_shard_bytes=...)")
    _write_folder(out_uri, files)
    return out_uri
