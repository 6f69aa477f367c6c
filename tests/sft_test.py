"""The SFT stage: paper numbers in the configs, learning, the prompt mask, the pretraining mix, RM-score eval."""

import jax
import numpy as np
import pytest

from configs import sft
from instructgpt_jax import main, models
from instructgpt_jax.data import stage_data
from instructgpt_jax.data import tokenizer as tokenizer_lib
from instructgpt_jax.trainers import common, lm_steps

from runs import configured, read_metrics


@pytest.mark.parametrize(
  "arg, epochs, mix, lr, batch",
  [
    ("size=1.3b", 16, 0.0, 9.65e-6, 32),
    ("size=6b", 16, 0.0, 9.65e-6, 32),
    ("size=175b", 16, 0.0, 5.03e-6, 8),
    ("size=1.3b,variant=ppo_init", 2, 0.1, 5e-6, 32),
    ("size=6b,variant=ppo_init", 2, 0.1, 1.04e-5, 32),
    ("size=175b,variant=ppo_init", 2, 0.1, 2.45e-6, 8),
  ],
)
def test_configs_hold_the_paper_numbers(arg, epochs, mix, lr, batch):
  c = sft.get_config(arg)
  assert (c.epochs, c.data.pretrain_mix, c.optim.lr, c.data.batch_size) == (epochs, mix, lr, batch)
  assert (c.optim.schedule, c.optim.final_lr_fraction, c.optim.warmup_steps) == ("cosine", 0.1, 0)
  assert (c.optim.b1, c.optim.b2) == (0.9, 0.95) and c.model.resid_dropout == 0.2
  assert c.data.seq_len == 2048 and not c.data.loss_on_prompt


def test_unknown_variant_is_a_one_line_error():
  with pytest.raises(ValueError, match="config arg variant: 'rlhf' is not one of"):
    sft.get_config("variant=rlhf")


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("sft") / "run"
  config = configured(
    sft,
    "tiny",
    total_steps=60,
    eval_every_steps=20,
    checkpoint_every_steps=60,
    **{"data.train": "lab:demonstrations:train:600", "data.eval": "lab:demonstrations:eval:48"},
  )
  final = main.run(config, str(workdir))
  return workdir, final


@pytest.mark.slow
def test_sft_held_out_loss_falls(sft_run):
  workdir, final = sft_run
  evals = [r["eval_loss"] for r in read_metrics(workdir) if "eval_loss" in r]
  assert len(evals) == 3 and evals[0] > evals[1] > evals[2], evals
  assert final["eval_loss"] < 0.6 * np.log(320)  # far below a uniform guess over the vocabulary


def test_prompt_tokens_contribute_nothing_to_the_loss(tmp_path):
  cfg = models.resolve({"size": "tiny"})
  graphdef, params = models.init(cfg, jax.random.key(0))
  tokenizer = tokenizer_lib.byte_tokenizer()
  data_cfg = common.resolve_lab_files(
    configured(sft, "tiny", **{"data.train": "lab:demonstrations:train:64", "data.eval": ""}).data,
    str(tmp_path),
    seed=0,
  )
  data_cfg.data_dir = str(tmp_path / "tfds")
  batch = next(stage_data.build_sft_data(data_cfg, tokenizer, seed=0))
  loss = jax.jit(lambda p, b: lm_steps.loss_sums(graphdef, p, b))
  want_sum, want = loss(params, batch)
  # Scramble every target the mask excludes (the prompt and the padding): nothing changes.
  rng = np.random.default_rng(0)
  scrambled = dict(
    batch, targets=np.where(batch["mask"] > 0, batch["targets"], rng.integers(0, 256, batch["targets"].shape))
  )
  got_sum, got = loss(params, scrambled)
  assert float(got_sum) == float(want_sum) and float(got["count"]) == float(want["count"]) == batch["mask"].sum()
  # and the loss gradient w.r.t. logits at prompt positions is exactly zero
  logits = lm_steps.forward_logits(graphdef, params, batch)
  from instructgpt_jax import losses

  grad = jax.grad(lambda z: losses.lm_loss_sum(z, batch["targets"], batch["mask"])[0])(logits)
  assert np.all(np.asarray(grad)[batch["mask"] == 0] == 0)


def test_pretraining_mix_is_honoured_in_sampled_batches(tmp_path):
  tokenizer = tokenizer_lib.byte_tokenizer()
  config = configured(sft, "tiny,variant=ppo_init", **{"data.train": "lab:demonstrations:train:400"})
  assert config.data.pretrain_mix == 0.1
  data_cfg = common.resolve_lab_files(config.data, str(tmp_path), seed=0)
  data_cfg.update(data_dir=str(tmp_path / "tfds"), eval="")
  data = stage_data.build_sft_data(data_cfg, tokenizer, seed=0)
  kinds = np.concatenate([next(data)["kind"] for _ in range(25)])  # 400 rows
  assert abs(kinds.mean() - 0.10) <= 0.02, kinds.mean()
  batch = next(data)
  pretraining = batch["kind"] == 1
  assert np.all(batch["mask"][pretraining] == 1)  # every token of a pretraining row is a target
  assert np.all(batch["mask"][~pretraining].min(axis=1) == 0)  # demonstrations mask their prompt


@pytest.mark.slow
def test_ppo_init_variant_logs_the_mix_and_both_losses(tmp_path):
  config = configured(
    sft, "tiny,variant=ppo_init", total_steps=10, log_every_steps=5, **{"data.train": "lab:demonstrations:train:200"}
  )
  main.run(config, str(tmp_path))
  rows = read_metrics(tmp_path)
  fractions = [r["ptx_fraction"] for r in rows if "ptx_fraction" in r]
  assert fractions and all(0.0 < f < 0.25 for f in fractions)
  assert all(np.isfinite(r["ptx_loss"]) and np.isfinite(r["demo_loss"]) for r in rows if "ptx_loss" in r)
