"""Compile a stage's step for a pod without the pod, and report per-device memory (instructgpt_jax/library/aot.py).

One config, the same flags as main.py (TPU targets need libtpu: `pip install "jax[tpu]==0.10.2"`; a separate
venv is fine):
    python -m launch.aot --target=v4-512 --config=configs/sft.py:size=1.3b --config.mesh.fsdp=8 \
        --config.model.scan_layers=true --config.model.remat=full
It prints the mesh, the global batch (a batch the mesh does not divide is raised to the next size it does, with
the flag that runs the same plan on the pod), PPO's rollout layout, the bytes per device by kind and whether the
plan fits; with under 10% of the memory left it warns; a plan that does not fit compiles up to --candidates
single changes (more fsdp, more tensor, more microbatches or smaller PPO batches, full remat) and names the
first that fits.
The tables of docs/scaling.md (every row of REPORT below: the GPT-3 sizes on named pods, then PPO at Llama-3-8B's
shape on one host, full fine-tuning against LoRA rank 16, "LoRA on one host"):
    python -m launch.aot --report
One row alone: its target, config and flags, e.g. `--target=v5p-8 --config=configs/ppo.py:size=6b` and the flags
LLAMA3_8B, --config.mesh.fsdp=4, PPO_ONE_HOST, BIG and LORA_16 below hold (--candidates=0 for --report's output).
Targets (instructgpt_jax/accelerators.py): v4-N and v5p-N (N TensorCores, 2 per chip), v5e-N (or v5litepod-N)
and v6e-N (N chips), any slice size Google offers, compiled by XLA:TPU from libtpu's topology; 8xH100, Nx8xH100,
8xH200, Nx8xH200: XLA:TPU's compile for as many v5p chips, judged against the GPU's memory (no XLA:GPU compiler
runs offline); cpu-N, or cpu-<any of those>: fake CPU devices, argument sizes only.
A bad target, config or override is one line (`error: ...`, exit status 2) before anything compiles.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
import time

# Row: (target, config, overrides). Global batches are chosen so every batch shard gets whole rows; remat
# and scanned layers are what a run at this size would set.
BIG = ["--config.model.remat=full", "--config.model.scan_layers=true"]
# Llama-3-8B's shape (models/sizes.py has no such row; the size=6b under it sets only the critic's learning rate).
# `--rm_size` names the RM's and critic's size for every row: the 6B (GPT-3 6.7B) shape here too.
LLAMA3_8B = [
  "--config.model.family=llama",
  "--config.model.n_layers=32",
  "--config.model.d_model=4096",
  "--config.model.n_heads=32",
  "--config.model.n_kv_heads=8",
  "--config.model.d_ff=14336",
  "--config.model.vocab_size=128256",
  "--config.model.rope_theta=500000",
  "--config.model.tied_embeddings=false",
  "--config.model.max_len=8192",
]
# A PPO batch for one host: 64 rollouts of <= 512 prompt and <= 256 new tokens, minibatches of 8, and the config's
# 8 pretraining sequences of 2048 tokens per episode (64 per minibatch).
PPO_ONE_HOST = [
  "--config.ppo.rollout_batch=64",
  "--config.ppo.minibatch=8",
  "--config.ppo.max_new_tokens=256",
  "--config.data.max_prompt_len=512",
]
# LoRA rank 16 on every attention and MLP projection (model.lora.targets' default); the default rules split the
# adapters' rank over fsdp ("lora_rank": "fsdp"), so an 8B model's adapters are split on an fsdp-only mesh.
LORA_16 = ["--config.model.lora.rank=16"]
REPORT = [
  ("v4-512", "configs/sft.py:size=1.3b", ["--config.mesh.fsdp=8", "--config.data.batch_size=256", *BIG]),
  ("v4-512", "configs/sft.py:size=6.7b", ["--config.mesh.fsdp=16", "--config.data.batch_size=256", *BIG]),
  (
    "v4-512",
    "configs/sft.py:size=175b",
    ["--config.mesh.fsdp=64", "--config.mesh.tensor=4", "--config.data.batch_size=64", *BIG],
  ),
  (
    "v5p-1024",
    "configs/sft.py:size=175b",
    ["--config.mesh.fsdp=128", "--config.mesh.tensor=4", "--config.data.batch_size=128", *BIG],
  ),
  (
    "64xH100",
    "configs/sft.py:size=175b",
    ["--config.mesh.fsdp=8", "--config.mesh.tensor=8", "--config.data.batch_size=8", *BIG],
  ),
  ("v4-512", "configs/rm.py:size=6b", ["--config.mesh.fsdp=16", "--config.mesh.tensor=4", *BIG]),
  ("64xH100", "configs/rm.py:size=6b", ["--config.mesh.fsdp=8", *BIG]),
  ("v4-512", "configs/ppo.py:size=175b", ["--config.mesh.fsdp=64", "--config.mesh.tensor=4", *BIG]),
  ("v5p-1024", "configs/ppo.py:size=175b", ["--config.mesh.fsdp=64", "--config.mesh.tensor=8", *BIG]),
  ("64xH100", "configs/ppo.py:size=175b", ["--config.mesh.fsdp=8", "--config.mesh.tensor=8", *BIG]),
  # PPO at Llama-3-8B's shape on one host, full fine-tuning against LoRA (docs/scaling.md, "LoRA on one host").
  ("8xH100", "configs/ppo.py:size=6b", [*LLAMA3_8B, "--config.mesh.fsdp=8", *PPO_ONE_HOST, *BIG]),
  ("8xH100", "configs/ppo.py:size=6b", [*LLAMA3_8B, "--config.mesh.fsdp=8", *PPO_ONE_HOST, *BIG, *LORA_16]),
  ("v5p-8", "configs/ppo.py:size=6b", [*LLAMA3_8B, "--config.mesh.fsdp=4", *PPO_ONE_HOST, *BIG]),
  ("v5p-8", "configs/ppo.py:size=6b", [*LLAMA3_8B, "--config.mesh.fsdp=4", *PPO_ONE_HOST, *BIG, *LORA_16]),
]


def _environment(targets) -> None:
  """Before jax starts: enough fake CPU devices for CPU targets; TPU targets compile from the CPU host (jax
  would otherwise try to start the TPU runtime that libtpu brings)."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  cpu = [t.devices for t in targets if t.platform == "cpu"]
  if cpu:
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={max(cpu)}"
    ).strip()


def _fail(error: Exception) -> int:
  for line in str(error).splitlines():
    print(f"error: {line}", file=sys.stderr)
  return 2


def checked_config(config_arg: str, flags: list[str], target):
  """The config main.py would run with `flags`, checked as main.py checks it (`stages.load_checked`), but for
  the inputs a run reads (none here) and for batches that do not divide over the mesh (the plan raises them,
  `aot.batch_fallback`, and says so); then its mesh laid out on the target's devices. errors.UserError, one
  line per problem, for anything wrong, before anything compiles."""
  from instructgpt_jax import stages
  from instructgpt_jax.library import aot

  config = stages.load_checked(config_arg, flags, inputs=False, batches_on_mesh=False)
  aot.target_mesh(config, target)  # a mesh that does not lay out the target's devices: one line
  return config


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--target", help="a TPU slice, GPU cluster or cpu-N (see above)")
  parser.add_argument("--config", help="configs/<stage>.py[:arg], as for main.py")
  parser.add_argument("--rm_size", default="6b", help="PPO: the reward model's and critic's size")
  parser.add_argument("--report", action="store_true", help="compile every row of REPORT; print the table")
  parser.add_argument(
    "--candidates",
    type=int,
    default=None,
    help="a plan that does not fit: compile at most this many single changes (default 4; --report: 0)",
  )
  parser.add_argument("--hbm_gib", type=float, help="memory per device to judge against (default: the target's)")
  args, overrides = parser.parse_known_args(argv)
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad or not (args.report or (args.target and args.config)):
    parser.error(
      f"need --report or --target and --config; unknown arguments {bad}" if bad else "need --target and --config"
    )
  rows = REPORT if args.report else [(args.target, args.config, overrides)]
  candidates = args.candidates if args.candidates is not None else (0 if args.report else 4)

  from instructgpt_jax import accelerators, errors  # no jax: a bad name fails before jax starts

  try:
    targets = [accelerators.parse_target(name) for name, _, _ in rows]
  except errors.UserError as e:
    return _fail(f"--target={e}")
  if args.hbm_gib:
    targets = [dataclasses.replace(t, hbm_gib=args.hbm_gib) for t in targets]
  if any(t.platform == "tpu" for t in targets) and importlib.util.find_spec("libtpu") is None:
    name = next(t.name for t in targets if t.platform == "tpu")
    return _fail(
      f"--target={name}: compiling for TPUs needs libtpu: pip install 'jax[tpu]==0.10.2' (a separate venv is "
      "fine), or use a cpu-* target (fake CPU devices: state only)"
    )
  _environment(targets)

  from instructgpt_jax import metrics
  from instructgpt_jax.library import aot

  # Every row's config is checked before anything is printed or compiled.
  configs = []
  for target, (_, config_arg, flags) in zip(targets, rows):
    try:
      configs.append(checked_config(config_arg, flags, target))
    except errors.UserError as e:
      if not args.report:
        return _fail(e)
      configs.append(e)
  records = []
  started = time.time()
  for target, config, (target_name, config_arg, flags) in zip(targets, configs, rows):
    command = " ".join([f"--target={target_name}", f"--config={config_arg}", *flags])
    print(f"== {command}", flush=True)
    try:
      if isinstance(config, errors.UserError):
        raise config
      result = aot.report(config, target, rm_size=args.rm_size, candidates=candidates)
    except errors.UserError as e:
      if not args.report:
        return _fail(e)
      print(f"  failed: {str(e).splitlines()[0]}", flush=True)
      continue
    except Exception as e:  # one bad row must not lose the others
      if not args.report:
        raise
      print(f"  failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
      continue
    print(aot.summary(result), flush=True)
    records += aot.table_records(result)
  print(
    f"\nper device, GiB; jax {__import__('jax').__version__}, libtpu {aot.libtpu_version()}; "
    f"{time.time() - started:.0f} s\n"
  )
  print(metrics.markdown_table(aot.TABLE_COLUMNS, records))
  return 0


if __name__ == "__main__":
  sys.exit(main())
