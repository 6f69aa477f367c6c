"""Time to the first step of a run, and of a second identical run, with JAX's persistent compilation cache
(`config.compilation_cache_dir`, on by default) and without it ("").

    python benchmarks/startup.py                       # tiny pretraining and a tiny PPO sweep point
    python benchmarks/startup.py --stages=ppo --steps=3

Every run is the `main.py` command in a fresh workdir (as a sweep point or a resume on a pod starts): the
first with an empty cache folder, the second with what the first left in it. "first row s" is the time from
the command's start to its first metrics row (written once the second step is dispatched: metrics are
fetched a step late); "total s" the whole command, its final evaluation and save included. PPO's models
(a tiny SFT run and an RM from it) are trained once beforehand, untimed.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def command(stage: str, workdir: pathlib.Path, cache: str, steps: int, models: pathlib.Path | None) -> list[str]:
  common = [
    f"--workdir={workdir}",
    f"--config.compilation_cache_dir={cache}",
    "--config.progress_bar=false",
    "--config.log_every_steps=1",
  ]
  if stage == "pretrain":
    flags = ["--config=configs/pretrain.py:tiny", f"--config.total_steps={steps}"]
  else:
    flags = [
      "--config=configs/ppo.py:tiny",
      f"--config.model.init_from={models / 'sft'}",
      f"--config.ppo.reward_model={models / 'rm' / 'export'}",
      f"--config.ppo.episodes={32 * steps}",  # `steps` iterations of 32 rollouts
      "--config.data.eval=",
    ]
  return [sys.executable, "-m", "instructgpt_jax.main", *flags, *common]


def timed(cmd: list[str], workdir: pathlib.Path, env: dict) -> tuple[float, float]:
  """(seconds to the first metrics row, seconds to the end) of one command."""
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  first, metrics = None, workdir / "metrics.jsonl"
  while proc.poll() is None:
    if first is None and metrics.exists() and metrics.read_text().strip():
      first = time.perf_counter() - start
    time.sleep(0.05)
  total = time.perf_counter() - start
  if proc.returncode:
    raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read()[-3000:]}")
  if first is None:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    first = total if rows else float("nan")
  return first, total


def train_models(root: pathlib.Path, env: dict) -> None:
  """A tiny PPO-init SFT run and an RM from it (untimed), for the PPO rows."""
  root.mkdir(parents=True)
  base = [sys.executable, "-m", "instructgpt_jax.main"]
  for cmd in (
    [*base, "--config=configs/sft.py:tiny,variant=ppo_init", f"--workdir={root / 'sft'}", "--config.total_steps=2"],
    [
      *base,
      "--config=configs/rm.py:tiny",
      f"--workdir={root / 'rm'}",
      "--config.total_steps=2",
      f"--config.model.init_from={root / 'sft'}",
    ],
  ):
    done = subprocess.run([*cmd, "--config.progress_bar=false"], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
      raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--stages", default="pretrain,ppo", help="comma-separated: pretrain, ppo")
  parser.add_argument("--steps", type=int, default=2, help="steps (PPO: iterations) per run")
  args = parser.parse_args()
  # The command's own setting decides: JAX_COMPILATION_CACHE_DIR would take precedence over it.
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env.setdefault("JAX_PLATFORMS", "cpu")
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    stages = [s for s in args.stages.split(",") if s]
    if "ppo" in stages:
      train_models(root / "models", env)
    for stage in stages:
      for cache_on in (True, False):
        cache = str(root / f"cache_{stage}") if cache_on else ""
        for run in ("first", "second"):
          workdir = root / f"{stage}_{'cache' if cache_on else 'nocache'}_{run}"
          first, total = timed(command(stage, workdir, cache, args.steps, root / "models"), workdir, env)
          rows.append(
            {
              "stage": stage,
              "compilation cache": "on" if cache_on else "off",
              "run": run,
              "first row s": f"{first:.1f}",
              "total s": f"{total:.1f}",
            }
          )
          print(rows[-1], flush=True)
  print(_common.header("CPU, one process per run"))
  print(_common.table(rows))


if __name__ == "__main__":
  main()
