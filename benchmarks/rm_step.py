"""Reward-model training throughput: comparisons/s (and sequences/s, tokens/s) of the RM stage's step.

It runs the RM stage itself (`instructgpt_jax.stages.rm.train`, the code users run) from a random
initialization on generated comparisons: every prompt has `--k` responses ranked without ties, so a batch
element carries all C(K, 2) of its comparisons (docs/paper.md §4.1) and a step of `--batch` prompts trains on
batch · C(K, 2) comparisons over batch · K sequences of `--seq_len` tokens. Prompt and response lengths are
fixed (`--prompt_len` + `--response_len` + EOS fill the sequence).

The metric writer logs the wall time between consecutive rows; with a row a step and metrics fetched a
step late, rows 2 .. n - 1 time steady steps. The first `--warmup` steps (at least 2) are left out;
"compile" is the first row's time less a steady step (it includes the stage's setup after the data build).

    python benchmarks/rm_step.py --size mini --batch 8 --k 4 --seq_len 256
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: configs/

import numpy as np  # noqa: E402

from benchmarks import _common, ppo_iteration  # noqa: E402
from configs import rm as rm_config  # noqa: E402
from instructgpt_jax import metrics, stages  # noqa: E402


def write_data(root: str, args, n_prompts: int) -> tuple[str, str]:
  """(comparisons file, bias demonstrations file) of random letters with the benchmark's lengths."""
  rng = np.random.default_rng(0)
  prompts = ppo_iteration.make_prompts(n_prompts, args.prompt_len, seed=1)
  responses = ppo_iteration.make_prompts(n_prompts * args.k, args.response_len, seed=2)
  comparisons, demonstrations = os.path.join(root, "comparisons.jsonl"), os.path.join(root, "demos.jsonl")
  with open(comparisons, "w") as f:
    for i, prompt in enumerate(prompts):
      ranks = rng.permutation(args.k).tolist()
      f.write(json.dumps({"prompt": prompt, "responses": responses[i * args.k : (i + 1) * args.k], "ranks": ranks}))
      f.write("\n")
  with open(demonstrations, "w") as f:
    for prompt, response in zip(prompts[: args.batch], responses):
      f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
  return comparisons, demonstrations


def measure(args) -> dict:
  steps = args.warmup + args.steps
  with tempfile.TemporaryDirectory() as root:
    comparisons, demonstrations = write_data(root, args, steps * args.batch)
    c = rm_config.get_config(f"size={args.size}")
    c.model.dtype = args.dtype
    c.data.update(
      train=comparisons,
      eval="",
      bias_demonstrations=demonstrations,
      batch_size=args.batch,
      seq_len=args.seq_len,
      max_responses=args.k,
    )
    c.total_steps = steps
    c.checkpoint_every_steps = steps + 1
    c.eval_every_steps = 0
    c.log_every_steps = 1
    c.progress_bar = False
    workdir = os.path.join(root, "rm")
    start = time.perf_counter()
    stages.run(c, workdir)
    total_s = time.perf_counter() - start
    rows = metrics.read_rows(workdir)
  if len(rows) != steps:
    raise RuntimeError(f"expected {steps} metric rows, found {len(rows)}")
  step_s = statistics.median(1.0 / r["steps_per_sec"] for r in rows[args.warmup - 1 : steps - 1])
  pairs = args.batch * math.comb(args.k, 2)
  assert all(r["pairs_per_batch"] == pairs for r in rows), "every comparison of a batch is counted once"
  return {
    "size": args.size,
    "step_s": step_s,
    "comparisons_per_s": pairs / step_s,
    "sequences_per_s": args.batch * args.k / step_s,
    "tokens_per_s": args.batch * args.k * args.seq_len / step_s,
    "compile_s": max(1.0 / rows[0]["steps_per_sec"] - step_s, 0.0),
    "total_s": total_s,
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--size", default="mini")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--batch", type=int, default=8, help="prompts per step, each with all K responses")
  p.add_argument("--k", type=int, default=4, help="responses per prompt (the paper: 4 to 9)")
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--prompt_len", type=int, default=96)
  p.add_argument("--response_len", type=int, default=159, help="prompt + response + EOS <= seq_len")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--json", action="store_true")
  args = p.parse_args(argv)
  if args.warmup < 2:
    raise SystemExit("--warmup: at least 2 (the first row's wall time includes compile and setup)")
  result = measure(args)
  if args.json:
    print(json.dumps(result))
    return
  print(_common.header())
  row = {
    "size": args.size,
    "dtype": args.dtype,
    "prompts × K": f"{args.batch} × {args.k}",
    "seq len": args.seq_len,
    "step ms": f"{result['step_s'] * 1e3:.0f}",
    "comparisons/s": f"{result['comparisons_per_s']:,.1f}",
    "sequences/s": f"{result['sequences_per_s']:,.1f}",
    "tokens/s": f"{result['tokens_per_s']:,.0f}",
    "compile s": f"{result['compile_s']:.1f}",
  }
  print(_common.table([row]))


if __name__ == "__main__":
  main()
