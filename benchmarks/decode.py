"""Decode throughput of the KV-cached sampler, and its fraction of the memory-bandwidth bound.

A decode step of a batch must read every parameter it uses once plus the keys and values of every cached
token, so it cannot run faster than (those bytes) ÷ (peak memory bandwidth). The fraction printed here is

    bytes read per step ÷ measured step time ÷ peak bandwidth

where "bytes read" counts the parameters a step multiplies by (all of them, except the rows of lookup
tables it does not touch: position embeddings, and the input embedding of an untied model) and the keys
and values of the filled cache slots, averaged over the response (P + (R - 1) / 2 slots). The sampler's
decode step actually reads the whole allocated window of P + R - 1 slots (the unfilled ones masked), so
for long responses this fraction understates the bandwidth it achieves.

Usage (one device; parameters are stored in the compute dtype, as for inference):

    python benchmarks/decode.py --size tiny,mini --batch 1,16,64 --prompt_len 64 --response_len 128
    python benchmarks/decode.py --size 124m,1.3b --batch 1,16,64 --dtype bfloat16    # on a GPU or TPU

The peak bandwidth comes from PEAK_BANDWIDTH_GBS by the device kind, or from --bandwidth_gbs. A CPU has
no single number: the default for "cpu" is a nominal 20 GB/s (a few DDR channels), so read CPU fractions
as relative, and pass the machine's measured STREAM bandwidth for an absolute one.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx

from instructgpt_jax import generation, models
from instructgpt_jax.models.kv_cache import cache_bytes

# Peak memory bandwidth in GB/s (vendor datasheets), matched against jax's device_kind in this order
# (more specific names first).
PEAK_BANDWIDTH_GBS = (
  ("H200", 4800.0),
  ("H100 NVL", 3900.0),
  ("H100 PCIe", 2000.0),
  ("H100", 3350.0),  # SXM, "NVIDIA H100 80GB HBM3"
  ("A100-SXM4-80GB", 2039.0),
  ("A100 80GB PCIe", 1935.0),
  ("A100", 1555.0),  # 40 GB parts
  ("L4", 300.0),
  ("V100", 900.0),
  ("TPU v6 lite", 1640.0),  # v6e
  ("TPU v5 lite", 819.0),  # v5e
  ("TPU v5", 2765.0),  # v5p
  ("TPU v4", 1228.0),
  ("cpu", 20.0),  # nominal: see the module docstring
)


def peak_bandwidth_gbs(device_kind: str) -> float | None:
  for name, gbs in PEAK_BANDWIDTH_GBS:
    if name.lower() in device_kind.lower():
      return gbs
  return None


def param_bytes_read_per_step(cfg: models.ModelConfig, params) -> int:
  """Parameter bytes one decode step reads: all, less the lookup tables it reads a few rows of."""
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  skipped = []
  if cfg.family == "gpt":
    skipped.append(params["pos_embed"]["embedding"])
  if not cfg.tied_embeddings:
    skipped.append(params["embed"]["embedding"])  # the unembedding is read in full; the embedding by rows
  return total - sum(x.size * x.dtype.itemsize for x in skipped)


def timed(fn, repeats: int) -> float:
  """Median wall time in seconds of fn() (which blocks), after one warm-up call that compiles."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure(size, batch, prompt_len, response_len, *, dtype, scan_layers, repeats, bandwidth) -> dict[str, str]:
  """One table row: times a full `generate` and a prefill alone; a decode step is the difference ÷ (R - 1)."""
  cfg = models.resolve({"size": size, "dtype": dtype, "param_dtype": dtype, "scan_layers": scan_layers})
  graphdef, params = models.init(cfg, jax.random.key(0))
  # An EOS id outside the vocabulary is never drawn, so every row decodes the whole response.
  settings = generation.SamplingSettings(eos_id=cfg.vocab_size, pad_id=cfg.vocab_size + 1)
  prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
  segment_ids = np.ones_like(prompts)
  key = jax.random.key(1)

  generate = jax.jit(
    lambda p, t, s, k: generation.generate(graphdef, p, t, s, k, settings=settings, max_new_tokens=response_len)
  )
  prefill = jax.jit(
    lambda p, t, s: generation.prefill(nnx.merge(graphdef, p), t, s, cache_length=prompt_len + response_len - 1)
  )
  total_s = timed(lambda: jax.block_until_ready(generate(params, prompts, segment_ids, key)), repeats)
  prefill_s = timed(lambda: jax.block_until_ready(prefill(params, prompts, segment_ids)), repeats)
  step_s = max(total_s - prefill_s, 1e-9) / max(response_len - 1, 1)

  mean_slots = prompt_len + (response_len - 1) / 2
  step_bytes = param_bytes_read_per_step(cfg, params) + cache_bytes(cfg, batch, 1) * mean_slots
  return {
    "size": size,
    "params (M)": f"{models.param_count(params) / 1e6:.1f}",
    "dtype": dtype,
    "scan": "yes" if scan_layers else "no",
    "batch": batch,
    "prompt": prompt_len,
    "response": response_len,
    "prefill ms": f"{prefill_s * 1e3:.1f}",
    "step ms": f"{step_s * 1e3:.2f}",
    "decode tok/s": f"{batch / step_s:,.0f}",
    "end-to-end tok/s": f"{batch * response_len / total_s:,.0f}",
    "MB read/step": f"{step_bytes / 1e6:.1f}",
    "GB/s": f"{step_bytes / step_s / 1e9:.1f}",
    "of bound": f"{step_bytes / step_s / (bandwidth * 1e9):.0%}" if bandwidth else "n/a",
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--size", default="tiny,mini", help="comma-separated model sizes (models/sizes.py)")
  parser.add_argument("--batch", default="1,16,64", help="comma-separated batch sizes")
  parser.add_argument("--prompt_len", type=int, default=64)
  parser.add_argument("--response_len", type=int, default=128)
  parser.add_argument("--dtype", default="float32", help="compute and parameter dtype: float32 or bfloat16")
  parser.add_argument("--scan_layers", action="store_true", help="run the layers under lax.scan")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument(
    "--bandwidth_gbs", type=float, default=None, help="peak memory bandwidth; default: by device kind"
  )
  args = parser.parse_args(argv)

  device = jax.devices()[0]
  bandwidth = args.bandwidth_gbs or peak_bandwidth_gbs(device.device_kind)
  nominal = device.platform == "cpu" and args.bandwidth_gbs is None
  print(f"# {datetime.date.today()} · {device.device_kind} ({platform.processor() or platform.machine()})")
  print(f"# jax {jax.__version__} · bandwidth {bandwidth} GB/s{' (nominal)' if nominal else ''}")
  print(f"# {' '.join(['python', *sys.argv])}")
  rows = [
    measure(
      size,
      batch,
      args.prompt_len,
      args.response_len,
      dtype=args.dtype,
      scan_layers=args.scan_layers,
      repeats=args.repeats,
      bandwidth=bandwidth,
    )
    for size in args.size.split(",")
    for batch in (int(b) for b in args.batch.split(","))
  ]
  header = list(rows[0])
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for row in rows:
    print("| " + " | ".join(str(row[h]) for h in header) + " |")


if __name__ == "__main__":
  main()
