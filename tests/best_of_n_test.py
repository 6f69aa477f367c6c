"""Best-of-n as an evaluation method: the RM's best of n samples, and the KL formula of its over-optimization
points."""

import math

import jax
import numpy as np
import pytest

from instructgpt_jax import generation, rl, sharding, train_state
from instructgpt_jax.data import tokenizer as tokenizer_lib
from instructgpt_jax.library import judging, model_io


def test_best_of_n_kl_by_hand():
  assert rl.best_of_n_kl(1) == 0.0
  assert rl.best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)  # 0.19315
  assert rl.best_of_n_kl(64) == pytest.approx(4.158883 - 63 / 64, abs=1e-6)  # 3.17451
  with pytest.raises(ValueError, match="n 0 must be at least 1"):
    rl.best_of_n_kl(0)


@pytest.mark.slow
def test_best_of_n_keeps_the_rms_best_of_the_samples(ppo_models):
  mesh = sharding.make_mesh({"data": -1})
  rules = sharding.rules_dict(sharding.DEFAULT_RULES)
  judge = judging.Judge.load(str(ppo_models / "rm" / "export"), mesh, rules)
  source = model_io.read_source(str(ppo_models / "sft"))
  graphdef, target = train_state.param_shardings_for(source.config, mesh, rules)
  params = model_io.load(source, "lm", target, source.config, 0)
  tokenizer = tokenizer_lib.load("bytes")
  settings = generation.SamplingSettings(eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  sampler = generation.Sampler(graphdef, settings, response_buckets=(16,), mesh=mesh, rules=rules)
  prompts = [np.array(tokenizer.encode(p), np.int32) for p in ("Name a fruit.", "Count to three.", "Say hi.")]
  common = dict(batch_size=8, max_new_tokens=16, pad_id=tokenizer.pad_id, buckets=(32,))
  key = jax.random.PRNGKey(3)

  best, kept, everything = judging.best_of_n(sampler, params, judge, prompts, key, n=4, **common)
  assert everything.shape == (3, 4) and len(kept) == 3
  np.testing.assert_array_equal(best, everything.max(axis=1))
  assert len(set(np.round(everything.ravel(), 6))) > 3  # the samples differ: there is a choice to make
  # The kept responses are the prompts' own, and the RM scores them as it did when choosing.
  for prompt, (kept_prompt, _) in zip(prompts, kept):
    np.testing.assert_array_equal(kept_prompt, prompt)
  tokens, segments = generation.left_pad([p for p, _ in kept], buckets=(32,), pad_id=tokenizer.pad_id)
  responses = np.full((3, 16), tokenizer.pad_id, np.int32)  # right-padded, as a rollout holds them
  mask = np.zeros((3, 16), np.int32)
  for i, (_, response) in enumerate(kept):
    responses[i, : len(response)], mask[i, : len(response)] = response, 1
  rescored = judge.score(tokens, segments, responses, mask)
  np.testing.assert_allclose(np.asarray(rescored), best, atol=1e-5)

  # n = 1 is plain sampling: the same responses and scores as sample_and_score with the same key.
  one, _, _ = judging.best_of_n(sampler, params, judge, prompts, key, n=1, **common)
  plain, _ = judging.sample_and_score(sampler, params, judge, prompts, key, **common)
  np.testing.assert_array_equal(one, plain)
