"""The arithmetic task generator, its tokenizer, and the shipped prompt files it produced.

(Basic seeding / knob / shipped-file checks live in test_tiny_model_and_task.py; these add the
knobs' edges, the tokenizer, atomic jsonl writing, and "the shipped files are what the code makes".)
"""

import importlib.util
import json
import os
import re

import pytest

from miles_lib.data.arithmetic import (
    CHARSET,
    ArithmeticTaskConfig,
    build_tokenizer,
    generate_problems,
    make_problem,
    write_jsonl,
)
from miles_lib.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT_RE = re.compile(r"Q:(\d+)([+-])(\d+)=\?\nA:")


def parse(prompt):
    a, op, b = PROMPT_RE.fullmatch(prompt).groups()
    return int(a), op, int(b)


def load_script():
    spec = importlib.util.spec_from_file_location("make_tiny_model", os.path.join(ROOT, "examples", "make_tiny_model.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_seed_zero_pinned():
    # random.Random(seed) is stable across machines and Python versions: these are the first draws
    assert generate_problems(ArithmeticTaskConfig(), 3) == [
        {"prompt": "Q:75-15=?\nA:", "label": "60"},
        {"prompt": "Q:55-48=?\nA:", "label": "7"},
        {"prompt": "Q:242+27=?\nA:", "label": "269"},
    ]
    assert make_problem(3, "-", 5) == {"prompt": "Q:3-5=?\nA:", "label": "-2"}


def test_digit_knobs_cover_their_whole_range():
    ones = [parse(p["prompt"]) for p in generate_problems(ArithmeticTaskConfig(max_digits=1, ops=["+"]), 100)]
    assert {a for a, _, _ in ones} | {b for _, _, b in ones} == set(range(10))  # 1 digit includes 0
    assert len(ones) == 100  # all 10 x 10 sums, each once
    mixed = [parse(p["prompt"]) for p in generate_problems(ArithmeticTaskConfig(min_digits=2, max_digits=4), 400)]
    assert {len(str(x)) for a, _, b in mixed for x in (a, b)} == {2, 3, 4}
    assert {op for _, op, _ in mixed} == {"+", "-"}
    three = [parse(p["prompt"]) for p in generate_problems(ArithmeticTaskConfig(min_digits=3, max_digits=3), 200)]
    assert all(100 <= x <= 999 for a, _, b in three for x in (a, b))


def test_allow_negative_and_labels_exact():
    for allow in (False, True):
        probs = generate_problems(ArithmeticTaskConfig(ops=["-"], allow_negative=allow, seed=3), 300)
        answers = []
        for p in probs:
            a, op, b = parse(p["prompt"])
            assert op == "-" and p["label"] == str(a - b)
            answers.append(a - b)
        assert (min(answers) < 0) == allow


def test_exclude_and_exhaustion():
    cfg = ArithmeticTaskConfig(max_digits=1, ops=["+"])
    first = generate_problems(cfg, 60)
    rest = generate_problems(cfg, 40, exclude={p["prompt"] for p in first})
    assert not {p["prompt"] for p in first} & {p["prompt"] for p in rest}
    with pytest.raises(ValueError, match="widen the digit range"):
        generate_problems(cfg, 41, exclude={p["prompt"] for p in first})  # only 100 one-digit sums exist
    with pytest.raises(ValueError, match="n=-1"):
        generate_problems(cfg, -1)


@pytest.mark.parametrize("kwargs, field", [
    ({"min_digits": 0}, "min_digits"), ({"max_digits": 10}, "max_digits"), ({"ops": []}, "ops"),
    ({"ops": "+"}, "ops"), ({"allow_negative": "yes"}, "allow_negative"), ({"seed": 1.5}, "seed"),
])
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ConfigError, match=f"ArithmeticTaskConfig.{field}="):
        ArithmeticTaskConfig(**kwargs)


def test_config_from_dict_rejects_unknown_keys():
    assert ArithmeticTaskConfig.from_dict({"max_digits": 2, "seed": 4}) == ArithmeticTaskConfig(max_digits=2, seed=4)
    with pytest.raises(ConfigError, match="max_digit"):
        ArithmeticTaskConfig.from_dict({"max_digit": 2})


def test_write_jsonl_round_trips_and_replaces_atomically(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("old\n")
    rows = generate_problems(ArithmeticTaskConfig(seed=9), 5)
    write_jsonl(str(path), rows)
    assert read_jsonl(path) == rows and os.listdir(tmp_path) == ["p.jsonl"]  # no temp file left behind


def test_tokenizer_is_one_token_per_character():
    tok = build_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.vocab_size) == (0, 1, 2 + len(CHARSET) + 1)
    ids = tok.encode(CHARSET)
    assert ids == list(range(2, 2 + len(CHARSET))) and tok.decode(ids) == CHARSET
    assert tok.decode(tok.encode("432") + [tok.eos_token_id]) == "432"
    # a character outside the task's alphabet is visible, not silently dropped or mapped to <pad>
    assert tok.encode("1 2") == [3, 20, 4] and tok.decode(tok.encode("1 2")) == "1<unk>2"


def test_shipped_files_are_what_the_code_makes():
    script = load_script()
    eval_rows, rl_rows, sft_rows = script.prompt_sets(seed=0)
    assert read_jsonl(os.path.join(ROOT, "examples", "data", "eval.jsonl")) == eval_rows
    assert read_jsonl(os.path.join(ROOT, "examples", "data", "train.jsonl")) == rl_rows
    # the SFT set the base model was trained on never contains an RL or eval prompt
    held = {r["prompt"] for r in eval_rows + rl_rows}
    assert len(sft_rows) == 30000 and not held & {r["prompt"] for r in sft_rows}
    with open(os.path.join(ROOT, "examples", "tiny-moe", "tokenizer.json")) as f:
        assert json.loads(f.read()) == json.loads(build_tokenizer().tok.to_str())
