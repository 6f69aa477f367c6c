"""LoRA through the stages (issue 30): a LoRA run starts from its base exactly (B = 0), trains and checkpoints
only its adapters (and heads), resumes exactly, hands the next stage its merged model, and its KL / DPO
reference is its own base with the adapters off, no second copy. models/lora.py's own tests: lora_test.py."""

import dataclasses
import math
import shutil

import jax
import numpy as np
import pytest

from configs import dpo, ppo, rm, sft
from instructgpt_jax import checkpoint, main, models, paths, scoring, sharding, train_state
from instructgpt_jax.library import model_io, ppo_steps
from instructgpt_jax.models import lora

from runs import configured, read_metrics

RANK = 4


def _names(tree) -> set[str]:
  """The last key of every leaf path of a (saved) pytree."""
  return {str(getattr(p[-1], "key", p[-1])) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _sft_flags(ppo_models, **overrides):
  return {
    "model.init_from": str(ppo_models / "sft"),
    "model.lora.rank": RANK,
    "model.lora.alpha": 8.0,
    "optim.lr": 1e-2,
    "data.train": "lab:demonstrations:train:200",
    "data.eval": "lab:demonstrations:eval:16",
    "total_steps": 6,
    "checkpoint_every_steps": 3,
    "eval_every_steps": 3,
    "log_every_steps": 1,
    **overrides,
  }


@pytest.fixture(scope="module")
def lora_sft(ppo_models, tmp_path_factory):
  """A 6-step LoRA SFT run (rank 4) from the tiny SFT model, checkpoints at 3 and 6."""
  workdir = tmp_path_factory.mktemp("lora_sft") / "run"
  main.run(configured(sft, "tiny", **_sft_flags(ppo_models)), str(workdir))
  return workdir


def _lm(cfg, params, tokens):
  graphdef = models.abstract(cfg)[0]
  return np.asarray(models.apply(graphdef, params, tokens)[0])


def test_lora_sft_trains_and_saves_only_the_adapters_and_records_its_base(lora_sft, ppo_models):
  saved = checkpoint._saved_tree(checkpoint.Checkpointer(str(lora_sft)).directory / "6" / "state")
  assert _names(saved["params"]) == {"lora_a", "lora_b"}  # no second copy of the base
  assert _names(saved["opt_state"]) <= {"lora_a", "lora_b", "count"}  # Adam's moments: the adapters' only
  info = paths.read_json(lora_sft / "model.json")
  base = model_io.read_source(str(ppo_models / "sft"))
  assert info["base"] == {"init_from": str(ppo_models / "sft"), "ema": False, "step": base.step}
  assert info["model"]["lora"]["rank"] == RANK
  adapters = checkpoint.Checkpointer(str(lora_sft)).restore_params(6)
  b = [np.abs(np.asarray(x)).max() for p, x in jax.tree_util.tree_flatten_with_path(adapters)[0] if "lora_b" in str(p)]
  assert b and min(b) > 0  # every B moved from zero
  rows = read_metrics(lora_sft)
  evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
  assert evals[-1] < evals[0], evals  # it learns


def test_a_lora_run_reads_back_as_its_merged_model(lora_sft, ppo_models):
  """model.init_from=<a LoRA run>: the base with the adapters merged, a model without adapters, whose logits are
  the adapted model's (base + adapters) within float32 rounding; the base itself is unchanged by training."""
  source = model_io.read_source(str(lora_sft))
  assert source.config.lora.rank == 0
  mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
  rules = sharding.rules_dict(sharding.DEFAULT_RULES)
  _, merged = model_io.load_frozen(source, "lm", mesh, rules)
  base_source = model_io.read_source(str(ppo_models / "sft"))
  _, base = model_io.load_frozen(base_source, "lm", mesh, rules)
  run_cfg = models.ModelConfig(**paths.read_json(lora_sft / "model.json")["model"])
  adapters = checkpoint.Checkpointer(str(lora_sft)).restore_params(source.step)
  tokens = np.random.default_rng(0).integers(3, 200, (2, 24)).astype(np.int32)
  adapted = _lm(run_cfg, lora.combine(adapters, base), tokens)
  np.testing.assert_allclose(_lm(source.config, merged, tokens), adapted, atol=2e-5, rtol=0)
  assert np.abs(adapted - _lm(base_source.config, base, tokens)).max() > 1e-3  # the adapters change the model


def test_lora_sft_resumed_equals_uninterrupted(lora_sft, ppo_models, tmp_path):
  """The same run with its last checkpoint gone resumes from step 3 (adapters, Adam, data position; the base read
  again from model.init_from) and ends where the uninterrupted run ended, bit for bit."""
  resumed = tmp_path / "run"
  shutil.copytree(lora_sft, resumed)
  shutil.rmtree(resumed / "checkpoints" / "6")
  main.run(configured(sft, "tiny", **_sft_flags(ppo_models)), str(resumed))
  assert checkpoint.Checkpointer.steps_in(str(resumed)) == [3, 6]
  a, b = read_metrics(lora_sft), read_metrics(resumed)
  assert [r["step"] for r in a] == [r["step"] for r in b]
  for x, y in zip(a, b):
    assert x.get("loss") == y.get("loss") and x.get("eval_loss") == y.get("eval_loss"), x["step"]
  jax.tree.map(
    np.testing.assert_array_equal,
    checkpoint.Checkpointer(str(lora_sft)).restore_params(6),
    checkpoint.Checkpointer(str(resumed)).restore_params(6),
  )


@pytest.mark.slow
def test_lora_rm_trains_its_head_fully_and_its_trunk_through_adapters(ppo_models, tmp_path):
  flags = {
    "model.init_from": str(ppo_models / "sft"),
    "model.lora.rank": RANK,
    "total_steps": 4,
    "data.train": "lab:comparisons:train:100",
    "data.eval": "",
    "eval_every_steps": 0,
  }
  main.run(configured(rm, "tiny", **flags), str(tmp_path))
  saved = checkpoint._saved_tree(checkpoint.Checkpointer(str(tmp_path)).directory / "4" / "state")
  assert set(saved["params"]) == {"transformer", "head"}
  assert _names(saved["params"]["transformer"]) == {"lora_a", "lora_b"} and _names(saved["params"]["head"]) <= {
    "kernel",
    "bias",
  }
  exported = model_io.read_source(str(tmp_path / "export"))  # merged: a plain reward model
  assert exported.kind == "scalar" and exported.config.lora.rank == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lora_dpo_reference_is_the_base_so_it_starts_at_log_2(ppo_models, tmp_path, dtype):
  """dpo.reference empty with LoRA: the reference is the policy's own base with its adapters off. At step 0
  (B = 0) every implicit reward β·log(π/π_ref) is exactly 0, in bfloat16 too (the adapter's term adds an exact
  zero): accuracy 0, margin 0, each pair log 2."""
  flags = {
    "model.init_from": str(ppo_models / "sft"),
    "model.dtype": dtype,
    "model.lora.rank": RANK,
    "data.train": "lab:comparisons:train:64",
    "data.eval": "lab:comparisons:eval:16",
    "total_steps": 2,
    "eval_at_start": True,
    "eval_every_steps": 0,
  }
  main.run(configured(dpo, "tiny", **flags), str(tmp_path))
  start = read_metrics(tmp_path)[0]
  assert start["step"] == 0 and start["eval_accuracy"] == 0.0 and start["eval_margin"] == 0.0
  assert 0.5 * math.log(2) < start["eval_loss"] <= math.log(2) + 1e-6


def test_lora_ppo_reference_is_the_policys_base_no_second_copy(ppo_models, tmp_path):
  """PPO with a LoRA policy and no ppo.reference: no reference params are held (Models.targets["reference"] is
  None), the first rollout's KL is exactly 0 (the policy at B = 0 is its base), and after training the
  reference log-probs (the state's base, adapters off) equal those of the SFT model loaded on its own."""
  flags = {
    "model.init_from": str(ppo_models / "sft"),
    "model.lora.rank": RANK,
    "ppo.reward_model": str(ppo_models / "rm" / "export"),
    "ppo.episodes": 2 * 32,
    "checkpoint_every_steps": 1,
    "eval_every_steps": 0,
    "data.eval": "",
  }
  run = tmp_path / "run"
  main.run(configured(ppo, "tiny", **flags), str(run))
  rows = read_metrics(run)
  assert [r["step"] for r in rows] == [1, 2]
  assert rows[0]["kl"] == 0.0 and rows[1]["kl"] != 0.0, rows
  saved = checkpoint._saved_tree(checkpoint.Checkpointer(str(run)).directory / "2" / "state")
  assert _names(saved["policy"]["params"]) == {"lora_a", "lora_b"} == _names(saved["policy"]["ema"])
  assert _names(saved["critic"]["params"]) == {"lora_a", "lora_b", "kernel", "bias"}  # adapters and the head
  # Resumed from iteration 1 (the base read again; adapters, Adam, EMA and the critic restored) == uninterrupted.
  resumed = tmp_path / "resumed"
  shutil.copytree(run, resumed)
  shutil.rmtree(resumed / "checkpoints" / "2")
  main.run(configured(ppo, "tiny", **flags), str(resumed))
  again = read_metrics(resumed)
  assert [r["step"] for r in again] == [1, 2]
  for x, y in zip(rows, again):  # every metric but the timings
    assert {k: v for k, v in x.items() if "time" not in k and "per_sec" not in k} == {
      k: v for k, v in y.items() if "time" not in k and "per_sec" not in k
    }, x["step"]
  jax.tree.map(
    np.testing.assert_array_equal,
    checkpoint.Checkpointer(str(run)).restore_params(2, keys=("policy", "ema")),
    checkpoint.Checkpointer(str(resumed)).restore_params(2, keys=("policy", "ema")),
  )
  # The reference of a LoRA policy: its base, the same arrays, run by the rank-0 graphdef.
  source = model_io.read_source(str(ppo_models / "sft"))
  mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
  rules = sharding.rules_dict(sharding.DEFAULT_RULES)
  graphdef, sft_params = model_io.load_frozen(source, "lm", mesh, rules)
  cfg = dataclasses.replace(source.config, lora=models.LoraConfig(rank=RANK, alpha=16.0))
  policy_target = train_state.param_shardings_for(cfg, mesh, rules)[1]
  adapters = checkpoint.Checkpointer(str(run)).restore_params(2, keys=("policy", "params"))
  policy = model_io.load(source, "lm", policy_target, cfg, 0)  # the base as the run loaded it, fresh adapters
  policy = lora.combine(adapters, lora.without_adapters(policy))
  m = ppo_steps.Models.build(
    configured(ppo, "tiny").ppo,
    policy_cfg=cfg,
    reference_cfg=None,
    reward_cfg=source.config,
    critic_cfg=source.config,
    reward_bias=0.0,
    eos_id=1,
    pad_id=0,
    policy_tx=None,
    policy_lr=None,
    critic_tx=None,
    mesh=mesh,
    rules=rules,
  )
  assert m.targets["reference"] is None
  ref = ppo_steps.reference_params(m, policy, None)
  rng = np.random.default_rng(1)
  seq = (
    rng.integers(3, 200, (2, 8)).astype(np.int32),
    np.ones((2, 8), np.int32),
    rng.integers(3, 200, (2, 6)).astype(np.int32),
    np.ones((2, 6), np.float32),
  )
  ours = scoring.response_logprobs(m.reference, ref, *seq)
  alone = scoring.response_logprobs(graphdef, sft_params, *seq)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(alone))


def test_the_recipe_takes_lora_for_every_stage():
  from configs import recipe
  from instructgpt_jax import errors

  full = recipe.get_config("model=hf:/m,data=/d.jsonl")
  adapted = recipe.get_config("model=hf:/m,data=/d.jsonl,lora=16")
  for name in ("sft", "rm", "ppo"):
    assert full.stages[name].model.lora.rank == 0
    assert adapted.stages[name].model.lora.rank == 16
    assert adapted.stages[name].optim.lr == recipe.LORA_LR[name] > full.stages[name].optim.lr
  with pytest.raises(errors.ConfigError, match="config arg lora: -1 is not a rank"):
    recipe.get_config("model=hf:/m,data=/d.jsonl,lora=-1")


@pytest.mark.slow
def test_lora_recipe_learns_on_smollm2_and_its_merged_export_is_what_transformers_runs(
  smollm2_folder, shared_data, tmp_path, exclusive_memory
):
  """The README's recipe with lora=16 on SmolLM2-135M-Instruct and real HH-RLHF pairs at its smoke size, SFT run to
  10 steps (32 held-out pairs): LoRA SFT lowers the held-out loss; every stage checkpoints adapters only; the
  exported PPO policy (merged) is what transformers loads, its greedy tokens equal to our sampler's on the LoRA
  run read back. (The RM's 3 smoke steps show no learning: on this CPU a LoRA RM step of 8 HH pairs x 256 tokens
  in bfloat16 takes ~40 s, so the RM's learning is not checked here.)"""
  import os
  import subprocess
  import sys

  from recipe_test import assert_greedy_is_the_references

  from doc_examples import README_RECIPE, argv, shrink
  from hf_test import SMOLLM2_PROMPTS, reference_python, run_reference

  reference_python()  # skips without the transformers reference venv, before the long run
  workdir = tmp_path / "hh"
  recipe = shrink(
    README_RECIPE,
    {
      "hf:/path/to/SmolLM2-360M": f"hf:{smollm2_folder}",
      "/data/hh-rlhf/harmless-base/train.jsonl.gz": str(shared_data / "hh_rlhf_harmless_base_test.jsonl.gz"),
      "ptx=/data/text/*.txt": f"ptx={shared_data / 'tinyshakespeare.txt'},size=smoke,lora=16",
      "runs/hh": str(workdir),
    },
    extra=(
      "--config.data.eval_pairs=32",
      "--config.stages.sft.total_steps=10",
      "--config.stages.sft.eval_every_steps=10",
    ),
  )
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  done = subprocess.run([sys.executable, *argv(recipe)[1:]], capture_output=True, text=True, env=env)
  assert done.returncode == 0, done.stderr[-3000:]
  sft_evals = [r["eval_loss"] for r in read_metrics(workdir / "sft") if "eval_loss" in r]
  print("LoRA SFT held-out loss", sft_evals)
  assert len(sft_evals) == 2 and sft_evals[1] < sft_evals[0], sft_evals
  for stage, keys in (("sft", ("params",)), ("rm", ("params", "transformer")), ("ppo", ("policy", "params"))):
    step = checkpoint.Checkpointer.steps_in(str(workdir / stage))[-1]
    saved = checkpoint._saved_tree(checkpoint.Checkpointer(str(workdir / stage)).directory / str(step) / "state")
    for key in keys:
      saved = saved[key]
    assert _names(saved) == {"lora_a", "lora_b"}, stage

  export = workdir / "export"  # the EMA policy, merged
  spec = tmp_path / "spec.json"
  spec.write_text(__import__("json").dumps(SMOLLM2_PROMPTS))
  run_reference("smollm2", export, spec, tmp_path / "reference.npz")
  reference = np.load(tmp_path / "reference.npz")
  run = model_io.read_source(str(workdir / "ppo"))  # the LoRA run read back: base + EMA adapters, merged
  assert run.ema and run.config.lora.rank == 0
  source = model_io.read_source(f"hf:{export}")  # float32, as transformers runs it
  mesh = sharding.make_mesh({"fsdp": -1})
  graphdef, target = train_state.param_shardings_for(source.config, mesh, sharding.DEFAULT_RULES)
  params = model_io.load(source, "lm", target, source.config, 0)
  # The export holds the run's merged model: the merge, compiled twice, agrees to float32 rounding (CI: 6e-8).
  merged = model_io.load(run, "lm", target, source.config, 0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), params, merged)
  assert_greedy_is_the_references(graphdef, params, reference, mesh)
