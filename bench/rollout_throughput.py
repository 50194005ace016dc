"""Rollout throughput: our RolloutEngine vs transformers' generate (KV cache on), same weights.

Both sides decode greedily exactly --new-tokens tokens for the same random prompts (no stop
tokens), at batch 1 and batch 64. Prints ONE JSON object with generated tokens/s for each and the
ratio engine / transformers: the best of --repeats rounds in which the engine(s) and transformers
take turns (the CPU VM's speed drifts by +-30%; alternating keeps both sides in the same phase),
and the median over rounds of the per-round ratio (``*_median_of_rounds``).

    python bench/rollout_throughput.py                                  # tiny config, CPU
    python bench/rollout_throughput.py --config large --device cuda --dtype bfloat16
    python bench/rollout_throughput.py --compile      # + the engine with compile_decode / compile_prefill
    python bench/rollout_throughput.py --device cuda --cuda-graphs   # + the engine with cuda_graphs=True
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from miles_lib.model import ModelConfig, MoEForCausalLM
from miles_lib.rollout import RolloutEngine, SamplingParams

CONFIGS = {
    # the shipped tiny model's architecture
    "tiny": dict(vocab_size=64, hidden_size=128, num_attention_heads=4, num_key_value_heads=4, head_dim=32,
                 num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, num_hidden_layers=4,
                 max_position_embeddings=512),
    "large": dict(vocab_size=32000, hidden_size=2048, num_attention_heads=16, num_key_value_heads=4,
                  head_dim=128, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=768,
                  num_hidden_layers=8, max_position_embeddings=4096),
}


def build(name: str, device: str, dtype: torch.dtype):
    cfg = ModelConfig(**CONFIGS[name])
    ours = MoEForCausalLM(cfg).init_weights(0, 0.02).to(device=device, dtype=dtype).eval()
    import tempfile

    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as d:  # through a HF checkpoint: the same bytes on both sides
        ours.save_pretrained(d)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()
    return cfg, ours, hf


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def engine_runner(model, prompts, new_tokens, compile=False, cuda_graphs=False):
    """A no-argument function running one engine generate (after a warm-up / compile call);
    ``compile``: decode step and prefill forward compiled."""
    engine = RolloutEngine(model, max_concurrent_seqs=len(prompts), max_seq_len=prompts.shape[1] + new_tokens + 1,
                           prefill_batch=len(prompts), compile_decode=compile, compile_prefill=compile,
                           cuda_graphs=cuda_graphs)
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
    ids = prompts.tolist()

    def run():
        out = engine.generate(ids, params)
        assert all(s.response_length == new_tokens for s in out)
        return [s.response_tokens for s in out]

    t0 = time.perf_counter()
    run()  # warm-up (and, compiled, the one-time compile)
    run.warmup_s = time.perf_counter() - t0
    return run


def hf_runner(hf, prompts, new_tokens, device):
    x = prompts.to(device)
    mask = torch.ones_like(x)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
              pad_token_id=0, eos_token_id=None)

    @torch.inference_mode()
    def run():
        out = hf.generate(x, attention_mask=mask, **kw)
        assert out.shape[1] == x.shape[1] + new_tokens
        return out[:, x.shape[1]:].tolist()

    run()  # warm-up
    return run


def timed_rounds(runners: dict, repeats: int, device: str) -> tuple[dict, dict]:
    """Wall time of each runner in each of ``repeats`` rounds; the runners take turns within a round
    so a slow phase of a shared machine hits all of them alike. Returns ({name: [seconds per
    round]}, last outputs)."""
    times = {k: [] for k in runners}
    outs = {}
    for _ in range(repeats):
        for k, run in runners.items():
            sync(device)
            t0 = time.perf_counter()
            outs[k] = run()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return times, outs


def median_round_ratio(times: dict, engine: str) -> float:
    """Median over rounds of transformers' time / the engine's time in the same round."""
    return statistics.median(h / e for h, e in zip(times["transformers"], times[engine]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--repeats", type=int, default=5, help="rounds; engine and transformers alternate, best kept")
    ap.add_argument("--compile", action="store_true",
                    help="also time the engine with compile_decode=True and compile_prefill=True "
                         "(compile time reported, not timed)")
    ap.add_argument("--cuda-graphs", action="store_true", help="also time the engine with cuda_graphs=True (CUDA)")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    dtype = getattr(torch, args.dtype)
    cfg, ours, hf = build(args.config, args.device, dtype)
    results = []
    for B in [int(b) for b in args.batches.split(",")]:
        g = torch.Generator().manual_seed(B)
        prompts = torch.randint(1, cfg.vocab_size, (B, args.prompt_len), generator=g)
        runners = {"engine": engine_runner(ours, prompts, args.new_tokens),
                   "transformers": hf_runner(hf, prompts, args.new_tokens, args.device)}
        if args.compile:
            runners["compiled"] = engine_runner(ours, prompts, args.new_tokens, compile=True)
        if args.cuda_graphs:
            runners["cuda_graphs"] = engine_runner(ours, prompts, args.new_tokens, cuda_graphs=True)
        times, outs = timed_rounds(runners, args.repeats, args.device)
        tps = {k: B * args.new_tokens / min(t) for k, t in times.items()}
        agree = sum(a == b for a, b in zip(outs["engine"], outs["transformers"])) / B
        row = {"batch": B, "engine_tokens_per_s": round(tps["engine"], 1),
               "transformers_tokens_per_s": round(tps["transformers"], 1),
               "ratio": round(tps["engine"] / tps["transformers"], 3),
               "ratio_median_of_rounds": round(median_round_ratio(times, "engine"), 3),
               "greedy_sequences_identical_frac": agree}
        if args.compile:
            row.update({"engine_compiled_tokens_per_s": round(tps["compiled"], 1),
                        "compiled_ratio": round(tps["compiled"] / tps["transformers"], 3),
                        "compiled_ratio_median_of_rounds": round(median_round_ratio(times, "compiled"), 3),
                        "compile_warmup_s": round(runners["compiled"].warmup_s, 1),
                        "compiled_equals_eager_frac": sum(a == b for a, b in zip(outs["compiled"], outs["engine"])) / B})
        if args.cuda_graphs:
            row.update({"engine_cuda_graphs_tokens_per_s": round(tps["cuda_graphs"], 1),
                        "cuda_graphs_ratio": round(tps["cuda_graphs"] / tps["transformers"], 3),
                        "cuda_graphs_ratio_median_of_rounds": round(median_round_ratio(times, "cuda_graphs"), 3),
                        "cuda_graphs_equals_eager_frac": sum(a == b for a, b in zip(outs["cuda_graphs"], outs["engine"])) / B})
        results.append(row)
    print(json.dumps({
        "bench": "rollout_throughput", "config": args.config, "device": args.device, "dtype": args.dtype,
        "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "cpu_threads": torch.get_num_threads(), "machine": platform.machine(),
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "results": results,
    }))


if __name__ == "__main__":
    main()
