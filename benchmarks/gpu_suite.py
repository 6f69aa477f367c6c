"""The GPU benchmark suite that benchmarks/gpu.sh runs: every acceptance figure of the benchmarks issue in one table.

  LM train step (tokens/s, MFU)    gpt2-124m, batch 16 × 1024; gpt3-1.3b, batch 8 × 2048 (bf16, float32 params)
  decode (fraction of the bound)   gpt3-1.3b, batch 16 and 64, prompt 256, response 256 (bf16)
  PPO iteration (episodes/s)       gpt2-124m: ours, and TRL 1.12's PPOTrainer where trl imports (bf16 autocast)

Each benchmark runs in its own process under a share of `--budget_s`, most important first, so the table
always prints: a job that fails or runs out of time says so in its row. A job may list fallbacks (e.g.
XLA attention where cuDNN's refuses a shape); the row names the variant that ran.

    python benchmarks/gpu_suite.py --budget_s 450
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: configs/

from benchmarks import _common, ppo_iteration, side_by_side  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable

PLAN = dict(
  train_124m=["--size", "124m", "--batch", "16", "--seq_len", "1024", "--dtype", "bfloat16", "--steps", "10"],
  train_1_3b=["--size", "1.3b", "--batch", "8", "--seq_len", "2048", "--dtype", "bfloat16", "--scan_layers"]
  + ["--steps", "5"],
  decode=["--size", "1.3b", "--batch", "16,64", "--prompt_len", "256", "--response_len", "256", "--dtype", "bfloat16"],
  ppo_size="124m",
  ppo_flags=["--dtype", "bfloat16"],
  ppo=dict(rollout_batch=64, minibatch=16, epochs=1, prompt_len=64, response_len=128, num_prompts=512)
  | dict(warmup=2, iterations=3),
  peer=dict(device="cuda", bf16=True, threads=8),
  peer_python=PY,  # the GPU image has torch and transformers in the same python as jax
  env={},
  labels=("124m", "1.3b"),
  settings=("bf16, batch 16 × 1024", "bf16, batch 8 × 2048"),
)
# --smoke: the same jobs at the tiny size on any machine, to check the plumbing in a minute or two.
SMOKE = dict(
  train_124m=["--size", "tiny", "--batch", "2", "--seq_len", "64", "--steps", "2", "--repeats", "1"],
  train_1_3b=["--size", "tiny", "--batch", "2", "--seq_len", "64", "--scan_layers", "--steps", "2", "--repeats", "1"],
  decode=["--size", "tiny", "--batch", "2", "--prompt_len", "16", "--response_len", "16"],
  ppo_size="tiny",
  ppo_flags=[],
  ppo=dict(rollout_batch=8, minibatch=4, epochs=1, prompt_len=16, response_len=16, num_prompts=32)
  | dict(warmup=2, iterations=1),
  peer=dict(device="cpu", bf16=False, threads=2),
  env=dict(OMP_WAIT_POLICY="PASSIVE"),  # see side_by_side.child_env
  labels=("tiny (smoke)", "tiny (smoke)"),
  settings=("float32, batch 2 × 64", "float32, batch 2 × 64"),
)


def run(command: list[str], timeout: float) -> tuple[str, str]:
  """(stdout, error or ''): a job's output, or why it has none."""
  if timeout < 1:
    return "", "not run: the suite's time budget was spent"
  env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1", **PLAN["env"])
  env["PYTHONPATH"] = os.pathsep.join(p for p in (side_by_side.REPO_ROOT, env.get("PYTHONPATH", "")) if p)
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
  except subprocess.TimeoutExpired:
    return "", f"timeout after {timeout:.0f} s"
  if done.returncode:
    last = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:] or [f"exit {done.returncode}"]
    return done.stdout, f"failed: {last[0][:160]}"
  return done.stdout, ""


def last_json(stdout: str) -> dict:
  return json.loads(stdout.strip().splitlines()[-1])


def train_rows(label: str, variants: list[tuple[str, list[str]]], target: float, deadline: float) -> list[dict]:
  error = ""
  for name, flags in variants:
    stdout, error = run([PY, os.path.join(HERE, "train_step.py"), "--json", *flags], deadline - time.time())
    if not error:
      r = last_json(stdout)
      figure = f"{r['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu']:.1%} (compile {r['compile_s']:.0f} s)"
      return [row(f"LM train step {label}", name, figure, f"≥ {target:.0%} MFU", r["mfu"] >= target)]
  return [row(f"LM train step {label}", variants[-1][0], error, f"≥ {target:.0%} MFU", None)]


def decode_rows(deadline: float) -> list[dict]:
  command = [PY, os.path.join(HERE, "decode.py"), *PLAN["decode"], "--repeats", "3"]
  stdout, error = run(command, deadline - time.time())
  if error:
    return [row(f"decode {PLAN['labels'][1]}", " ".join(PLAN["decode"]), error, "≥ 60% of bound", None)]
  lines = [line for line in stdout.splitlines() if line.startswith("| ")]
  keys = [k.strip() for k in lines[0].strip("|").split("|")]
  rows = []
  for line in lines[1:]:
    r = dict(zip(keys, (v.strip() for v in line.strip("|").split("|"))))
    fraction = float(r["of bound"].rstrip("%")) / 100
    figure = f"{r['decode tok/s']} tokens/s, step {r['step ms']} ms, {r['GB/s']} GB/s = {r['of bound']} of bound"
    rows.append(
      row(f"decode {PLAN['labels'][1]}", f"batch {r['batch']}, {r['dtype']}", figure, "≥ 60% of bound", fraction >= 0.6)
    )
  return rows


def ppo_rows(deadline: float) -> list[dict]:
  size, ppo = PLAN["ppo_size"], PLAN["ppo"]
  ours_cmd = [PY, os.path.join(HERE, "ppo_iteration.py"), "--json", "--size", size, *PLAN["ppo_flags"]]
  for key, value in ppo.items():
    ours_cmd += [f"--{key}", str(value)]
  setting = f"{size}: rollout {ppo['rollout_batch']}, minibatch {ppo['minibatch']}, response {ppo['response_len']}"
  stdout, error = run(ours_cmd, deadline - time.time())
  if error:
    return [row("PPO iteration (ours)", setting, error, "", None)]
  ours = last_json(stdout)
  rows = [row("PPO iteration (ours)", setting, ppo_figure(ours), "", None)]
  peer_python = PLAN["peer_python"]
  if subprocess.run([peer_python, "-c", "import trl.experimental.ppo"], capture_output=True).returncode:
    return rows + [row("PPO iteration (TRL 1.12)", setting, f"not run: no trl in {peer_python}", "", None)]
  prompts, eos_id, pad_id = ppo_iteration.prompt_ids(ppo["num_prompts"], ppo["prompt_len"])
  spec = dict(side_by_side.shape(size), eos_id=eos_id, pad_id=pad_id, prompts=prompts, **PLAN["peer"])
  spec.update({k: ppo[k] for k in ("rollout_batch", "minibatch", "epochs", "response_len", "warmup", "iterations")})
  spec.update(temperature=1.0, kl_coef=0.02, clip=0.2, lam=0.95, lr=5e-6)
  with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
    json.dump(spec, f)
  stdout, error = run([peer_python, os.path.join(HERE, "torch_reference.py"), "ppo", f.name], deadline - time.time())
  if error:
    return rows + [row("PPO iteration (TRL 1.12)", setting, error, "", None)]
  peer = last_json(stdout)
  ratio = ours["episodes_per_s"] / peer["episodes_per_s"]
  return rows + [
    row("PPO iteration (TRL 1.12)", setting, ppo_figure(peer), "", None),
    row("PPO ours / TRL", setting, f"{ratio:.2f}×", "≥ 5×", ratio >= 5),
  ]


def ppo_figure(r: dict) -> str:
  return (
    f"{r['episodes_per_s']:.1f} episodes/s; iteration {r['iteration_s']:.2f} s = rollout {r['rollout_s']:.2f} "
    f"+ scoring {r['scoring_s']:.2f} + training {r['training_s']:.2f}"
  )


def row(benchmark: str, setting: str, figure: str, target: str, met: bool | None) -> dict:
  return {
    "benchmark": benchmark,
    "setting": setting,
    "figure": figure,
    "target": target,
    "met": "" if met is None else ("yes" if met else "no"),
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--budget_s", type=float, default=450)
  p.add_argument("--smoke", action="store_true", help="the tiny size: checks the plumbing on any machine")
  p.add_argument("--ref_python", default="", help="the python with torch and trl, if not this one")
  args = p.parse_args(argv)
  if args.smoke:
    PLAN.update(SMOKE)
  if args.ref_python:
    PLAN["peer_python"] = args.ref_python
  start = time.time()
  deadline = start + args.budget_s

  def until(share_s: float) -> float:
    """The end of a job's share: `share_s` from now, but never past the suite's deadline."""
    return min(time.time() + share_s, deadline)

  rows = train_rows(PLAN["labels"][0], [(PLAN["settings"][0], PLAN["train_124m"])], 0.35, until(90))
  rows += train_rows(
    PLAN["labels"][1],
    [
      (f"{PLAN['settings'][1]}, cuDNN attention", [*PLAN["train_1_3b"], "--attention", "cudnn"]),
      (f"{PLAN['settings'][1]}, XLA attention", [*PLAN["train_1_3b"], "--attention", "xla"]),  # not "auto": cuDNN
    ],
    0.45,
    until(150),
  )
  rows += ppo_rows(until(170))
  rows += decode_rows(deadline)
  print(_common.header(f"suite {time.time() - start:.0f} s"))
  print(_common.table(rows))


if __name__ == "__main__":
  main()
