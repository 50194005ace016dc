"""Hugging Face checkpoint I/O: config.json, (sharded) safetensors, generation_config.json.

Layout read and written (local folder or any fsspec URI):
    config.json                      architecture (ModelConfig.to_hf_dict)
    model.safetensors                one shard, or
    model-0000k-of-0000n.safetensors + model.safetensors.index.json {"weight_map": {name: file}}
    generation_config.json           eos/bos/pad ids
    tokenizer.json (+ tokenizer_config.json), when a tokenizer is saved alongside

Quantized checkpoints (config.json "quantization_config", e.g. HF block-FP8 with
``<name>.weight_scale_inv`` tensors) load through a dequantizer registered for their
``quant_method`` (``register_dequantizer``; ``miles_lib.precision`` registers "fp8" when imported,
the model package itself never depends on precision) and are materialized in high precision.

Loading validates before materializing anything: safetensors headers are parsed and checked
against the file size (truncated / corrupt files are named), the tensor names and shapes are
compared with what config.json implies (missing / unexpected / mis-shaped tensors are listed).
Saving is atomic: locally the folder is written under a temporary name and renamed into place;
on object stores config.json is written LAST and the loader requires it (it is the commit marker).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from miles_lib import storage
from miles_lib.errors import CheckpointError
from miles_lib.model.config import ModelConfig
from miles_lib.model.hf_keys import hf_to_internal, internal_to_hf, validate_hf_tensors

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8,
              "F8_E4M3": torch.float8_e4m3fn, "BOOL": torch.bool}


def parse_safetensors_header(data: bytes, source: str) -> dict[str, dict]:
    """Tensor entries {name: {dtype, shape, data_offsets}} of a safetensors blob, checked for
    truncation and corruption."""
    if len(data) < 8:
        raise CheckpointError(f"{source}: truncated safetensors file ({len(data)} bytes, no header)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise CheckpointError(f"{source}: corrupt or truncated safetensors: header claims {n} bytes, "
                              f"file has {len(data) - 8} after the length prefix")
    try:
        header = json.loads(data[8: 8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{source}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{source}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    body = len(data) - 8 - n
    for name, entry in header.items():
        try:
            start, end = entry["data_offsets"]
            dtype, shape = entry["dtype"], entry["shape"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{source}: corrupt safetensors header entry for {name!r}") from None
        if end > body:
            raise CheckpointError(f"{source}: truncated safetensors: tensor {name!r} ends at byte {end} "
                                  f"but the data section has {body} bytes; re-download or re-save the file")
        itemsize = torch.empty(0, dtype=_ST_DTYPES[dtype]).element_size() if dtype in _ST_DTYPES else None
        numel = 1
        for d in shape:
            numel *= d
        if itemsize is not None and end - start != numel * itemsize:
            raise CheckpointError(f"{source}: corrupt safetensors: tensor {name!r} has {end - start} bytes "
                                  f"for shape {shape} of {dtype}")
    return header


# quant_method -> fn(hf_config dict, hf tensors, dtype, source) -> plain hf tensors
_DEQUANTIZERS: dict = {}
SCALE_SUFFIXES = (".weight_scale_inv",)


def register_dequantizer(quant_method: str, fn) -> None:
    """Let ``load_pretrained`` / ``load_hf_tensors`` read checkpoints quantized with ``quant_method``."""
    _DEQUANTIZERS[quant_method] = fn


def read_config_dict(uri: str) -> dict:
    path = storage.join(uri, "config.json")
    try:
        raw = storage.read_bytes(path)
    except FileNotFoundError:
        raise CheckpointError(f"{uri}: no config.json — not a HF checkpoint folder, or it was not "
                              "completely written (config.json is written last)") from None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def read_config(uri: str) -> tuple[ModelConfig, dict]:
    """(the ModelConfig, the raw config.json dict) of the HF checkpoint at ``uri``."""
    hf_config = read_config_dict(uri)
    return ModelConfig.from_hf_dict(hf_config, source=storage.join(uri, "config.json")), hf_config


def _shard_files(uri: str) -> list[str]:
    index_uri = storage.join(uri, INDEX)
    if storage.exists(index_uri):
        try:
            weight_map = json.loads(storage.read_bytes(index_uri))["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index_uri}: corrupt index ({e})") from None
        files = sorted(set(weight_map.values()))
        for f in files:
            if not storage.exists(storage.join(uri, f)):
                raise CheckpointError(f"{index_uri} references shard {f!r}, which does not exist in {uri}")
        return files
    if storage.exists(storage.join(uri, SINGLE)):
        return [SINGLE]
    raise CheckpointError(f"{uri}: no {SINGLE} or {INDEX} found")


def load_hf_tensors(uri: str, cfg: ModelConfig, dtype: torch.dtype | None = None,
                    hf_config: dict | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a HF checkpoint (HF names), validated against ``cfg``; a quantized checkpoint
    is dequantized (to ``dtype``, default bfloat16) by its registered dequantizer. ``hf_config``:
    the config.json dict when the caller already read it."""
    hf_config = read_config_dict(uri) if hf_config is None else hf_config
    qc = hf_config.get("quantization_config")
    dequantize = None
    if qc:
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        dequantize = _DEQUANTIZERS.get(method)
        if dequantize is None:
            known = sorted(_DEQUANTIZERS) or ["none registered: import miles_lib.precision for 'fp8'"]
            raise CheckpointError(f"{uri}: config.json has quantization_config with quant_method={method!r}, "
                                  f"which has no dequantizer (known: {known}); dequantize the checkpoint first")
    blobs, shapes, origin = {}, {}, {}
    for f in _shard_files(uri):
        src = storage.join(uri, f)
        data = storage.read_bytes(src)
        header = parse_safetensors_header(data, src)
        for name, entry in header.items():
            if name in origin:
                raise CheckpointError(f"tensor {name!r} appears in both {origin[name]} and {src}")
            shapes[name], origin[name] = tuple(entry["shape"]), src
        blobs[src] = data
    if dequantize is not None:  # scales are checked against their weights by the dequantizer
        shapes = {n: sh for n, sh in shapes.items() if not n.endswith(SCALE_SUFFIXES)}
    validate_hf_tensors(cfg, shapes, uri)
    tensors: dict[str, torch.Tensor] = {}
    for src, data in blobs.items():
        try:
            tensors.update(st_load(data))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{src}: cannot decode safetensors ({e})") from None
    if dequantize is not None:
        tensors = dequantize(hf_config, tensors, dtype or torch.bfloat16, uri)
    return tensors


def load_pretrained(uri: str, dtype: torch.dtype | None = None, device=None):
    from miles_lib.model.layers import RotaryEmbedding
    from miles_lib.model.modeling import MoEForCausalLM

    cfg, hf_config = read_config(uri)
    tensors = load_hf_tensors(uri, cfg, dtype, hf_config)
    state = hf_to_internal(tensors, cfg)
    with torch.device("meta"):
        model = MoEForCausalLM(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)  # non-persistent buffer
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return model


def _write_folder(uri: str, files: dict[str, bytes]) -> None:
    """Write ``files`` as the folder ``uri`` atomically (config.json last on object stores)."""
    if storage.is_remote(uri):
        for name in sorted(files, key=lambda n: n == "config.json"):
            storage.atomic_write_bytes(storage.join(uri, name), files[name])
        return
    target = os.path.abspath(uri)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(target)}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        storage.swap_in_dir(tmp, target)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def hf_files(model, max_shard_bytes: int | None = None, tokenizer=None) -> dict[str, bytes]:
    """The files of a HF checkpoint of ``model`` as {name: bytes}."""
    cfg: ModelConfig = model.config
    tensors = internal_to_hf({k: v.detach().cpu() for k, v in model.state_dict().items()}, cfg)
    files: dict[str, bytes] = {}
    if max_shard_bytes is None:
        files[SINGLE] = st_save(tensors, metadata={"format": "pt"})
    else:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name in sorted(tensors):
            nbytes = tensors[name].numel() * tensors[name].element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = tensors[name]
            size += nbytes
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            files[fname] = st_save(shard, metadata={"format": "pt"})
            weight_map.update({n: fname for n in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        files[INDEX] = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2).encode()
    dtype = next(iter(tensors.values())).dtype
    hf_cfg = cfg.to_hf_dict()
    hf_cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    files["config.json"] = json.dumps(hf_cfg, indent=2).encode()
    gen = {k: v for k, v in (("bos_token_id", cfg.bos_token_id), ("eos_token_id", cfg.eos_token_id),
                             ("pad_token_id", cfg.pad_token_id)) if v is not None}
    files["generation_config.json"] = json.dumps(gen, indent=2).encode()
    if tokenizer is not None:
        files.update(tokenizer.files())
    return files


def save_pretrained(model, uri: str, max_shard_bytes: int | None = None, tokenizer=None) -> None:
    _write_folder(uri, hf_files(model, max_shard_bytes, tokenizer))
