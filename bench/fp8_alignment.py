"""Train-inference log-prob gap under each precision mode (miles_lib.precision.modes).

Generates with the rollout engine, then recomputes the log-probs of the same tokens with a
teacher-forced trainer forward (grad enabled, R3 replay), and prints ONE JSON object with the mean
and max |logp_train - logp_rollout| over response tokens for:
    off          trainer = engine = high precision (the reference gap: kernels/batching only)
    fp8          unified FP8: the engine runs the trainer's FP8 module
    fp8_rollout  trainer in high precision, engine on an FP8 copy
    int4_qat     trainer with fake-quantized int4 experts, engine on packed int4 experts
ratio_fp8_rollout_over_fp8 is how much smaller the unified gap is.

    python bench/fp8_alignment.py                               # shipped tiny model, CPU fp32
    python bench/fp8_alignment.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from miles_lib.model import MoEForCausalLM
from miles_lib.precision.modes import PrecisionConfig, apply_rollout_precision, apply_training_precision
from miles_lib.rollout import RolloutEngine, SamplingParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def response_logprobs(model, samples, device) -> list[torch.Tensor]:
    """Teacher-forced log p(token) of each response token, routing replayed (R3)."""
    out = []
    for s in samples:
        ids = torch.tensor(s.tokens, device=device)[None]
        routed = torch.as_tensor(s.rollout_routed_experts, device=device)[None]
        logits = model(ids[:, :-1], routed_experts=routed).logits.float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[0, :, 0]
        out.append(lp[-s.response_length:].detach())
    return out


def measure(base: MoEForCausalLM, mode: str, prompts, device, max_new_tokens: int) -> dict:
    cfg = PrecisionConfig(mode=mode)
    trainer = copy.deepcopy(base)
    apply_training_precision(trainer, cfg)
    if cfg.separate_rollout_model:
        engine_model = copy.deepcopy(base).requires_grad_(False)
        apply_rollout_precision(engine_model, cfg)
    else:
        engine_model = trainer
    engine = RolloutEngine(engine_model, max_concurrent_seqs=len(prompts), seed=0)
    params = [SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, seed=i) for i in range(len(prompts))]
    samples = engine.generate(prompts, params)
    train_lp = response_logprobs(trainer, samples, device)
    diffs = torch.cat([(t.cpu() - torch.tensor(s.rollout_log_probs)).abs() for t, s in zip(train_lp, samples)])
    return {"mean_abs_dlogp": float(diffs.mean()), "max_abs_dlogp": float(diffs.max()), "tokens": int(diffs.numel())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="examples/tiny-moe")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    base = MoEForCausalLM.from_pretrained(args.model).to(args.device, DTYPES[args.dtype])
    g = torch.Generator().manual_seed(0)
    V = base.config.vocab_size
    prompts = [torch.randint(2, V, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
               for _ in range(args.prompts)]
    res = {m: measure(base, m, prompts, args.device, args.max_new_tokens)
           for m in ("off", "fp8", "fp8_rollout", "int4_qat")}
    print(json.dumps({"bench": "fp8_alignment", "model": args.model, "device": args.device, "dtype": args.dtype,
                      "torch": torch.__version__, "modes": res,
                      "ratio_fp8_rollout_over_fp8": round(res["fp8_rollout"]["mean_abs_dlogp"]
                                                          / max(res["fp8"]["mean_abs_dlogp"], 1e-12), 1)}))


if __name__ == "__main__":
    main()
