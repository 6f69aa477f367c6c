"""The language-model training step of pretraining and SFT: tokens/s, model FLOPs utilization, compile time.

It times the step the trainers run: `lm_steps.make_train_step` (masked next-token loss, clipped Adam with
the pretraining config's settings) jitted by `train_state.jit_step` with the trainers' shardings over all
devices, on a random batch of `--batch` rows of `--seq_len` tokens (every target counted; dropout off).
Compilation is timed apart (`.lower().compile()`); then `--warmup` steps, then `--steps` steps dispatched
back to back, as a training loop does, and the median over `--repeats` such runs.

    MFU = tokens/s × (6N + 12·L·H·Q·T) / peak        (PaLM, Appendix B; instructgpt_jax/flops.py)

The peak is the device's dense bf16 peak (flops.PEAK_BF16_TFLOPS), or --peak_tflops. A CPU has no
datasheet number here: the script measures the best rate of a large matmul in the step's dtype and
uses that, so a CPU's MFU reads "of what this machine's matmuls reach", not of a theoretical peak.

    python benchmarks/train_step.py --size tiny,mini --batch 8 --seq_len 256
    python benchmarks/train_step.py --size 124m --batch 16 --seq_len 1024 --dtype bfloat16   # on a GPU
    python benchmarks/train_step.py --size 1.3b --batch 8 --seq_len 2048 --dtype bfloat16 --attention cudnn
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: configs/

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import _common  # noqa: E402
from configs import pretrain  # noqa: E402
from instructgpt_jax import flops, models, optim, sharding, train_state  # noqa: E402
from instructgpt_jax.library import lm_steps, loop  # noqa: E402


def measured_matmul_tflops(dtype: str, n: int = 2048, repeats: int = 5) -> float:
  """The best rate of an n×n×n matmul in `dtype` on the default device: a CPU's practical peak."""
  a = jnp.ones((n, n), dtype)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best / 1e12


def build_step(args, size: str):
  """(model config, jitted step, state, batch): the trainers' LM step on a random batch."""
  c = pretrain.get_config(f"size={size}")
  c.model.update(dtype=args.dtype, remat=args.remat, scan_layers=args.scan_layers, resid_dropout=0.0)
  if args.attention:
    c.model.attention_impl = args.attention
  model_cfg = models.resolve(c.model)
  mesh = sharding.make_mesh(c.mesh.to_dict())
  rules = sharding.rules_dict(c.sharding_rules)
  total_steps = 1000
  tx = optim.make_optimizer(c.optim, total_steps)
  graphdef, state, shardings = train_state.create_sharded(model_cfg, tx, c.seed, mesh, rules)
  train_step = lm_steps.make_train_step(
    graphdef, model_cfg, tx, optim.schedule(c.optim, total_steps), microbatches=args.microbatches
  )
  step = train_state.jit_step(train_step, shardings, loop.batch_sharding(mesh, rules), rules)
  tokens = np.random.default_rng(0).integers(0, model_cfg.vocab_size, (args.batch, args.seq_len + 1), dtype=np.int32)
  local = {
    "inputs": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "mask": np.ones((args.batch, args.seq_len), np.float32),
  }
  local = {k: v[jax.process_index() :: jax.process_count()] for k, v in local.items()}
  return model_cfg, step, state, loop.to_global(local, mesh, rules)


def measure(args, size: str, peak_tflops: float) -> dict:
  model_cfg, step, state, batch = build_step(args, size)
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  for _ in range(args.warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  runs = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    for _ in range(args.steps):
      state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    runs.append((time.perf_counter() - start) / args.steps)
  step_s = statistics.median(runs)
  tokens_per_s = args.batch * args.seq_len / step_s
  flops_per_token = flops.train_flops_per_token(model_cfg, args.seq_len)
  return {
    "size": size,
    "params_m": round(models.param_count(state.params) / 1e6, 2),
    "batch": args.batch,
    "seq_len": args.seq_len,
    "dtype": args.dtype,
    "step_s": step_s,
    "tokens_per_s": tokens_per_s,
    "model_tflops": tokens_per_s * flops_per_token / 1e12,
    "mfu": tokens_per_s * flops_per_token / (peak_tflops * 1e12),
    "compile_s": compile_s,
    "loss": float(metrics["loss"]),
  }


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--size", default="tiny,mini", help="comma-separated model sizes (models/sizes.py)")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--dtype", default="float32", help="compute dtype; parameters stay float32")
  p.add_argument("--remat", default="none", help="none, full, dots, dots_no_batch")
  p.add_argument("--scan_layers", action="store_true")
  p.add_argument("--attention", default="", help="model.attention_impl: auto (default), einsum, xla, cudnn, splash")
  p.add_argument("--microbatches", type=int, default=1)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--steps", type=int, default=5, help="steps per timed run")
  p.add_argument("--repeats", type=int, default=3, help="timed runs (the median is reported)")
  p.add_argument("--peak_tflops", type=float, default=None, help="default: by device kind; on a CPU, measured")
  p.add_argument("--json", action="store_true", help="print one JSON line per size (for side_by_side.py)")
  return p


def main(argv=None):
  args = parser().parse_args(argv)
  device = jax.devices()[0]
  peak = args.peak_tflops or flops.peak_tflops(device.device_kind)
  peak_note = "given" if args.peak_tflops else "dense bf16 datasheet"
  if peak is None:
    peak, peak_note = measured_matmul_tflops(args.dtype), f"measured {args.dtype} 2048³ matmul"
  peak *= jax.device_count()
  results = [measure(args, size, peak) for size in args.size.split(",")]
  if args.json:
    for r in results:
      print(json.dumps(dict(r, peak_tflops=peak)))
    return
  print(_common.header(f"peak {peak:.3g} TFLOP/s ({peak_note})"))
  rows = [
    {
      "size": r["size"],
      "params (M)": r["params_m"],
      "dtype": r["dtype"],
      "remat": args.remat,
      "batch × len": f"{r['batch']} × {r['seq_len']}",
      "step ms": f"{r['step_s'] * 1e3:.1f}",
      "tokens/s": f"{r['tokens_per_s']:,.0f}",
      "model TFLOP/s": f"{r['model_tflops']:.3g}",
      "MFU": f"{r['mfu']:.1%}",
      "compile s": f"{r['compile_s']:.1f}",
    }
    for r in results
  ]
  print(_common.table(rows))


if __name__ == "__main__":
  main()
