"""The reward-model stage: paper numbers, K-wise batching, a learnable rule, the bias, real HH-RLHF data."""

import gzip
import json
import math
import os
import random
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import rm
from instructgpt_jax import errors, generation, losses, main, sharding
from instructgpt_jax.data import batching
from instructgpt_jax.data import tokenizer as tokenizer_lib
from instructgpt_jax.library import judging

from runs import configured, read_metrics


def test_config_holds_the_paper_numbers():
  c = rm.get_config("")
  assert c.model.size == "6b" and c.epochs == 1 and c.optim.lr == 9e-6
  assert (c.optim.schedule, c.optim.final_lr_fraction, c.optim.b1, c.optim.b2) == ("cosine", 0.1, 0.9, 0.95)
  assert c.data.batch_size == 64 and c.data.max_responses == 9 and c.model.resid_dropout == 0.0
  assert c.data.batch_size * math.comb(c.data.max_responses, 2) == 2304  # comparisons per batch, at most
  # Eq. 1 by default: a prompt with ties still divides by C(K,2) (K = 3, one tie: two pairs over 3).
  assert c.rm.pair_normalizer == "binom_k"
  rewards, ranks = jnp.array([[1.0, 0.0, 0.5]]), jnp.array([[0, 1, 1]])
  loss, _ = losses.ranking_loss(rewards, ranks, normalizer=c.rm.pair_normalizer)
  assert float(loss) == pytest.approx((math.log1p(math.exp(-1.0)) + math.log1p(math.exp(-0.5))) / 3, rel=1e-6)
  # The evaluation's per-prompt terms average to the training loss, for both normalizers.
  rng = np.random.default_rng(0)
  rewards, ranks = rng.normal(size=(6, 5)), rng.integers(-1, 3, size=(6, 5))
  for normalizer in ("binom_k", "valid_pairs"):
    terms = losses.ranking_prompt_terms(rewards, ranks, normalizer=normalizer)
    with_pairs = np.asarray(terms["num_pairs"]) > 0
    want, _ = losses.ranking_loss(rewards, ranks, normalizer=normalizer)
    assert np.asarray(terms["loss"])[with_pairs].mean() == pytest.approx(float(want), rel=1e-6)


def test_k_wise_batches_count_every_pair_exactly_once():
  # All K responses of a prompt sit in one batch element; with equal rewards, -dL/dr_i is 1/2 per pair in
  # which i is the better response and -1/2 per pair in which it is the worse: it counts its pairs.
  ranks = np.array([[0, 1, 2, 3, -1], [0, 0, 1, -1, -1], [2, 1, 0, 3, 4]])
  grads = jax.grad(lambda r: losses.ranking_loss(r, ranks, normalizer="binom_k")[0] * 3)(jnp.zeros(ranks.shape))
  for row, g in zip(ranks, np.asarray(grads)):
    k = (row >= 0).sum()
    wins = [((row >= 0) & (row > r)).sum() if r >= 0 else 0 for r in row]
    losses_ = [((row >= 0) & (row < r)).sum() if r >= 0 else 0 for r in row]
    want = -0.5 * (np.array(wins) - np.array(losses_)) / math.comb(k, 2)
    np.testing.assert_allclose(g, want, atol=1e-7)


def test_k_equals_2_is_the_pairwise_loss():
  rewards = np.random.default_rng(0).normal(size=(16, 2))
  ranks = np.tile([0, 1], (16, 1))
  loss, metrics = losses.ranking_loss(jnp.asarray(rewards), ranks)
  np.testing.assert_allclose(float(loss), np.mean(np.log1p(np.exp(-(rewards[:, 0] - rewards[:, 1])))), rtol=1e-6)
  assert float(metrics["num_pairs"]) == 16


WORDS = ("good", "bad", "fine", "meh")


def rule_comparisons(n: int, seed: int) -> list[dict]:
  """A known scoring rule: a response's quality is (#good - #bad) among its six words."""
  rng = random.Random(seed)
  out = []
  while len(out) < n:
    responses = [" ".join(rng.choice(WORDS) for _ in range(6)) for _ in range(rng.randint(2, 6))]
    scores = [r.split().count("good") - r.split().count("bad") for r in responses]
    if len(set(scores)) > 1:
      order = sorted(set(scores), reverse=True)
      out.append({"prompt": "Rate the words:", "responses": responses, "ranks": [order.index(s) for s in scores]})
  return out


def write_lines(path, lines):
  with open(path, "w") as f:
    f.writelines(lines)
  return str(path)


def write_jsonl(path, records):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  return str(path)


@pytest.fixture(scope="module")
def rule_rm(tmp_path_factory):
  root = tmp_path_factory.mktemp("rm_rule")
  train = write_jsonl(root / "train.jsonl", rule_comparisons(1600, seed=0))
  evals = write_jsonl(root / "eval.jsonl", rule_comparisons(300, seed=1))
  demos = write_jsonl(
    root / "demos.jsonl",
    [{"prompt": "Rate the words:", "response": r["responses"][0]} for r in rule_comparisons(64, 2)],
  )
  config = configured(
    rm,
    "tiny",
    epochs=1,
    **{
      "data.train": train,
      "data.eval": evals,
      "data.bias_demonstrations": demos,
      "data.seq_len": 64,
      "data.max_responses": 6,
    },
  )
  final = main.run(config, str(root / "run"))
  return root, final


@pytest.mark.slow
def test_rm_learns_a_known_rule_to_90_percent_held_out(rule_rm):
  root, final = rule_rm
  print(f"\nknown-rule RM: held-out pairwise accuracy {final['eval_accuracy']:.3f} on {final['eval_pairs']:.0f} pairs")
  assert final["eval_accuracy"] >= 0.90, final
  assert final["eval_pairs"] > 1000
  rows = read_metrics(root / "run")
  assert rows[-1]["step"] == 100  # 1 epoch of 1,600 prompts at 16 per batch


@pytest.mark.slow
def test_after_normalization_demonstrations_score_zero_on_average(rule_rm):
  root, final = rule_rm
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  judge = judging.Judge.load(str(root / "run" / "export"), mesh, sharding.DEFAULT_RULES)
  assert judge.bias == pytest.approx(final["reward_bias"])
  tokenizer = tokenizer_lib.byte_tokenizer()
  demos = [json.loads(line) for line in open(root / "demos.jsonl")]
  prompts = [np.array(tokenizer.encode(d["prompt"]), np.int32) for d in demos]
  responses = [tokenizer.encode(d["response"]) + [tokenizer.eos_id] for d in demos]
  prompt_tokens, prompt_segments = generation.left_pad(prompts, buckets=(32,), pad_id=tokenizer.pad_id)
  width = 32
  response_tokens = np.full((len(demos), width), tokenizer.pad_id, np.int32)
  response_mask = np.zeros((len(demos), width), np.int32)
  for i, r in enumerate(responses):
    response_tokens[i, : len(r)], response_mask[i, : len(r)] = r, 1
  scores = np.asarray(judge.score(prompt_tokens, prompt_segments, response_tokens, response_mask))
  assert abs(scores.mean()) <= 1e-4, scores.mean()
  assert scores.std() > 0.1  # the bias shifts; it does not flatten


def test_demonstrations_are_scored_in_the_comparison_layout():
  records = [{"prompt_ids": [5, 6], "response_ids": [7, 256]}]
  rows = batching.sequence_rows(records, seq_len=6, pad_id=257)
  np.testing.assert_array_equal(rows["tokens"], [[5, 6, 7, 256, 257, 257]])
  np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 1, 0, 0]])


@pytest.mark.slow
def test_rm_on_real_hh_rlhf_pairs_reports_held_out_accuracy(tmp_path, shared_data):
  from instructgpt_jax.data import formats

  """The first 2,000 HH-RLHF pairs train a small RM of our own (random init); the other 312 measure it.

  Whatever the accuracy is, it is reported beside the chance level (0.5); the assertions only check that
  the measurement covers exactly the 312 held-out pairs and is a proper fraction.
  """
  path = str(shared_data / "hh_rlhf_harmless_base_test.jsonl.gz")
  records = [record for _, record in formats.read_records([path], "comparisons")]
  assert len(records) == 2312
  with gzip.open(path, "rt") as f:
    lines = f.readlines()
  train = write_lines(tmp_path / "train.jsonl", lines[:2000])
  held_out = write_lines(tmp_path / "eval.jsonl", lines[2000:])
  # A BPE of our own, trained on the first 1,000 training dialogues (never on the held-out 312).
  tokenizer = tokenizer_lib.train_bpe(
    [t for r in records[:1000] for t in (r["prompt"], *r["responses"])], vocab_size=1024
  )
  tokenizer.save(str(tmp_path / "tokenizer.json"))
  demos = write_jsonl(
    tmp_path / "demos.jsonl", [{"prompt": r["prompt"], "response": r["responses"][0]} for r in records[:64]]
  )
  overrides = {
    "epochs": 1,
    "data.train": train,
    "data.eval": held_out,
    "data.bias_demonstrations": demos,
    "data.tokenizer": str(tmp_path / "tokenizer.json"),
    "data.seq_len": 512,
    "data.max_responses": 2,
    # A dialogue over 512 tokens keeps its latest turns; the few pairs whose response alone is longer are
    # skipped. Both are counted and printed.
    "data.truncate_prompt": "left",
    "data.on_error": "skip",
    "model.vocab_size": 1088,
    "model.max_len": 512,
    "progress_bar": "false",
  }
  # One device in a subprocess: 8 fake devices on 2 cores would slow this long run down.
  cmd = [sys.executable, "-m", "instructgpt_jax.main", "--config=configs/rm.py:tiny", f"--workdir={tmp_path / 'run'}"]
  cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  out = subprocess.run(cmd, capture_output=True, text=True, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  final = read_metrics(tmp_path / "run")[-1]
  print(
    f"\nHH-RLHF held-out pairwise accuracy: {final['eval_accuracy']:.3f} on {final['eval_pairs']:.0f} pairs "
    f"(chance 0.500); train accuracy {final['accuracy']:.3f}"
  )
  skipped = {split: int(m) for split, m in re.findall(r"comparisons/(\w+): \d+ records, (\d+) skipped", out.stdout)}
  print(f"pairs skipped for a response over 512 tokens: {skipped}")
  assert 0.0 <= final["eval_accuracy"] <= 1.0
  assert final["eval_pairs"] == 312 - skipped.get("eval", 0) and skipped.get("eval", 0) <= 3
  assert read_metrics(tmp_path / "run")[-1]["step"] == math.ceil((2000 - skipped.get("train", 0)) / 16)


def test_the_bias_demonstrations_are_truncated_like_the_comparisons(tmp_path):
  """data.truncate_prompt=left applies to the demonstrations that set the reward bias too: a demonstration
  whose prompt alone is longer than seq_len is cut from the left there, as in the comparisons; without it,
  the file is refused in one line before anything compiles."""
  long_prompt = "a long prompt " * 40  # 560 bytes: over seq_len 256 by itself
  (tmp_path / "bias.jsonl").write_text(
    json.dumps({"prompt": long_prompt, "response": "a reply"}) + "\n" + json.dumps({"prompt": "hi", "response": "yo"})
  )
  overrides = {
    "data.train": "lab:comparisons:train:64",
    "data.eval": "",
    "data.bias_demonstrations": str(tmp_path / "bias.jsonl"),
    "data.truncate_prompt": "left",
  }
  final = main.run(configured(rm, "tiny", total_steps=1, **overrides), str(tmp_path / "left"))
  assert np.isfinite(final["reward_bias"])
  with pytest.raises(errors.DataError, match=r"bias.jsonl:1: prompt: too long: .*data.truncate_prompt=left"):
    main.run(
      configured(rm, "tiny", total_steps=1, **{**overrides, "data.truncate_prompt": "none"}), str(tmp_path / "none")
    )
