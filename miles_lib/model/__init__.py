"""The decoder model (HF Qwen3-MoE / Qwen3 / Llama layouts), its config and HF checkpoint I/O."""

from miles_lib.model.config import ModelConfig
from miles_lib.model.modeling import MoEForCausalLM, ModelOutput

__all__ = ["ModelConfig", "MoEForCausalLM", "ModelOutput"]
