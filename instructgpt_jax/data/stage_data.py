"""What the stage modules call: a stage's `config.data` section -> its training iterator and evaluation batches.

    data = stage_data.build_sft_data(config.data, tokenizer, seed=config.seed,
                                     process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(data)                      # this host's numpy batch
    checkpoint(..., data.get_state())       # JSON-able; data.set_state(state) resumes exactly
    for batch in data.eval_batches(4): ...  # one pass over the eval split, padded last batch

The fields each function reads (docs/data.md lists them with defaults):

* every stage: `train` (file globs), `eval` (file globs, optional), `eval_examples` (hold out the last N
  records of `train` when `eval` is empty), `data_dir` (where TFDS builds), `template` ("plain" | "chat"),
  `on_error` ("raise" | "skip"), `batch_size` (global), `shuffle` (default True).
* SFT and RM: `truncate_prompt` ("none" | "left").
* SFT: `seq_len`, `pack`, `loss_on_prompt`, `pretrain_mix` (a fraction), `pretrain_mix_by` ("rows": that
  fraction of the rows are pretraining text; "loss_tokens", the default: of the loss tokens, see
  `pretrain_row_fraction`)
  and `pretrain_corpus` (as text.load_documents).   RM: `seq_len`, `max_responses`.
* PPO: `max_prompt_len` (the paper: 1024), `prompt_buckets` (e.g. "64,128,256,512,1024").
* pretraining from TFDS: `seq_len`, `eval_fraction`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from instructgpt_jax.data import formats, pipeline, text, tfds_builders
from instructgpt_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass
class StageData:
  """A stage's data: iterates over this host's training batches (the batch-iterator protocol)."""

  train: pipeline.IndexedBatches | pipeline.StreamedBatches
  dataset: tfds_builders.Dataset
  train_source: object  # random-access records of the training split
  eval_source: object | None  # the same for the eval split, or None without one
  collate: Callable  # eval records -> one batch (see pipeline.eval_batches)
  batch_size: int  # per host
  process_index: int = 0
  process_count: int = 1
  mix_fraction: float = 0.0  # the fraction of training rows that are not examples of the split (SFT's mix)

  @property
  def reports(self) -> dict[str, formats.Report]:
    return self.dataset.reports

  def __iter__(self):
    return self

  def __next__(self) -> pipeline.Batch:
    return next(self.train)

  def get_state(self) -> dict:
    return self.train.get_state()

  def set_state(self, state: dict) -> None:
    self.train.set_state(state)

  def eval_batches(self, n: int | None = None):
    """At most n batches (all when None) of one in-order pass over the eval split; nothing without one."""
    if self.eval_source is None:
      return iter(())
    return pipeline.eval_batches(
      self.eval_source,
      self.collate,
      batch_size=self.batch_size,
      process_index=self.process_index,
      process_count=self.process_count,
      max_batches=n,
    )


def _per_host(data_cfg, process_count: int) -> int:
  batch_size = int(data_cfg["batch_size"])
  if batch_size % process_count:
    raise formats.DataError(f"data.batch_size: {batch_size} is not divisible by the {process_count} processes")
  return batch_size // process_count


def _build_splits(kind: str, data_cfg, tokenizer: Tokenizer, **limits):
  """Builds the TFDS dataset; returns it with its train and eval sources (eval None when there is none)."""
  files = {"train": data_cfg["train"]}
  if data_cfg.get("eval"):
    files["eval"] = data_cfg["eval"]
  dataset = tfds_builders.build(
    kind,
    files,
    data_dir=data_cfg["data_dir"],
    tokenizer=tokenizer,
    template=data_cfg.get("template", "plain"),
    on_error=data_cfg.get("on_error", "raise"),
    truncate_prompt=data_cfg.get("truncate_prompt", "none"),
    **limits,
  )
  if "eval" in files:
    return dataset, dataset.source("train"), dataset.source("eval")
  held_out = int(data_cfg.get("eval_examples", 0))
  if not held_out:
    return dataset, dataset.source("train"), None
  records = dataset.reports["train"].records
  if held_out >= records:
    raise formats.DataError(f"data.eval_examples: {held_out} leaves none of the {records} records for training")
  return dataset, dataset.source(f"train[:-{held_out}]"), dataset.source(f"train[-{held_out}:]")


def _stage_data(kind: str, data_cfg, tokenizer: Tokenizer, host: dict, *, limits: dict, batches, collate, options):
  """What every build_*_data shares: the TFDS splits (`limits` for the builder), this host's share of the
  batch, and its training batches `batches(train source, batch_size=, seed=, process_index=,
  process_count=, **options(train source))`; `collate` makes eval batches. host: seed, process_index,
  process_count. A "mix_fraction" among the options is recorded in the StageData."""
  dataset, train, evals = _build_splits(kind, data_cfg, tokenizer, **limits)
  batch_size = _per_host(data_cfg, host["process_count"])
  kwargs = options(train)
  return StageData(
    batches(train, batch_size=batch_size, **host, **kwargs),
    dataset,
    train,
    evals,
    collate,
    batch_size,
    host["process_index"],
    host["process_count"],
    kwargs.get("mix_fraction", 0.0),
  )


def build_sft_data(
  data_cfg, tokenizer: Tokenizer, *, seed: int, process_index: int = 0, process_count: int = 1
) -> StageData:
  """Demonstrations -> SFT batches (pipeline.sft_batches); examples longer than seq_len + 1 tokens are errors."""
  seq_len = int(data_cfg["seq_len"])
  loss_on_prompt = bool(data_cfg.get("loss_on_prompt", False))

  def options(train) -> dict:
    mix_fraction, mix_rows = float(data_cfg.get("pretrain_mix", 0.0)), None
    if mix_fraction:
      documents = text.load_documents(data_cfg["pretrain_corpus"])
      mix_rows = text.pack(tokenizer.encode_batch(documents), eos_id=tokenizer.eos_id, seq_len=seq_len)
      by = data_cfg.get("pretrain_mix_by", "loss_tokens")
      if by == "loss_tokens":
        mix_fraction = pretrain_row_fraction(mix_fraction, _mean_loss_tokens(train, loss_on_prompt), seq_len)
      elif by != "rows":
        raise formats.DataError(f"data.pretrain_mix_by: {by!r} is not 'rows' or 'loss_tokens'")
    return dict(
      seq_len=seq_len,
      pad_id=tokenizer.pad_id,
      pack=bool(data_cfg.get("pack", False)),
      loss_on_prompt=loss_on_prompt,
      shuffle=bool(data_cfg.get("shuffle", True)),
      mix_rows=mix_rows,
      mix_fraction=mix_fraction,
    )

  return _stage_data(
    "demonstrations",
    data_cfg,
    tokenizer,
    dict(seed=seed, process_index=process_index, process_count=process_count),
    limits=dict(max_tokens=seq_len + 1),
    batches=pipeline.sft_batches,
    collate=pipeline.sft_collate(seq_len=seq_len, pad_id=tokenizer.pad_id, loss_on_prompt=loss_on_prompt),
    options=options,
  )


def pretrain_row_fraction(token_fraction: float, demonstration_tokens: float, row_tokens: int) -> float:
  """The fraction p of rows that must be pretraining rows for them to hold `token_fraction` f of the loss
  tokens, when a demonstration row has `demonstration_tokens` R loss tokens on average and a pretraining
  row `row_tokens` L (all of its tokens):

      p·L / (p·L + (1 − p)·R) = f   ⇔   p = f·R / (f·R + (1 − f)·L)

  e.g. f = 0.1, R = 200, L = 2048: p ≈ 0.0107 (by rows, p = 0.1 would make ~53% of the loss tokens
  pretraining text)."""
  return (
    token_fraction * demonstration_tokens / (token_fraction * demonstration_tokens + (1 - token_fraction) * row_tokens)
  )


def _mean_loss_tokens(source, loss_on_prompt: bool) -> float:
  """Mean number of loss tokens of a demonstration (its response with EOS; with the prompt, all but one)."""
  counts = []
  for i in range(len(source)):
    record = source[i]
    prompt, response = len(record["prompt_ids"]), len(record["response_ids"])
    counts.append(prompt + response - 1 if loss_on_prompt else response)
  return float(np.mean(counts))


def build_comparison_data(
  data_cfg, tokenizer: Tokenizer, *, seed: int, process_index: int = 0, process_count: int = 1
) -> StageData:
  """Comparisons -> K-wise RM batches (pipeline.comparison_batches); K_max = data.max_responses."""
  seq_len, max_responses = int(data_cfg["seq_len"]), int(data_cfg["max_responses"])
  layout = dict(seq_len=seq_len, max_responses=max_responses, pad_id=tokenizer.pad_id)
  return _stage_data(
    "comparisons",
    data_cfg,
    tokenizer,
    dict(seed=seed, process_index=process_index, process_count=process_count),
    limits=dict(max_tokens=seq_len, max_responses=max_responses),
    batches=pipeline.comparison_batches,
    collate=pipeline.comparison_collate(**layout),
    options=lambda _: dict(layout, shuffle=bool(data_cfg.get("shuffle", True))),
  )


def prompt_buckets(data_cfg) -> tuple[int, ...]:
  """data.prompt_buckets (a list or "64,128,..."), or by default powers of two from 64 up to max_prompt_len."""
  max_len = int(data_cfg.get("max_prompt_len", 1024))
  buckets = data_cfg.get("prompt_buckets", None)
  if isinstance(buckets, str):
    buckets = [int(b) for b in buckets.split(",") if b.strip()]
  if not buckets:
    buckets = [b for b in (64, 128, 256, 512, 1024, 2048, 4096) if b < max_len] + [max_len]
  if max(buckets) < max_len:
    raise formats.DataError(f"data.prompt_buckets: {tuple(buckets)} cannot hold a prompt of max_prompt_len {max_len}")
  return tuple(sorted(int(b) for b in buckets))


def build_prompt_data(
  data_cfg, tokenizer: Tokenizer, *, seed: int, process_index: int = 0, process_count: int = 1
) -> StageData:
  """Prompts -> PPO batches (pipeline.prompt_batches); prompts over max_prompt_len are dropped and counted."""
  layout = dict(buckets=prompt_buckets(data_cfg), pad_id=tokenizer.pad_id)
  return _stage_data(
    "prompts",
    data_cfg,
    tokenizer,
    dict(seed=seed, process_index=process_index, process_count=process_count),
    limits=dict(max_tokens=int(data_cfg.get("max_prompt_len", 1024))),
    batches=pipeline.prompt_batches,
    collate=pipeline.prompt_collate(**layout),
    options=lambda _: layout,
  )


def build_pretraining_data(
  data_cfg, tokenizer: Tokenizer, *, seed: int, process_index: int = 0, process_count: int = 1
) -> text.TextData:
  """Pretraining documents built with TFDS (tokenized once) -> packed rows, as text.build_text_data."""
  dataset = tfds_builders.build(
    "text",
    {"train": data_cfg["train"]},
    data_dir=data_cfg["data_dir"],
    tokenizer=tokenizer,
    on_error=data_cfg.get("on_error", "raise"),
  )
  source = dataset.source("train")
  rows = text.pack(
    [source[i]["ids"] for i in range(len(source))], eos_id=tokenizer.eos_id, seq_len=int(data_cfg["seq_len"])
  )
  n_eval = int(len(rows) * float(data_cfg.get("eval_fraction", 0.0)))
  batch_size = _per_host(data_cfg, process_count)
  if len(rows) - n_eval < batch_size * process_count:
    raise formats.DataError(
      f"data: {len(rows) - n_eval} training rows are fewer than one batch of {batch_size * process_count}"
    )
  return text.TextData(
    rows[: len(rows) - n_eval],
    rows[len(rows) - n_eval :],
    batch_size,
    seed,
    process_index,
    process_count,
    shuffle=bool(data_cfg.get("shuffle", True)),
  )
