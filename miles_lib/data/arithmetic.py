"""Synthetic, verifiable arithmetic task: prompt "Q:347+85=?\\nA:", label "432".

The model's expected response is the bare answer followed by <eos> ("432<eos>", no space), so a
rollout is a handful of tokens; the "math" reward compares the last number of the response to the
label.

Seeded and deterministic: the same ``ArithmeticTaskConfig`` and ``n`` give the same problems on any
machine (Python's ``random.Random(seed)``). Difficulty knobs: operand digit counts, operations,
whether subtraction may go negative. Sampling rule per problem: op ~ uniform(ops); for each operand
a digit count d ~ uniform[min_digits, max_digits], then the operand ~ uniform over the d-digit
integers ([0, 9] for d = 1, [10^(d-1), 10^d - 1] otherwise); with allow_negative=False the operands
of a subtraction are swapped when b > a, so a - b >= 0.
"""

from __future__ import annotations

import dataclasses
import json
import random

from miles_lib.config import ConfigBase, check

PROMPT_TEMPLATE = "Q:{a}{op}{b}=?\nA:"
CHARSET = "0123456789+-=?:QA\n"
SPECIAL_TOKENS = ("<pad>", "<eos>")  # ids 0 and 1
UNK_TOKEN = "<unk>"  # id 2 + len(CHARSET); any character outside CHARSET encodes to it


@dataclasses.dataclass
class ArithmeticTaskConfig(ConfigBase):
    """What problems ``generate_problems`` draws (see the module docstring for the sampling rule)."""

    min_digits: int = 1  # fewest digits of an operand (1 includes 0..9)
    max_digits: int = 3  # most digits of an operand, <= 9
    ops: list[str] = dataclasses.field(default_factory=lambda: ["+", "-"])  # drawn uniformly
    allow_negative: bool = False  # False: a - b is generated with a >= b
    seed: int = 0  # random.Random(seed): same config + n -> same problems

    def __post_init__(self) -> None:
        s = "ArithmeticTaskConfig"
        check(_is_int(self.min_digits) and self.min_digits >= 1, s, "min_digits", self.min_digits,
              "an integer >= 1")
        check(_is_int(self.max_digits) and self.min_digits <= self.max_digits <= 9, s, "max_digits",
              self.max_digits, f"an integer in [min_digits={self.min_digits}, 9]")
        check(isinstance(self.ops, (list, tuple)) and bool(self.ops) and set(self.ops) <= {"+", "-"}, s,
              "ops", self.ops, "a non-empty list drawn from ['+', '-']")
        check(isinstance(self.allow_negative, bool), s, "allow_negative", self.allow_negative, "true or false")
        check(_is_int(self.seed), s, "seed", self.seed, "an integer")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


def make_problem(a: int, op: str, b: int) -> dict:
    answer = a + b if op == "+" else a - b
    return {"prompt": PROMPT_TEMPLATE.format(a=a, op=op, b=b), "label": str(answer)}


def generate_problems(cfg: ArithmeticTaskConfig, n: int, exclude: set[str] | None = None) -> list[dict]:
    """``n`` distinct problems ``{"prompt", "label"}``, none of whose prompts is in ``exclude``.

    Raises ValueError when the config cannot supply ``n`` distinct new prompts (the digit range is too
    narrow for ``n`` after ``exclude``).
    """
    if not _is_int(n) or n < 0:
        raise ValueError(f"generate_problems: n={n!r} must be an integer >= 0")
    rng = random.Random(cfg.seed)
    seen = set(exclude or ())
    out: list[dict] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct problems from {cfg} (got {len(out)} after "
                             f"{attempts - 1} draws); widen the digit range or ask for fewer")
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
    """Character-level tokenizer for the task: <pad>=0, <eos>=1, CHARSET at 2..19, <unk>=20.

    Every character is its own token (the pre-tokenizer splits between all characters). <unk> is a
    plain (not special) token, so a prompt with a character outside CHARSET (a space, say) decodes
    visibly as "...<unk>..." instead of silently losing the character.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from miles_lib.model.tokenizer import Tokenizer

    names = [*SPECIAL_TOKENS, *CHARSET, UNK_TOKEN]
    tok = HFTokenizer(models.WordLevel({t: i for i, t in enumerate(names)}, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return Tokenizer(tok, eos_token="<eos>", pad_token="<pad>")
