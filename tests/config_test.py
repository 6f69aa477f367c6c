"""Configs: argument strings, variants, command-line overrides, and the model section."""

import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from configs import pretrain
from instructgpt_jax import config_lib, models


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
  assert "config.stage: 'nope' is not one of" in out.stderr


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
