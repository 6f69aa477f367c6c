"""grain pipelines over the TFDS builds: seeded shuffling, per-host sharding, static-shape batches, and
iterator state that goes into every checkpoint.

Every stage's data follows one protocol (the stages rely on it): iterating yields this host's numpy
batches; `get_state()` returns a JSON-able dict; `set_state(state)` restores it, so that the next batch is
exactly the one an uninterrupted iterator would have yielded.

Examples are visited as one infinite stream per run: epoch e is a permutation of the split (grain reseeds
the shuffle with every epoch), and host h of H takes stream positions h, h + H, h + 2H, ... So in every
epoch the H hosts together see each example exactly once, and batch i is a pure function of (seed, i).
The unpacked pipelines are random access (`grain.MapDataset`): their state is the next batch's number.
Packed SFT streams through `grain.experimental.FirstFitPackIterDataset`, whose iterator state grain
provides. PPO prompts are batched by length bucket from a per-epoch plan (batching.plan_bucketed_batches).

Evaluation is one pass over a split in order, the same number of batches on every host; the last batch
is filled with blank rows (index -1, ranks -1, zero masks).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator

import grain
import numpy as np

from instructgpt_jax.data import batching
from instructgpt_jax.data.formats import DataError

Batch = dict[str, np.ndarray]


class IndexedBatches:
  """Batches of a random-access grain.MapDataset whose element i is batch i; state: the next index."""

  def __init__(self, batches: grain.MapDataset):
    self._batches = batches
    self._next = 0

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    batch = self._batches[self._next]
    self._next += 1
    return batch

  def get_state(self) -> dict:
    return {"next_batch": self._next}

  def set_state(self, state: dict) -> None:
    self._next = int(state["next_batch"])


class StreamedBatches:
  """Batches of a grain.IterDataset; state: grain's iterator state (it replays from the last restore point)."""

  def __init__(self, batches: grain.IterDataset):
    self._iterator = iter(batches)

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    return next(self._iterator)

  def get_state(self) -> dict:
    # A JSON round trip turns grain's numpy integers into plain ones, as a checkpoint will.
    return json.loads(json.dumps(self._iterator.get_state(), default=int))

  def set_state(self, state: dict) -> None:
    self._iterator.set_state(state)


def host_stream(
  num_examples: int, *, seed: int, process_index: int = 0, process_count: int = 1, shuffle: bool = True
) -> grain.MapDataset:
  """This host's infinite stream of example indices (see the module docstring)."""
  indices = grain.MapDataset.range(num_examples)
  if shuffle:
    indices = indices.shuffle(seed=seed)
  return indices.repeat(None)[process_index::process_count]


def _check_batch(batch_size: int, num_examples: int, process_count: int) -> None:
  if batch_size * process_count > num_examples:
    raise DataError(
      f"data.batch_size: a global batch of {batch_size * process_count} is more than the {num_examples} examples"
    )


# ----------------------------------------------------------------------------------------------------
# Training streams
# ----------------------------------------------------------------------------------------------------


def sft_batches(
  source,
  *,
  batch_size: int,
  seq_len: int,
  pad_id: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  pack: bool = False,
  loss_on_prompt: bool = False,
  shuffle: bool = True,
  mix_rows: np.ndarray | None = None,
  mix_fraction: float = 0.0,
) -> IndexedBatches | StreamedBatches:
  """Demonstration batches: inputs, targets, mask, segment_ids, positions, each [batch_size, seq_len].

  pack=False: one example per row. pack=True: first-fit packing of several examples per row (each keeps its
  own segment id and positions from 0, so attention never crosses examples); fewer rows per epoch.

  mix_fraction > 0 mixes packed pretraining rows (`mix_rows` [N, seq_len + 1]) into the stream: a fixed
  interleave in which that fraction of all rows are pretraining text (InstructGPT's PPO-init SFT: 10%).
  Unpacked batches then carry `kind` [batch_size] (0 demonstration, 1 pretraining).
  """
  _check_batch(batch_size, len(source), process_count)
  if mix_fraction and pack:
    raise DataError("data.pretrain_mix: mixing pretraining text into packed SFT rows is not supported; set pack=false")

  def example(i):
    record = source[i]
    return batching.sft_example(record["prompt_ids"], record["response_ids"], loss_on_prompt=loss_on_prompt)

  examples = host_stream(
    len(source), seed=seed, process_index=process_index, process_count=process_count, shuffle=shuffle
  ).map(example)
  if not pack:
    rows = examples.map(lambda e: dict(batching.pad_sft_example(e, seq_len, pad_id), kind=np.int32(0)))
    if mix_fraction:
      text = host_stream(
        len(mix_rows), seed=seed + 1, process_index=process_index, process_count=process_count, shuffle=shuffle
      ).map(lambda i: dict(batching.lm_row(mix_rows[i]), kind=np.int32(1)))
      rows = grain.MapDataset.mix([rows, text], weights=[1.0 - mix_fraction, mix_fraction])
    return IndexedBatches(rows.batch(batch_size, drop_remainder=True))
  # One packing round fills batch_size rows (bins); the example that fits none of them starts the next.
  stream = examples.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2 * batch_size))
  packed = grain.experimental.FirstFitPackIterDataset(
    stream,
    length_struct={"inputs": seq_len, "targets": seq_len, "mask": seq_len},
    num_packing_bins=batch_size,
    shuffle_bins=False,
    padding_struct={"inputs": pad_id, "targets": pad_id, "mask": 0},
  )
  return StreamedBatches(packed.batch(batch_size, drop_remainder=True).map(batching.rename_packed))


def comparison_batches(
  source,
  *,
  batch_size: int,
  seq_len: int,
  max_responses: int,
  pad_id: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  shuffle: bool = True,
) -> IndexedBatches:
  """K-wise comparison batches: tokens, segment_ids [B, K, L]; ranks, response_lengths [B, K];
  prompt_lengths, index [B] (see batching.comparison_element)."""
  _check_batch(batch_size, len(source), process_count)
  layout = dict(seq_len=seq_len, max_responses=max_responses, pad_id=pad_id)
  stream = host_stream(
    len(source), seed=seed, process_index=process_index, process_count=process_count, shuffle=shuffle
  )
  elements = stream.map(lambda i: batching.comparison_element(source[i], i, **layout))
  return IndexedBatches(elements.batch(batch_size, drop_remainder=True))


class _BucketPlans:
  """The per-epoch plans of bucketed prompt batches, computed on demand and the last one cached."""

  def __init__(self, lengths: np.ndarray, buckets: tuple[int, ...], global_batch: int, seed: int):
    self.lengths, self.buckets, self.global_batch, self.seed = lengths, buckets, global_batch, seed
    self.batches_per_epoch = len(lengths) // global_batch
    self._epoch, self._plan = None, None

  def global_batch_ids(self, i: int) -> np.ndarray:
    epoch, j = divmod(i, self.batches_per_epoch)
    if epoch != self._epoch:
      rng = np.random.default_rng([self.seed, epoch])
      self._epoch = epoch
      self._plan = batching.plan_bucketed_batches(self.lengths, self.buckets, self.global_batch, rng)
    return self._plan[j]


def prompt_batches(
  source,
  *,
  batch_size: int,
  buckets: tuple[int, ...],
  pad_id: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
) -> IndexedBatches:
  """PPO prompt batches, left-padded, each from one length bucket: tokens, segment_ids [B, P]; lengths,
  index [B]; P is one of `buckets`. Each epoch drops fewer than one global batch (a different few each time)."""
  _check_batch(batch_size, len(source), process_count)
  buckets = tuple(sorted(buckets))
  lengths = np.array([len(source[i]["prompt_ids"]) for i in range(len(source))], np.int64)
  if lengths.max() > buckets[-1]:
    raise DataError(
      f"data.prompt_buckets: the longest bucket {buckets[-1]} is shorter than a {lengths.max()}-token prompt"
    )
  plans = _BucketPlans(lengths, buckets, batch_size * process_count, seed)

  def host_batch(i: int, _) -> Batch:
    global_ids = plans.global_batch_ids(i)
    width = batching.bucket_length(int(lengths[global_ids].max()), buckets)
    ids = [int(k) for k in global_ids[process_index * batch_size : (process_index + 1) * batch_size]]
    prompts = [source[k]["prompt_ids"] for k in ids]
    return batching.left_padded_prompts(prompts, ids, width=width, pad_id=pad_id)

  return IndexedBatches(grain.MapDataset.range(plans.batches_per_epoch).repeat(None).map_with_index(host_batch))


# ----------------------------------------------------------------------------------------------------
# Evaluation: one pass, in order, the same number of batches on every host
# ----------------------------------------------------------------------------------------------------


def eval_batches(
  source,
  collate: Callable[[list, list[int], list], Batch],
  *,
  batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  max_batches: int | None = None,
) -> Iterator[Batch]:
  """Batches of this host's share of `source` (records h, h + H, ...).

  Global batch b holds records H·j + h for j in [b·B, (b+1)·B) and every host h; this host's batch is
  `collate(records, indices, batch_records)`, batch_records being the whole global batch's records (for a
  shape every host agrees on). Every host yields ceil(ceil(N / H) / B) batches, since a sharded eval step
  needs all of them; rows past the end have index -1 and carry record 0 as a stand-in, which the collate
  turns into a blank row.
  """
  n = len(source)
  num_batches = math.ceil(math.ceil(n / process_count) / batch_size)
  if max_batches is not None:
    num_batches = min(num_batches, max_batches)
  for b in range(num_batches):
    rows = range(b * batch_size, (b + 1) * batch_size)
    batch_records = [
      source[j * process_count + h] for j in rows for h in range(process_count) if j * process_count + h < n
    ]
    indices = [j * process_count + process_index for j in rows]
    indices = [i if i < n else -1 for i in indices]
    yield collate([source[max(i, 0)] for i in indices], indices, batch_records)


def _stack_with_blanks(elements: list[Batch], indices: list[int], pad_id: int) -> Batch:
  return batching.stack([e if i >= 0 else batching.blank_like(e, pad_id) for e, i in zip(elements, indices)])


def sft_collate(*, seq_len: int, pad_id: int, loss_on_prompt: bool = False):
  def collate(records, indices, _):
    rows = [
      batching.pad_sft_example(
        batching.sft_example(r["prompt_ids"], r["response_ids"], loss_on_prompt=loss_on_prompt), seq_len, pad_id
      )
      for r in records
    ]
    return _stack_with_blanks(rows, indices, pad_id)

  return collate


def comparison_collate(*, seq_len: int, max_responses: int, pad_id: int):
  layout = dict(seq_len=seq_len, max_responses=max_responses, pad_id=pad_id)

  def collate(records, indices, _):
    elements = [batching.comparison_element(r, max(i, 0), **layout) for r, i in zip(records, indices)]
    return _stack_with_blanks(elements, indices, pad_id)

  return collate


def prompt_collate(*, buckets: tuple[int, ...], pad_id: int):
  buckets = tuple(sorted(buckets))

  def collate(records, indices, batch_records):
    width = batching.bucket_length(max(len(r["prompt_ids"]) for r in batch_records), buckets)
    prompts = [r["prompt_ids"] if i >= 0 else None for r, i in zip(records, indices)]
    return batching.left_padded_prompts(prompts, indices, width=width, pad_id=pad_id)

  return collate
