"""The PPO-ptx stage: paper numbers, agreement of sampler/scorer/trainer, Eq. 2 on a real batch, mesh
independence, resuming mid-run, and (slow) learning against the RM with and without the ptx term."""

import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ppo, sft
from instructgpt_jax import checkpoint, errors, generation, losses, main, paths, rl, scoring, sharding, train_state
from instructgpt_jax.data import tokenizer as tokenizer_lib
from instructgpt_jax.library import judging, model_io, ppo_steps
from instructgpt_jax.stages import ppo as ppo_trainer

from doc_examples import README_PPO, run_main, shrink
from runs import configured, read_metrics


def test_config_holds_the_paper_numbers():
  c = ppo.get_config("size=1.3b")
  p = c.ppo
  assert (p.kl_coef, p.kl_controller, p.ptx_coef, p.episodes, p.rollout_batch, p.minibatch, p.epochs) == (
    0.02,
    "fixed",
    27.8,
    256_000,
    512,
    64,
    1,
  )
  assert (p.clip, p.gamma, p.lam, p.temperature, p.max_new_tokens, c.data.max_prompt_len) == (
    0.2,
    1.0,
    0.95,
    1.0,
    1024,
    1024,
  )
  assert (p.ema_decay, p.ptx_per_episode) == (0.992, 8)
  assert (c.optim.schedule, c.optim.warmup_steps, c.optim.warmup_init_fraction) == ("constant", 10, 0.1)
  assert (c.optim.b1, c.optim.b2, c.value_optim.lr) == (0.9, 0.95, 9e-6)
  assert ppo.get_config("size=175b").value_optim.lr == 5e-6
  assert ppo.get_config("ptx=false").ppo.ptx_coef == 0.0  # plain PPO
  assert p.episodes // p.rollout_batch == 500  # iterations (docs/paper.md §5.2)


@pytest.mark.parametrize(
  "arg, policy, lr, error",
  [
    ("", "gpt3-1.3b", None, None),
    ("size=175b", "gpt3-175b", None, None),
    (
      "",
      "gpt3-175b",
      None,
      "value_optim.lr: 9e-06 is the paper's for a gpt3-1.3b policy (configs/ppo.py:size), "
      "but model.init_from is 175B-shaped, for which App. C.4 uses 5e-06: pass configs/ppo.py:size=175b or "
      "--config.value_optim.lr",
    ),
    (
      "size=175b",
      "gpt3-6.7b",
      None,
      "value_optim.lr: 5e-06 is the paper's for a gpt3-175b policy (configs/ppo.py:"
      "size), but model.init_from is not 175B-shaped, for which App. C.4 uses 9e-06: pass configs/ppo.py:size=1.3b "
      "or --config.value_optim.lr",
    ),
    ("", "gpt3-175b", 4e-6, None),  # the user's own lr passes
  ],
)
def test_the_value_lr_is_the_papers_for_the_loaded_policy_or_one_line(arg, policy, lr, error):
  from instructgpt_jax.models import sizes

  config = ppo.get_config(arg)
  config.model.init_from = "a workdir"
  if lr is not None:
    config.value_optim.lr = lr
  policy_cfg = sizes.resolve({"size": policy})
  if error is None:
    ppo_trainer._check_value_lr(config, policy_cfg)
  else:
    with pytest.raises(errors.ConfigError) as raised:
      ppo_trainer._check_value_lr(config, policy_cfg)
    assert str(raised.value) == error


def test_sweep_covers_gamma_and_beta():
  runs = ppo.sweep()
  assert {(r["ppo.ptx_coef"], r["ppo.kl_coef"]) for r in runs} == {(0.0, 0.01), (0.0, 0.02), (27.8, 0.01), (27.8, 0.02)}


@pytest.fixture(scope="module")
def chain(ppo_models):
  """A tiny PPO-init SFT model and an RM started from it (conftest.ppo_models: the PPO tests need models, not
  skill)."""
  return ppo_models


def ppo_flags(chain, **overrides):
  flags = {
    "model.init_from": str(chain / "sft"),
    "ppo.reward_model": str(chain / "rm" / "export"),
    "ppo.episodes": 4 * 32,
    "checkpoint_every_steps": 2,
    "eval_every_steps": 0,
    "data.eval": "",
    "progress_bar": False,
  }
  flags.update(overrides)
  return flags


@pytest.fixture(scope="module")
def short_ppo(chain):
  """The README's PPO command (doc_examples.README_PPO) on the chain's models, shrunk to 4 iterations."""
  shorter = {k: v for k, v in ppo_flags(chain).items() if k not in ("model.init_from", "ppo.reward_model")}
  flags = tuple(f"--config.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in shorter.items())
  run_main(
    shrink(
      README_PPO,
      {"runs/sft": str(chain / "sft"), "runs/rm": str(chain / "rm"), "runs/ppo": str(chain / "ppo_short")},
      flags,
    )
  )
  return chain / "ppo_short"


@pytest.mark.slow
def test_first_minibatch_of_every_iteration_has_ratio_one(short_ppo):
  rows = read_metrics(short_ppo)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  for r in rows:
    assert r["first_minibatch_approx_kl"] <= 1e-5 and abs(r["first_minibatch_ratio_max"] - 1.0) <= 1e-5, r
    assert r["logprob_gap"] <= 1e-4  # sampler and teacher-forced scorer agree (float32)
  assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # iteration 1 samples the reference policy itself
  assert rows[-1]["kl"] > 0.0


@pytest.mark.slow
def test_a_ppo_workdir_gives_its_ema_policy_and_the_raw_policy_on_request(short_ppo, tmp_path, capsys):
  """What `sample --checkpoint`, `model.init_from` and the export command read from a PPO workdir: the EMA of
  the policy (the paper's model), the same weights as `<workdir>/export`; `--raw_policy` the optimizer's."""
  from instructgpt_jax import export as export_command

  mesh = sharding.make_mesh({"fsdp": -1})
  rules = sharding.rules_dict(sharding.DEFAULT_RULES)
  source = model_io.read_source(str(short_ppo))  # as sample.py and init_from read it
  _, target = train_state.param_shardings_for(source.config, mesh, rules)

  def load(path, **kw):
    return model_io.load(model_io.read_source(path, **kw), "lm", target, source.config, 0)

  ema, raw = load(str(short_ppo)), load(str(short_ppo), ema=False)
  jax.tree.map(np.testing.assert_array_equal, ema, load(str(short_ppo / "export")))
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(raw)))

  export_command.main([f"--workdir={short_ppo}", f"--out={tmp_path / 'ema'}"])
  assert capsys.readouterr().out.startswith(f"exported the EMA policy of {short_ppo} step 4 to {tmp_path / 'ema'}")
  jax.tree.map(np.testing.assert_array_equal, ema, load(f"hf:{tmp_path / 'ema'}"))
  export_command.main([f"--workdir={short_ppo}", f"--out={tmp_path / 'raw'}", "--raw_policy"])
  jax.tree.map(np.testing.assert_array_equal, raw, load(f"hf:{tmp_path / 'raw'}"))
  with pytest.raises(SystemExit) as exit_info:
    export_command.main([f"--workdir={tmp_path / 'nothing'}", f"--out={tmp_path / 'x'}"])
  assert exit_info.value.code == 2 and capsys.readouterr().err.startswith("error: --workdir: ")


def test_in_chunks_runs_rows_in_minibatch_shaped_chunks_and_rejoins_them_in_order():
  x = jnp.arange(12 * 3, dtype=jnp.float32).reshape(12, 3)
  seen = []

  def fn(a, b):
    seen.append(a.shape)
    return a * 2 + b, None

  doubled, nothing = ppo_steps.in_chunks(fn, 4, x, jnp.ones_like(x))
  np.testing.assert_array_equal(doubled, x * 2 + 1)
  assert nothing is None and seen == [(4, 3)]  # one traced body, at the chunk's shape
  chunks = []

  def record(a):
    jax.debug.callback(lambda v: chunks.append(np.asarray(v)[:, 0]), a, ordered=True)
    return a

  ppo_steps.in_chunks(record, 4, x)
  assert [c.tolist() for c in chunks] == [[0, 9, 18, 27], [3, 12, 21, 30], [6, 15, 24, 33]]  # rows c, c+3, c+6, c+9
  assert ppo_steps.in_chunks(lambda a: a + 1, 16, x).shape == (12, 3)  # fewer rows than a chunk: one call


@pytest.mark.slow
def test_per_token_rewards_sum_to_the_eq2_bracket_on_a_real_batch(chain, short_ppo):
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  rules = sharding.rules_dict(sharding.DEFAULT_RULES)
  tokenizer = tokenizer_lib.byte_tokenizer()
  policy_source, ref_source = model_io.read_source(str(short_ppo / "export")), model_io.read_source(str(chain / "sft"))
  graphdef, target = train_state.param_shardings_for(policy_source.config, mesh, rules)
  policy = model_io.load(policy_source, "lm", target, policy_source.config, 0)
  reference = model_io.load(ref_source, "lm", target, ref_source.config, 0)
  judge = judging.Judge.load(str(chain / "rm" / "export"), mesh, rules)
  from instructgpt_jax.lab import datasets

  prompts = [np.array(tokenizer.encode(r["prompt"]), np.int32) for r in datasets.records("prompts", "eval", 16)]
  tokens, segments = generation.left_pad(prompts, buckets=(64, 128), pad_id=tokenizer.pad_id)
  settings = generation.SamplingSettings(eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  rollout = generation.Sampler(graphdef, settings, response_buckets=(64,), mesh=mesh, rules=rules)(
    policy, tokens, segments, jax.random.PRNGKey(0), max_new_tokens=64
  )
  seq = (tokens, segments, rollout.tokens, rollout.mask)
  logprobs = scoring.response_logprobs(graphdef, policy, *seq)
  ref_logprobs = scoring.response_logprobs(graphdef, reference, *seq)
  score = judge.score(*seq)
  beta = 0.02
  rewards = rl.per_token_rewards(score, logprobs, ref_logprobs, rollout.mask, kl_coef=beta)
  k1 = np.asarray(losses.kl_penalty(logprobs, ref_logprobs)) * np.asarray(rollout.mask)
  np.testing.assert_allclose(np.asarray(rewards).sum(1), np.asarray(score) - beta * k1.sum(1), rtol=1e-5, atol=1e-5)
  assert np.abs(k1).sum() > 0  # a real batch: the trained policy has moved away from the reference


def run_cli(chain, workdir, devices: int, **overrides):
  flags = ppo_flags(chain, **overrides)
  cmd = [sys.executable, "-m", "instructgpt_jax.main", "--config=configs/ppo.py:tiny", f"--workdir={workdir}"]
  cmd += [f"--config.{k}={v}" for k, v in flags.items()]
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return cmd, env


@pytest.mark.slow
def test_one_iteration_on_8_devices_equals_one_device(chain, tmp_path):
  cmd, env = run_cli(chain, tmp_path / "one", 1, **{"ppo.episodes": 32})
  out = subprocess.run(cmd, env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  main.run(configured(ppo, "tiny", **ppo_flags(chain, **{"ppo.episodes": 32})), str(tmp_path / "eight"))
  one, eight = read_metrics(tmp_path / "one")[0], read_metrics(tmp_path / "eight")[0]
  for key in (
    "score",
    "kl",
    "entropy",
    "response_length",
    "loss",
    "policy_loss",
    "ptx_loss",
    "value_loss",
    "approx_kl",
    "clip_frac",
    "explained_variance",
  ):
    assert eight[key] == pytest.approx(one[key], rel=1e-4, abs=1e-4), key


@pytest.mark.slow
def test_an_iteration_in_the_decode_layout_equals_one_in_the_training_layout(chain, tmp_path):
  """ppo.rollout_layout: the rollout resharded into tensor parallelism over fsdp × tensor changes no number
  (on the 8-device mesh, where "auto" picks it for this mesh); a mesh it does not fit is a one-line error."""
  runs = {}
  mesh = {"mesh.data": 2, "mesh.fsdp": 4}  # the tiny policy's 4 heads split over fsdp × tensor = 4
  for layout in ("train", "decode"):
    flags = ppo_flags(chain, **{"ppo.episodes": 32, "ppo.rollout_layout": layout, **mesh})
    main.run(configured(ppo, "tiny", **flags), str(tmp_path / layout))
    runs[layout] = read_metrics(tmp_path / layout)[0]
  for key in ("score", "kl", "entropy", "response_length", "loss", "policy_loss", "value_loss", "approx_kl"):
    assert runs["decode"][key] == pytest.approx(runs["train"][key], rel=1e-4, abs=1e-5), key
  assert runs["decode"]["response_length"] == runs["train"]["response_length"]  # the same tokens
  misfit = {"ppo.rollout_layout": "decode", "mesh.data": 1, "mesh.fsdp": 8}
  config = configured(ppo, "tiny", **ppo_flags(chain, **misfit))
  with pytest.raises(errors.ConfigError) as raised:
    main.run(config, str(tmp_path / "misfit"))
  assert str(raised.value) == (
    "ppo.rollout_layout: 'decode' splits the KV cache's 4 kv heads over fsdp × tensor = 8, which does not divide "
    "them; use 'train' or a mesh whose fsdp × tensor divides them"
  )


CRITIC_FREE = {  # estimator -> the overrides a run of it needs
  "grpo": {"ppo.samples_per_prompt": 4, "ppo.kl_in": "loss"},
  "dr_grpo": {"ppo.samples_per_prompt": 4},
  "rloo": {"ppo.samples_per_prompt": 2},
  "reinforce_pp": {},
}


@pytest.mark.slow
@pytest.mark.parametrize("estimator", sorted(CRITIC_FREE))
def test_critic_free_estimators_start_at_ratio_one_and_keep_no_critic(chain, tmp_path, estimator):
  flags = ppo_flags(chain, **{"ppo.episodes": 2 * 32, "ppo.advantage_estimator": estimator, **CRITIC_FREE[estimator]})
  main.run(configured(ppo, "tiny", **flags), str(tmp_path))
  rows = read_metrics(tmp_path)
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:  # the first minibatch trains on the rollout policy itself
    assert r["first_minibatch_approx_kl"] <= 1e-5 and abs(r["first_minibatch_ratio_max"] - 1.0) <= 1e-5, r
    assert np.isfinite(r["loss"]) and r["policy_grad_norm"] > 0
    assert not any(k.startswith(("value_", "explained_variance")) for k in r), sorted(r)  # no value function
  assert ("kl_loss" in rows[0]) == (flags.get("ppo.kl_in") == "loss")
  saved = checkpoint._saved_tree(checkpoint.Checkpointer(str(tmp_path)).directory / "2" / "state")
  assert saved.get("critic") in (None, {}), "a critic-free run checkpoints no critic"
  assert set(saved["policy"]) >= {"params", "opt_state", "ema"}


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"ppo.advantage_estimator": "grpo"}, "ppo.samples_per_prompt: grpo compares the responses to one prompt"),
    ({"ppo.advantage_estimator": "rloo", "ppo.samples_per_prompt": 3}, "ppo.samples_per_prompt: 3 does not divide"),
    (
      {"ppo.advantage_estimator": "reinforce_pp", "ppo.shared_trunk": True},
      "ppo.shared_trunk: reinforce_pp has no value function",
    ),
    ({"ppo.advantage_estimator": "vtrace"}, "ppo.advantage_estimator: 'vtrace' is not one of"),
    ({"ppo.kl_in": "both"}, "ppo.kl_in: 'both' is not one of"),
  ],
)
def test_estimator_settings_that_cannot_work_are_one_line_errors(tmp_path, overrides, message):
  # Checked with the config's other values, before any model path is read (stages.check_config).
  flags = {"model.init_from": str(tmp_path / "sft"), "ppo.reward_model": str(tmp_path / "rm"), **overrides}
  with pytest.raises(errors.ConfigError, match=message) as excinfo:
    main.run(configured(ppo, "tiny", **flags), str(tmp_path))
  assert "\n" not in str(excinfo.value)


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_kill_9_mid_run_then_rerun_matches_the_uninterrupted_run(chain, tmp_path, estimator):
  flags = {"ppo.episodes": 6 * 32, "ppo.advantage_estimator": estimator}
  if estimator == "grpo":
    flags.update(CRITIC_FREE["grpo"])
  cmd, env = run_cli(chain, tmp_path / "straight", 8, **flags)
  assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
  cmd, env = run_cli(chain, tmp_path / "killed", 8, **flags)
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  path = tmp_path / "killed" / "metrics.jsonl"
  deadline = time.time() + 180
  while time.time() < deadline and not (path.exists() and sum(1 for _ in open(path)) >= 3):
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)  # during iteration 4: after the checkpoint of iteration 2
  proc.wait()
  assert checkpoint.Checkpointer(str(tmp_path / "killed")).latest_step() < 6
  assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
  straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "killed")
  assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
  for a, b in zip(straight, resumed):
    for key in ("score", "kl", "loss", "entropy", "policy_grad_norm") + (("value_loss",) if estimator == "gae" else ()):
      assert a[key] == b[key], (a["step"], key)
  jax.tree.map(
    np.testing.assert_array_equal,
    checkpoint.Checkpointer(str(tmp_path / "straight")).restore_params(6, keys=("policy", "params")),
    checkpoint.Checkpointer(str(tmp_path / "killed")).restore_params(6, keys=("policy", "params")),
  )


@pytest.fixture(scope="module")
def learning_runs(chain):
  """PPO (γ = 0) and PPO-ptx (γ = 27.8 per token) from the same SFT model, RM and seeds: 60 iterations each.

  γ is read per token here (ptx_reduction="token_mean"): in Eq. 2's reading (the default), 128-token
  pretraining rows against responses of at most 64 tokens weigh the ptx term 2-6 times more, and this tiny
  policy's RM score then stays put (measured 0.620 -> 0.626 over 60 iterations; docs/results.md)."""
  runs = {}
  # eval.baseline: PPO's is its own reference (so its *_vs_baseline metrics must equal the reference's);
  # PPO-ptx's is PPO's export (so its baseline scores must equal PPO's last evaluation).
  baselines = {"ppo": chain / "sft", "ppo_ptx": chain / "ppo" / "export"}
  for name, gamma in (("ppo", 0.0), ("ppo_ptx", 27.8)):
    overrides = {
      "ppo.episodes": 60 * 32,
      "ppo.ptx_coef": gamma,
      **({"ppo.ptx_reduction": "token_mean"} if gamma else {}),  # γ = 0 has no ptx term to reduce
      "eval_every_steps": 60,
      "data.eval": "lab:prompts:eval:64",
      "checkpoint_every_steps": 30,
      "eval.baseline": str(baselines[name]),
    }
    # One device in a subprocess: 8 fake devices on 2 cores make 60 iterations several times slower.
    cmd, env = run_cli(chain, chain / name, 1, **overrides)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    runs[name] = read_metrics(chain / name)
  return runs


@pytest.mark.slow
def test_rm_score_rises_with_bounded_kl_and_ptx_limits_the_alignment_tax(learning_runs):
  for name, rows in learning_runs.items():
    first, last = np.mean([r["score"] for r in rows[:10]]), np.mean([r["score"] for r in rows[-10:]])
    print(
      f"\n{name}: RM score {first:.3f} -> {last:.3f}, KL {rows[-1]['kl']:.2f}, "
      f"ptx loss {rows[-1]['eval_ptx_loss']:.3f} (SFT {rows[-1]['eval_ptx_loss_sft']:.3f}), "
      f"win rate vs SFT (RM) {rows[-1]['eval_win_rate_rm']:.2f}"
    )
    assert last > first + 0.2, name  # the RM score of the policy's own samples rises
  assert learning_runs["ppo"][-1]["eval_win_rate_rm"] > 0.5  # held out, EMA weights, judged by the RM
  # β = 0.02 bounds the KL (nats per response); the ptx term, pulling towards pretraining text, bounds it more.
  ptx_kl = max(r["kl"] for r in learning_runs["ppo_ptx"])
  assert ptx_kl < 15.0 and ptx_kl < learning_runs["ppo"][-1]["kl"]
  tax = {n: abs(rows[-1]["eval_ptx_loss"] - rows[-1]["eval_ptx_loss_sft"]) for n, rows in learning_runs.items()}
  assert tax["ppo_ptx"] < tax["ppo"], tax


@pytest.mark.slow
def test_the_evaluation_against_a_baseline_is_the_evaluation_of_that_model(learning_runs):
  """eval.baseline = the reference gives the reference's numbers under the baseline's names; = another run's
  export gives that run's own last evaluation (same prompts, same sampling key, EMA weights)."""
  ppo, ptx = learning_runs["ppo"][-1], learning_runs["ppo_ptx"][-1]
  for last in (ppo, ptx):
    assert {"eval_rm_score_baseline", "eval_win_rate_rm_vs_baseline", "eval_gold_baseline"} <= set(last)
  assert ppo["eval_rm_score_baseline"] == ppo["eval_rm_score_sft"]
  assert ppo["eval_win_rate_rm_vs_baseline"] == ppo["eval_win_rate_rm"]
  assert ppo["eval_win_rate_gold_vs_baseline"] == ppo["eval_win_rate_gold"]
  assert ptx["eval_rm_score_baseline"] == ppo["eval_rm_score"] and ptx["eval_gold_baseline"] == ppo["eval_gold"]
  assert ptx["eval_rm_score_sft"] == ppo["eval_rm_score_sft"]  # the same reference, the same samples
  assert ptx["eval_win_rate_rm_vs_baseline"] != ptx["eval_win_rate_rm"]  # PPO is not the SFT model


@pytest.mark.slow
def test_sft_keeps_the_checkpoint_with_the_best_rm_score_for_the_next_stage(chain, tmp_path):
  config = configured(
    sft,
    "tiny",
    total_steps=6,
    eval_every_steps=2,
    keep_checkpoints=1,
    checkpoint_every_steps=1000,
    **{
      "model.init_from": str(chain / "sft"),
      "data.train": "lab:demonstrations:train:200",
      "eval_rm.rm": str(chain / "rm" / "export"),
      "eval_rm.num_prompts": 16,
      "eval_rm.max_new_tokens": 32,
    },
  )
  final = main.run(config, str(tmp_path))
  scores = {r["step"]: r["eval_rm_score"] for r in read_metrics(tmp_path) if "eval_rm_score" in r}
  assert sorted(scores) == [2, 4, 6] and scores[6] == final["eval_rm_score"]
  best = max(scores, key=scores.get)
  selected = paths.read_json(tmp_path / "selected.json")
  assert selected == {"step": best, "metric": "eval_rm_score", "value": pytest.approx(scores[best], rel=1e-6)}
  assert checkpoint.Checkpointer.steps_in(tmp_path) == sorted({best, 6})  # keep=1 newest, and the best
  assert model_io.read_source(str(tmp_path)).step == best  # what model.init_from=<this workdir> loads
  assert model_io.read_source(str(tmp_path), step="latest").step == 6


@pytest.mark.slow
def test_critic_starts_from_the_rm_with_its_bias_so_its_last_value_is_the_normalized_score(ppo_models):

  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  rules = sharding.rules_dict(sharding.DEFAULT_RULES)
  tokenizer = tokenizer_lib.byte_tokenizer()
  rm_source = model_io.read_source(str(ppo_models / "rm" / "export"))
  assert abs(rm_source.metadata["reward_bias"]) > 1e-2  # the fold matters: the raw scores are off by this
  critic_graphdef, critic_target = train_state.param_shardings_for(rm_source.config, mesh, rules, kind="scalar")
  critic = ppo_trainer.critic_init_params(rm_source, critic_target, rm_source.config, 0)
  judge = judging.Judge.load(str(ppo_models / "rm" / "export"), mesh, rules)

  policy_source = model_io.read_source(str(ppo_models / "sft"))
  graphdef, target = train_state.param_shardings_for(policy_source.config, mesh, rules)
  policy = model_io.load(policy_source, "lm", target, policy_source.config, 0)
  from instructgpt_jax.lab import datasets

  prompts = [np.array(tokenizer.encode(r["prompt"]), np.int32) for r in datasets.records("prompts", "eval", 16)]
  tokens, segments = generation.left_pad(prompts, buckets=(64, 128), pad_id=tokenizer.pad_id)
  settings = generation.SamplingSettings(eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  rollout = generation.Sampler(graphdef, settings, response_buckets=(32,), mesh=mesh, rules=rules)(
    policy, tokens, segments, jax.random.PRNGKey(0), max_new_tokens=32
  )
  seq = (tokens, segments, rollout.tokens, rollout.mask)
  _, critic_last = scoring.response_values(critic_graphdef, critic, *seq)  # the value at the last token
  normalized_score = judge.score(*seq)  # r_θ(x, y) − b, what the rollout is rewarded
  assert np.asarray(rollout.mask).sum(axis=1).min() > 0
  np.testing.assert_allclose(np.asarray(critic_last), np.asarray(normalized_score), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_shared_trunk_trains_one_model_with_a_value_head(chain, tmp_path):
  flags = ppo_flags(chain, **{"ppo.episodes": 2 * 32, "ppo.shared_trunk": True})
  main.run(configured(ppo, "tiny", **flags), str(tmp_path))
  rows = read_metrics(tmp_path)
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:
    assert r["first_minibatch_approx_kl"] <= 1e-5 and np.isfinite(r["value_loss"]) and r["value_grad_norm"] > 0
  params = checkpoint.Checkpointer(str(tmp_path)).restore_params(2, keys=("policy", "params"))
  assert set(params) == {"lm", "value_head"}  # the value head sits on the policy; there is no critic
  assert params["value_head"]["proj"]["kernel"].shape == (64, 1)
  source = model_io.read_source(str(tmp_path))  # a later stage can start from this workdir's policy
  assert source.metadata["params_keys"] == ["policy", "params", "lm"]
