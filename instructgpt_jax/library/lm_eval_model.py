"""Our JAX model as an lm-evaluation-harness backend (`lm_eval.api.model.LM`; EleutherAI's `lm-eval`, the
`[eval]` extra): the harness owns the tasks, prompts and metrics, this module scores and generates, jitted and
sharded over the mesh's data axis.

Requests follow lm-eval's HF backend (`--model hf`) so that the two give the same numbers:
  loglikelihood          (context, continuation): trailing spaces of the context move to the continuation; the
                         continuation's tokens are those of tok(context + continuation) after tok(context)
                         (an empty context is the prefix token, BOS else EOS, unless the continuation starts
                         with it: then that token is the context); the last max_len + 1 tokens
                         are kept; the sum of the continuation's log-probs, and whether greedy decoding would
                         produce it
  loglikelihood_rolling  a document's log-likelihood from the prefix token, in windows of max_len tokens
                         (lm_eval.utils.get_rolling_token_windows), each token predicted once
  generate_until         greedy, up to `max_gen_toks` new tokens (256 by default), the context truncated to its
                         last max_len − max_gen_toks tokens, the text cut at the first stop string

Scored requests are packed into rows of the window (best-fit decreasing, `pack`: each request its own
segment, positions from 0, attention within it; the packed answer equals the request scored alone), rows
in batches of `batch_size` (the last one rounded up to a multiple of batch_size / 8 rows), a row's length
a power of two (up to the window), and the logits only at the positions scored, LOGIT_ROWS at a time, so
few positions are padding and the number of compiled programs stays small; `compiled` lists the shapes
compiled and `truncated` counts the requests cut to the window.
"""

from __future__ import annotations

import bisect
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
import tqdm
from flax import nnx
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from instructgpt_jax import errors, generation, paths, sharding
from instructgpt_jax.data import chat
from instructgpt_jax.data import tokenizer as tokenizer_lib
from instructgpt_jax.library import model_io

MAX_GEN_TOKS = 256  # lm-eval's HF backend default
LOGIT_ROWS = 128  # positions whose logits are computed at once (`_continuation_logprobs`)


def length_bucket(n: int, limit: int, smallest: int = 32) -> int:
  """The smallest power of two >= n (at least `smallest`), capped at `limit`."""
  return min(limit, max(smallest, 1 << math.ceil(math.log2(max(n, 1)))))


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
  """Best-fit decreasing bin packing: the indices of `lengths` in rows whose lengths sum to at most
  `capacity` (every length <= capacity), each row's longest first, the fullest rows first. Each index lands
  in the fullest row that still has room for it, longest first."""
  order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
  packed: list[list[int]] = []
  room: list[tuple[int, int]] = []  # (room left, row), sorted
  for i in order:
    j = bisect.bisect_left(room, (lengths[i], -1))
    if j < len(room):
      left, r = room.pop(j)
    else:
      left, r = capacity, len(packed)
      packed.append([])
    packed[r].append(i)
    if left - lengths[i] > 0:
      bisect.insort(room, (left - lengths[i], r))
  fill = [sum(lengths[i] for i in row) for row in packed]
  return [packed[r] for r in sorted(range(len(packed)), key=lambda r: -fill[r])]


def _continuation_logprobs(graphdef, params, inputs, segment_ids, positions, at, targets):
  """log p(targets | inputs) in float32 [B, K] at the positions `at` [B, K] of each row, and whether each target
  is the argmax there. The logits (the unembedding and the log-softmax over the vocabulary, the costly part
  of a short continuation) are computed at those K positions only, not all L, and `LOGIT_ROWS` rows at a time
  (a loop over position chunks), so the [rows, vocabulary] block is read while it is still in cache: the
  whole [B, K, V] at once took twice as long on the CPU (benchmarks/RESULTS.md)."""
  model = nnx.merge(graphdef, params)
  hidden = model.hidden_states(inputs, positions=positions, segment_ids=segment_ids)  # [B, L, D]
  hidden = jnp.take_along_axis(hidden, at[..., None], axis=1)  # [B, K, D]
  rows, k = at.shape
  step = math.gcd(k, 1 << int(math.log2(max(1, LOGIT_ROWS // rows))))  # positions per chunk, a divisor of K

  def score(chunk):
    h, t = chunk  # [B, step, D], [B, step]
    logits = model.logits(h)  # float32
    top = jnp.max(logits, axis=-1, keepdims=True)
    shifted = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0] - top[..., 0]
    # = log_softmax(logits)[t], the same arithmetic as jax.nn.log_softmax
    picked = shifted - jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1))
    return picked, jnp.argmax(logits, axis=-1) == t

  def chunks(x):  # [B, K, ...] -> [K / step, B, step, ...]
    return jnp.moveaxis(x.reshape(rows, k // step, step, *x.shape[2:]), 1, 0)

  picked, greedy = jax.lax.map(score, (chunks(hidden), chunks(targets)))
  return jnp.moveaxis(picked, 0, 1).reshape(rows, k), jnp.moveaxis(greedy, 0, 1).reshape(rows, k)


def read_model(
  init_from: str, *, step: str = "", dtype: str | None = None, tokenizer: str | None = None
) -> tuple[model_io.Source, str, tokenizer_lib.Tokenizer]:
  """(the model's source with `dtype` applied, its tokenizer spec: `tokenizer`, else the model's own, that
  tokenizer loaded), or a
  one-line ConfigError: a path with no model, a reward model, a dtype other than float32/bfloat16, a model
  that holds or records no tokenizer (then --tokenizer names one)."""
  source = model_io.read_source(init_from, "--init_from", step=step)
  if source is None or source.kind != "lm":
    raise errors.ConfigError(f"--init_from: {init_from} is not a language model (a reward model scores, not generates)")
  if dtype and dtype not in ("float32", "bfloat16"):
    raise errors.ConfigError(f"--dtype: {dtype!r} is not float32 or bfloat16")
  # The layers run as one scanned layer: one layer compiled, not n_layers, and on the CPU 4-6% faster than
  # the unrolled loop at SmolLM2 size (benchmarks/RESULTS.md); the parameters are stacked either way.
  config = dataclasses.replace(source.config, dtype=dtype or source.config.dtype, scan_layers=True)
  source = dataclasses.replace(source, config=config)
  spec = tokenizer or model_io.tokenizer_of(source, "--tokenizer")
  try:
    loaded = tokenizer_lib.load(spec)
  except errors.UserError as e:  # its message names data.tokenizer, the training field
    raise errors.ConfigError(str(e).replace("data.tokenizer:", "--tokenizer:", 1)) from None
  if loaded.vocab_size > source.config.vocab_size:
    raise errors.ConfigError(
      f"--tokenizer: {spec} has {loaded.vocab_size} ids, more than the model's vocabulary of "
      f"{source.config.vocab_size}: it is not the model's tokenizer"
    )
  return source, spec, loaded


class JaxLM(LM):
  """A language model read as `export` reads it (a run's workdir: its selected or EMA weights; an export;
  hf:PATH), with its own tokenizer, for lm_eval.simple_evaluate.

  `tokenizer`: a data.tokenizer spec in place of the model's own. `dtype`: the compute dtype ("float32",
  "bfloat16"; default the model's config: a run's as it trained, an HF folder's float32). `fsdp`: the
  parameters split over that many devices (the mesh's fsdp axis; the rows over all of them, as in training).
  `max_length`: the window (default the model's `max_len`; smaller windows as lm-eval's `max_length`).
  `progress_bar`: a tqdm bar over the batches of each request type."""

  def __init__(
    self,
    init_from: str,
    *,
    batch_size: int = 16,
    max_gen_toks: int = MAX_GEN_TOKS,
    step: str = "",
    dtype: str | None = None,
    tokenizer: str | None = None,
    fsdp: int = 1,
    max_length: int | None = None,
    progress_bar: bool = False,
    devices=None,
  ):
    super().__init__()
    source, self.tokenizer_spec, self.tokenizer = read_model(init_from, step=step, dtype=dtype, tokenizer=tokenizer)
    self.init_from, self.tokenizer_given = init_from, bool(tokenizer)
    self.cfg, self.max_length = source.config, max_length or source.config.max_len
    if not 0 < self.max_length <= source.config.max_len:
      raise errors.ConfigError(f"--max_length: {max_length} is not in 1..{source.config.max_len} (the model's window)")
    # The harness's text is tokenized as transformers tokenizes it: a special token written in it (a chat
    # template's <|im_start|>) is its special id. (Training data never is: tokenizer_lib.Tokenizer.encode.)
    self._raw = tokenizers.Tokenizer.from_str(self.tokenizer.hf.to_str())
    self._raw.encode_special_tokens = False
    self.mesh = sharding.make_mesh({"data": -1, "fsdp": fsdp, "tensor": 1}, devices)
    self.rules = sharding.rules_dict(sharding.DEFAULT_RULES)
    self.graphdef, self.params = model_io.load_frozen(source, "lm", self.mesh, self.rules)
    rows = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    self.batch_size = max(rows, -(-batch_size // rows) * rows)  # whole rows on every device
    self.max_gen_toks, self.progress_bar = max_gen_toks, progress_bar
    self.compiled: set[tuple] = set()
    self.truncated = 0  # requests whose tokens did not fit the window (the oldest context tokens left out)
    graphdef = self.graphdef
    self._score = sharding.jit_on_mesh(
      lambda p, *batch: _continuation_logprobs(graphdef, p, *batch), mesh=self.mesh, rules=self.rules
    )
    self._samplers: dict[int, generation.Sampler] = {}
    prefix = self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id
    self.prefix_token_id = int(prefix)

  def swap(self, init_from: str, *, step: str = "") -> bool:
    """Loads another model's weights in place of these when it has this model's architecture and tokenizer
    (the compiled programs then serve it too), read in this model's dtype; False, and nothing changed, when
    it has not."""
    source, spec, _ = read_model(init_from, step=step, dtype=self.cfg.dtype)
    spec = self.tokenizer_spec if self.tokenizer_given else spec
    if source.config != self.cfg or spec != self.tokenizer_spec:
      return False
    _, self.params = model_io.load_frozen(source, "lm", self.mesh, self.rules)
    self.init_from, self.truncated = init_from, 0
    return True

  def encode(self, text: str) -> list[int]:
    """The ids of the harness's text, special tokens in it recognized, nothing added."""
    return self._raw.encode(text, add_special_tokens=False).ids

  def _bar(self, total: int, what: str):
    return tqdm.tqdm(total=total, desc=what, unit="batch", disable=not self.progress_bar, leave=False)

  def _sampler(self, budget: int) -> generation.Sampler:
    """The greedy sampler for `budget` new tokens (one per budget the tasks ask for)."""
    if budget not in self._samplers:
      settings = generation.SamplingSettings(eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id, greedy=True)
      self._samplers[budget] = generation.Sampler(
        self.graphdef, settings, response_buckets=(budget,), mesh=self.mesh, rules=self.rules
      )
    return self._samplers[budget]

  # ---------------------------------------------------------------- chat templates (--chat)

  @property
  def tokenizer_name(self) -> str:
    return self.tokenizer_spec.replace("/", "__")

  def chat_template(self, chat_template: bool | str = False) -> str | None:
    if not chat_template:
      return None
    template = chat.template_of(self.tokenizer_spec) if paths.path(self.tokenizer_spec).is_dir() else None
    if template is None:
      raise errors.UserError(
        f"--chat: the model's tokenizer ({self.tokenizer_spec}) has no chat template "
        "(tokenizer_config.json or chat_template.jinja)"
      )
    return template

  def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The messages in the tokenizer's template; without a generation prompt the last (assistant) message is
    left open, as lm-eval's HF backend asks transformers to (`continue_final_message`)."""
    return chat.render(
      self.tokenizer_spec,
      chat_history,
      add_generation_prompt=add_generation_prompt,
      continue_final=not add_generation_prompt,
    )

  # ---------------------------------------------------------------- scoring token pairs

  def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    spaces = len(context) - len(context.rstrip())
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = self.encode(context + continuation)
    context_ids = self.encode(context)
    return context_ids, whole[len(context_ids) :]

  def score_pairs(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(Σ log p(continuation | context), greedy?) for token-id pairs, the context cut to fit the window.

    The pairs are packed into rows of the window (`pack`: several short requests in one row, each its own
    segment with positions from 0, attending only to itself), so the trunk runs on few padding positions."""
    rows = []
    for context, continuation in pairs:
      tokens = (list(context) + list(continuation))[-(self.max_length + 1) :]
      self.truncated += len(context) + len(continuation) > len(tokens)
      # A continuation longer than the window is scored on its last max_len tokens.
      rows.append((tokens[:-1], tokens[1:], min(len(continuation), len(tokens) - 1)))
    out: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
    packed = pack([len(x) for x, _, _ in rows], self.max_length)  # fullest rows first
    bar = self._bar(-(-len(packed) // self.batch_size), "scoring")
    for start in range(0, len(packed), self.batch_size):
      chunk = packed[start : start + self.batch_size]
      n_rows = self._rows_for(len(chunk))
      length = length_bucket(sum(len(rows[i][0]) for i in chunk[0]), self.max_length)
      width = length_bucket(max(sum(rows[i][2] for i in row) for row in chunk), length, smallest=8)  # positions scored
      inputs = np.full((n_rows, length), self.tokenizer.pad_id, np.int32)
      segments, positions = np.zeros_like(inputs), np.zeros_like(inputs)
      at, targets = np.zeros((n_rows, width), np.int32), np.zeros((n_rows, width), np.int32)
      for r, row in enumerate(chunk):
        offset, scored = 0, 0
        for segment, i in enumerate(row, start=1):
          x, y, k = rows[i]
          inputs[r, offset : offset + len(x)], segments[r, offset : offset + len(x)] = x, segment
          positions[r, offset : offset + len(x)] = np.arange(len(x))
          at[r, scored : scored + k] = np.arange(offset + len(x) - k, offset + len(x))
          targets[r, scored : scored + k] = y[len(x) - k :]
          offset, scored = offset + len(x), scored + k
      self.compiled.add(("score", n_rows, length, width))
      logprobs, greedy = jax.device_get(self._score(self.params, inputs, segments, positions, at, targets))
      for r, row in enumerate(chunk):
        scored = 0
        for i in row:
          k = rows[i][2]
          piece = slice(scored, scored + k)
          out[i] = (float(np.sum(logprobs[r, piece], dtype=np.float64)), bool(np.all(greedy[r, piece])))
          scored += k
      bar.update()
    bar.close()
    return out

  def _rows_for(self, n: int) -> int:
    """The rows of a batch of n packed rows: the batch size, or for a last, smaller batch n rounded up to a
    multiple of an eighth of it (whole rows on every device): at most eight shapes per length."""
    per_device = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    step = max(per_device, -(-(self.batch_size // 8) // per_device) * per_device)
    return min(self.batch_size, -(-n // step) * step)

  # ---------------------------------------------------------------- lm-eval's three requests

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    pairs = []
    for context, continuation in (r.args for r in requests):
      if context == "":  # the prefix token is the context, unless the continuation starts with it: then that is
        ids = self.encode(continuation)
        pairs.append((ids[:1], ids[1:]) if ids[:1] == [self.prefix_token_id] else ([self.prefix_token_id], ids))
      else:
        pairs.append(self._encode_pair(context, continuation))
    return self.score_pairs(pairs)

  def loglikelihood_rolling(self, requests) -> list[float]:
    pairs, owner = [], []
    for i, (text,) in enumerate(r.args for r in requests):
      windows = get_rolling_token_windows(
        token_list=self.encode(text),
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
      if kwargs.get("do_sample"):
        raise errors.UserError(
          f"--tasks: request {i} asks for sampling (do_sample=True); this backend generates greedily"
        )
      until = kwargs.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      budget = int(kwargs.get("max_gen_toks", self.max_gen_toks))
      ids = self.encode(context)[-(self.max_length - budget) :]
      groups.setdefault(budget, []).append((i, ids, until))
    bar = self._bar(sum(-(-len(items) // self.batch_size) for items in groups.values()), "generating")
    for budget, items in groups.items():
      buckets = sorted({length_bucket(n, self.max_length - budget) for n in (len(ids) for _, ids, _ in items)})
      batches = generation.sample_batches(
        self._sampler(budget),
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
        bar.update()
    bar.close()
    return out
