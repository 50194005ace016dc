"""Shared builders for tests: a random tiny MoE and rollouts from it."""

from __future__ import annotations

import torch

from miles_lib.algorithms import AlgorithmConfig, compute_advantages
from miles_lib.model import ModelConfig, MoEForCausalLM
from miles_lib.rollout import RolloutEngine, SamplingParams
from miles_lib.train.batch import collate

TINY = dict(vocab_size=48, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, num_hidden_layers=2)


def tiny_model(seed: int = 0, std: float = 0.2, **overrides) -> MoEForCausalLM:
    return MoEForCausalLM(ModelConfig(**{**TINY, **overrides})).init_weights(seed, std)


def rollout(model, n_prompts=4, n_samples=4, max_new_tokens=6, temperature=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, model.config.vocab_size, (int(torch.randint(2, 6, (1,), generator=g)),),
                             generator=g).tolist() for _ in range(n_prompts)]
    ids, params, groups = [], [], []
    for p_i, p in enumerate(prompts):
        for j in range(n_samples):
            ids.append(p)
            groups.append(p_i)
            params.append(SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens,
                                         seed=seed * 1000 + p_i * 10 + j))
    samples = RolloutEngine(model).generate(ids, params, group_ids=groups)
    for s in samples:  # a reward that varies within groups: parity of the last token
        s.reward = float(s.tokens[-1] % 2)
    return samples


def batch_from(samples, algo: AlgorithmConfig | None = None):
    algo = algo or AlgorithmConfig()
    R = max(s.response_length for s in samples)
    mask = torch.zeros(len(samples), R)
    for i, s in enumerate(samples):
        mask[i, : s.response_length] = 1
    adv = compute_advantages(torch.tensor([s.reward for s in samples]),
                             torch.tensor([s.group_index for s in samples]), mask, algo)
    return collate(samples, adv)


def char_tokenizer():
    """The arithmetic task's character-level tokenizer (<pad>=0, <eos>=1)."""
    from miles_lib.data.arithmetic import build_tokenizer

    return build_tokenizer()


def write_prompts(path, n=64, seed=0):
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            f.write(json.dumps({"prompt": f"Q:{a}+{b}=?\nA:", "label": str(a + b)}) + "\n")
    return str(path)


def tiny_base_checkpoint(tmp_path, seed=0):
    """A random tiny MoE with the char tokenizer saved as a training checkpoint; returns its URI."""
    from miles_lib.checkpoint import save_training_checkpoint

    tok = char_tokenizer()
    model = tiny_model(seed=seed, std=0.1, vocab_size=32, max_position_embeddings=64)
    uri = str(tmp_path / "base")
    save_training_checkpoint(uri, model.state_dict(), model.config, step=0, tokenizer=tok)
    return uri
