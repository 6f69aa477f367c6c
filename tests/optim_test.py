"""Schedules, the weight-decay mask and TF-style Adam against hand-worked numbers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from instructgpt_jax import optim


def test_cosine_schedule_decays_to_ten_percent_without_warmup():
  s = optim.schedule(common.optim_config(lr=9.65e-6), total_steps=100)  # SFT baseline (docs/paper.md §3.1)
  assert float(s(0)) == pytest.approx(9.65e-6)
  assert float(s(50)) == pytest.approx(9.65e-6 * (0.1 + 0.9 * 0.5), rel=1e-5)
  assert float(s(100)) == pytest.approx(9.65e-7, rel=1e-5)


def test_constant_schedule_warms_up_from_a_tenth_over_ten_steps():
  # PPO (docs/paper.md §5.2, §9 item 4): LR_i = peak · (0.1 + 0.9 · i/10) for i < 10, then peak.
  cfg = common.optim_config(lr=1e-5, schedule="constant", warmup_steps=10, warmup_init_fraction=0.1)
  s = optim.schedule(cfg, total_steps=4000)
  for i in range(10):
    assert float(s(i)) == pytest.approx(1e-5 * (0.1 + 0.09 * i), rel=1e-5)
  assert float(s(10)) == pytest.approx(1e-5) and float(s(3999)) == pytest.approx(1e-5)


def test_unknown_schedule_is_a_one_line_error():
  with pytest.raises(ValueError, match="optim.schedule: 'step' is not one of"):
    optim.schedule(common.optim_config(lr=1.0, schedule="step"), 10)


def test_weight_decay_skips_biases_and_norm_scales():
  params = {
    "layers": {"attn": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}, "norm": {"scale": jnp.ones(3)}},
    "embed": {"embedding": jnp.ones((4, 3))},
  }
  mask = optim.weight_decay_mask(params)
  assert mask == {
    "layers": {"attn": {"kernel": True, "bias": False}, "norm": {"scale": False}},
    "embed": {"embedding": True},
  }


def test_tf_style_adam_matches_the_tf1_formula():
  b1, b2, eps, lr = 0.9, 0.95, 1e-5, 0.1
  tx = optax.chain(optim.scale_by_adam_tf_style(b1, b2, eps), optax.scale(-lr))
  params = jnp.array([1.0, -2.0])
  state = tx.init(params)
  m = v = np.zeros(2)
  theta = np.array([1.0, -2.0])
  for t, g in enumerate([np.array([0.5, -1.0]), np.array([0.1, 0.3]), np.array([-0.2, 0.0])], start=1):
    updates, state = tx.update(jnp.asarray(g), state)
    params = optax.apply_updates(params, updates)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    theta = theta - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + eps)
    np.testing.assert_allclose(np.asarray(params), theta, rtol=1e-5)


def test_tf_style_first_step_is_smaller_than_optax_adam_for_small_gradients():
  # docs/paper.md §8.3: optax's effective ε early in training is ε·sqrt(1-β2^t), so its first steps are larger.
  g = jnp.array([1e-5])
  tf_step, _ = optim.scale_by_adam_tf_style(0.9, 0.95, 1e-5).update(g, optim.scale_by_adam_tf_style().init(g))
  ox = optax.scale_by_adam(0.9, 0.95, 1e-5)
  ox_step, _ = ox.update(g, ox.init(g))
  assert float(tf_step[0]) < 0.5 * float(ox_step[0])


def test_make_optimizer_clips_the_global_norm():
  cfg = common.optim_config(lr=1.0, clip_norm=1.0, schedule="constant", weight_decay=0.0)
  tx = optim.make_optimizer(cfg, total_steps=10)
  grads = {"w": jnp.array([300.0, 400.0])}
  # The first Adam step is ±lr per coordinate regardless of scale, so inspect the clip stage alone.
  clipped, _ = optax.clip_by_global_norm(1.0).update(grads, None)
  np.testing.assert_allclose(np.asarray(clipped["w"]), [0.6, 0.8], rtol=1e-6)
  updates, _ = tx.update(grads, tx.init(grads), grads)
  np.testing.assert_allclose(np.asarray(updates["w"]), [-1.0, -1.0], rtol=1e-3)
  assert jax.tree.structure(updates) == jax.tree.structure(grads)
