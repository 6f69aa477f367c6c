"""The SFT stage: paper numbers in the configs, learning, the prompt mask, the pretraining mix, RM-score eval."""

import flax
import jax
import numpy as np
import pytest

from configs import sft
from instructgpt_jax import errors, main, models, paths
from instructgpt_jax.data import schemes, stage_data
from instructgpt_jax.data import tokenizer as tokenizer_lib
from instructgpt_jax.library import lm_steps, loop, model_io

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
  assert (c.optim.b1, c.optim.b2) == (0.9, 0.95)
  # Residual dropout 0.2 for the baseline (App. C.1); App. C.3 names none for the PPO-init model.
  assert c.model.resid_dropout == (0.2 if c.variant == "baseline" else 0.0)
  assert (c.optim.eps, c.optim.clip_norm, c.optim.weight_decay) == (1e-8, 1.0, 0.0)  # our choices, stated
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
  data_cfg = schemes.resolve(
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


def test_selection_keeps_the_best_evaluated_checkpoint_and_the_next_stage_loads_it(tmp_path):
  """LoopIO with a Selection, on a run whose best evaluation is not its last: retention (keep=1) keeps the
  newest step and the best one, selected.json names the best, and model.init_from=<workdir> loads it."""
  import jax.numpy as jnp
  import ml_collections

  from instructgpt_jax import checkpoint, paths
  from instructgpt_jax.library import model_io

  config = ml_collections.ConfigDict(
    dict(total_steps=8, log_every_steps=1, checkpoint_every_steps=1000, eval_every_steps=2, progress_bar=False)
  )
  eval_loss = {2: 3.0, 4: 1.0, 6: 2.0, 8: 2.5}  # the best (lowest) at step 4

  @flax.struct.dataclass
  class State:
    step: jax.Array
    params: dict

  def evaluate(state):
    return {"eval_loss": eval_loss[int(state.step)]}

  select = checkpoint.Selection(str(tmp_path), "eval_loss", "min")
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1, select=select)
  model_io.write_model_json(str(tmp_path), "lm", models.resolve({"size": "tiny"}))
  io = loop.LoopIO(config, str(tmp_path), ckpt, dict, start_step=0, select=select)
  with io:
    for step in range(1, 9):
      state = State(jnp.int32(step), {"w": jnp.full((2,), float(step))})
      if step < 8:
        io.end_of_step(step, state, {"loss": jnp.float32(1.0)}, evaluate)
    io.finish(state, evaluate)
  assert checkpoint.Checkpointer.steps_in(str(tmp_path)) == [4, 8]
  assert paths.read_json(tmp_path / "selected.json") == {"step": 4, "metric": "eval_loss", "value": 1.0}
  source = model_io.read_source(str(tmp_path))
  assert source.step == 4
  assert checkpoint.Checkpointer(str(tmp_path)).restore_params(source.step)["w"].tolist() == [4.0, 4.0]
  assert model_io.read_source(str(tmp_path), step="latest").step == 8
  with pytest.raises(errors.ConfigError, match=r"model.init_from_step: '6' is not one of .* \[4, 8\]"):
    model_io.read_source(str(tmp_path), step="6")


def test_demonstration_epochs_are_counted_exactly_with_a_pretraining_mix(tmp_path):
  tokenizer = tokenizer_lib.byte_tokenizer()
  overrides = {"data.train": "lab:demonstrations:train:200", "data.pretrain_mix_by": "rows"}
  config = configured(sft, "tiny,variant=ppo_init", **overrides)
  data_cfg = schemes.resolve(config.data, str(tmp_path), seed=0)
  data_cfg.update(data_dir=str(tmp_path / "tfds"), eval="")
  data = stage_data.build_sft_data(data_cfg, tokenizer, seed=0)
  n, batch = len(data.train_source), config.data.batch_size
  assert (n, batch, config.epochs, data.mix_fraction) == (200, 16, 2, 0.1)
  steps = loop.steps_for_epochs(config, n, mix_fraction=data.mix_fraction)
  assert steps == 28  # ceil(2 · 200 / (16 · 0.9)) = ceil(27.8); without the mix's share it would be 25
  demonstrations = []
  for _ in range(steps):
    b = next(data)
    demonstrations += [tuple(row) for row, kind in zip(b["inputs"], b["kind"]) if kind == 0]
  assert 2 * n <= len(demonstrations) < 2 * n + batch  # two whole epochs over the demonstrations
  counts = {}
  for row in demonstrations[: 2 * n]:
    counts[row] = counts.get(row, 0) + 1
  assert len(counts) == n and set(counts.values()) == {2}  # every demonstration exactly twice


def test_a_mix_by_loss_tokens_gives_pretraining_text_that_share_of_the_loss(tmp_path):
  tokenizer = tokenizer_lib.byte_tokenizer()
  config = configured(sft, "tiny,variant=ppo_init", **{"data.train": "lab:demonstrations:train:200"})
  assert config.data.pretrain_mix_by == "loss_tokens"  # the default (docs/paper.md §3.3)
  data_cfg = schemes.resolve(config.data, str(tmp_path), seed=0)
  data_cfg.update(data_dir=str(tmp_path / "tfds"), eval="")
  data = stage_data.build_sft_data(data_cfg, tokenizer, seed=0)
  source = data.train_source
  mean_response = np.mean([len(source[i]["response_ids"]) for i in range(len(source))])
  p = 0.1 * mean_response / (0.1 * mean_response + 0.9 * config.data.seq_len)
  assert data.mix_fraction == pytest.approx(p, rel=1e-9) and data.mix_fraction < 0.1
  batches = [next(data) for _ in range(400)]
  pretraining = sum(float(b["mask"][b["kind"] == 1].sum()) for b in batches)
  total = sum(float(b["mask"].sum()) for b in batches)
  assert abs(pretraining / total - 0.1) < 0.02, pretraining / total
  assert stage_data.pretrain_row_fraction(0.1, 200, 2048) == pytest.approx(0.0107, abs=1e-4)


@pytest.mark.parametrize("by", ["rows", "loss_tokens"])
def test_the_mix_share_of_loss_tokens_on_real_data(by, shared_data, smollm2_folder, tmp_path):
  """HH-RLHF's harmless test set as demonstrations, SmolLM2's tokenizer, 2,048-token rows of tiny Shakespeare:
  by rows, 10% of the rows carry most of the loss tokens (docs/paper.md §3.3); by loss tokens, 10% of them."""
  from instructgpt_jax.data import convert

  convert.convert(str(shared_data / "hh_rlhf_harmless_base_test.jsonl.gz"), str(tmp_path / "hh"), "demonstrations")
  tokenizer = tokenizer_lib.load(str(smollm2_folder))
  config = configured(sft, "variant=ppo_init", **{"data.pretrain_mix_by": by})
  config.data.update(
    train=str(tmp_path / "hh" / "demonstrations.jsonl"),
    pretrain_corpus=str(shared_data / "tinyshakespeare.txt"),
    data_dir=str(tmp_path / "tfds"),
    batch_size=64,
    on_error="skip",
  )
  assert config.data.seq_len == 2048 and config.data.pretrain_mix == 0.1
  data = stage_data.build_sft_data(config.data, tokenizer, seed=0)
  source = data.train_source
  response = np.mean([len(source[i]["response_ids"]) for i in range(len(source))])  # R, with EOS
  rows_share = 0.1 * 2048 / (0.1 * 2048 + 0.9 * response)  # what p = 0.1 of the rows gives
  pretraining = total = 0.0
  for _ in range(200):  # 12,800 rows
    b = next(data)
    pretraining += float(b["mask"][b["kind"] == 1].sum())
    total += float(b["mask"].sum())
  share = pretraining / total
  if by == "rows":
    assert data.mix_fraction == 0.1
    assert 0.70 < rows_share < 0.90 and abs(share - rows_share) < 0.03, (share, rows_share, response)
  else:
    assert data.mix_fraction == pytest.approx(0.1 * response / (0.1 * response + 0.9 * 2048), rel=1e-9)
    assert abs(share - 0.1) < 0.025, (share, data.mix_fraction, response)


def test_pretraining_mix_is_honoured_in_sampled_batches(tmp_path):
  tokenizer = tokenizer_lib.byte_tokenizer()
  overrides = {"data.train": "lab:demonstrations:train:400", "data.pretrain_mix_by": "rows"}
  config = configured(sft, "tiny,variant=ppo_init", **overrides)
  assert config.data.pretrain_mix == 0.1
  data_cfg = schemes.resolve(config.data, str(tmp_path), seed=0)
  data_cfg.update(data_dir=str(tmp_path / "tfds"), eval="")
  data = stage_data.build_sft_data(data_cfg, tokenizer, seed=0)
  kinds = np.concatenate([next(data)["kind"] for _ in range(25)])  # 400 rows
  assert abs(kinds.mean() - 0.10) <= 0.02, kinds.mean()
  batch = next(data)
  pretraining = batch["kind"] == 1
  assert np.all(batch["mask"][pretraining] == 1)  # every token of a pretraining row is a target
  assert np.all(batch["mask"][~pretraining].min(axis=1) == 0)  # demonstrations mask their prompt


@pytest.mark.slow
def test_ppo_init_variant_logs_the_mix_and_both_losses_and_keeps_its_last_step(tmp_path):
  overrides = {"data.train": "lab:demonstrations:train:200", "optim.lr": 0.05}  # a loss that rises after step 3
  config = configured(sft, "tiny,variant=ppo_init", total_steps=10, log_every_steps=5, eval_every_steps=3, **overrides)
  assert not config.select_checkpoint and configured(sft, "tiny").select_checkpoint  # baseline: selects
  main.run(config, str(tmp_path / "last"))
  config.select_checkpoint = True
  main.run(config, str(tmp_path / "selected"))
  rows = read_metrics(tmp_path / "last")
  evaluated = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
  best = min(evaluated, key=evaluated.get)
  assert best < 10, evaluated  # selecting would have kept an earlier step, so the two runs differ
  assert not (tmp_path / "last" / "selected.json").exists() and model_io.read_source(str(tmp_path / "last")).step == 10
  assert paths.read_json(tmp_path / "selected" / "selected.json")["step"] == best
  assert model_io.read_source(str(tmp_path / "selected")).step == best
  fractions = [r["ptx_fraction"] for r in rows if "ptx_fraction" in r]  # of the rows: ~1.7% here, often 0
  assert fractions and all(0.0 <= f < 0.25 for f in fractions)
  shares = [r["ptx_token_fraction"] for r in rows if "ptx_token_fraction" in r]
  assert len(shares) == len(fractions) and all(0.0 <= f <= 1.0 for f in shares)
  assert all((f == 0.0) == (s == 0.0) for f, s in zip(fractions, shares))  # rows and their tokens come together
  assert all(np.isfinite(r["ptx_loss"]) and np.isfinite(r["demo_loss"]) for r in rows if "ptx_loss" in r)
