"""Synthetic, verifiable arithmetic task: "Q:347+85=?\\nA:" -> "432".

Seeded and deterministic: the same ``ArithmeticTaskConfig`` and ``n`` give the same problems on any
machine (Python's ``random.Random(seed)``). Difficulty knobs: operand digit counts, operations,
whether subtraction may go negative.
"""

from __future__ import annotations

import dataclasses
import json
import random

from miles_lib.config import ConfigBase, check

PROMPT_TEMPLATE = "Q:{a}{op}{b}=?\nA:"
CHARSET = "0123456789+-=?:QA\n"


@dataclasses.dataclass
class ArithmeticTaskConfig(ConfigBase):
    min_digits: int = 1
    max_digits: int = 3
    ops: list[str] = dataclasses.field(default_factory=lambda: ["+", "-"])
    allow_negative: bool = False  # False: a - b is generated with a >= b
    seed: int = 0

    def __post_init__(self) -> None:
        s = "ArithmeticTaskConfig"
        check(isinstance(self.min_digits, int) and self.min_digits >= 1, s, "min_digits", self.min_digits, ">= 1")
        check(isinstance(self.max_digits, int) and self.min_digits <= self.max_digits <= 9, s, "max_digits",
              self.max_digits, f"in [min_digits={self.min_digits}, 9]")
        check(bool(self.ops) and set(self.ops) <= {"+", "-"}, s, "ops", self.ops, "a non-empty subset of ['+', '-']")


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


def make_problem(a: int, op: str, b: int) -> dict:
    answer = a + b if op == "+" else a - b
    return {"prompt": PROMPT_TEMPLATE.format(a=a, op=op, b=b), "label": str(answer)}


def generate_problems(cfg: ArithmeticTaskConfig, n: int, exclude: set[str] | None = None) -> list[dict]:
    """``n`` distinct problems (prompt, label), none of whose prompts is in ``exclude``."""
    rng = random.Random(cfg.seed)
    seen = set(exclude or ())
    out: list[dict] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct problems from {cfg}; widen the digit range")
        op = rng.choice(cfg.ops)
        a = _operand(rng, rng.randint(cfg.min_digits, cfg.max_digits))
        b = _operand(rng, rng.randint(cfg.min_digits, cfg.max_digits))
        if op == "-" and not cfg.allow_negative and b > a:
            a, b = b, a
        p = make_problem(a, op, b)
        if p["prompt"] in seen:
            continue
        seen.add(p["prompt"])
        out.append(p)
    return out


def write_jsonl(path: str, rows: list[dict]) -> None:
    """Write rows as JSON lines atomically (temp name + rename; any fsspec URI)."""
    from miles_lib.storage import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def build_tokenizer():
    """Character-level tokenizer for the task: <pad>=0, <eos>=1, then CHARSET."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from miles_lib.model.tokenizer import Tokenizer

    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARSET)}}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<pad>", "<eos>"])
    return Tokenizer(tok, eos_token="<eos>", pad_token="<pad>")
