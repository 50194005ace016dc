"""Reward functions: built-ins by name, custom ones by import path, one entry point to score Samples.

A reward spec is either a registered name (``REWARDS.names()``: "math", "exact_match") or an import
path ``"package.module:function"`` (attributes after the colon may be dotted: ``"pkg.mod:Cls.fn"``).

Two shapes, declared explicitly (no signature sniffing):
  per-sample (default)      fn(response: str, label, sample: Sample | None = None) -> float
  batched (@batched_reward) fn(responses: list[str], labels: list, samples: list[Sample] | None = None)
                                -> list[float]   (one value per sample, same order)
Either may be ``async def`` (or return any awaitable): per-sample coroutines of one call run
concurrently on one asyncio loop (at most ``max_concurrency`` at a time when given).

Event loops: ``compute_rewards`` is synchronous. When rewards are async it runs them on its own loop
(``asyncio.run``); when it is itself called from inside a running loop (a notebook, an async server)
it runs that private loop in a worker thread and blocks until it finishes — async callers should
``await compute_rewards_async(...)`` instead, which runs on the caller's loop.

Every returned value must be a real number convertible with ``float()`` and finite; anything else is
a RewardError naming the reward and the sample. An exception raised inside a reward function
propagates unchanged, with a note naming the reward and the sample.

Math verifier (``math``): the answer is the content of the last ``\\boxed{...}`` (nested braces
allowed; an unclosed last box counts as no box) and otherwise the last number in the response.
Answer and label are normalized — spaces, ``$``, LaTeX spacing (``\\,`` ``\\!``), ``\\text{}``,
``\\left``/``\\right``, thousands commas (``1,234``), a trailing period, a leading ``+`` and a trailing
``%`` removed; unicode minus ``−`` -> ``-``; ``\\frac{a}{b}`` -> ``a/b``; in a boxed answer ``x = 5``
-> ``5`` — then compared as exact rationals, |answer - label| <= 1e-6 (so "3/4" == "0.75"), falling
back to a case-insensitive compare of the normalized strings when either side is not a number.
Reward 1.0 if they match, else 0.0 (also when the response holds no number and no box).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import inspect
import math
import re
from collections.abc import Awaitable, Callable
from fractions import Fraction
from typing import Any

from miles_lib.algorithms.registry import Registry
from miles_lib.errors import ConfigError
from miles_lib.types import Sample

RewardFn = Callable[..., Any]
REWARDS: Registry[RewardFn] = Registry("reward")
MATH_TOLERANCE = Fraction(1, 10**6)


class RewardError(ValueError):
    """A reward function returned something that is not one finite number per sample."""


def batched_reward(fn: RewardFn) -> RewardFn:
    """Mark ``fn`` as batched: ``fn(responses, labels, samples=None) -> list[float]``."""
    fn.batched_reward = True
    return fn


def is_batched(fn: RewardFn) -> bool:
    return getattr(fn, "batched_reward", False) is True


# -- resolution ----------------------------------------------------------------------------------

def _import_path(spec: str) -> RewardFn:
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise ConfigError(f"reward {spec!r}: an import path must look like 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):  # the module itself (or its package) is absent
            raise ConfigError(f"reward {spec!r}: module {module_name!r} not found ({e}); is it installed "
                              "or on sys.path / PYTHONPATH?") from None
        raise ConfigError(f"reward {spec!r}: importing module {module_name!r} failed: "
                          f"{type(e).__name__}: {e}") from e
    except Exception as e:
        raise ConfigError(f"reward {spec!r}: importing module {module_name!r} failed: "
                          f"{type(e).__name__}: {e}") from e
    where = module_name
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"reward {spec!r}: {where!r} has no attribute {part!r}")
        obj, where = getattr(obj, part), f"{where}.{part}"
    if not callable(obj):
        raise ConfigError(f"reward {spec!r}: {where!r} is a {type(obj).__name__}, not callable")
    return obj


def resolve_reward(spec: str) -> RewardFn:
    """The reward function for a registered name or a ``"package.module:function"`` path."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"reward {spec!r}: expected a reward name {REWARDS.names()} "
                          "or an import path 'package.module:function'")
    if ":" in spec:
        return _import_path(spec.strip())
    if spec not in REWARDS:
        raise ConfigError(f"unknown reward {spec!r}; valid names are {REWARDS.names()}, or an import path "
                          "'package.module:function' (module and function separated by ':')")
    return REWARDS.get(spec)


# -- scoring -------------------------------------------------------------------------------------

def _where(samples: list[Sample], i: int) -> str:
    return f"samples[{i}] (Sample.index={samples[i].index})"


def _start(fn: RewardFn, spec: str, samples: list[Sample]) -> Any:
    """Call the reward: a list (per-sample values or awaitables) or one batched result/awaitable."""
    if is_batched(fn):
        try:
            return fn([s.response for s in samples], [s.label for s in samples], samples)
        except Exception as e:
            e.add_note(f"in batched reward {spec!r} over {len(samples)} samples")
            raise
    out: list[Any] = []
    for i, s in enumerate(samples):
        try:
            out.append(fn(s.response, s.label, s))
        except Exception as e:
            for pending in out:  # do not leak never-awaited coroutines
                if inspect.iscoroutine(pending):
                    pending.close()
            e.add_note(f"in reward {spec!r} on {_where(samples, i)}")
            raise
    return out


def _needs_loop(raw: Any) -> bool:
    return inspect.isawaitable(raw) or (isinstance(raw, list) and any(inspect.isawaitable(v) for v in raw))


async def _finish(raw: Any, spec: str, samples: list[Sample], max_concurrency: int | None) -> Any:
    """Await a batched awaitable, or the per-sample awaitables concurrently."""
    if inspect.isawaitable(raw):
        try:
            return await raw
        except Exception as e:
            e.add_note(f"in batched reward {spec!r} over {len(samples)} samples")
            raise
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def one(i: int, v: Any) -> Any:
        if not inspect.isawaitable(v):
            return v
        try:
            if sem is None:
                return await v
            async with sem:
                return await v
        except Exception as e:
            e.add_note(f"in reward {spec!r} on {_where(samples, i)}")
            raise
        finally:
            if inspect.iscoroutine(v):  # cancelled while waiting for the semaphore: never started
                v.close()

    return list(await asyncio.gather(*(one(i, v) for i, v in enumerate(raw))))


def _run_sync(coro: Awaitable[Any]) -> Any:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # Called from inside a running loop: run a private loop in a worker thread (blocks this caller).
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rewards") as pool:
        return pool.submit(asyncio.run, coro).result()


def _to_reward(value: Any, spec: str, samples: list[Sample], i: int) -> float:
    bad = f"reward {spec!r} returned {value!r} for {_where(samples, i)}"
    if isinstance(value, (str, bytes)) or not hasattr(type(value), "__float__"):
        raise RewardError(f"{bad}: not a number (a reward must be a finite float)")
    try:
        r = float(value)
    except (TypeError, ValueError) as e:
        raise RewardError(f"{bad}: not convertible to float ({e})") from None
    if not math.isfinite(r):
        raise RewardError(f"{bad}: not finite (a reward must be a finite float)")
    return r


def _assign(raw: Any, fn: RewardFn, spec: str, samples: list[Sample]) -> list[float]:
    if is_batched(fn):
        if isinstance(raw, (str, bytes, dict)) or not hasattr(raw, "__len__") or not hasattr(raw, "__iter__"):
            raise RewardError(f"batched reward {spec!r} returned a {type(raw).__name__}; "
                              f"expected a list of {len(samples)} floats")
        raw = list(raw)
        if len(raw) != len(samples):
            raise RewardError(f"batched reward {spec!r} returned {len(raw)} values for {len(samples)} samples")
    rewards = [_to_reward(v, spec, samples, i) for i, v in enumerate(raw)]
    for s, r in zip(samples, rewards):
        s.reward = r
    return rewards


def compute_rewards(samples: list[Sample], reward_spec: str,
                    max_concurrency: int | None = None) -> list[float]:
    """Score ``samples`` with the reward ``reward_spec``; sets ``sample.reward`` and returns the rewards.

    ``max_concurrency`` caps how many per-sample async rewards are awaited at once (None = all).
    """
    fn = resolve_reward(reward_spec)
    if not samples:
        return []
    raw = _start(fn, reward_spec, samples)
    if _needs_loop(raw):
        raw = _run_sync(_finish(raw, reward_spec, samples, max_concurrency))
    return _assign(raw, fn, reward_spec, samples)


async def compute_rewards_async(samples: list[Sample], reward_spec: str,
                                max_concurrency: int | None = None) -> list[float]:
    """``compute_rewards`` on the caller's running event loop (for async callers)."""
    fn = resolve_reward(reward_spec)
    if not samples:
        return []
    raw = _start(fn, reward_spec, samples)
    if _needs_loop(raw):
        raw = await _finish(raw, reward_spec, samples, max_concurrency)
    return _assign(raw, fn, reward_spec, samples)


# -- built-in rewards ----------------------------------------------------------------------------

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
# A number: optional sign (not when it follows a word/closing bracket, so "5-3" yields 3, not -3),
# thousands-grouped or plain digits, optional decimals, optional "/denominator".
_NUMBER = re.compile(r"(?:(?<![\w)\]])[-+−])?"
                     r"(?:\d{1,3}(?:,\d{3})+(?!\d|,\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
                     r"(?:/\d+(?:\.\d+)?)?")
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces balanced), None if absent or unclosed."""
    opens = list(_BOX_OPEN.finditer(text))
    if not opens:
        return None
    start = opens[-1].end()
    depth = 1
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return None


def last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def extract_answer(response: str) -> str | None:
    """The final answer of a response: last boxed content, else last number, else None."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed.rsplit("=", 1)[-1]  # "x = 5" -> " 5"
    return last_number(response)


def normalize_answer(s: str) -> str:
    s = s.replace("−", "-").replace("\\left", "").replace("\\right", "")
    for token in ("\\!", "\\,", "\\;", "\\:", "\\ ", "\\$", "$", "\\%"):
        s = s.replace(token, "")
    s = _TEXT.sub(r"\1", s)
    s = _FRAC.sub(lambda m: f"{m[1]}/{m[2]}" if _is_plain_number(m[1]) and _is_plain_number(m[2])
                  else f"({m[1]})/({m[2]})", s)
    s = "".join(s.split())
    s = _THOUSANDS.sub("", s)
    s = s.rstrip(".").rstrip("%").removeprefix("+")
    return s


def _is_plain_number(s: str) -> bool:
    return re.fullmatch(r"\s*-?\d+(?:\.\d+)?\s*", s) is not None


def to_number(s: str) -> Fraction | None:
    """Exact rational value of a normalized answer ("-3", "0.75", "3/4", "1.5/2"), None if not one."""
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            d = Fraction(den)
            return Fraction(num) / d if d != 0 else None
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _label_answer(label: Any) -> str:
    if isinstance(label, str):
        boxed = last_boxed(label)
        return boxed if boxed is not None else label
    return str(label)  # ints, floats, numpy scalars: str() keeps the decimal the user wrote


def answers_match(answer: str, label: Any) -> bool:
    a, g = normalize_answer(answer), normalize_answer(_label_answer(label))
    a_num, g_num = to_number(a), to_number(g)
    if a_num is not None and g_num is not None:
        return abs(a_num - g_num) <= MATH_TOLERANCE
    return a.casefold() == g.casefold()


@REWARDS.register("math")
def math_reward(response: str, label: Any, sample: Sample | None = None) -> float:
    """1.0 if the response's final answer (last boxed, else last number) equals the label, else 0.0."""
    if label is None:
        raise ValueError("the 'math' reward needs a label (the sample's label is None)")
    answer = extract_answer(response)
    return 1.0 if answer is not None and answers_match(answer, label) else 0.0


@REWARDS.register("exact_match")
def exact_match_reward(response: str, label: Any, sample: Sample | None = None) -> float:
    """1.0 if ``response.strip() == str(label).strip()``, else 0.0."""
    if label is None:
        raise ValueError("the 'exact_match' reward needs a label (the sample's label is None)")
    return 1.0 if response.strip() == str(label).strip() else 0.0
