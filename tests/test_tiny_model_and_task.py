"""The synthetic arithmetic task and the shipped tiny base model."""

import json
import os

import pytest
import torch

from miles_lib.data.arithmetic import ArithmeticTaskConfig, build_tokenizer, generate_problems
from miles_lib.data.rewards import math_reward
from miles_lib.errors import ConfigError
from miles_lib.model import MoEForCausalLM
from miles_lib.model.tokenizer import Tokenizer
from miles_lib.rollout import RolloutEngine, SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "examples", "tiny-moe")


def rows(name):
    return [json.loads(line) for line in open(os.path.join(ROOT, "examples", "data", name))]


def test_generator_is_seeded_and_respects_knobs():
    cfg = ArithmeticTaskConfig(min_digits=2, max_digits=2, ops=["-"], seed=5)
    a, b = generate_problems(cfg, 50), generate_problems(cfg, 50)
    assert a == b and a != generate_problems(ArithmeticTaskConfig(min_digits=2, max_digits=2, ops=["-"], seed=6), 50)
    for p in a:
        x, y = p["prompt"][2:].split("=")[0].split("-")
        assert 10 <= int(x) <= 99 and 10 <= int(y) <= 99 and int(p["label"]) == int(x) - int(y) >= 0
    with pytest.raises(ConfigError, match="max_digits"):
        ArithmeticTaskConfig(min_digits=3, max_digits=2)
    with pytest.raises(ConfigError, match="ops"):
        ArithmeticTaskConfig(ops=["*"])


def test_shipped_prompt_files_are_valid_and_disjoint():
    train, held = rows("train.jsonl"), rows("eval.jsonl")
    assert len(train) == 2000 and len(held) == 300
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    for r in train[:200] + held:
        expr = r["prompt"][2:].split("=")[0]
        assert str(eval(expr)) == r["label"]  # noqa: S307 - digits and +/- only


def test_shipped_model_loads_in_both_and_tokenizer_round_trips():
    from transformers import AutoModelForCausalLM

    ours = MoEForCausalLM.from_pretrained(TINY).eval()
    theirs = AutoModelForCausalLM.from_pretrained(TINY).eval()
    tok = Tokenizer.from_pretrained(TINY)
    assert tok.vocab_size == build_tokenizer().vocab_size and tok.eos_token_id == ours.config.eos_token_id
    p = rows("eval.jsonl")[0]["prompt"]
    ids = tok.encode(p)
    assert tok.decode(ids) == p
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (ours(x).logits - theirs(x).logits).abs().max() <= 1e-4
    assert all(d % 128 == 0 for d in (ours.config.hidden_size, ours.config.moe_intermediate_size,
                                      ours.config.num_attention_heads * ours.config.head_dim,
                                      ours.config.num_key_value_heads * ours.config.head_dim))


def test_shipped_model_has_partial_skill():
    model = MoEForCausalLM.from_pretrained(TINY).eval()
    tok = Tokenizer.from_pretrained(TINY)
    held = rows("eval.jsonl")[:100]
    out = RolloutEngine(model).generate([tok.encode(r["prompt"]) for r in held],
                                        SamplingParams(temperature=0.0, max_new_tokens=6, stop_token_ids=tok.stop_token_ids))
    acc = sum(math_reward(tok.decode(s.response_tokens), r["label"]) for s, r in zip(out, held)) / len(held)
    documented = json.load(open(os.path.join(TINY, "base_eval.json")))["greedy_acc"]
    assert 0.15 <= acc <= 0.5 and 0.15 <= documented <= 0.5
