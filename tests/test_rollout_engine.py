import shutil
import threading

import pytest
import torch

from miles_lib.rollout import RolloutEngine, SamplingParams
from miles_lib.types import Status
from tests.helpers_tiny import tiny_model

PROMPT_LENS = [3, 7, 5, 2, 9, 4, 6, 8]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0, std=0.2).eval()


@pytest.fixture(scope="module")
def prompts(model):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENS]


def teacher_forced(model, s, temperature=1.0):
    t = torch.tensor(s.tokens)[None]
    with torch.no_grad():
        out = model(t[:, :-1], return_routing=True)
    logits = out.logits.float() / temperature
    lp = logits.log_softmax(-1)[0, torch.arange(t.shape[1] - 1), t[0, 1:]]
    return lp[-s.response_length:], out.routed_experts[0].int()


def assert_aligned(model, samples, temperature=1.0):
    for s in samples:
        lp, routing = teacher_forced(model, s, temperature)
        assert len(s.rollout_log_probs) == s.response_length == len(s.weight_versions)
        assert (lp - torch.tensor(s.rollout_log_probs)).abs().max() <= 1e-5
        assert s.rollout_routed_experts.shape == (len(s.tokens) - 1, model.config.num_moe_layers, 2)
        assert torch.equal(routing, s.rollout_routed_experts)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10),
    SamplingParams(temperature=0.7, top_k=5, max_new_tokens=10),
    SamplingParams(temperature=0.0, max_new_tokens=10),
])
def test_logprobs_and_routing_match_teacher_forced_forward(model, prompts, params):
    reqs = [SamplingParams(**{**params.__dict__, "seed": 100 + i}) for i in range(len(prompts))]
    samples = RolloutEngine(model).generate(prompts, reqs)
    assert [s.prompt_tokens for s in samples] == prompts
    assert_aligned(model, samples, params.temperature if params.temperature > 0 else 1.0)
    assert all(s.status == Status.TRUNCATED and s.response_length == 10 for s in samples)


def test_results_do_not_depend_on_batch_composition(model, prompts):
    params = [SamplingParams(temperature=1.0, max_new_tokens=8, seed=7 + i) for i in range(len(prompts))]
    together = RolloutEngine(model).generate(prompts, params)
    for i in (0, 4):
        alone = RolloutEngine(model).generate([prompts[i]], [params[i]])[0]
        assert alone.tokens == together[i].tokens
        assert max(abs(a - b) for a, b in zip(alone.rollout_log_probs, together[i].rollout_log_probs)) <= 1e-5


def test_continuous_batching_with_few_slots_gives_same_results(model, prompts):
    params = [SamplingParams(temperature=1.0, max_new_tokens=6 + i, seed=i) for i in range(len(prompts))]
    wide = RolloutEngine(model).generate(prompts, params)
    narrow_engine = RolloutEngine(model, max_concurrent_seqs=3, prefill_batch=2)
    narrow = narrow_engine.generate(prompts, params)
    assert narrow_engine.max_concurrent_seqs == 3
    for a, b in zip(wide, narrow):
        assert a.tokens == b.tokens and a.response_length == b.response_length
    assert_aligned(model, narrow)


def test_same_seed_same_tokens_and_stop_tokens_complete(model, prompts):
    p = SamplingParams(temperature=1.0, max_new_tokens=12, seed=3)
    a = RolloutEngine(model).generate(prompts[:2], p)
    b = RolloutEngine(model, seed=99).generate(prompts[:2], p)
    assert [s.tokens for s in a] == [s.tokens for s in b]
    stop = a[0].response_tokens[2]
    c = RolloutEngine(model).generate(prompts[:1], SamplingParams(temperature=1.0, max_new_tokens=12, seed=3,
                                                                   stop_token_ids=[stop]))[0]
    assert c.status == Status.COMPLETED and c.response_tokens[-1] == stop
    assert c.response_length == a[0].response_tokens.index(stop) + 1


def test_partial_rollout_abort_and_resume_stays_aligned(model, prompts):
    engine = RolloutEngine(model, max_concurrent_seqs=4)
    params = [SamplingParams(temperature=1.0, max_new_tokens=12, seed=50 + i) for i in range(len(prompts))]
    steps = {"n": 0}
    forward = model.forward

    def counting_forward(*a, **kw):  # abort from "another thread" after a few model calls
        steps["n"] += 1
        if steps["n"] == 6:
            threading.Thread(target=engine.abort).start()
            threading.Event().wait(0.05)
        return forward(*a, **kw)

    model.forward = counting_forward
    try:
        partial = engine.generate(prompts, params)
    finally:
        del model.forward
    aborted = [s for s in partial if s.status == Status.ABORTED]
    assert aborted, "nothing was aborted"
    assert any(0 < s.response_length < 12 for s in aborted)
    assert_aligned(model, [s for s in partial if s.response_length > 0])
    # resume with new weights: the rest of every response carries the new version
    engine.mark_weights_updated(1)
    done = engine.generate_samples(partial, params)
    assert all(s.status == Status.TRUNCATED and s.response_length == 12 for s in done)
    assert_aligned(model, done)
    for s in aborted:
        k = len(s.weight_versions) - s.weight_versions.count(1)
        assert s.weight_versions == [0] * k + [1] * (12 - k)


def test_target_groups_stops_early_and_returns_the_rest(model, prompts):
    engine = RolloutEngine(model, max_concurrent_seqs=2, prefill_batch=2)
    params = [SamplingParams(temperature=1.0, max_new_tokens=4 + 2 * (i % 4), seed=i) for i in range(len(prompts))]
    out = engine.generate(prompts, params, group_ids=[i // 2 for i in range(len(prompts))], target_groups=2)
    finished_groups = {s.group_index for s in out if s.status == Status.TRUNCATED}
    by_group = {g: [s for s in out if s.group_index == g] for g in range(4)}
    complete = [g for g, ss in by_group.items() if all(s.status == Status.TRUNCATED for s in ss)]
    assert len(complete) >= 2 and any(s.status == Status.ABORTED for s in out)
    assert finished_groups


def test_update_weights_copies_in_place_and_bumps_version(model, prompts):
    other = tiny_model(seed=5, std=0.2).eval()
    engine_model = tiny_model(seed=0, std=0.2).eval()
    engine = RolloutEngine(engine_model)
    p = SamplingParams(temperature=0.0, max_new_tokens=5)
    before = engine.generate(prompts[:2], p)
    ptr = engine_model.lm_head.weight.data_ptr()
    engine.update_weights(list(other.state_dict().items()), version=3)
    assert engine_model.lm_head.weight.data_ptr() == ptr  # in place
    after = engine.generate(prompts[:2], p)
    assert all(v == 3 for s in after for v in s.weight_versions)
    assert [s.tokens for s in after] == [s.tokens for s in RolloutEngine(other).generate(prompts[:2], p)]
    assert [s.tokens for s in before] != [s.tokens for s in after]
    with pytest.raises(ValueError, match="unknown tensor"):
        engine.update_weights([("nope", torch.zeros(1))], 4)
    with pytest.raises(ValueError, match="shape"):
        engine.update_weights([("lm_head.weight", torch.zeros(2, 2))], 4)


@pytest.mark.parametrize("prompt,params,match", [
    ([], SamplingParams(), "empty prompt"),
    ([1] * 600, SamplingParams(), "context"),
    ([1, 999], SamplingParams(), "outside the vocabulary"),
    ([1, -1], SamplingParams(), "outside the vocabulary"),
    ([1, 2], SamplingParams(stop_token_ids=[1000]), "stop_token_ids"),
])
def test_bad_input_raises_value_error(model, prompt, params, match):
    with pytest.raises(ValueError, match=match):
        RolloutEngine(model, max_seq_len=512).generate([[1, 2], prompt], params)


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                    dict(max_new_tokens=0), dict(seed=-3)])
def test_invalid_sampling_params(kwargs):
    with pytest.raises(ValueError, match=r"SamplingParams\.\w+=.* is invalid"):
        SamplingParams(**kwargs)


def test_cache_memory_cap(model):
    engine = RolloutEngine(model, max_concurrent_seqs=64, max_seq_len=32, max_cache_bytes=20_000)
    assert 1 <= engine.max_concurrent_seqs < 64
    with pytest.raises(ValueError, match="max_cache_bytes"):
        RolloutEngine(model, max_seq_len=32, max_cache_bytes=10)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None,
                    reason="torch.compile (inductor, CPU) needs a C++ compiler")
def test_compiled_decode_matches_teacher_forcing_and_the_eager_engine(model, prompts):
    params = [SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8, seed=3 + i) for i in range(len(prompts))]
    eager = RolloutEngine(model).generate(prompts, params)
    # slots reused: B varies, and prefills of varying n and length land at varying slot offsets
    compiled_engine = RolloutEngine(model, max_concurrent_seqs=3, compile_decode=True, compile_prefill=True)
    compiled = compiled_engine.generate(prompts, params)
    assert_aligned(model, compiled)
    assert [s.tokens for s in compiled] == [s.tokens for s in eager]
    with torch.no_grad():  # in-place weight updates are seen by the compiled step (no stale constants)
        model.model.layers[0].self_attn.q_proj.weight.mul_(1.5)
    try:
        compiled_engine.mark_weights_updated(1)
        assert_aligned(model, compiled_engine.generate(prompts[:2], params[:2]))
    finally:
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.weight.div_(1.5)
    # partial rollout: stop once one group is done, resume (the compiled prefill re-feeds histories)
    uneven = [SamplingParams(temperature=1.0, max_new_tokens=4 + 2 * (i % 4), seed=i) for i in range(len(prompts))]
    partial = compiled_engine.generate(prompts, uneven, group_ids=[i // 2 for i in range(len(prompts))],
                                       target_groups=1)
    assert any(s.status == Status.ABORTED and s.response_length > 0 for s in partial)
    resumed = compiled_engine.generate_samples(partial, uneven)
    assert_aligned(model, resumed)
    assert [s.tokens for s in resumed] == [s.tokens for s in RolloutEngine(model).generate(prompts, uneven)]
    # greedy with stop tokens: another graph of the same step (all-greedy sampler, stop check)
    greedy = [SamplingParams(temperature=0.0, max_new_tokens=8, stop_token_ids=[1, 2])] * len(prompts)
    compiled = compiled_engine.generate(prompts, greedy)
    eager = RolloutEngine(model).generate(prompts, greedy)
    assert_aligned(model, compiled)
    assert [(s.tokens, s.status) for s in compiled] == [(s.tokens, s.status) for s in eager]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU rejection")
def test_cuda_graphs_need_a_cuda_model_and_job(model, tmp_path):
    from miles_lib.checkpoint import convert_hf_to_training
    from miles_lib.cycle import load_state
    from miles_lib.errors import ConfigError
    from miles_lib.pipeline_config import GRPOConfig
    with pytest.raises(ValueError, match="cuda_graphs=True needs a model on a CUDA device"):
        RolloutEngine(model, cuda_graphs=True)
    ckpt = convert_hf_to_training("examples/tiny-moe", str(tmp_path / "ckpt"))
    cfg = GRPOConfig.from_yaml("examples/configs/tiny_grpo.yaml").override(rollout={"cuda_graphs": True})
    with pytest.raises(ConfigError, match="rollout.cuda_graphs needs a single-process CUDA job"):
        load_state(ckpt, cfg)


def test_padded_decode_steps_match_the_unpadded_engine(model, prompts):
    """What a CUDA graph replays (steps.CudaGraphDecodeStep), checked on the CPU: every step
    padded to power-of-two batch / window buckets, the padded rows running on free slots."""
    from miles_lib.rollout.steps import decode_step, pad_step

    def padded_step(model_, cache, st, B, window, sampling, check_stops):
        Bb, Wb, padded = pad_step(st, B, window, sampling)
        assert Bb >= B and Wb >= window
        return decode_step(model_, cache, st, Bb, Wb, padded, check_stops)[:B]

    params = [SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10, stop_token_ids=[1], seed=i)
              for i in range(len(prompts))]
    engine = RolloutEngine(model, max_concurrent_seqs=5)  # B runs 5 -> 1 with buckets 4, 2, 1 and slot reuse
    engine._decode_step = padded_step
    padded = engine.generate(prompts, params)
    ref = RolloutEngine(model, max_concurrent_seqs=5).generate(prompts, params)
    assert_aligned(model, padded)
    assert [(s.tokens, s.status) for s in padded] == [(s.tokens, s.status) for s in ref]


def test_rope_table_rows_equal_the_on_the_fly_rope():
    from miles_lib.model.layers import RotaryEmbedding

    rotary = RotaryEmbedding(32, 10000.0)
    cos_t, sin_t = rotary.table(97)
    pos = torch.tensor([[0, 5, 96], [17, 3, 40]])
    for dtype in (torch.float32, torch.bfloat16):
        cos, sin = rotary(pos, dtype)
        assert torch.equal(cos_t[pos].to(dtype), cos) and torch.equal(sin_t[pos].to(dtype), sin)
