"""Compile a stage's step for a pod without the pod, and report per-device memory (instructgpt_jax/aot.py).

One config, the same flags as main.py:
    python -m launch.aot --target=v4-512 --config=configs/sft.py:size=1.3b --config.mesh.fsdp=8
The table of docs/scaling.md (every row of REPORT below; TPU targets need `pip install "jax[tpu]"`):
    python -m launch.aot --report
Targets: v4-8 v4-512 v5e-256 v5p-8 v5p-1024 64xH100 (TPU topologies from libtpu, compiled offline), cpu-8
and cpu-64xH100 (fake CPU devices: argument sizes only).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# Row: (target, config, overrides). Global batches are chosen so every batch shard gets whole rows; remat
# and scanned layers are what a run at this size would set.
BIG = ["--config.model.remat=full", "--config.model.scan_layers=true"]
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
]


def _environment(target_names) -> None:
  """Before jax starts: enough fake CPU devices for CPU targets; TPU targets compile from the CPU host."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TPU_LOG_DIR", "/tmp/tpu_logs")
  cpu = [int(n.split("-")[1].split("x")[0]) for n in target_names if n.startswith("cpu-")]
  if cpu:
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={max(cpu)}"
    ).strip()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--target", help="a pod or cluster (instructgpt_jax.aot.TARGETS)")
  parser.add_argument("--config", help="configs/<stage>.py[:arg], as for main.py")
  parser.add_argument("--rm_size", default="6b", help="PPO: the reward model's and critic's size")
  parser.add_argument("--report", action="store_true", help="compile every row of REPORT; print the table")
  args, overrides = parser.parse_known_args(argv)
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad or not (args.report or (args.target and args.config)):
    parser.error(
      f"need --report or --target and --config; unknown arguments {bad}" if bad else "need --target and --config"
    )
  rows = REPORT if args.report else [(args.target, args.config, overrides)]
  _environment([r[0] for r in rows])

  from instructgpt_jax import aot, metrics, sweep

  records = []
  started = time.time()
  for target_name, config_arg, flags in rows:
    command = " ".join([f"--target={target_name}", f"--config={config_arg}", *flags])
    print(f"== {command}", flush=True)
    config = sweep.load_config(config_arg, flags)
    try:
      result = aot.report(config, aot.TARGETS[target_name], rm_size=args.rm_size)
    except Exception as e:  # one bad row (a mesh that does not divide, ...) must not lose the others
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
