"""HF checkpoint I/O errors, training-checkpoint round trip and integrity."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from miles_lib.checkpoint import (convert_hf_to_training, convert_training_to_hf, latest_good_checkpoint,
                                  load_training_checkpoint, save_training_checkpoint)
from miles_lib.errors import CheckpointError
from miles_lib.model import MoEForCausalLM

CFG = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2)


@pytest.fixture
def hf_dir(tmp_path):
    d = tmp_path / "hf"
    Qwen3MoeForCausalLM(Qwen3MoeConfig(**CFG)).save_pretrained(d)
    return d


def test_hf_to_training_to_hf_is_bit_exact(hf_dir, tmp_path):
    convert_hf_to_training(str(hf_dir), str(tmp_path / "ckpt"))
    convert_training_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "back"))
    a, b = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k
    assert (hf_dir / "config.json").read_bytes() == (tmp_path / "back" / "config.json").read_bytes()
    assert (hf_dir / "generation_config.json").read_bytes() == (tmp_path / "back" / "generation_config.json").read_bytes()


def _corrupt(path, fn):
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(fn(data)))


def test_bad_checkpoints_name_the_file_and_tensor(hf_dir, tmp_path):
    st = hf_dir / "model.safetensors"
    tensors = load_file(st)
    cfg = json.loads((hf_dir / "config.json").read_text())

    # unknown model_type
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="unsupported model_type 'gpt2'"):
        MoEForCausalLM.from_pretrained(str(hf_dir))
    (hf_dir / "config.json").write_text(json.dumps(cfg))

    # missing and unexpected tensors are listed
    t2 = dict(tensors)
    t2.pop("model.layers.1.mlp.experts.3.up_proj.weight")
    t2["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(t2, st)
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\).*experts\.3\.up_proj.*unexpected.*extra\.weight"):
        MoEForCausalLM.from_pretrained(str(hf_dir))

    # shape mismatch: name, expected, got
    t3 = dict(tensors)
    t3["model.norm.weight"] = torch.ones(31)
    save_file(t3, st)
    with pytest.raises(CheckpointError, match=r"shape mismatch for model.norm.weight: expected \[32\], got \[31\]"):
        MoEForCausalLM.from_pretrained(str(hf_dir))

    # truncated file
    save_file(tensors, st)
    _corrupt(st, lambda d: d[: len(d) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        MoEForCausalLM.from_pretrained(str(hf_dir))

    # corrupt header
    save_file(tensors, st)
    _corrupt(st, lambda d: d[:8] + b"{not json" + d[17:])
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        MoEForCausalLM.from_pretrained(str(hf_dir))
    _corrupt(st, lambda d: struct.pack("<Q", 10**12) + d[8:])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated"):
        MoEForCausalLM.from_pretrained(str(hf_dir))

    # index pointing at a missing shard
    os.remove(st)
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="references shard 'model-00001-of-00002.safetensors'"):
        MoEForCausalLM.from_pretrained(str(hf_dir))

    # no config.json
    os.remove(hf_dir / "config.json")
    with pytest.raises(CheckpointError, match="no config.json"):
        MoEForCausalLM.from_pretrained(str(hf_dir))


def test_training_checkpoint_integrity(hf_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    convert_hf_to_training(str(hf_dir), str(ckpt))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    # tamper with one tensor's recorded checksum -> the loader names it
    name = "model.layers.0.mlp.experts.gate_up_proj"
    manifest["tensors"][name]["sha256"] = "0" * 64
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=f"checksum mismatch for tensor {name}"):
        load_training_checkpoint(str(ckpt))
    # corrupt a data file -> the loader names the file
    convert_hf_to_training(str(hf_dir), str(ckpt))
    shard = next((ckpt / "model").glob("*.distcp"))
    _corrupt(shard, lambda d: d[:100] + bytes([d[100] ^ 0xFF]) + d[101:])
    with pytest.raises(CheckpointError, match="checksum mismatch for file model/"):
        load_training_checkpoint(str(ckpt))
    # no manifest -> incomplete
    os.remove(ckpt / "manifest.json")
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        load_training_checkpoint(str(ckpt))
    assert latest_good_checkpoint(str(tmp_path)) is None


def test_crash_mid_write_leaves_nothing_loadable(hf_dir, tmp_path, monkeypatch):
    model = MoEForCausalLM.from_pretrained(str(hf_dir))
    import miles_lib.checkpoint.training as tr

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(tr, "_local_replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_training_checkpoint(str(tmp_path / "c"), model.state_dict(), model.config, step=1, extra={"x": 1})
    assert not (tmp_path / "c").exists()
    monkeypatch.undo()
    save_training_checkpoint(str(tmp_path / "c"), model.state_dict(), model.config, step=1, extra={"x": 1})
    good = load_training_checkpoint(str(tmp_path / "c"))
    assert good.step == 1 and good.extra == {"x": 1}
    assert latest_good_checkpoint(str(tmp_path)) == str(tmp_path / "c")
