"""Configs: argument strings, variants, command-line overrides, and the model section."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

import instructgpt_jax
from configs import pretrain
from instructgpt_jax import config_lib, errors, models, stages


def test_parse_arg_types_and_bare_flags():
  a = config_lib.parse_arg("size=1.3b,tiny,steps=5,lr=3e-4", size="125m", tiny=False, steps=1, lr=1.0)
  assert (a.size, a.tiny, a.steps, a.lr) == ("1.3b", True, 5, 3e-4)
  assert config_lib.parse_arg("", size="125m").size == "125m"
  with pytest.raises(ValueError, match="config arg 'sise': not one of"):
    config_lib.parse_arg("sise=1", size="x")
  with pytest.raises(ValueError, match="config arg steps: 'many' is not a int"):
    config_lib.parse_arg("steps=many", steps=1)


def test_pretrain_variants_resolve_to_the_expected_models():
  tiny = pretrain.get_config("tiny")
  assert models.resolve(tiny.model).n_layers == 2 and tiny.total_steps == 200
  assert models.resolve(pretrain.get_config("").model).d_model == 384
  big = pretrain.get_config("size=1.3b")
  cfg = models.resolve(big.model)
  assert (cfg.n_layers, cfg.d_model, cfg.dtype, cfg.scan_layers) == (24, 2048, "bfloat16", True)
  # GPT-3 Table 2.1: 2.0e-4 and a 1M-token batch (488 sequences of 2048).
  assert big.optim.lr == 2.0e-4 and big.data.batch_size == 488 and big.data.seq_len == 2048
  assert (big.optim.b1, big.optim.b2) == (0.9, 0.95)


def test_command_line_overrides_reach_placeholder_model_fields(monkeypatch):
  argv = [
    "prog",
    "--config=configs/pretrain.py:tiny",
    "--config.model.n_layers=3",
    "--config.optim.lr=0.5",
    "--config.model.size=tiny-llama",
    "--config.mesh.fsdp=2",
  ]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags registers the override flags it sees in sys.argv
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=False)
  fv(argv)
  c = fv.config
  cfg = models.resolve(c.model)
  assert (cfg.family, cfg.n_layers, c.optim.lr, c.mesh.fsdp) == ("llama", 3, 0.5, 2)


def test_main_rejects_an_unknown_stage_in_one_line():
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "instructgpt_jax.main",
      "--config=configs/pretrain.py:tiny",
      "--config.stage=nope",
      "--workdir=/tmp/unused",
    ],
    capture_output=True,
    text=True,
  )
  assert out.returncode != 0
  assert "error: stage: 'nope' is not one of" in out.stderr


def test_command_line_mistakes_are_one_line_before_anything_runs(tmp_path):
  """A config given by absolute path from another folder loads; a field typo, a bad value and a missing config
  file are each one line and exit 2."""
  repo = str(config_test_repo())
  cases = {
    (f"--config={repo}/configs/pretrain.py:tiny", "--config.data.batchsize=4"): (
      "error: --config.data.batchsize: no such config field 'batchsize'; did you mean 'batch_size'?"
    ),
    (f"--config={repo}/configs/pretrain.py:tiny", "--config.data.batch_size=four"): (
      "error: flag --config.data.batch_size=four: invalid literal for int() with base 10: 'four'"
    ),
    (
      f"--config={repo}/configs/nonexistent.py",
    ): f"error: --config: {repo}/configs/nonexistent.py: no such config file",
    # Loads from /tmp (configs/ is not importable there), then stops at the workdir check: the config was read.
    (f"--config={repo}/configs/sft.py:tiny",): f"error: --workdir: {tmp_path}/no/run: its parent folder",
  }
  for flags_given, expected in cases.items():
    cmd = [sys.executable, "-m", "instructgpt_jax.main", f"--workdir={tmp_path}/no/run", *flags_given]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": repo})
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:") or "Traceback" in line]
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith(expected), (flags_given, out.stderr[-2000:])


def config_test_repo():
  import pathlib

  return pathlib.Path(__file__).resolve().parents[1]


# Each kind of mistake, as every command that starts or prints runs meets it (stages.load_checked), one line each.
MISTAKES = [
  ("configs/ppo.py:tinyy", [], "config arg 'tinyy': not one of ['ptx', 'size', 'tiny']"),
  ("configs/nope.py", [], "--config: configs/nope.py: no such config file"),
  (
    "configs/ppo.py:tiny",
    ["--config.optim.lrr=1e-4"],
    "--config.optim.lrr: no such config field 'lrr'; did you mean 'lr'?",
  ),
  ("configs/ppo.py:tiny", ["--config.mesh.fsdpp=8"], "--config.mesh.fsdpp: no such config field 'fsdpp'; did you mean"),
  ("configs/sft.py:tiny", ["--config.optim.lr=abc"], "flag --config.optim.lr=abc: could not convert string to float"),
  ("configs/sft.py:tiny", ["config.optim.lr=1"], "config.optim.lr=1: not a config override; write --config."),
  ("configs/ppo.py:tiny", ["--config.ppo.kl_coef=-1"], "ppo.kl_coef: -1.0 must be >= 0"),
  ("configs/ppo.py:tiny", ["--config.ppo.minibatch=5"], "ppo.minibatch: 5 does not divide ppo.rollout_batch 32"),
  (
    "configs/ppo.py:tiny",
    ["--config.data.ptx_corpus="],
    "data.ptx_corpus: required: pretraining text ('lab' or globs) when ppo.ptx_coef > 0",
  ),
  ("configs/ppo.py:tiny", ["--config.model.size=gpt3-175b"], "model.size: given, but model.init_from (W) decides"),
  (
    "configs/ppo.py:tiny",
    ["--config.value_optim.lr=1e-3", "--config.ppo.advantage_estimator=rloo", "--config.ppo.samples_per_prompt=4"],
    "value_optim.lr: given, but ppo.advantage_estimator=rloo trains no value",
  ),
  ("configs/ppo.py:tiny", ["--config.ppo.kl_target=3"], "ppo.kl_target: given, but ppo.kl_controller is 'fixed'"),
  ("configs/sft.py:tiny", ["--config.eval_rm.num_prompts=8"], "eval_rm.num_prompts: given, but eval_rm.rm is empty"),
  ("configs/sft.py:tiny", ["--config.data.pretrain_mix=1.5"], "data.pretrain_mix: 1.5 is not in [0, 1)"),
  ("configs/sft.py:tiny", ["--config.mesh.fsdp=3", "--config.mesh.data=1"], "data.batch_size: 16 does not divide over"),
  ("configs/sft.py:tiny", ["--config.model.remat=some"], "model.remat: 'some' is not one of"),
  ("configs/sft.py:tiny", ["--config.distributed.mode=manual"], "distributed.coordinator_address: required with mode"),
  (
    "configs/sft.py:tiny",
    [
      "--config.distributed.mode=manual",
      "--config.distributed.coordinator_address=h:1",
      "--config.distributed.num_processes=2",
      "--config.distributed.process_id=2",
    ],
    "distributed.process_id: 2 is not in",
  ),
  ("configs/sft.py:tiny", ["--config.model.dtype=fp8"], "model.dtype: 'fp8' is not one of ('float32', 'bfloat16'"),
  ("configs/rm.py:tiny", ["--config.rm.pair_normalizer=pairs"], "rm.pair_normalizer: 'pairs' is not one of"),
  ("configs/pretrain.py:size=1.3b", [], "data.corpus: required: globs of .txt / .jsonl files, or 'lab'"),
  ("configs/pipeline.py:lab_quick", ["--config.stages.ppo.ppo.clip=0"], "stages.ppo.ppo.clip: 0.0 must be > 0"),
  ("configs/pipeline.py:lab_quick", ["--config.stages.sft.seed=3"], "stages.sft.seed: given, but the lab sets it"),
  ("configs/pipeline.py:lab_quick", ["--config.stages.rm.data.train=x"], "stages.rm.data.train: given, but the lab"),
  (
    "configs/recipe.py:model=/m,data=d.jsonl",
    [],
    "model: '/m': give a HuggingFace folder as the config arg model=hf:PATH",
  ),
  (
    "configs/recipe.py:model=hf:/m,data=d.jsonl,eval_tasks=hellaswagg",
    [],
    "eval.tasks: 'hellaswagg' is not an lm-eval task; did you mean hellaswag",
  ),
  ("configs/recipe.py:model=hf:/m,data=d.jsonl,eval_tasks=x.yaml", [], "eval.tasks: x.yaml: no such task file"),
  (
    "configs/recipe.py:model=hf:/m,data=d.jsonl",
    ["--config.eval.tasks=hellaswag", "--config.eval.dtype=fp8"],
    "eval.dtype",
  ),
]


@pytest.mark.parametrize("config_arg, overrides, message", MISTAKES, ids=[m[2][:40] for m in MISTAKES])
def test_each_kind_of_mistake_is_one_line_before_anything_runs(config_arg, overrides, message):
  if config_arg.startswith("configs/ppo.py"):  # PPO's required inputs, so that the mistake is the only problem
    overrides = ["--config.model.init_from=W", "--config.ppo.reward_model=R", *overrides]
  with pytest.raises(errors.UserError) as excinfo:
    stages.load_checked(config_arg, overrides)
  assert str(excinfo.value).startswith(message) and "\n" not in str(excinfo.value), str(excinfo.value)


def test_good_configs_pass_the_check():
  for config_arg, overrides in [
    ("configs/pretrain.py:tiny", []),
    ("configs/sft.py:tiny,variant=ppo_init", ["--config.optim.lr=1e-3"]),
    ("configs/rm.py:tiny", ["--config.model.init_from=W"]),
    ("configs/ppo.py:tiny", ["--config.model.init_from=W", "--config.ppo.reward_model=R", "--config.ppo.kl_coef=0"]),
    ("configs/pipeline.py:lab_quick,compare", ["--config.stages.ppo.ppo.kl_coef=0.05"]),
    ("configs/recipe.py:model=hf:/m,data=d.jsonl,size=smoke", []),
    ("configs/recipe.py:model=hf:/m,data=d.jsonl,ptx=t.txt", []),  # each stage's inputs come from the recipe
    ("configs/sft.py:size=175b,variant=ppo_init", ["--config.data.train=d", "--config.data.pretrain_corpus=t"]),
    ("configs/rm.py", ["--config.data.train=c", "--config.data.bias_demonstrations=d"]),
    ("configs/dpo.py:tiny", ["--config.model.init_from=W"]),
  ]:
    assert stages.load_checked(config_arg, overrides).stage == config_arg.split("/")[1].split(".")[0]
  # An AOT compile reads no inputs: the paper-size configs need no data files or models there.
  assert stages.load_checked("configs/ppo.py:size=175b", inputs=False).ppo.rollout_batch == 512


def test_all_problems_are_reported_before_the_workdir_check(tmp_path):
  """Every value error at once, one line each, before the workdir (whose parent is missing) is looked at."""
  cmd = [
    sys.executable,
    "-m",
    "instructgpt_jax.main",
    "--config=configs/sft.py:tiny",
    f"--workdir={tmp_path}/no/such/run",
    "--config.optim.lr=-1",
    "--config.data.pretrain_mix=1.5",
  ]
  out = subprocess.run(cmd, capture_output=True, text=True)
  assert out.returncode == 2 and out.stdout == ""
  assert out.stderr.splitlines() == [
    "error: optim.lr: -1.0 must be > 0",
    "error: data.pretrain_mix: 1.5 is not in [0, 1)",
  ]


def test_print_config_prints_the_resolved_model_and_exits(tmp_path):
  """`--print_config`: the config as config.json will hold it, the model's shape resolved (from the size table,
  or from the run `model.init_from` names); no workdir needed, nothing written."""
  base = [sys.executable, "-m", "instructgpt_jax.main", "--print_config"]
  out = subprocess.run(
    [*base, "--config=configs/sft.py:tiny", "--config.model.n_layers=3"], capture_output=True, text=True
  )
  assert out.returncode == 0, out.stderr[-2000:]
  printed = json.loads(out.stdout)
  assert (printed["model"]["n_layers"], printed["model"]["d_model"], printed["model"]["family"]) == (3, 64, "gpt")
  assert printed["stage"] == "sft" and printed["instructgpt_jax_version"] == instructgpt_jax.__version__
  earlier = tmp_path / "exported"  # an exported model: its metadata.json gives the shape
  earlier.mkdir()
  shape = dataclasses.asdict(models.resolve({"size": "tiny-llama"}))
  (earlier / "metadata.json").write_text(json.dumps({"kind": "lm", "model": shape}))
  out = subprocess.run(
    [*base, "--config=configs/rm.py:tiny", f"--config.model.init_from={earlier}"], capture_output=True, text=True
  )
  assert out.returncode == 0, out.stderr[-2000:]
  model = json.loads(out.stdout)["model"]
  assert (model["family"], model["n_kv_heads"], model["size"], model["init_from"]) == ("llama", 2, "tiny", str(earlier))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]


def test_the_version_has_one_source():
  """setup.py, CITATION.cff and the README's BibTeX carry instructgpt_jax.__version__."""
  root = config_test_repo()
  setup = subprocess.run([sys.executable, "setup.py", "--version"], capture_output=True, text=True, cwd=root)
  assert setup.stdout.strip().splitlines()[-1] == instructgpt_jax.__version__
  citation = (root / "CITATION.cff").read_text()
  assert f"\nversion: {instructgpt_jax.__version__}\n" in citation
  assert f"version   = {{{instructgpt_jax.__version__}}}" in (root / "README.md").read_text()
