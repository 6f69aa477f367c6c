"""The recipe a researcher runs first: a real pretrained model (SmolLM2-135M-Instruct) and real preference data
(Anthropic HH-RLHF pairs) through SFT → RM → PPO-ptx → export, at the recipe's smoke size, in bfloat16.

Skips where ../shared is absent (the model comes from ../shared/tools/smollm2.sh, the data from ../shared/data)
or where the transformers reference venv is missing.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from lm_eval_test import _local_tasks

from instructgpt_jax import generation, paths, sharding, train_state
from instructgpt_jax.library import lm_eval_model, model_io

from doc_examples import README_EXPORT, README_RECIPE, RECIPE_EVAL, argv, shrink
from hf_test import SMOLLM2_PROMPTS, reference_python, run_reference
from runs import read_metrics


@pytest.mark.slow
def test_recipe_smoke_on_smollm2_and_hh_rlhf(smollm2_folder, shared_data, tmp_path, exclusive_memory):
  """The README's recipe command (doc_examples.README_RECIPE) with docs/evaluation.md's eval_tasks (RECIPE_EVAL)
  at its smoke size on the local tasks, then the README's export command (README_EXPORT)."""
  reference_python()  # skips without the transformers reference venv, before the long run
  workdir = tmp_path / "hh"
  # docs/evaluation.md's recipe command is the README's with eval_tasks: the run below is both, on the local
  # tasks (tests/eval_tasks) in place of the hub's.
  assert RECIPE_EVAL.startswith(README_RECIPE + ",")
  tasks = _local_tasks(tmp_path).replace(",", "+")
  recipe = shrink(
    RECIPE_EVAL,
    {
      "hf:/path/to/SmolLM2-360M": f"hf:{smollm2_folder}",
      "/data/hh-rlhf/harmless-base/train.jsonl.gz": str(shared_data / "hh_rlhf_harmless_base_test.jsonl.gz"),
      "ptx=/data/text/*.txt": f"ptx={shared_data / 'tinyshakespeare.txt'},size=smoke",
      "runs/hh": str(workdir),
      "eval_tasks=hellaswag+truthfulqa_mc2": f"eval_tasks={tasks}",
    },
    extra=("--config.eval.batch_size=8",),
  )
  # One device in a subprocess, as a user runs it: 8 fake CPU devices each hold the all-gathered model, and
  # the SFT step alone then passes 22 GiB.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  done = subprocess.run([sys.executable, *argv(recipe)[1:]], capture_output=True, text=True, env=env)
  assert done.returncode == 0, done.stderr[-3000:]
  for stage in ("data", "sft", "rm", "ppo", "export"):
    assert (workdir / stage / "done.json").exists(), stage
  final = read_metrics(workdir / "ppo")[-1]
  assert np.isfinite(final["kl"]) and np.isfinite(read_metrics(workdir / "rm")[-1]["eval_accuracy"])

  # Every stage ran in bfloat16 with the model's own tokenizer, and started with an evaluation (step 0).
  for stage in ("sft", "rm", "ppo"):
    config = paths.read_json(workdir / stage / "config.json")
    assert config["model"]["dtype"] == "bfloat16" and config["data"]["tokenizer"] == str(smollm2_folder), stage
    assert read_metrics(workdir / stage)[0]["step"] == 0, stage
  rows = [r for r in read_metrics(workdir / "ppo") if r["step"] > 0]
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:  # the first minibatch trains on the rollout policy itself: its ratio is 1 up to bf16 drift
    assert abs(r["first_minibatch_ratio_max"] - 1.0) <= 0.02, r

  # The alignment tax: the starting, SFT and PPO-ptx models' results, each in its folder, tabulated with their
  # standard errors and differences from the start (lm_eval_tasks.tax_table; by hand in tests/lm_eval_test.py).
  evaluated = {}
  for n, label in enumerate(("start", "SFT", "PPO_ptx")):
    evaluated[label] = json.loads((workdir / "eval" / f"{n}_{label}" / "results.json").read_text())
    assert evaluated[label]["instructgpt_jax"]["dtype"] == "bfloat16", label
  assert evaluated["start"]["instructgpt_jax"]["init_from"] == f"hf:{smollm2_folder}"
  assert evaluated["PPO_ptx"]["instructgpt_jax"]["init_from"] == str(workdir / "ppo")
  assert lm_eval_model.read_model(str(workdir / "ppo"))[0].ema  # the PPO column is the EMA policy, as exported
  table = (workdir / "alignment_tax.md").read_text()
  assert "| task | metric | start | SFT | PPO-ptx | SFT − start | PPO-ptx − start |" in table
  start, ppo = evaluated["start"]["results"]["local_mc"], evaluated["PPO_ptx"]["results"]["local_mc"]
  row = next(line for line in table.splitlines() if line.startswith("| local_mc | acc ↑ |"))
  assert f"{start['acc,none']:.4f} ± {start['acc_stderr,none']:.4f}" in row
  assert f"{ppo['acc,none'] - start['acc,none']:+.4f}" in row
  assert sum(line.startswith("| local_") for line in table.splitlines()) == 5  # acc, 3 perplexities, exact match

  # The export: transformers loads it as it is, stops a chat turn at its end, and its greedy tokens are our
  # sampler's on the same (EMA) weights.
  export = workdir / "export"
  generation_config = json.loads((export / "generation_config.json").read_text())
  spec = tmp_path / "spec.json"
  spec.write_text(json.dumps(SMOLLM2_PROMPTS))
  run_reference("smollm2", export, spec, tmp_path / "reference.npz")
  reference = np.load(tmp_path / "reference.npz")
  eos = int(reference["eos_id"])
  eos_ids = generation_config["eos_token_id"]
  eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids]
  assert eos in eos_ids
  first_chat = reference["greedy_0"].tolist()
  assert first_chat[-1] in eos_ids and len(first_chat) < SMOLLM2_PROMPTS["new_tokens"]  # the turn ended

  source = model_io.read_source(f"hf:{export}")
  mesh = sharding.make_mesh({"fsdp": -1})
  graphdef, target = train_state.param_shardings_for(source.config, mesh, sharding.DEFAULT_RULES)
  params = model_io.load(source, "lm", target, source.config, 0)
  ema = model_io.load(model_io.read_source(str(workdir / "ppo")), "lm", target, source.config, 0)
  jax.tree.map(np.testing.assert_array_equal, params, ema)  # the export holds the EMA policy
  assert_greedy_is_the_references(graphdef, params, reference, mesh)

  # The README's export command on the recipe's PPO run writes the same files the recipe's own export wrote.
  out = tmp_path / "hh-policy"
  export = shrink(README_EXPORT, {"runs/hh/ppo": str(workdir / "ppo"), "runs/hh-policy": str(out)})
  done = subprocess.run([sys.executable, *argv(export)[1:]], capture_output=True, text=True, env=env)
  assert done.returncode == 0, done.stderr[-3000:]
  for name in ("model.safetensors", "config.json", "tokenizer.json", "generation_config.json"):
    assert (out / name).read_bytes() == (workdir / "export" / name).read_bytes(), name


def assert_greedy_is_the_references(graphdef, params, reference, mesh) -> None:
  """Our sampler's greedy tokens on SMOLLM2_PROMPTS equal transformers' (`reference`: hf_reference.py's npz)."""
  eos = int(reference["eos_id"])
  n_prompts = len(SMOLLM2_PROMPTS["chat"]) + len(SMOLLM2_PROMPTS["raw"])
  prompts = [reference[f"prompt_{k}"].tolist() for k in range(n_prompts)]
  tokens, segments = generation.left_pad(prompts, buckets=(64,), pad_id=0)
  settings = generation.SamplingSettings(eos_id=eos, pad_id=0 if eos else 1, greedy=True)
  sampler = generation.Sampler(graphdef, settings, response_buckets=(32,), mesh=mesh)
  rollout = sampler(params, tokens, segments, jax.random.PRNGKey(0), max_new_tokens=SMOLLM2_PROMPTS["new_tokens"])
  for k in range(n_prompts):
    ours = np.asarray(rollout.tokens[k])[np.asarray(rollout.mask[k]) > 0].tolist()
    assert ours == reference[f"greedy_{k}"].tolist(), k
