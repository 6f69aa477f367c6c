"""Bytes the PPO programs move through collectives, per decode step and per training step, in both rollout
layouts (`ppo.rollout_layout`), from the compiled HLO (`hlo.collective_bytes`); and the time they imply.

    python benchmarks/collectives.py --rows cpu        # 8 fake CPU devices, the tiny and mini models
    python benchmarks/collectives.py --rows tpu        # GPT-3 1.3B / 6.7B / 175B PPO on v4 and v5p (jax[tpu])

Each row compiles the trainer's own rollout sampler and minibatch step (`aot.plan_for`, as launch/aot.py does)
and reads from the compiled program: the per-device result bytes of its collectives outside the decode loop
("once": the prompt's prefill, and in the decode layout the one resharding of the weights) and inside one
iteration of it ("per decode step"); XLA's temporary memory per device. For TPU targets it adds the time
those bytes take at the chip's interconnect bandwidth beside the step's model FLOPs at peak (a roofline per
step; `flops.py` counts the FLOPs). Bandwidths: v4 1.1 PB/s all-reduce bandwidth per 4,096-chip pod (the
Cloud TPU v4 page), 269 GB/s a chip; v5p 1,200 GB/s bidirectional ICI a chip (the v5p page), 600 GB/s one
way. The bytes are results held per device, an upper bound on what crosses its links.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: configs/

BIG = ["--config.model.remat=full", "--config.model.scan_layers=true"]
CPU_SMALL = [
  "--config.ppo.rollout_batch=32",
  "--config.ppo.minibatch=8",
  "--config.ppo.max_new_tokens=32",
  "--config.data.max_prompt_len=32",
  "--config.data.ptx_seq_len=64",
  "--config.ppo.ptx_per_episode=1",
]
ROWS = {
  # (target, policy size, reward model size, overrides): on 8 CPU devices, data 4 × fsdp 2 (2 divides the kv
  # heads of both sizes, so the decode layout fits).
  "cpu": [
    ("cpu-8", size, size, ["--config.mesh.data=4", "--config.mesh.fsdp=2", *CPU_SMALL]) for size in ("tiny", "mini")
  ],
  # Meshes where fsdp × tensor divides the kv heads (16, 32 and 96; the decode layout needs it) and data × fsdp
  # divides the paper's minibatch of 64.
  "tpu": [
    ("v4-512", "1.3b", "6b", ["--config.mesh.data=16", "--config.mesh.fsdp=4", "--config.mesh.tensor=4", *BIG]),
    ("v4-512", "6.7b", "6b", ["--config.mesh.data=8", "--config.mesh.fsdp=8", "--config.mesh.tensor=4", *BIG]),
    ("v5p-1024", "1.3b", "6b", ["--config.mesh.data=32", "--config.mesh.fsdp=2", "--config.mesh.tensor=8", *BIG]),
    ("v5p-1024", "6.7b", "6b", ["--config.mesh.data=16", "--config.mesh.fsdp=4", "--config.mesh.tensor=8", *BIG]),
    ("v5p-1024", "175b", "6b", ["--config.mesh.data=16", "--config.mesh.fsdp=4", "--config.mesh.tensor=8", *BIG]),
  ],
}
ICI_BYTES_PER_S = {"v4": 1.1e15 / 4096, "v5p": 600e9}
PEAK_FLOPS = {"v4": 275e12, "v5p": 459e12}


def _flops_per_device(config, program: str, devices: int) -> float:
  """Model FLOPs of one decode step (every rollout row's next token) or one minibatch step, per device."""
  from instructgpt_jax import flops, models
  from instructgpt_jax.library import ppo_steps

  p, policy = config.ppo, models.resolve(config.model.to_dict())
  length = config.data.max_prompt_len + p.max_new_tokens
  if program == "rollout":
    return flops.forward_flops_per_token(policy, length) * p.rollout_batch / devices
  rows = p.minibatch * length
  ptx = ppo_steps.ptx_rows(p) * config.data.ptx_seq_len if p.ptx_coef else 0
  return (2 * flops.train_flops_per_token(policy, length) * rows + flops.train_flops_per_token(policy, 2048) * ptx) / (
    devices
  )  # the policy and a critic of about its size; the ptx rows


def measure(target_name: str, size: str, rm_size: str, flags: list[str], layout: str, programs=None) -> list[dict]:
  """One row per compiled program of the PPO stage in `layout` (only those named in `programs`, if given)."""
  from instructgpt_jax import accelerators, config_lib, hlo
  from instructgpt_jax.library import aot

  config = config_lib.load_config(f"configs/ppo.py:size={size}", [*flags, f"--config.ppo.rollout_layout={layout}"])
  target = accelerators.parse_target(target_name)
  mesh, plan = aot.plan_for(config, target, rm_size=rm_size)
  chip = target.topology.split(":")[0] if target.platform == "tpu" else ""
  rows = []
  for program in [p for p in plan.programs if programs is None or p.name in programs]:
    started = time.perf_counter()
    try:
      with aot.without_persistent_cache() if chip else contextlib.nullcontext():
        compiled = program.lower().compile()
    except Exception as e:  # a program that does not fit is reported, not fatal
      rows.append({"target": target_name, "size": size, "layout": layout, "program": program.name,
                   "error": str(e).splitlines()[0][:120]})  # fmt: skip
      continue
    moved = hlo.collective_bytes(compiled.as_text())
    # A decode step is one iteration of the sampler's loop; a minibatch step is the whole train_step program.
    kinds = moved["per_iteration"] if program.name == "rollout" else moved["once"]
    per_step = sum(kinds.values())
    other = per_step - kinds["all-gather"] - kinds["all-reduce"]
    flop_s = _flops_per_device(config, program.name, mesh.size) / PEAK_FLOPS[chip] if chip else None
    ici_s = per_step / ICI_BYTES_PER_S[chip] if chip else None
    temp = compiled.memory_analysis().temp_size_in_bytes
    rows.append(
      {
        "target": target_name,
        "size": size,
        "mesh (data, fsdp, tensor)": ", ".join(str(mesh.shape[a]) for a in ("data", "fsdp", "tensor")),
        "layout": layout,
        "program": program.name,
        "once MB": f"{sum(moved['once'].values()) / 1e6:,.2f}" if program.name == "rollout" else "-",
        "per step MB": f"{per_step / 1e6:,.3f}",
        "all-gather / all-reduce / other MB": " / ".join(
          f"{v / 1e6:,.3f}" for v in (kinds["all-gather"], kinds["all-reduce"], other)
        ),
        "ICI ms": f"{ici_s * 1e3:,.3f}" if ici_s is not None else "-",
        "FLOP ms": f"{flop_s * 1e3:,.3f}" if flop_s is not None else "-",
        "temp": f"{temp / 2**30:,.2f} GiB" if chip else f"{temp / 2**20:,.1f} MiB",
        "compile s": f"{time.perf_counter() - started:.0f}",
      }
    )
    print(rows[-1], flush=True)
  return rows


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rows", default="cpu", choices=sorted(ROWS))
  args = parser.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if args.rows == "cpu":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
  from benchmarks import _common

  records = []
  for target_name, size, rm_size, flags in ROWS[args.rows]:
    train = measure(target_name, size, rm_size, flags, "train")
    # The minibatch step is the same program in both layouts: compiled once, its row shown for both.
    records += train + measure(target_name, size, rm_size, flags, "decode", programs=("rollout",))
    records += [dict(r, layout="decode") for r in train if r["program"] == "train_step"]
  print(_common.header())
  columns = list(next(r for r in records if "error" not in r))
  print(
    _common.table([{c: r.get(c, r.get("error", "") if c == "per step MB" else "-") for c in columns} for r in records])
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
