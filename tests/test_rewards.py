"""Reward functions: math verifier, exact match, custom rewards by import path, value validation."""

import asyncio
import importlib
import sys
import textwrap
import uuid

import pytest

from miles_lib.data.rewards import (
    REWARDS,
    RewardError,
    compute_rewards,
    compute_rewards_async,
    extract_answer,
    math_reward,
    resolve_reward,
)
from miles_lib.errors import ConfigError
from miles_lib.types import Sample


def samples_of(pairs, **meta):
    return [Sample(index=10 + i, response=r, label=l, metadata=dict(meta)) for i, (r, l) in enumerate(pairs)]


# -- math verifier -----------------------------------------------------------------------------

@pytest.mark.parametrize("response,label,expected", [
    (r"so the result is \boxed{42}.", 42, 1.0),
    (r"\boxed{41}", 42, 0.0),
    (r"\boxed{\frac{3}{4}}", "0.75", 1.0),  # nested braces inside the box
    (r"\boxed{2^{10}}", "2^{10}", 1.0),  # non-numeric: normalized string compare
    (r"first \boxed{1}, finally \boxed{ 7 }", 7, 1.0),  # the last box wins
    (r"\boxed{42} because 6 times 7 is 42, not 40", 42, 1.0),  # box beats later numbers
    (r"\boxed{x = 5}", 5, 1.0),
    (r"\boxed{\$1,000}", 1000, 1.0),
    ("The answer is 1,234.", 1234, 1.0),
    ("The answer is 1,234.", "1,234", 1.0),
    ("The answer is 1234", "1,234", 1.0),
    ("-5", -5, 1.0),
    ("−5", -5, 1.0),  # unicode minus
    ("x = −5", "-5", 1.0),
    ("+7", "7", 1.0),
    ("$12", "12", 1.0),
    ("7.0", 7, 1.0),
    ("3/4", "0.75", 1.0),
    ("0.75", "3/4", 1.0),
    ("0.3333333", "1/3", 1.0),  # within 1e-6
    ("0.333", "1/3", 0.0),
    ("1234567", 1234568, 0.0),  # tolerance is absolute, not relative
    ("10-7=3", 3, 1.0),  # '-' after a digit is not a sign
    ("no number here", 5, 0.0),
    ("", 0, 0.0),
    ("42 is the answer, hope that helps!", 42, 1.0),  # trailing text
    ("I get 12, or maybe 13 apples", 12, 0.0),  # the last number counts
    ("answer: 5", r"\boxed{5}", 1.0),  # boxed label
    (r"\boxed{A}", "a", 1.0),  # case-insensitive string fallback
    (r"\boxed{4", 4, 1.0),  # unclosed box -> last number
    ("50%", 50, 1.0),
])
def test_math_reward(response, label, expected):
    assert math_reward(response, label) == expected


def test_extract_answer():
    assert extract_answer(r"\boxed{\frac{1}{\sqrt{2}}} done 3") == r"\frac{1}{\sqrt{2}}"
    assert extract_answer("it is 1,234.") == "1,234"
    assert extract_answer("(−3) then") == "−3"
    assert extract_answer("nothing") is None


def test_exact_match_and_registry():
    ss = samples_of([("  Paris \n", "Paris"), ("paris", "Paris"), ("4", 4)])
    assert compute_rewards(ss, "exact_match") == [1.0, 0.0, 1.0]
    assert [s.reward for s in ss] == [1.0, 0.0, 1.0]
    assert {"math", "exact_match"} <= set(REWARDS.names())


def test_compute_rewards_math_sets_rewards():
    ss = samples_of([(r"\boxed{3}", 3), ("I think 4", 3)])
    assert compute_rewards(ss, "math") == [1.0, 0.0]
    assert [s.reward for s in ss] == [1.0, 0.0]
    assert compute_rewards([], "math") == []


def test_missing_label_names_reward_and_sample():
    ss = samples_of([("1", 1), ("2", None)])
    with pytest.raises(ValueError, match="needs a label") as e:
        compute_rewards(ss, "math")
    assert "in reward 'math' on samples[1] (Sample.index=11)" in e.value.__notes__


# -- custom rewards by import path --------------------------------------------------------------

MODULE = '''
import asyncio
from miles_lib.data.rewards import batched_reward

NOT_CALLABLE = 3
calls = []

def length(response, label, sample=None):
    return len(response) + sample.metadata["bonus"]

async def async_match(response, label, sample=None):
    await asyncio.sleep(0)
    return 1.0 if response == label else 0.0

arrived = []

async def needs_concurrency(response, label, sample=None):
    # Returns only once all 3 samples' coroutines have started: deadlock-free only if concurrent.
    arrived.append(sample.index)
    for _ in range(100):
        if len(arrived) >= 3:
            return float(len(arrived))
        await asyncio.sleep(0)
    raise RuntimeError("rewards did not run concurrently")

@batched_reward
def batched_match(responses, labels, samples=None):
    calls.append(len(responses))
    return [float(r == str(l)) for r, l in zip(responses, labels)]

@batched_reward
async def batched_async(responses, labels, samples=None):
    await asyncio.sleep(0)
    return [float(s.index) for s in samples]

@batched_reward
def batched_short(responses, labels, samples=None):
    return [1.0]

@batched_reward
def batched_scalar(responses, labels, samples=None):
    return 1.0

def nan(response, label, sample=None):
    return float("nan") if sample.index == 11 else 0.0

def inf(response, label, sample=None):
    return float("-inf")

def text(response, label, sample=None):
    return "1.0"

def none(response, label, sample=None):
    return None

async def async_raises(response, label, sample=None):
    raise KeyError("boom")

class Scorer:
    @staticmethod
    def score(response, label, sample=None):
        return 0.5
'''


@pytest.fixture
def mod(tmp_path, monkeypatch):
    """A fresh reward module on sys.path; yields its import name."""
    name = f"user_rewards_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(MODULE))
    (tmp_path / f"{name}_broken.py").write_text("import not_a_real_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_custom_sync_reward_gets_sample(mod):
    ss = samples_of([("abc", None), ("abcdef", None)], bonus=0.5)
    assert compute_rewards(ss, f"{mod}:length") == [3.5, 6.5]
    assert compute_rewards(ss[:1], f"{mod}:Scorer.score") == [0.5]


def test_custom_async_reward(mod):
    ss = samples_of([("a", "a"), ("b", "c"), ("c", "c")])
    assert compute_rewards(ss, f"{mod}:async_match") == [1.0, 0.0, 1.0]


def test_async_rewards_run_concurrently(mod):
    ss = samples_of([("a", 1), ("b", 1), ("c", 1)])
    assert compute_rewards(ss, f"{mod}:needs_concurrency") == [3.0, 3.0, 3.0]


def test_max_concurrency_limits_async_rewards(mod):
    ss = samples_of([("a", 1), ("b", 1), ("c", 1)])
    with pytest.raises(RuntimeError, match="did not run concurrently") as e:
        compute_rewards(ss, f"{mod}:needs_concurrency", max_concurrency=1)
    assert f"in reward '{mod}:needs_concurrency' on samples[0] (Sample.index=10)" in e.value.__notes__


def test_custom_batched_rewards(mod):
    ss = samples_of([("1", 1), ("2", 3), ("3", 3)])
    assert compute_rewards(ss, f"{mod}:batched_match") == [1.0, 0.0, 1.0]
    assert importlib.import_module(mod).calls == [3]  # one call for the whole batch
    assert compute_rewards(ss, f"{mod}:batched_async") == [10.0, 11.0, 12.0]


def test_called_inside_running_loop(mod):
    ss = samples_of([("a", "a"), ("b", "c")])

    async def main():
        inside = compute_rewards(ss, f"{mod}:async_match")  # private loop in a worker thread
        awaited = await compute_rewards_async(ss, f"{mod}:async_match")
        return inside, awaited

    assert asyncio.run(main()) == ([1.0, 0.0], [1.0, 0.0])


def test_async_exception_carries_note(mod):
    with pytest.raises(KeyError, match="boom") as e:
        compute_rewards(samples_of([("a", 1)]), f"{mod}:async_raises")
    assert e.value.__notes__ == [f"in reward '{mod}:async_raises' on samples[0] (Sample.index=10)"]


@pytest.mark.parametrize("fn,message", [
    ("nan", r"returned nan for samples\[1\] \(Sample.index=11\): not finite"),
    ("inf", r"returned -inf for samples\[0\] \(Sample.index=10\): not finite"),
    ("text", r"returned '1.0' for samples\[0\] \(Sample.index=10\): not a number"),
    ("none", r"returned None for samples\[0\] \(Sample.index=10\): not a number"),
    ("batched_short", r"returned 1 values for 2 samples"),
    ("batched_scalar", r"returned a float; expected a list of 2 floats"),
])
def test_bad_reward_values_rejected(mod, fn, message):
    ss = samples_of([("a", 1), ("b", 1)])
    with pytest.raises(RewardError, match=rf"reward '{mod}:{fn}' {message}"):
        compute_rewards(ss, f"{mod}:{fn}")
    assert [s.reward for s in ss] == [None, None]  # nothing half-assigned


@pytest.mark.parametrize("spec,message", [
    ("no_such_module_xyz:fn", r"module 'no_such_module_xyz' not found .*sys.path"),
    ("no_such_pkg_xyz.sub:fn", r"module 'no_such_pkg_xyz.sub' not found"),
    ("{mod}:missing", r"'{mod}' has no attribute 'missing'"),
    ("{mod}:Scorer.missing", r"'{mod}.Scorer' has no attribute 'missing'"),
    ("{mod}:NOT_CALLABLE", r"'{mod}.NOT_CALLABLE' is a int, not callable"),
    ("{mod}:", r"must look like 'package.module:function'"),
    (":fn", r"must look like 'package.module:function'"),
    ("{mod}_broken:fn", r"importing module '{mod}_broken' failed: ModuleNotFoundError: .*not_a_real_dependency_xyz"),
    ("mathh", r"unknown reward 'mathh'; valid names are \['exact_match', 'math'"),
    ("{mod}.length", r"unknown reward .* separated by ':'"),
    ("", r"expected a reward name"),
])
def test_unresolvable_reward_specs(mod, spec, message):
    spec, message = spec.format(mod=mod), message.format(mod=mod)
    with pytest.raises(ConfigError, match=message):
        resolve_reward(spec)
