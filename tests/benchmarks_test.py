"""The benchmarks: the PaLM FLOP count by hand, the CPU side by side against TRL at the smallest sizes, and PPO's
state with and without LoRA (benchmarks/lora_memory.py) at the tiny size.

The side by side needs the reference venv (torch, transformers, trl==1.12.0 of requirements-ref.txt), named
by INSTRUCTGPT_JAX_REF_PYTHON or at .cache/venv-ref (.ci/run creates it); without it that test skips.
"""

import os
import pathlib
import re
import subprocess
import sys

import jax
import pytest

from instructgpt_jax import flops, models

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_palm_flops_of_the_tiny_model_match_the_hand_count():
  cfg = models.resolve({"size": "tiny"})  # 2 layers, d 64, 4 heads × 16, d_ff 256, vocabulary 320, max_len 256
  per_layer = (64 * 192 + 192) + (64 * 64 + 64) + (2 * 64 * 256 + 256 + 64) + 4 * 64
  assert per_layer == 49_984
  n = 2 * per_layer + 320 * 64 + 2 * 64  # the tied unembedding and the final norm; no position table
  assert flops.matmul_params(cfg) == n == 120_576
  assert flops.train_flops_per_token(cfg, 128) == 6 * 120_576 + 12 * 2 * 4 * 16 * 128 == 920_064
  assert flops.forward_flops_per_token(cfg, 128) * 3 == flops.train_flops_per_token(cfg, 128)
  # N is every parameter of the real model but the position table.
  _, params = models.init(cfg, jax.random.key(0))
  assert models.param_count(params) - 256 * 64 == n


def test_palm_n_of_gpt2_124m_and_an_untied_model():
  assert flops.matmul_params(models.resolve({"size": "124m"})) == 124_439_808 - 1024 * 768
  untied = models.resolve({"size": "tiny-llama"})  # no position table; the input embedding is a lookup
  _, params = models.init(untied, jax.random.key(0))
  assert flops.matmul_params(untied) == models.param_count(params) - 320 * 64
  assert flops.peak_tflops("NVIDIA H200") == 989.4 and flops.peak_tflops("cpu") is None


def reference_python() -> str:
  path = os.environ.get("INSTRUCTGPT_JAX_REF_PYTHON") or str(REPO_ROOT / ".cache" / "venv-ref" / "bin" / "python")
  if not os.path.isfile(path):
    pytest.skip(f"TRL side by side: no reference venv at {path} (.ci/run creates it from requirements-ref.txt)")
  if subprocess.run([path, "-c", "import trl.experimental.ppo"], capture_output=True).returncode:
    pytest.skip(f"TRL side by side: {path} has no trl.experimental.ppo (trl==1.12.0, requirements-ref.txt)")
  return path


@pytest.mark.slow
def test_cpu_side_by_side_against_trl_prints_the_ratio():
  command = [sys.executable, str(REPO_ROOT / "benchmarks" / "side_by_side.py"), "--what", "ppo", "--size", "tiny"]
  command += ["--rollout_batch", "8", "--minibatch", "4", "--prompt_len", "16", "--response_len", "16"]
  command += ["--num_prompts", "32", "--iterations", "1", "--rounds", "1", "--ref_python", reference_python()]
  done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
  assert done.returncode == 0, done.stderr[-3000:]
  print(done.stdout)
  match = re.search(r"^RATIO ppo tiny: ours / TRL 1\.12 PPOTrainer = ([0-9.]+)x", done.stdout, re.MULTILINE)
  assert match, done.stdout
  assert float(match.group(1)) > 0
  assert "| ppo | tiny | instructgpt_jax |" in done.stdout and "| ppo | tiny | TRL 1.12 PPOTrainer |" in done.stdout


def test_same_results_ignores_timings_and_names_each_moved_number():
  from benchmarks import same_results

  before = [{"step": 1, "loss": 2.5, "time_rollout": 3.0, "steps_per_sec": 1.0}, {"step": 2, "loss": 2.25}]
  timing_only = [{"step": 1, "loss": 2.5, "time_rollout": 9.0, "steps_per_sec": 7.0}, {"step": 2, "loss": 2.25}]
  assert same_results.compare_rows(before, timing_only) == []
  moved = [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.2500001, "kl": 0.0}]
  assert same_results.compare_rows(before, moved) == ["step 2 kl: None -> 0.0", "step 2 loss: 2.25 -> 2.2500001"]
  assert same_results.compare_rows(before, before[:1]) == ["2 rows before, 1 after"]


def test_lora_memory_drops_the_reference_and_shrinks_adam_and_the_ema():
  """benchmarks/lora_memory.py at the tiny size: the live arrays of PPO's state after setup, full against rank 4."""
  from benchmarks import lora_memory

  full, adapted = lora_memory.measure("tiny", 0), lora_memory.measure("tiny", 4)
  f, a = full["kinds"], adapted["kinds"]
  base = f["policy params (base)"]
  assert base > 0 and f["reference params"] == base and a["reference params"] == 0  # the policy's base is the reference
  assert a["policy params (base)"] == base and f["policy adapters"] == 0 < a["policy adapters"]
  assert f["policy EMA"] == base and a["policy EMA"] == a["policy adapters"]  # the EMA of what trains only
  for kinds, trained in ((f, base), (a, a["policy adapters"])):  # Adam: two moments per trained param, + counts
    assert 2 * trained <= kinds["policy optimizer state"] <= 2 * trained + 64
  assert a["critic optimizer state"] < f["critic optimizer state"] / 10 and a["critic params"] > f["critic params"]
  assert a["reward model params"] == f["reward model params"] > 0
  assert f["other"] == a["other"] == 0  # every live array is a part of the state
  for result in (full, adapted):  # launch.aot's plan counts the same bytes
    assert lora_memory.totals(result) == (result["aot params"], result["aot opt state"])
