"""The Transformer: sizes, a slow NumPy reference forward, causality, padding, GQA, RoPE (and Llama 3's
scaling), Qwen3's q/k norms, scan and remat."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructgpt_jax import models, sharding
from instructgpt_jax.errors import ConfigError
from instructgpt_jax.models import sizes, transformer

TINY = {"gpt": models.resolve({"size": "tiny"}), "llama": models.resolve({"size": "tiny-llama"})}
LLAMA3_ROPE = dict(
  rope_scaling="llama3", rope_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_len=32
)
# The llama options of Llama 3.x (RoPE scaling; head size 16 and context 32 put frequency 0 in the kept band,
# 1 in the interpolated one and 2..7 in the scaled one) and Qwen3 (q/k norms, head size 24 != 64 / 4).
VARIANTS = {
  "llama3_rope": dataclasses.replace(TINY["llama"], **LLAMA3_ROPE),
  "qwen3": dataclasses.replace(TINY["llama"], qk_norm=True, d_head=24),
}
TINY.update(VARIANTS)


def forward(cfg, params, graphdef, tokens, **kw):
  return jax.jit(lambda p, t: models.apply(graphdef, p, t, **kw))(params, tokens)


def init(cfg, key):
  """models.init, with random q/k norm scales (they start at 1, where a misplaced scale would not show)."""
  graphdef, params = models.init(cfg, key)
  if cfg.qk_norm:
    attn = params["layers"]["attn"]
    for k, name in enumerate(("query_norm", "key_norm")):
      scale = attn[name]["scale"]
      attn[name]["scale"] = 1.0 + 0.3 * jax.random.normal(jax.random.fold_in(key, k), scale.shape, scale.dtype)
  return graphdef, params


# ------------------------------------------------------------------------------------------ parameter counts


@pytest.mark.parametrize(
  "name, expected", [("gpt3-125m", 0.125e9), ("gpt3-1.3b", 1.316e9), ("gpt3-6.7b", 6.658e9), ("gpt3-175b", 174.6e9)]
)
def test_gpt3_parameter_counts_match_spec_table(name, expected):
  _, state = models.abstract(models.resolve({"size": name}))  # eval_shape: nothing is allocated
  count = models.param_count(state)
  assert abs(count - expected) / expected < 0.01, (name, count)


def test_gpt2_124m_has_exactly_124_439_808_parameters():
  _, state = models.abstract(models.resolve({"size": "gpt2-124m"}))
  assert models.param_count(state) == 124_439_808


@pytest.mark.parametrize("name", sorted(sizes.SIZES))
def test_every_size_matches_the_closed_form_count_and_names_every_axis(name):
  cfg = models.resolve({"size": name})
  _, state = models.abstract(cfg)
  assert models.param_count(state) == sizes.param_count_formula(cfg)
  names = sharding.logical_axes(state)
  shapes = jax.tree.map(lambda v: v.shape, state)
  for axes, shape in zip(
    jax.tree.leaves(names, is_leaf=lambda x: isinstance(x, tuple)),
    jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple)),
  ):
    assert len(axes) == len(shape) and axes[0] is not None


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_llama_options_match_the_closed_form_count_and_name_every_axis(name):
  cfg = VARIANTS[name]
  _, state = models.abstract(cfg)
  assert models.param_count(state) == sizes.param_count_formula(cfg)
  without = models.abstract(dataclasses.replace(cfg, qk_norm=False, **dict.fromkeys(LLAMA3_ROPE)))[1]
  # Two [H] scales per layer for the q/k norms; RoPE scaling adds no parameter.
  assert models.param_count(state) - models.param_count(without) == (
    2 * cfg.n_layers * cfg.head_dim if cfg.qk_norm else 0
  )
  names = sharding.logical_axes(state)
  if cfg.qk_norm:
    for norm in ("query_norm", "key_norm"):
      assert names["layers"]["attn"][norm]["scale"] == ("layers", "kv")
      assert state["layers"]["attn"][norm]["scale"].shape == (cfg.n_layers, cfg.head_dim)


def test_llama_options_are_checked_in_one_line():
  llama = TINY["llama"]
  cases = [
    (dict(rope_factor=8.0), "model.rope_factor: set only with model.rope_scaling"),
    (dict(rope_scaling="yarn"), "model.rope_scaling: 'yarn' is not None or one of"),
    (dict(rope_scaling="llama3", rope_factor=8.0), "needs model.rope_low_freq_factor, model.rope_high_freq_factor"),
    ({**LLAMA3_ROPE, "rope_high_freq_factor": 1.0}, "must exceed rope_low_freq_factor"),
    ({**LLAMA3_ROPE, "rope_factor": 0.0}, "must be positive"),
  ]
  for fields, message in cases:
    with pytest.raises(ConfigError, match=message):
      dataclasses.replace(llama, **fields)
  with pytest.raises(ConfigError, match="model.qk_norm: query/key norms exist in the llama family only"):
    dataclasses.replace(TINY["gpt"], qk_norm=True)
  with pytest.raises(ConfigError, match="model.rope_scaling: RoPE exists in the llama family only"):
    dataclasses.replace(TINY["gpt"], **LLAMA3_ROPE)
  # Hashable and JSON-serializable, as a static jit argument and model.json need.
  assert hash(VARIANTS["llama3_rope"]) != hash(llama)
  assert (
    models.ModelConfig(**json.loads(json.dumps(dataclasses.asdict(VARIANTS["llama3_rope"])))) == VARIANTS["llama3_rope"]
  )


def test_untied_llama_has_an_unembedding_and_scalar_model_has_none():
  cfg = TINY["llama"]
  _, lm = models.abstract(cfg)
  _, rm = models.abstract(cfg, kind="scalar")
  assert "unembed" in lm and "unembed" not in rm["transformer"]
  assert models.param_count(lm) - models.param_count(rm) == cfg.d_model * cfg.vocab_size - cfg.d_model - 1


def test_resolve_overrides_and_errors():
  cfg = models.resolve({"size": "gpt3-1.3b", "n_layers": 4, "dtype": None})
  assert (cfg.n_layers, cfg.d_model, cfg.dtype) == (4, 2048, "float32")
  with pytest.raises(ValueError, match="model.size: unknown size 'gpt5'"):
    models.resolve({"size": "gpt5"})
  with pytest.raises(ValueError, match="model.n_kv_heads: 3 does not divide n_heads=4"):
    models.resolve({"size": "tiny-llama", "n_kv_heads": 3})


# ------------------------------------------------------------------------------------------ NumPy reference


def np_layer_norm(x, scale, bias, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def np_rms_norm(x, scale, eps):
  return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * scale


def np_inv_freq(cfg, dim):
  """RoPE frequencies in float64 from the equations: theta^(-2i/H), then Llama 3's piecewise scaling of
  wavelength λ = 2π/f against the pretraining context C: λ < C/high kept, λ > C/low divided by the factor s,
  and in between (1 - g)·f/s + g·f with g = (C/λ - low) / (high - low)."""
  out = []
  for i in range(dim // 2):
    f = cfg.rope_theta ** (-2.0 * i / dim)
    if cfg.rope_scaling == "llama3":
      context, low, high, s = (
        cfg.rope_original_max_len,
        cfg.rope_low_freq_factor,
        cfg.rope_high_freq_factor,
        cfg.rope_factor,
      )
      wavelength = 2 * math.pi / f
      if wavelength > context / low:
        f = f / s
      elif wavelength >= context / high:
        g = (context / wavelength - low) / (high - low)
        f = (1 - g) * f / s + g * f
    out.append(f)
  return np.array(out)


def np_rope(x, positions, theta, inv_freq=None):
  """Slow RoPE: rotate each pair (x_i, x_{i+H/2}) by position · f_i, f_i = theta^(-2i/H) unless `inv_freq`
  gives them, one scalar at a time."""
  out = np.array(x, dtype=np.float64)
  _, length, heads, dim = x.shape
  half = dim // 2
  if inv_freq is None:
    inv_freq = [theta ** (-2.0 * i / dim) for i in range(half)]
  for b in range(x.shape[0]):
    for t in range(length):
      for h in range(heads):
        for i in range(half):
          angle = positions[b, t] * inv_freq[i]
          a, c = x[b, t, h, i], x[b, t, h, i + half]
          out[b, t, h, i] = a * math.cos(angle) - c * math.sin(angle)
          out[b, t, h, i + half] = c * math.cos(angle) + a * math.sin(angle)
  return out


def np_gelu(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def np_forward(cfg, params, tokens):
  """A plain NumPy float64 forward pass written from the equations, one layer at a time."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  batch, length = tokens.shape
  positions = np.broadcast_to(np.arange(length), (batch, length))
  x = p["embed"]["embedding"][tokens]
  if cfg.family == "gpt":
    x = x + p["pos_embed"]["embedding"][positions]
  n, k, h = cfg.n_heads, cfg.kv_heads, cfg.head_dim
  causal = np.tril(np.ones((length, length), bool))
  for i in range(cfg.n_layers):
    lp = jax.tree.map(lambda a: a[i], p["layers"])

    def norm(name, x):
      if cfg.family == "gpt":
        return np_layer_norm(x, lp[name]["scale"], lp[name]["bias"], cfg.norm_eps)
      return np_rms_norm(x, lp[name]["scale"], cfg.norm_eps)

    def proj(name, x, heads):
      out = np.einsum("btd,dnh->btnh", x, lp["attn"][name]["kernel"])
      return out + lp["attn"][name]["bias"] if cfg.family == "gpt" else out

    y = norm("attn_norm", x)
    q, kk, v = proj("query", y, n), proj("key", y, k), proj("value", y, k)
    if cfg.qk_norm:  # per head, over its h features, before RoPE
      q = np_rms_norm(q, lp["attn"]["query_norm"]["scale"], cfg.norm_eps)
      kk = np_rms_norm(kk, lp["attn"]["key_norm"]["scale"], cfg.norm_eps)
    if cfg.family == "llama":
      inv_freq = np_inv_freq(cfg, h)
      q, kk = np_rope(q, positions, None, inv_freq), np_rope(kk, positions, None, inv_freq)
    kk, v = np.repeat(kk, n // k, axis=2), np.repeat(v, n // k, axis=2)  # head j uses kv head j // (n/k)
    scores = np.einsum("btnh,bsnh->bnts", q, kk) / math.sqrt(h)
    scores = np.where(causal, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attn = np.einsum("bnts,bsnh->btnh", probs, v)
    out = np.einsum("btnh,nhd->btd", attn, lp["attn"]["out"]["kernel"])
    x = x + (out + lp["attn"]["out"]["bias"] if cfg.family == "gpt" else out)
    y = norm("mlp_norm", x)
    m = lp["mlp"]
    if cfg.family == "gpt":
      hidden = np_gelu(y @ m["up"]["kernel"] + m["up"]["bias"])
      x = x + hidden @ m["down"]["kernel"] + m["down"]["bias"]
    else:
      gate = y @ m["gate"]["kernel"]
      x = x + (gate / (1 + np.exp(-gate)) * (y @ m["up"]["kernel"])) @ m["down"]["kernel"]
  if cfg.family == "gpt":
    x = np_layer_norm(x, p["final_norm"]["scale"], p["final_norm"]["bias"], cfg.norm_eps)
  else:
    x = np_rms_norm(x, p["final_norm"]["scale"], cfg.norm_eps)
  unembed = p["embed"]["embedding"].T if cfg.tied_embeddings else p["unembed"]["kernel"]
  return x @ unembed


@pytest.mark.parametrize("family", ["gpt", "llama", "llama3_rope", "qwen3"])
def test_forward_matches_numpy_reference(family):
  cfg = TINY[family]
  graphdef, params = init(cfg, jax.random.key(1))
  length = 40 if cfg.rope_scaling else 12  # llama3: positions past the pretraining context (32)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, length))
  logits, hidden = forward(cfg, params, graphdef, jnp.asarray(tokens))
  assert logits.dtype == jnp.float32 and hidden.shape == (2, length, cfg.d_model)
  want = np_forward(cfg, params, tokens)
  np.testing.assert_allclose(np.asarray(logits), want, atol=2e-5, rtol=1e-4)
  if family in VARIANTS:  # the option changes the function: the plain llama reference is off by far more
    plain = dataclasses.replace(
      cfg, qk_norm=False, rope_scaling=None, **dict.fromkeys(LLAMA3_ROPE.keys() - {"rope_scaling"})
    )
    assert np.abs(np_forward(plain, params, tokens) - want).max() > 50 * 2e-5  # 50 times the tolerance


def test_llama3_rope_frequencies_keep_interpolate_and_scale_the_three_bands():
  cfg = VARIANTS["llama3_rope"]
  got = np.asarray(transformer.rope_frequencies(cfg))
  plain = np.asarray(transformer.rope_frequencies(TINY["llama"]))
  assert got.dtype == np.float32 and got.shape == (cfg.head_dim // 2,)
  wavelength = 2 * np.pi / plain  # 6.3, 19.9, 62.8, ...: context 32 / high 4 = 8 and 32 / low 1 = 32
  assert wavelength[0] < 8 and 8 < wavelength[1] < 32 and np.all(wavelength[2:] > 32)
  assert got[0] == plain[0]  # kept
  np.testing.assert_allclose(got[2:], plain[2:] / 8, rtol=1e-6)  # scaled
  assert plain[1] / 8 < got[1] < plain[1]  # interpolated
  np.testing.assert_allclose(got, np_inv_freq(cfg, cfg.head_dim), rtol=2e-6)


def test_rope_matches_slow_numpy_reference():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
  positions = rng.integers(0, 50, size=(2, 5))
  got = models.apply_rope(jnp.asarray(x), jnp.asarray(positions), 10_000.0)
  np.testing.assert_allclose(np.asarray(got), np_rope(x, positions, 10_000.0), atol=1e-5)
  # A rotation: norms of each pair are kept, and position 0 is the identity.
  np.testing.assert_allclose(np.linalg.norm(np.asarray(got), axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(models.apply_rope(jnp.asarray(x), jnp.zeros((2, 5), int), 1e4)), x)


# ------------------------------------------------------------------------------------------ invariances


def test_positions_from_mask_spec_vector():
  mask = jnp.array([[1, 0, 0, 1, 1, 1]])
  assert models.positions_from_mask(mask).tolist() == [[0, 1, 1, 1, 2, 3]]  # docs/paper.md §8.2


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_causality_gradient_from_future_inputs_is_exactly_zero(family):
  # Untied, so the unembedding does not touch the input embedding rows. Each position holds a distinct
  # token, so the gradient of the logits at position t w.r.t. the embedding row of a later token (and, for
  # GPT, w.r.t. a later position embedding) must be exactly zero.
  cfg = dataclasses.replace(TINY[family], tied_embeddings=False)
  graphdef, params = models.init(cfg, jax.random.key(2))
  length = 10
  tokens = jnp.arange(1, length + 1)[None]
  for t in (0, 4, length - 2):
    grads = jax.grad(lambda p: models.apply(graphdef, p, tokens)[0][0, t].sum())(params)
    emb = np.asarray(grads["embed"]["embedding"])
    assert np.all(emb[np.asarray(tokens[0, t + 1 :])] == 0.0), t
    assert np.all(np.abs(emb[np.asarray(tokens[0, : t + 1])]).sum(-1) > 0), t
    if family == "gpt":
      pos = np.asarray(grads["pos_embed"]["embedding"])
      assert np.all(pos[t + 1 :] == 0.0) and np.all(np.abs(pos[: t + 1]).sum(-1) > 0), t


@pytest.mark.parametrize("family", ["gpt", "llama", "llama3_rope", "qwen3"])
def test_left_padding_does_not_change_logits(family):
  cfg = TINY[family]
  graphdef, params = init(cfg, jax.random.key(3))
  real = np.random.default_rng(1).integers(0, 256, 9)
  width = len(real) + 7
  rows, segments = [], []
  for pad in range(8):
    rows.append(np.concatenate([np.full(pad, 257), real, np.full(7 - pad, 257)]))  # left and right pad
    segments.append(np.concatenate([np.zeros(pad), np.ones(len(real)), np.zeros(7 - pad)]))
  logits, _ = forward(
    cfg,
    params,
    graphdef,
    jnp.asarray(np.stack(rows), jnp.int32),
    segment_ids=jnp.asarray(np.stack(segments), jnp.int32),
  )
  logits = np.asarray(logits)
  assert logits.shape[1] == width
  reference = logits[0, : len(real)]
  for pad in range(1, 8):
    np.testing.assert_allclose(logits[pad, pad : pad + len(real)], reference, atol=1e-5)


def test_packed_segments_do_not_attend_across_examples():
  cfg = TINY["llama"]
  graphdef, params = models.init(cfg, jax.random.key(4))
  a, b = np.arange(1, 6), np.arange(10, 17)
  packed = jnp.asarray(np.concatenate([a, b])[None], jnp.int32)
  segments = jnp.asarray(np.array([[1] * 5 + [2] * 7]), jnp.int32)
  positions = jnp.asarray(np.concatenate([np.arange(5), np.arange(7)])[None], jnp.int32)
  logits, _ = forward(cfg, params, graphdef, packed, segment_ids=segments, positions=positions)
  alone_b, _ = forward(cfg, params, graphdef, jnp.asarray(b[None], jnp.int32))
  np.testing.assert_allclose(np.asarray(logits[0, 5:]), np.asarray(alone_b[0]), atol=1e-5)


@pytest.mark.parametrize("n_kv_heads", [1, 4])
def test_grouped_query_attention_equals_multi_head_with_shared_kv(n_kv_heads):
  # A GQA model equals a multi-head model whose K/V projections repeat each kv head n_heads/n_kv times.
  gqa = dataclasses.replace(TINY["llama"], n_kv_heads=n_kv_heads)
  mha = dataclasses.replace(TINY["llama"], n_kv_heads=4)
  graphdef, params = models.init(gqa, jax.random.key(5))
  mha_graphdef, _ = models.init(mha, jax.random.key(5))
  mha_params = jax.tree.map(lambda x: x, params)
  for name in ("key", "value"):
    kernel = params["layers"]["attn"][name]["kernel"]  # [L, D, K, H]
    mha_params["layers"]["attn"][name]["kernel"] = jnp.repeat(kernel, 4 // n_kv_heads, axis=2)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 11)), jnp.int32)
  got, _ = forward(gqa, params, graphdef, tokens)
  want, _ = forward(mha, mha_params, mha_graphdef, tokens)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  np.testing.assert_allclose(np.asarray(got), np_forward(gqa, params, np.asarray(tokens)), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_scan_and_remat_give_the_same_logits_and_gradients(family):
  base = TINY[family]
  graphdef, params = models.init(base, jax.random.key(6))
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 256, (2, 16)), jnp.int32)

  def loss_and_grad(cfg):
    gd = models.init(cfg, jax.random.key(6))[0]
    return jax.jit(jax.value_and_grad(lambda p: models.apply(gd, p, tokens)[0].std()))(params)

  want_loss, want_grads = loss_and_grad(base)
  for variant in (dict(scan_layers=True), dict(remat="full"), dict(scan_layers=True, remat="dots")):
    loss, grads = loss_and_grad(dataclasses.replace(base, **variant))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads, want_grads)


def test_bf16_compute_keeps_f32_parameters_and_float32_logits():
  cfg = dataclasses.replace(TINY["gpt"], dtype="bfloat16")
  graphdef, params = models.init(cfg, jax.random.key(7))
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, 256, (2, 8)), jnp.int32)
  logits, hidden = forward(cfg, params, graphdef, tokens)
  assert logits.dtype == jnp.float32 and hidden.dtype == jnp.float32  # f32_logits: the final norm in float32
  f32, _ = forward(TINY["gpt"], params, graphdef, tokens)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(f32), atol=0.1)  # same function, bf16 rounding
  plain = dataclasses.replace(cfg, f32_logits=False, f32_attention_probs=False)
  plain_graphdef, _ = models.init(plain, jax.random.key(7))
  plain_logits, plain_hidden = forward(plain, params, plain_graphdef, tokens)
  assert plain_logits.dtype == jnp.float32 and plain_hidden.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(plain_logits), np.asarray(f32), atol=0.1)


def test_residual_dropout_is_off_without_a_key_and_random_with_one():
  cfg = dataclasses.replace(TINY["gpt"], resid_dropout=0.2)
  graphdef, params = models.init(cfg, jax.random.key(8))
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, 256, (2, 8)), jnp.int32)
  plain, _ = forward(cfg, params, graphdef, tokens)
  no_dropout, _ = forward(TINY["gpt"], params, graphdef, tokens)
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(no_dropout))
  run = jax.jit(lambda p, t, k: models.apply(graphdef, p, t, dropout_rng=k)[0])
  a, b = run(params, tokens, jax.random.key(0)), run(params, tokens, jax.random.key(1))
  assert not np.allclose(a, plain) and not np.allclose(a, b)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(run(params, tokens, jax.random.key(0))))


def test_inverted_dropout_keeps_the_expected_value():
  from instructgpt_jax.models.transformer import dropout

  x = jnp.ones((200_000,))
  y = np.asarray(dropout(x, 0.2, jax.random.key(0)))
  assert abs((y == 0).mean() - 0.2) < 0.005 and abs(y.mean() - 1.0) < 0.01
  assert set(np.unique(y).tolist()) == {0.0, 1.25}


# ------------------------------------------------------------------------------------------ scalar head


def test_scalar_head_init_and_final_token_value():
  cfg = models.resolve({"size": "mini"})
  graphdef, params = models.init(cfg, jax.random.key(9), kind="scalar")
  kernel = np.asarray(params["head"]["proj"]["kernel"])
  assert kernel.shape == (cfg.d_model, 1) and np.all(np.asarray(params["head"]["proj"]["bias"]) == 0)
  assert abs(kernel.std() - 1 / math.sqrt(cfg.d_model + 1)) < 0.15 / math.sqrt(cfg.d_model + 1)
  tokens = jnp.asarray(np.random.default_rng(6).integers(0, 256, (3, 6)), jnp.int32)
  values, hidden = jax.jit(lambda p, t: models.apply(graphdef, p, t))(params, tokens)
  assert values.shape == (3, 6) and values.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(values), np.asarray(hidden, np.float64) @ kernel[:, 0], atol=1e-4)
  mask = jnp.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
  np.testing.assert_allclose(np.asarray(models.final_token_value(values, mask)), [values[0, 2], values[1, 5], 0.0])
