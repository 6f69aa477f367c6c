"""Ours against the PyTorch peers on the CPU, same model shape, batch and settings; prints the ratios.

  ppo   our PPO iteration (benchmarks/ppo_iteration.py: the PPO stage itself) against TRL 1.12's experimental
        PPOTrainer: the same GPT-2 shape for policy, reference, value model and reward model (random
        weights), the same prompts (ids), rollout batch, minibatch, PPO epochs, response length,
        temperature 1, clip 0.2, GAE λ, float32. Episodes/s over whole iterations after `--warmup` ones.
  sft   our LM training step (benchmarks/train_step.py) against a transformers GPT2LMHeadModel step
        (masked cross-entropy, backward, clip 1.0, AdamW β = (0.9, 0.95)): tokens/s.

Each side runs in its own process (ours in this python, the peer in the reference venv's: torch 2.13.0,
transformers, trl==1.12.0 of requirements-ref.txt), with torch on 2 threads and XLA on every core (2 here).
The sides alternate, `--rounds` times, peer first in every other round, so a shared machine's load falls
on both alike; each figure is the median over the rounds, and the load average is printed before and after.

Differences that remain, both in the peer's favour: TRL steps its optimizer once per epoch where ours
steps once per minibatch (TRL accumulates its minibatches: see torch_reference.py), and ours also keeps
the EMA of the policy weights (InstructGPT §C.4); TRL's one AdamW updates policy and value together.

    python benchmarks/side_by_side.py --what ppo,sft --size mini
    python benchmarks/side_by_side.py --what ppo --size tiny --rollout_batch 8 --minibatch 4 \
        --prompt_len 16 --response_len 16 --iterations 1 --rounds 1                       # the test's
The peer's python: --ref_python, else $INSTRUCTGPT_JAX_REF_PYTHON, else .cache/venv-ref/bin/python.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: configs/

from benchmarks import _common, ppo_iteration  # noqa: E402
from instructgpt_jax import flops, models  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
REF_PYTHON_VARIABLE = "INSTRUCTGPT_JAX_REF_PYTHON"


def reference_python(given: str) -> str:
  path = given or os.environ.get(REF_PYTHON_VARIABLE) or os.path.join(REPO_ROOT, ".cache", "venv-ref", "bin", "python")
  if not os.path.isfile(path):
    raise SystemExit(
      f"side_by_side: no reference python at {path}; create it from requirements-ref.txt "
      f"(python3 -m venv .cache/venv-ref && .cache/venv-ref/bin/pip install -r requirements-ref.txt) "
      f"or pass --ref_python"
    )
  return path


def child_env() -> dict[str, str]:
  """One CPU device for XLA (not the tests' 8 fake ones); OpenMP threads that wait passively; quiet TRL.

  OpenMP's default spin-waiting collapses torch on a loaded machine: with a load average of 9 on 2 cores, a
  tiny GPT-2 step took 1.5 s on 2 threads against 6 ms on 1; waiting passively, 2 threads ran as fast as 1.
  """
  env = dict(os.environ)
  env["OMP_WAIT_POLICY"] = "PASSIVE"
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)
  env["JAX_PLATFORMS"] = "cpu"
  env["TRL_EXPERIMENTAL_SILENCE"] = "1"
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH", "")) if p)
  return env


def run_json(command: list[str]) -> dict:
  """Runs a side; its last stdout line is its JSON result."""
  done = subprocess.run(command, capture_output=True, text=True, env=child_env(), cwd=REPO_ROOT)
  if done.returncode:
    raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def shape(size: str) -> dict:
  cfg = models.resolve({"size": size})
  if cfg.family != "gpt" or not cfg.tied_embeddings or cfg.d_ff != 4 * cfg.d_model:
    raise SystemExit(f"--size {size}: the peers build GPT-2 models; choose a GPT-2-shaped size (tiny, mini, 124m)")
  return dict(
    n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads, vocab_size=cfg.vocab_size, max_len=cfg.max_len
  )


def ppo_sides(args, size: str, spec_dir: str):
  ours = [sys.executable, os.path.join(HERE, "ppo_iteration.py"), "--json", "--size", size]
  for name in (
    "rollout_batch",
    "minibatch",
    "epochs",
    "prompt_len",
    "response_len",
    "num_prompts",
    "warmup",
    "iterations",
  ):
    ours += [f"--{name}", str(getattr(args, name))]
  prompts, eos_id, pad_id = ppo_iteration.prompt_ids(args.num_prompts, args.prompt_len)
  spec = dict(
    shape(size),
    eos_id=eos_id,
    pad_id=pad_id,
    prompts=prompts,
    rollout_batch=args.rollout_batch,
    minibatch=args.minibatch,
    epochs=args.epochs,
    response_len=args.response_len,
    warmup=args.warmup,
    iterations=args.iterations,
    temperature=1.0,
    kl_coef=0.02,
    clip=0.2,
    lam=0.95,
    lr=5e-6,
    threads=args.threads,
  )
  path = os.path.join(spec_dir, f"ppo_{size}.json")
  with open(path, "w") as f:
    json.dump(spec, f)
  return ours, [reference_python(args.ref_python), os.path.join(HERE, "torch_reference.py"), "ppo", path]


def sft_sides(args, size: str, spec_dir: str):
  ours = [sys.executable, os.path.join(HERE, "train_step.py"), "--json", "--size", size]
  ours += ["--batch", str(args.batch), "--seq_len", str(args.seq_len), "--steps", str(args.steps), "--repeats", "1"]
  spec = dict(shape(size), batch=args.batch, seq_len=args.seq_len, lr=1e-3, weight_decay=0.1, warmup=2)
  spec.update(steps=args.steps, threads=args.threads)
  path = os.path.join(spec_dir, f"sft_{size}.json")
  with open(path, "w") as f:
    json.dump(spec, f)
  return ours, [reference_python(args.ref_python), os.path.join(HERE, "torch_reference.py"), "sft", path]


# What each comparison reports: (throughput key, its unit, the time keys shown for both sides).
COMPARISONS = {
  "ppo": ("episodes_per_s", "episodes/s", ("iteration_s", "rollout_s", "scoring_s", "training_s")),
  "sft": ("tokens_per_s", "tokens/s", ("step_s",)),
}


def compare(args, what: str, size: str, spec_dir: str) -> tuple[list[dict], str]:
  ours_cmd, peer_cmd = {"ppo": ppo_sides, "sft": sft_sides}[what](args, size, spec_dir)
  results = {"ours": [], "peer": []}
  for round_index in range(args.rounds):
    order = [("ours", ours_cmd), ("peer", peer_cmd)]
    for side, command in order if round_index % 2 == 0 else order[::-1]:
      results[side].append(run_json(command))
      print(f"# {what} {size} round {round_index + 1} {side}: {json.dumps(results[side][-1])}", file=sys.stderr)
  key, unit, time_keys = COMPARISONS[what]
  peer_name = {"ppo": "TRL 1.12 PPOTrainer", "sft": "transformers GPT-2"}[what]
  rows = []
  for side, name in (("ours", "instructgpt_jax"), ("peer", peer_name)):
    row = {
      "compare": what,
      "size": size,
      "side": name,
      unit: f"{statistics.median(r[key] for r in results[side]):,.2f}",
    }
    for t in time_keys:
      row[t.replace("_s", " s")] = f"{statistics.median(r[t] for r in results[side]):.3f}"
    # What the first iteration or step costs beyond a steady one: compilation on our side, first-call set-up on
    # the peer's (torch compiles nothing).
    first = [r["compile_s"] if side == "ours" else r[f"first_{time_keys[0]}"] - r[time_keys[0]] for r in results[side]]
    row["first extra s"] = f"{statistics.median(first):.1f}"
    if what == "sft":  # both sides against the same model FLOPs and the same measured matmul peak
      peak = statistics.median(r["peak_tflops"] for r in results["ours"])
      per_token = flops.train_flops_per_token(models.resolve({"size": size}), args.seq_len)
      row["MFU"] = f"{statistics.median(r[key] for r in results[side]) * per_token / (peak * 1e12):.1%}"
    rows.append(row)
  ratio = statistics.median(r[key] for r in results["ours"]) / statistics.median(r[key] for r in results["peer"])
  return rows, f"RATIO {what} {size}: ours / {peer_name} = {ratio:.2f}x ({unit}, median of {args.rounds} rounds)"


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--what", default="ppo,sft", help="comma-separated: ppo, sft")
  p.add_argument("--size", default="mini", help="comma-separated GPT-2-shaped sizes: tiny, mini, 124m")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--threads", type=int, default=2, help="torch threads")
  p.add_argument("--ref_python", default="")
  ppo = p.add_argument_group("ppo")
  ppo.add_argument("--rollout_batch", type=int, default=32)
  ppo.add_argument("--minibatch", type=int, default=8)
  ppo.add_argument("--epochs", type=int, default=1)
  ppo.add_argument("--prompt_len", type=int, default=64)
  ppo.add_argument("--response_len", type=int, default=64)
  ppo.add_argument("--num_prompts", type=int, default=256)
  ppo.add_argument("--warmup", type=int, default=2)
  ppo.add_argument("--iterations", type=int, default=3)
  sft = p.add_argument_group("sft")
  sft.add_argument("--batch", type=int, default=8)
  sft.add_argument("--seq_len", type=int, default=256)
  sft.add_argument("--steps", type=int, default=5)
  return p


def main(argv=None):
  args = parser().parse_args(argv)
  before = _common.load_average()
  rows, ratios = [], []
  with tempfile.TemporaryDirectory() as spec_dir:
    for what in args.what.split(","):
      for size in args.size.split(","):
        comparison_rows, ratio = compare(args, what, size, spec_dir)
        rows += comparison_rows
        ratios.append(ratio)
  print(_common.header())
  print(f"# before: {before}; after: {_common.load_average()}")
  for what in args.what.split(","):
    print(_common.table([r for r in rows if r["compare"] == what]))
  print("\n".join(ratios))


if __name__ == "__main__":
  main()
