"""PPO iteration throughput: episodes/s and where an iteration's time goes (rollout / scoring / training).

It runs the PPO stage itself (`instructgpt_jax.stages.ppo.train`, the code users run) on random models:
a random policy exported as the SFT model, a random reward model of the same shape, and prompts of
random letters all `--prompt_len` tokens long (one prompt bucket). Plain PPO (γ = 0: TRL has no ptx term),
a separate critic started from the RM, EMA of the policy as configured.

The trainer logs, for every iteration, the seconds of its rollout, scoring and training phases
(`time_rollout`, `time_scoring`, `time_training`) and its metric writer logs the wall time between
consecutive rows (`steps_per_sec`). With a row a step, the row of iteration s is written at the end of
iteration s + 1, so `steps_per_sec` of rows 2 .. n - 1 times whole iterations 3 .. n, logging included.
The first `--warmup` iterations (at least 2: the first compiles) are left out; "compile" is the first
iteration's time less a steady one.

    python benchmarks/ppo_iteration.py --size mini --rollout_batch 32 --minibatch 8 --response_len 64
    python benchmarks/ppo_iteration.py --size 124m --dtype bfloat16 --rollout_batch 64 --minibatch 16 \
        --prompt_len 64 --response_len 128        # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import string
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: configs/

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import _common  # noqa: E402
from configs import ppo as ppo_config  # noqa: E402
from instructgpt_jax import metrics, models, stages  # noqa: E402
from instructgpt_jax.data import tokenizer as tokenizer_lib  # noqa: E402
from instructgpt_jax.library import model_io  # noqa: E402
from instructgpt_jax.models import sizes  # noqa: E402


def make_prompts(n: int, length: int, seed: int) -> list[str]:
  """n prompts of `length` random lowercase letters: `length` ids each under the byte tokenizer."""
  rng = np.random.default_rng(seed)
  letters = np.array(list(string.ascii_lowercase))
  return ["".join(rng.choice(letters, length)) for _ in range(n)]


def prompt_ids(n: int, length: int) -> tuple[list[list[int]], int, int]:
  """(the token ids of the benchmark's prompts, EOS id, pad id) under the byte tokenizer, for the peer."""
  tokenizer = tokenizer_lib.load("bytes")
  return [tokenizer.encode(p) for p in make_prompts(n, length, seed=0)], tokenizer.eos_id, tokenizer.pad_id


def build_inputs(root: str, args) -> tuple[models.ModelConfig, str, str, str]:
  """(model config, SFT export, RM export, prompts file): random models of one shape and the prompts."""
  cfg = models.resolve({"size": args.size, "dtype": args.dtype})
  graphdef, params = models.init(cfg, jax.random.key(0))
  sft, rm = os.path.join(root, "sft"), os.path.join(root, "rm")
  model_io.export(sft, params, "lm", cfg, tokenizer="bytes")
  _, rm_params = models.init(cfg, jax.random.key(1), kind="scalar")
  model_io.export(rm, rm_params, "scalar", cfg, reward_bias=0.0, tokenizer="bytes")
  prompts = os.path.join(root, "prompts.jsonl")
  with open(prompts, "w") as f:
    for text in make_prompts(args.num_prompts, args.prompt_len, seed=0):
      f.write(json.dumps({"prompt": text}) + "\n")
  return cfg, sft, rm, prompts


def ppo_run_config(args, sft: str, rm: str, prompts: str, iterations: int):
  c = ppo_config.get_config(f"size={args.size},ptx=false")
  c.model.init_from = sft
  c.model.dtype = args.dtype
  c.ppo.update(
    reward_model=rm,
    rollout_batch=args.rollout_batch,
    minibatch=args.minibatch,
    epochs=args.epochs,
    max_new_tokens=args.response_len,
    temperature=1.0,
  )
  c.data.update(train=prompts, eval="", max_prompt_len=args.prompt_len, prompt_buckets=str(args.prompt_len))
  c.total_steps = iterations
  c.checkpoint_every_steps = iterations + 1  # only the final save, after the timed iterations
  c.eval_every_steps = 0
  c.log_every_steps = 1
  c.progress_bar = False
  return c


def measure(args) -> dict:
  iterations = args.warmup + args.iterations
  with tempfile.TemporaryDirectory() as root:
    cfg, sft, rm, prompts = build_inputs(root, args)
    workdir = os.path.join(root, "ppo")
    start = time.perf_counter()
    stages.run(ppo_run_config(args, sft, rm, prompts, iterations), workdir)
    total_s = time.perf_counter() - start
    rows = metrics.read_rows(workdir)
  if len(rows) != iterations:
    raise RuntimeError(f"expected {iterations} metric rows, found {len(rows)}")
  # Rows warmup - 1 .. iterations - 1 (1-based) time iterations warmup + 1 .. iterations (module docstring).
  iteration_s = statistics.median(1.0 / r["steps_per_sec"] for r in rows[args.warmup - 1 : iterations - 1])
  steady = rows[args.warmup :]
  split = {k: statistics.median(r[f"time_{k}"] for r in steady) for k in ("rollout", "scoring", "training")}
  first = rows[0]
  first_s = first["time_rollout"] + first["time_scoring"] + first["time_training"]
  in_loop_s = statistics.median(r["time_rollout"] + r["time_scoring"] + r["time_training"] for r in steady)
  return {
    "size": args.size,
    "params_m": round(sizes.param_count_formula(cfg) / 1e6, 2),
    "iteration_s": iteration_s,
    "episodes_per_s": args.rollout_batch / iteration_s,
    "rollout_s": split["rollout"],
    "scoring_s": split["scoring"],
    "training_s": split["training"],
    "compile_s": max(first_s - in_loop_s, 0.0),
    "total_s": total_s,
  }


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--size", default="mini", help="a model size of models/sizes.py (GPT family)")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--rollout_batch", type=int, default=32)
  p.add_argument("--minibatch", type=int, default=8)
  p.add_argument("--epochs", type=int, default=1)
  p.add_argument("--prompt_len", type=int, default=64)
  p.add_argument("--response_len", type=int, default=64)
  p.add_argument("--num_prompts", type=int, default=256)
  p.add_argument("--warmup", type=int, default=2, help="iterations left out (>= 2)")
  p.add_argument("--iterations", type=int, default=3, help="timed iterations")
  p.add_argument("--json", action="store_true", help="print one JSON line (for side_by_side.py)")
  return p


def main(argv=None):
  args = parser().parse_args(argv)
  if args.warmup < 2:
    raise SystemExit("--warmup: at least 2 (the first iteration compiles; its row's wall time includes setup)")
  result = measure(args)
  if args.json:
    print(json.dumps(result))
    return
  print(_common.header())
  row = {
    "size": result["size"],
    "params (M)": result["params_m"],
    "rollout batch": args.rollout_batch,
    "minibatch": args.minibatch,
    "prompt": args.prompt_len,
    "response": args.response_len,
    "episodes/s": f"{result['episodes_per_s']:.2f}",
    "iteration s": f"{result['iteration_s']:.2f}",
    "rollout s": f"{result['rollout_s']:.2f}",
    "scoring s": f"{result['scoring_s']:.2f}",
    "training s": f"{result['training_s']:.2f}",
    "compile s": f"{result['compile_s']:.1f}",
  }
  print(_common.table([row]))


if __name__ == "__main__":
  main()
