"""Build the shipped tiny MoE base model: tokenizer, prompt files, SFT to a *partial* arithmetic skill.

    python examples/make_tiny_model.py            # writes examples/tiny-moe/ and examples/data/*.jsonl

Seeded and reproducible on CPU (2 threads). The SFT stops early on purpose: the base model should
solve only part of the held-out problems greedily, while sampling often finds the right answer, so
RL has something to improve (see examples/tiny-moe/README.md for the measured numbers).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from miles_lib.data.arithmetic import (
    ArithmeticTaskConfig,
    build_tokenizer,
    generate_problems,
    write_jsonl,
)
from miles_lib.data.rewards import math_reward
from miles_lib.evaluation import pass_at_k
from miles_lib.model import ModelConfig, MoEForCausalLM
from miles_lib.rollout import RolloutEngine, SamplingParams

TASK = {"min_digits": 1, "max_digits": 3, "ops": ["+", "-"]}


def model_config(tok) -> ModelConfig:
    # every projection is a multiple of 128 wide (block-scaled FP8 needs 128-aligned GEMMs); the
    # 21-token character vocabulary is padded to 32 rows (ids >= 21 are never targets)
    assert tok.vocab_size <= 32, tok.vocab_size
    return ModelConfig(model_type="qwen3_moe", vocab_size=32, hidden_size=128, num_attention_heads=4,
                       num_key_value_heads=4, head_dim=32, num_experts=8, num_experts_per_tok=2,
                       moe_intermediate_size=128, intermediate_size=256, num_hidden_layers=4,
                       norm_topk_prob=True, max_position_embeddings=64, tie_word_embeddings=False,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def prompt_sets(seed: int = 0, num_sft: int = 30000) -> tuple[list[dict], list[dict], list[dict]]:
    """(eval, rl, sft) problem rows, pairwise disjoint: 300 held-out eval prompts (generator seed
    1000 + seed), 2,000 RL prompts (2000 + seed), ``num_sft`` SFT problems (3000 + seed)."""
    eval_rows = generate_problems(ArithmeticTaskConfig(**TASK, seed=1000 + seed), 300)
    rl_rows = generate_problems(ArithmeticTaskConfig(**TASK, seed=2000 + seed), 2000,
                                exclude={r["prompt"] for r in eval_rows})
    held = {r["prompt"] for r in eval_rows} | {r["prompt"] for r in rl_rows}
    sft_rows = generate_problems(ArithmeticTaskConfig(**TASK, seed=3000 + seed), num_sft, exclude=held)
    return eval_rows, rl_rows, sft_rows


def sft_batch(rows, tok, device):
    seqs, masks = [], []
    for r in rows:
        p = tok.encode(r["prompt"])
        a = tok.encode(r["label"]) + [tok.eos_token_id]
        seqs.append(p + a)
        masks.append([0] * len(p) + [1] * len(a))
    L = max(map(len, seqs))
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    loss_mask = torch.zeros(len(seqs), L)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = torch.tensor(s)
        loss_mask[i, : len(m)] = torch.tensor(m, dtype=torch.float)
    return ids.to(device), loss_mask.to(device)


@torch.no_grad()
def evaluate(model, tok, rows, k=8, max_new_tokens=6):
    engine = RolloutEngine(model, max_concurrent_seqs=512)
    stop = [tok.eos_token_id]
    ids = [tok.encode(r["prompt"]) for r in rows]
    greedy = engine.generate(ids, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=stop))
    g_acc = sum(math_reward(tok.decode(s.response_tokens), r["label"]) for s, r in zip(greedy, rows)) / len(rows)
    rep = [x for x in ids for _ in range(k)]
    params = [SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, stop_token_ids=stop, seed=i)
              for i in range(len(rep))]
    sampled = engine.generate(rep, params)
    correct = [0] * len(rows)
    for i, s in enumerate(sampled):
        correct[i // k] += int(math_reward(tok.decode(s.response_tokens), rows[i // k]["label"]))
    return {"greedy_acc": g_acc, f"pass@{k}": sum(pass_at_k(k, c, k) for c in correct) / len(rows),
            "sampled_acc": sum(correct) / (k * len(rows))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "examples", "tiny-moe"))
    ap.add_argument("--data-dir", default=os.path.join(ROOT, "examples", "data"))
    ap.add_argument("--steps", type=int, default=470, help="SFT steps taken (stops early on purpose)")
    ap.add_argument("--horizon", type=int, default=1500, help="steps the LR schedule is laid out for")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--num-sft", type=int, default=30000)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    t0 = time.time()

    tok = build_tokenizer()
    eval_rows, rl_rows, sft_rows = prompt_sets(args.seed, args.num_sft)
    write_jsonl(os.path.join(args.data_dir, "eval.jsonl"), eval_rows)
    write_jsonl(os.path.join(args.data_dir, "train.jsonl"), rl_rows)

    cfg = model_config(tok)
    model = MoEForCausalLM(cfg).init_weights(args.seed, std=0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warm = max(1, args.horizon // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.horizon))))
    rng = random.Random(args.seed)
    log = []
    for step in range(args.steps):
        rows = rng.sample(sft_rows, args.batch)
        ids, mask = sft_batch(rows, tok, "cpu")
        logits = model(ids[:, :-1]).logits
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1),
                                                reduction="none").view_as(mask[:, 1:])
        loss = (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if args.eval_every and (step + 1) % args.eval_every == 0:
            m = evaluate(model.eval(), tok, eval_rows[:200])
            model.train()
            log.append({"step": step + 1, "loss": float(loss.detach()), **m})
            print(json.dumps(log[-1]), flush=True)
    model.eval()
    final = evaluate(model, tok, eval_rows)
    seconds = time.time() - t0
    from miles_lib.model.hf_io import save_pretrained

    save_pretrained(model, args.out, tokenizer=tok)
    report = {"command": "python examples/make_tiny_model.py " + " ".join(sys.argv[1:]), "seed": args.seed,
              "sft_steps": args.steps, "lr_horizon": args.horizon, "batch": args.batch, "seconds": round(seconds, 1),
              "eval_prompts": len(eval_rows), **{k: round(v, 4) for k, v in final.items()}}
    with open(os.path.join(args.out, "base_eval.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
