"""The KV-cached sampler and teacher-forced scoring: cached == full forward, greedy invariance across batch
and mesh, stopping rules, sampler log-probs == scorer log-probs, top-k/top-p frequencies, no recompiles."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from scipy import stats

from instructgpt_jax import generation, models, scoring, sharding

TINY = {"gpt": models.resolve({"size": "tiny"}), "llama": models.resolve({"size": "tiny-llama"})}
# The llama options of Llama 3.x and Qwen3. The pretraining context 16 lies inside the 20 cached positions of
# the cache test, and head size 16 puts RoPE frequencies in all three of llama3's bands (models_test).
TINY["llama3_rope"] = dataclasses.replace(
  TINY["llama"],
  rope_scaling="llama3",
  rope_factor=8.0,
  rope_low_freq_factor=1.0,
  rope_high_freq_factor=4.0,
  rope_original_max_len=16,
)
TINY["qwen3"] = dataclasses.replace(TINY["llama"], qk_norm=True, d_head=24)
EOS, PAD = 256, 257  # the byte tokenizer's layout: pad is a real id, distinct from EOS
PROMPT_BUCKETS = (4, 8, 16, 32)


def init(cfg, key):
  """models.init, with random q/k norm scales (they start at 1, where a misplaced scale would not show)."""
  graphdef, params = models.init(cfg, key)
  if cfg.qk_norm:
    attn = params["layers"]["attn"]
    for k, name in enumerate(("query_norm", "key_norm")):
      scale = attn[name]["scale"]
      attn[name]["scale"] = 1.0 + 0.3 * jax.random.normal(jax.random.fold_in(key, k), scale.shape, scale.dtype)
  return graphdef, params


def ragged_prompts(seed, lengths):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, n).tolist() for n in lengths]


def full_forward_logits(graphdef, params, prompt_tokens, prompt_segment_ids, response_tokens, response_mask):
  """Uncached logits [B, R, V] at the positions that predict each response token (P - 1 + t)."""
  tokens = jnp.concatenate([jnp.asarray(prompt_tokens), jnp.asarray(response_tokens)], axis=1)
  segment_ids = jnp.concatenate([jnp.asarray(prompt_segment_ids), jnp.asarray(response_mask)], axis=1)
  logits, _ = jax.jit(lambda p, t, s: models.apply(graphdef, p, t, segment_ids=s))(params, tokens, segment_ids)
  return np.asarray(logits[:, prompt_tokens.shape[1] - 1 : -1])


def mesh_and_sharded_params(cfg, params, kind="lm"):
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  names = sharding.logical_axes(models.abstract(cfg, kind=kind)[1])
  return mesh, jax.device_put(params, sharding.tree_shardings(params, names, mesh, sharding.DEFAULT_RULES))


def batch_sharded(mesh, *arrays):
  return [jax.device_put(a, NamedSharding(mesh, P(("data", "fsdp")))) for a in arrays]


# ------------------------------------------------------------------------------------------ cache == full pass


@pytest.mark.parametrize(
  "family, scan_layers",
  [("gpt", False), ("llama", False), ("gpt", True), ("llama", True), ("llama3_rope", False), ("qwen3", True)],
)
def test_cached_decoding_matches_the_full_forward_pass(family, scan_layers):
  # Ragged left padding (one row fills the bucket, one has a single token) and ragged responses: row 2's
  # response ends after 3 tokens, so it feeds padding (segment 0) for the remaining steps.
  cfg = dataclasses.replace(TINY[family], scan_layers=scan_layers)
  graphdef, params = init(cfg, jax.random.key(0))
  prompt_tokens, prompt_segments = generation.left_pad(ragged_prompts(0, [12, 1, 7, 4]), buckets=(12,), pad_id=PAD)
  steps = 9
  response_tokens = np.random.default_rng(1).integers(0, 256, (4, steps)).astype(np.int32)
  response_mask = np.ones((4, steps), np.int32)
  response_mask[2, 3:] = 0
  response_tokens[2, 3:] = PAD

  prefill = jax.jit(
    lambda p, t, s: generation.prefill(nnx.merge(graphdef, p), t, s, cache_length=12 + steps - 1),
  )
  step = jax.jit(lambda p, t, s, c: generation.decode_step(nnx.merge(graphdef, p), t, s, c))
  logits, cache = prefill(params, prompt_tokens, prompt_segments)
  cached = [np.asarray(logits)]
  for t in range(1, steps):
    logits, cache = step(params, response_tokens[:, t - 1], response_mask[:, t - 1], cache)
    cached.append(np.asarray(logits))
  cached = np.stack(cached, axis=1)  # [B, R, V]
  assert int(cache.end) == 12 + steps - 1 and cache.keys.shape == (cfg.n_layers, 4, cfg.kv_heads, 20, cfg.head_dim)
  np.testing.assert_array_equal(np.asarray(cache.real_token_counts()), [12 + 8, 1 + 8, 7 + 3, 4 + 8])

  want = full_forward_logits(graphdef, params, prompt_tokens, prompt_segments, response_tokens, response_mask)
  # Logits at step t are read when the token fed at t - 1 was real (the prompt's last token at t = 0).
  fed_real = np.concatenate([np.ones((4, 1), bool), response_mask[:, :-1] > 0], axis=1)
  assert np.abs(want).max() > 0.1  # a real comparison, not two zero arrays
  np.testing.assert_allclose(cached[fed_real], want[fed_real], atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------ greedy invariance


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_greedy_tokens_are_the_same_alone_among_others_and_on_the_mesh(family):
  cfg = TINY[family]
  graphdef, params = models.init(cfg, jax.random.key(1))
  settings = generation.SamplingSettings(eos_id=EOS, pad_id=PAD, greedy=True)
  prompts = ragged_prompts(2, [5, 16, 1, 9, 3, 12, 7, 2])
  tokens, segments = generation.left_pad(prompts, buckets=PROMPT_BUCKETS, pad_id=PAD)
  sampler = generation.Sampler(graphdef, settings, response_buckets=(8,))
  batch = sampler(params, tokens, segments, jax.random.key(0), max_new_tokens=8)
  assert batch.tokens.shape == (8, 8) and int(batch.mask.sum()) > 8

  # Cached greedy == argmax of the uncached forward pass at every generated position.
  want = full_forward_logits(graphdef, params, tokens, segments, batch.tokens, batch.mask).argmax(-1)
  mask = np.asarray(batch.mask) > 0
  np.testing.assert_array_equal(np.asarray(batch.tokens)[mask], want[mask])

  for row, prompt in enumerate(prompts):  # alone, left-padded to its own (smaller) bucket
    alone_tokens, alone_segments = generation.left_pad([prompt], buckets=PROMPT_BUCKETS, pad_id=PAD)
    alone = sampler(params, alone_tokens, alone_segments, jax.random.key(0), max_new_tokens=8)
    np.testing.assert_array_equal(np.asarray(alone.tokens[0]), np.asarray(batch.tokens[row]), err_msg=str(row))
    np.testing.assert_array_equal(np.asarray(alone.mask[0]), np.asarray(batch.mask[row]))
    np.testing.assert_allclose(np.asarray(alone.logprobs[0]), np.asarray(batch.logprobs[row]), atol=1e-5)

  mesh, sharded_params = mesh_and_sharded_params(cfg, params)
  on_mesh = generation.Sampler(graphdef, settings, response_buckets=(8,), mesh=mesh)
  sharded = on_mesh(sharded_params, *batch_sharded(mesh, tokens, segments), jax.random.key(0), max_new_tokens=8)
  np.testing.assert_array_equal(np.asarray(sharded.tokens), np.asarray(batch.tokens))
  np.testing.assert_array_equal(np.asarray(sharded.mask), np.asarray(batch.mask))
  np.testing.assert_allclose(np.asarray(sharded.logprobs), np.asarray(batch.logprobs), atol=1e-5)
  assert sharded.tokens.sharding.spec[0] == ("data", "fsdp")


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_the_decode_layout_samples_what_the_training_layout_samples(family):
  """ppo.rollout_layout="decode": the sampler reshards the params once per call into sharding.DECODE_RULES
  (weights over fsdp × tensor, batch over data); on 8 devices it yields the training layout's tokens, mask and
  log-probs, greedy and sampled with one key."""
  cfg = TINY[family]
  graphdef, params = init(cfg, jax.random.key(3))
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  names = sharding.logical_axes(models.abstract(cfg)[1])
  train_params = jax.device_put(params, sharding.tree_shardings(params, names, mesh, sharding.DEFAULT_RULES))
  decode_shardings = sharding.tree_shardings(params, names, mesh, sharding.DECODE_RULES)
  tokens, segments = generation.left_pad(ragged_prompts(4, [5, 16, 1, 9, 3, 12, 7, 2]), buckets=(16,), pad_id=PAD)
  prompts = batch_sharded(mesh, tokens, segments)
  for greedy in (True, False):
    settings = generation.SamplingSettings(eos_id=EOS, pad_id=PAD, greedy=greedy)
    train = generation.Sampler(graphdef, settings, response_buckets=(8,), mesh=mesh)
    layout = dict(rules=sharding.DECODE_RULES, param_shardings=decode_shardings)
    decode = generation.Sampler(graphdef, settings, response_buckets=(8,), mesh=mesh, **layout)
    want = train(train_params, *prompts, jax.random.key(5), max_new_tokens=8)
    got = decode(train_params, *prompts, jax.random.key(5), max_new_tokens=8)
    assert int(want.mask.sum()) > 8
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens), err_msg=f"greedy={greedy}")
    np.testing.assert_array_equal(np.asarray(got.mask), np.asarray(want.mask))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), atol=1e-5)
    assert got.tokens.sharding.spec[0] == "data"  # the rollout's rows over data only
  # The resharded copy lives inside the call: the caller's params keep their training layout.
  assert (
    jax.tree.leaves(train_params)[0].sharding
    == jax.tree.leaves(sharding.tree_shardings(params, names, mesh, sharding.DEFAULT_RULES))[0]
  )


def test_kv_cache_is_sharded_over_batch_and_kv_heads():
  cfg = TINY["llama"]  # 2 kv heads: split by tensor = 2
  graphdef, params = models.init(cfg, jax.random.key(2))
  mesh, sharded_params = mesh_and_sharded_params(cfg, params)
  tokens, segments = generation.left_pad(ragged_prompts(3, [3, 8, 1, 6] * 2), buckets=(8,), pad_id=PAD)
  prefill = sharding.jit_on_mesh(
    lambda p, t, s: generation.prefill(nnx.merge(graphdef, p), t, s, cache_length=12)[1], mesh=mesh
  )
  cache = prefill(sharded_params, *batch_sharded(mesh, tokens, segments))
  # XLA drops trailing unsharded axes from a spec; compare the named axes only.
  assert cache.keys.sharding.spec[:3] == (None, ("data", "fsdp"), "tensor")
  assert cache.values.sharding.spec[:3] == (None, ("data", "fsdp"), "tensor")
  assert cache.segment_ids.sharding.spec[:1] == (("data", "fsdp"),)


# ------------------------------------------------------------------------------------------ stopping rules


def test_rows_stop_at_eos_and_at_their_length_limit():
  cfg = TINY["gpt"]
  graphdef, params = models.init(cfg, jax.random.key(3))
  prompts = ragged_prompts(4, [6, 2, 8, 4]) + [[]]  # the last row is batch filler: no prompt, no response
  tokens, segments = generation.left_pad(prompts, buckets=(8,), pad_id=PAD)
  run = jax.jit(generation.generate, static_argnums=0, static_argnames=("settings", "max_new_tokens"))
  key = jax.random.key(0)

  # Without an EOS in sight (an id the model never emits), every real row runs to the bucket.
  never = generation.SamplingSettings(eos_id=cfg.vocab_size, pad_id=PAD, greedy=True)
  free = run(graphdef, params, tokens, segments, key, settings=never, max_new_tokens=10)
  np.testing.assert_array_equal(np.asarray(free.mask).sum(1), [10, 10, 10, 10, 0])
  assert np.all(np.asarray(free.tokens)[4] == PAD) and np.all(np.asarray(free.logprobs)[4] == 0)

  # Make a token that first appears at step >= 2 of some row the EOS: greedy decoding is unchanged up to
  # each row's first EOS, then pads.
  free_tokens = np.asarray(free.tokens)
  first_row, first_step = next(
    (r, t) for r in range(4) for t in range(2, 10) if free_tokens[r, t] not in free_tokens[r, :t]
  )
  eos = int(free_tokens[first_row, first_step])
  ended = run(
    graphdef, params, tokens, segments, key, settings=dataclasses.replace(never, eos_id=eos), max_new_tokens=10
  )
  for row in range(4):
    hits = np.flatnonzero(np.asarray(free.tokens[row]) == eos)
    length = hits[0] + 1 if len(hits) else 10
    np.testing.assert_array_equal(np.asarray(ended.mask[row]), np.arange(10) < length)
    np.testing.assert_array_equal(np.asarray(ended.tokens[row, :length]), np.asarray(free.tokens[row, :length]))
    assert np.all(np.asarray(ended.tokens[row, length:]) == PAD)
    assert np.all(np.asarray(ended.logprobs[row, length:]) == 0.0) and np.all(ended.logprobs[row, :length] < 0)
  assert np.asarray(ended.mask[first_row]).sum() == first_step + 1

  # Per-row length limits within the bucket.
  limits = jnp.array([1, 4, 0, 10, 3])
  limited = run(graphdef, params, tokens, segments, key, settings=never, max_new_tokens=10, length_limit=limits)
  np.testing.assert_array_equal(np.asarray(limited.mask).sum(1), [1, 4, 0, 10, 0])
  np.testing.assert_array_equal(np.asarray(limited.tokens[1, :4]), np.asarray(free.tokens[1, :4]))


# ------------------------------------------------------------------------------------------ teacher forcing


@pytest.mark.parametrize("family, scan_layers", [("gpt", False), ("llama", True)])
def test_teacher_forced_logprobs_equal_the_samplers(family, scan_layers):
  cfg = dataclasses.replace(TINY[family], scan_layers=scan_layers)
  graphdef, params = models.init(cfg, jax.random.key(4))
  tokens, segments = generation.left_pad(ragged_prompts(5, [7, 3, 16, 1, 10, 5, 12, 2]), buckets=(16,), pad_id=PAD)
  settings = generation.SamplingSettings(eos_id=EOS, pad_id=PAD, temperature=0.7, top_k=40, top_p=0.95)
  sampler = generation.Sampler(graphdef, settings, response_buckets=(12,))
  rollout = sampler(params, tokens, segments, jax.random.key(7), max_new_tokens=12)
  other = sampler(params, tokens, segments, jax.random.key(8), max_new_tokens=12)
  assert not np.array_equal(np.asarray(rollout.tokens), np.asarray(other.tokens))  # really sampled

  score = jax.jit(scoring.response_logprobs, static_argnums=0, static_argnames="temperature")
  scored = score(graphdef, params, tokens, segments, rollout.tokens, rollout.mask, temperature=0.7)
  mask = np.asarray(rollout.mask) > 0
  assert mask.sum() > 40 and np.asarray(rollout.logprobs)[mask].min() < -1.0
  assert np.abs(np.asarray(scored) - np.asarray(rollout.logprobs)).max() <= 1e-4
  assert np.all(np.asarray(scored)[~mask] == 0.0)
  # The temperature matters: at T = 1 the same tokens score differently.
  at_one = score(graphdef, params, tokens, segments, rollout.tokens, rollout.mask, temperature=1.0)
  assert np.abs(np.asarray(at_one) - np.asarray(scored))[mask].max() > 1e-2


def test_values_and_scores_are_read_at_the_response_positions_and_match_on_the_mesh():
  cfg = TINY["llama"]
  graphdef, params = models.init(cfg, jax.random.key(5), kind="scalar")
  tokens, segments = generation.left_pad(ragged_prompts(6, [3, 8, 1, 6, 2, 7, 5, 4]), buckets=(8,), pad_id=PAD)
  response = np.random.default_rng(7).integers(0, 256, (8, 6)).astype(np.int32)
  lengths = np.array([6, 1, 3, 0, 6, 2, 5, 4])
  mask = (np.arange(6) < lengths[:, None]).astype(np.int32)
  response = np.where(mask > 0, response, PAD)
  values, scores = jax.jit(scoring.response_values, static_argnums=0)(
    graphdef, params, tokens, segments, response, mask
  )

  sequence = jnp.concatenate([tokens, response], 1)
  scalars, _ = models.apply(graphdef, params, sequence, segment_ids=jnp.concatenate([segments, mask], 1))
  scalars = np.asarray(scalars)
  for row, length in enumerate(lengths):
    np.testing.assert_allclose(np.asarray(values[row, :length]), scalars[row, 7 : 7 + length], atol=1e-5)
    assert np.all(np.asarray(values[row, length:]) == 0.0)
    want = scalars[row, 8 + length - 1] if length else 0.0
    np.testing.assert_allclose(float(scores[row]), want, atol=1e-5)

  mesh, sharded_params = mesh_and_sharded_params(cfg, params, kind="scalar")
  on_mesh = sharding.jit_on_mesh(lambda *a: scoring.response_values(graphdef, *a), mesh=mesh)
  sharded_values, sharded_scores = on_mesh(sharded_params, *batch_sharded(mesh, tokens, segments, response, mask))
  np.testing.assert_allclose(np.asarray(sharded_values), np.asarray(values), atol=1e-5)
  np.testing.assert_allclose(np.asarray(sharded_scores), np.asarray(scores), atol=1e-5)


# ------------------------------------------------------------------------------------------ top-k / top-p


def truncated_distribution(logits, temperature, top_k, top_p):
  """NumPy reference: softmax(logits / T), keep the top k, renormalize, keep the nucleus, renormalize."""
  probs = np.exp(logits / temperature - (logits / temperature).max())
  probs /= probs.sum()
  order = np.argsort(-probs, kind="stable")
  keep = np.zeros(len(probs), bool)
  keep[order[: top_k or len(probs)]] = True
  kept = np.where(keep, probs, 0.0) / probs[keep].sum()
  mass = 0.0
  for token in order:
    if not keep[token]:
      break
    if mass >= top_p:
      keep[token] = False
    mass += kept[token]
  out = np.where(keep, probs, 0.0)
  return out / out.sum()


@pytest.mark.parametrize("top_k, top_p, temperature", [(5, 1.0, 1.0), (0, 0.8, 1.0), (8, 0.7, 0.6)])
def test_top_k_top_p_token_frequencies_match_the_truncated_distribution(top_k, top_p, temperature):
  vocab, draws = 16, 20_000
  logits = np.random.default_rng(8).normal(0, 1.5, vocab).astype(np.float32)
  want = truncated_distribution(logits.astype(np.float64), temperature, top_k, top_p)
  settings = generation.SamplingSettings(eos_id=0, pad_id=1, temperature=temperature, top_k=top_k, top_p=top_p)
  tokens, logprobs = jax.jit(generation.sample_tokens, static_argnums=2)(
    jnp.broadcast_to(jnp.asarray(logits), (draws, vocab)), jax.random.key(9), settings
  )
  counts = np.bincount(np.asarray(tokens), minlength=vocab)
  kept = want > 0
  assert 1 < kept.sum() < vocab and np.all(counts[~kept] == 0)
  assert stats.chisquare(counts[kept], want[kept] * draws).pvalue > 1e-3
  # The reported log-prob is the full (untruncated) scaled distribution's, not the truncated one's.
  full = jax.nn.log_softmax(jnp.asarray(logits) / temperature)
  np.testing.assert_allclose(np.asarray(logprobs), np.asarray(full)[np.asarray(tokens)], atol=1e-6)


# ------------------------------------------------------------------------------------------ static shapes


def test_no_recompilation_across_prompt_lengths_in_one_bucket():
  cfg = TINY["llama"]
  graphdef, params = models.init(cfg, jax.random.key(10))
  settings = generation.SamplingSettings(eos_id=EOS, pad_id=PAD, temperature=1.0, top_k=20)
  sampler = generation.Sampler(graphdef, settings, response_buckets=(4, 8))
  rng = np.random.default_rng(11)
  batches = []
  for longest in [16, 9, 10, 11, 12, 13, 14, 15, 16, 12, 9]:  # warm-up batch, then 10 more in bucket 16
    lengths = [longest] + rng.integers(1, longest + 1, 3).tolist()
    batches.append(generation.left_pad(ragged_prompts(int(longest), lengths), buckets=PROMPT_BUCKETS, pad_id=PAD))
  keys = [jax.random.key(i) for i in range(len(batches))]
  new_tokens = [8, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6]  # all in response bucket 8
  jax.block_until_ready(sampler(params, *batches[0], keys[0], max_new_tokens=new_tokens[0]))

  events = []
  listener = lambda event, duration, **kw: events.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for (tokens, segments), key, n in zip(batches[1:], keys[1:], new_tokens[1:]):
      assert tokens.shape == (4, 16)
      rollout = sampler(params, tokens, segments, key, max_new_tokens=n)
      # NumPy checks: an eager jnp reduction would compile a program of its own.
      assert rollout.tokens.shape == (4, 8) and np.asarray(rollout.mask).sum(1).max() <= n
    compiles = [e for e in events if e.endswith(("backend_compile_duration", "jaxpr_trace_duration"))]
    assert compiles == []
    tokens, segments = generation.left_pad(ragged_prompts(12, [20, 3]), buckets=PROMPT_BUCKETS, pad_id=PAD)
    sampler(params, tokens, segments, keys[0], max_new_tokens=8)  # bucket 32: a new program, and the counter sees it
    assert any(e.endswith("backend_compile_duration") for e in events)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def test_left_pad_buckets_and_settings_errors():
  tokens, segments = generation.left_pad([[5, 6, 7], [8]], buckets=(2, 4, 8), pad_id=PAD, batch_size=3)
  np.testing.assert_array_equal(tokens, [[PAD, 5, 6, 7], [PAD, PAD, PAD, 8], [PAD] * 4])
  np.testing.assert_array_equal(segments, [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]])
  assert generation.pick_bucket(5, (16, 8)) == 8
  with pytest.raises(ValueError, match="length 17 exceeds the largest bucket 16"):
    generation.pick_bucket(17, (8, 16))
  with pytest.raises(ValueError, match="pad_id must differ from eos_id"):
    generation.SamplingSettings(eos_id=3, pad_id=3)
  with pytest.raises(ValueError, match="top_p"):
    generation.SamplingSettings(eos_id=3, pad_id=4, top_p=0.0)
