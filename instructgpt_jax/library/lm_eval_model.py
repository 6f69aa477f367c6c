"""Our JAX model as an lm-evaluation-harness backend (`lm_eval.api.model.LM`; EleutherAI's `lm-eval`, the
`[eval]` extra): the harness owns the tasks, prompts and metrics, this module scores and generates, jitted and
sharded over the mesh's data axis.

Requests follow lm-eval's HF backend (`--model hf`) so that the two give the same numbers:
  loglikelihood          (context, continuation): trailing spaces of the context move to the continuation; the
                         continuation's tokens are those of tok(context + continuation) after tok(context)
                         (an empty context is the prefix token: BOS, else EOS); the last max_len + 1 tokens
                         are kept; the sum of the continuation's log-probs, and whether greedy decoding would
                         produce it
  loglikelihood_rolling  a document's log-likelihood from the prefix token, in windows of max_len tokens
                         (lm_eval.utils.get_rolling_token_windows), each token predicted once
  generate_until         greedy, up to `max_gen_toks` new tokens (256 by default), the context truncated to its
                         last max_len − max_gen_toks tokens, the text cut at the first stop string

Requests are scored in length buckets (powers of two, up to the model's window) and in batches of
`batch_size` rows, so the number of compiled programs stays small; `compiled` lists the shapes compiled and
`truncated` counts the requests cut to the window.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from instructgpt_jax import errors, generation, models, sharding
from instructgpt_jax.data import tokenizer as tokenizer_lib
from instructgpt_jax.library import model_io

MAX_GEN_TOKS = 256  # lm-eval's HF backend default


def length_bucket(n: int, limit: int, smallest: int = 32) -> int:
  """The smallest power of two >= n (at least `smallest`), capped at `limit`."""
  return min(limit, max(smallest, 1 << math.ceil(math.log2(max(n, 1)))))


def _continuation_logprobs(graphdef, params, inputs, targets, segment_ids):
  """[B, L] log p(target_t | inputs_≤t) in float32 and whether target_t is the argmax, 0/False at padding."""
  logits, _ = models.apply(graphdef, params, inputs, segment_ids=segment_ids)
  logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
  greedy = jnp.argmax(logits, axis=-1) == targets
  real = segment_ids > 0
  return jnp.where(real, picked, 0.0), greedy | ~real


class JaxLM(LM):
  """A language model read as `export` reads it (a run's workdir: its selected or EMA weights; an export;
  hf:PATH), with its own tokenizer, for lm_eval.simple_evaluate."""

  def __init__(
    self, init_from: str, *, batch_size: int = 16, max_gen_toks: int = MAX_GEN_TOKS, step: str = "", devices=None
  ):
    super().__init__()
    source = model_io.read_source(init_from, "--init_from", step=step)
    if source is None or source.kind != "lm":
      raise errors.ConfigError(
        f"--init_from: {init_from} is not a language model (a reward model scores, not generates)"
      )
    self.tokenizer = tokenizer_lib.load(model_io.tokenizer_of(source, "--init_from"))
    self.mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices)  # rows over the devices
    self.rules = sharding.rules_dict(sharding.DEFAULT_RULES)
    self.graphdef, self.params = model_io.load_frozen(source, "lm", self.mesh, self.rules)
    self.cfg, self.max_length = source.config, source.config.max_len
    devices = self.mesh.shape["data"]
    self.batch_size = max(devices, -(-batch_size // devices) * devices)  # whole rows on every device
    self.max_gen_toks = max_gen_toks
    self.compiled: set[tuple[str, int, int]] = set()
    self.truncated = 0  # requests whose tokens did not fit the window (the oldest context tokens left out)
    graphdef = self.graphdef
    self._score = sharding.jit_on_mesh(
      lambda p, *batch: _continuation_logprobs(graphdef, p, *batch), mesh=self.mesh, rules=self.rules
    )
    settings = generation.SamplingSettings(eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id, greedy=True)
    self.sampler = generation.Sampler(
      graphdef, settings, response_buckets=(max_gen_toks,), mesh=self.mesh, rules=self.rules
    )
    prefix = self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id
    self.prefix_token_id = int(prefix)

  # ---------------------------------------------------------------- scoring token pairs

  def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    spaces = len(context) - len(context.rstrip())
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = self.tokenizer.encode(context + continuation)
    context_ids = self.tokenizer.encode(context)
    return context_ids, whole[len(context_ids) :]

  def score_pairs(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(Σ log p(continuation | context), greedy?) for token-id pairs, the context cut to fit the window."""
    rows = []
    for context, continuation in pairs:
      tokens = (list(context) + list(continuation))[-(self.max_length + 1) :]
      self.truncated += len(context) + len(continuation) > len(tokens)
      # A continuation longer than the window is scored on its last max_len tokens.
      rows.append((tokens[:-1], tokens[1:], min(len(continuation), len(tokens) - 1)))
    out: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # longest first: fewest pad tokens
    for start in range(0, len(order), self.batch_size):
      chunk = order[start : start + self.batch_size]
      length = length_bucket(len(rows[chunk[0]][0]), self.max_length)
      inputs = np.full((self.batch_size, length), self.tokenizer.pad_id, np.int32)
      targets, segments = np.zeros_like(inputs), np.zeros_like(inputs)
      for r, i in enumerate(chunk):
        x, y, _ = rows[i]
        inputs[r, : len(x)], targets[r, : len(y)], segments[r, : len(x)] = x, y, 1
      self.compiled.add(("score", self.batch_size, length))
      logprobs, greedy = jax.device_get(self._score(self.params, inputs, targets, segments))
      for r, i in enumerate(chunk):
        n, k = len(rows[i][0]), rows[i][2]
        out[i] = (float(np.sum(logprobs[r, n - k : n], dtype=np.float64)), bool(np.all(greedy[r, n - k : n])))
    return out

  # ---------------------------------------------------------------- lm-eval's three requests

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    pairs = []
    for context, continuation in (r.args for r in requests):
      if context == "":
        pairs.append(([self.prefix_token_id], self.tokenizer.encode(continuation)))
      else:
        pairs.append(self._encode_pair(context, continuation))
    return self.score_pairs(pairs)

  def loglikelihood_rolling(self, requests) -> list[float]:
    pairs, owner = [], []
    for i, (text,) in enumerate(r.args for r in requests):
      windows = get_rolling_token_windows(
        token_list=self.tokenizer.encode(text),
        prefix_token=self.prefix_token_id,
        max_seq_len=self.max_length,
        context_len=1,
      )
      for window in map(make_disjoint_window, windows):
        pairs.append(window)
        owner.append(i)
    totals = [0.0] * len(requests)
    for i, (logprob, _) in zip(owner, self.score_pairs(pairs)):
      totals[i] += logprob
    return totals

  def generate_until(self, requests) -> list[str]:
    out = [""] * len(requests)
    groups: dict[int, list[tuple[int, list[int], list[str]]]] = {}
    for i, (context, kwargs) in enumerate(r.args for r in requests):
      until = kwargs.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      budget = int(kwargs.get("max_gen_toks", self.max_gen_toks))
      ids = self.tokenizer.encode(context)[-(self.max_length - budget) :]
      groups.setdefault(budget, []).append((i, ids, until))
    for budget, items in groups.items():
      sampler = self.sampler if budget == self.max_gen_toks else None
      if sampler is None:
        settings = generation.SamplingSettings(eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id, greedy=True)
        sampler = generation.Sampler(
          self.graphdef, settings, response_buckets=(budget,), mesh=self.mesh, rules=self.rules
        )
      buckets = sorted({length_bucket(n, self.max_length - budget) for n in (len(ids) for _, ids, _ in items)})
      batches = generation.sample_batches(
        sampler,
        self.params,
        [np.asarray(ids, np.int32) for _, ids, _ in items],
        batch_size=self.batch_size,
        buckets=buckets,
        pad_id=self.tokenizer.pad_id,
        max_new_tokens=budget,
        key_of=lambda start: jax.random.PRNGKey(start),  # greedy: the key changes nothing
      )
      done = 0
      for chunk, tokens, _, rollout in batches:
        self.compiled.add(("generate", tokens.shape[0], tokens.shape[1]))
        response, mask = np.asarray(rollout.tokens), np.asarray(rollout.mask)
        for r in range(len(chunk)):
          i, _, until = items[done + r]
          text = self.tokenizer.decode(response[r][mask[r] > 0])
          for stop in until:
            text = text.split(stop)[0]
          out[i] = text
        done += len(chunk)
    return out
