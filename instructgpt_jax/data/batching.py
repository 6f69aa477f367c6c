"""Batch layouts: encoded records -> fixed-shape numpy arrays (docs/data.md draws each layout).

Conventions shared with the model (models/transformer.py): `segment_ids` is 0 at padding and a positive
example id elsewhere (1 for an unpacked row, 1, 2, ... for the examples of a packed row); `positions`
restart at 0 with every example. SFT and comparison rows are right-padded with the pad id (docs/paper.md §8 row 4);
PPO prompts are left-padded, so that sampling appends to every prompt at the same position.
"""

from __future__ import annotations

import numpy as np

# Keys whose blank (padding-row) value is the pad id, or -1; every other key is 0 in a blank row.
_PAD_ID_KEYS = ("inputs", "targets", "tokens")
_MINUS_ONE_KEYS = ("ranks", "index")


def _ids(x) -> np.ndarray:
  return np.asarray(x, dtype=np.int32)


def blank_like(element: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
  """A padding row with the shapes of `element`: pad ids, rank/index -1, zero masks and segment ids."""
  blank = {}
  for key, value in element.items():
    fill = pad_id if key in _PAD_ID_KEYS else -1 if key in _MINUS_ONE_KEYS else 0
    blank[key] = np.full_like(value, fill)
  return blank


def stack(elements: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {key: np.stack([e[key] for e in elements]) for key in elements[0]}


# ----------------------------------------------------------------------------------------------------
# SFT: prompt ‖ response ‖ EOS, shifted; loss on the response
# ----------------------------------------------------------------------------------------------------


def sft_example(prompt_ids, response_ids, *, loss_on_prompt: bool = False) -> dict[str, np.ndarray]:
  """One demonstration as next-token pairs of n - 1 positions, n = len(prompt_ids) + len(response_ids).

  inputs = ids[:-1], targets = ids[1:], mask[t] = 1 where targets[t] is a response token (EOS included),
  or everywhere with loss_on_prompt. Shifting each example before packing keeps every target inside its
  own example: the last token of one example never predicts the first token of the next.
  """
  prompt_ids, response_ids = _ids(prompt_ids), _ids(response_ids)
  ids = np.concatenate([prompt_ids, response_ids])
  mask = np.zeros(len(ids) - 1, np.float32)
  mask[0 if loss_on_prompt else max(len(prompt_ids) - 1, 0) :] = 1.0
  return {"inputs": ids[:-1], "targets": ids[1:], "mask": mask}


def pad_sft_example(example: dict[str, np.ndarray], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """An sft_example right-padded to one row: inputs, targets, mask, segment_ids, positions, each [seq_len]."""
  n = len(example["inputs"])
  row = {
    "inputs": np.full(seq_len, pad_id, np.int32),
    "targets": np.full(seq_len, pad_id, np.int32),
    "mask": np.zeros(seq_len, np.float32),
    "segment_ids": (np.arange(seq_len) < n).astype(np.int32),
    "positions": np.where(np.arange(seq_len) < n, np.arange(seq_len), 0).astype(np.int32),
  }
  for key in ("inputs", "targets", "mask"):
    row[key][:n] = example[key]
  return row


def lm_row(row: np.ndarray) -> dict[str, np.ndarray]:
  """A packed pretraining row [seq_len + 1] in the SFT layout: every token a target, one segment."""
  n = len(row) - 1
  return {
    "inputs": np.asarray(row[:-1], np.int32),
    "targets": np.asarray(row[1:], np.int32),
    "mask": np.ones(n, np.float32),
    "segment_ids": np.ones(n, np.int32),
    "positions": np.arange(n, dtype=np.int32),
  }


def sequence_rows(records: list[dict], *, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """Demonstrations as whole sequences prompt ‖ response ‖ EOS, right-padded: tokens, segment_ids [N, seq_len].

  The layout of a comparison row, so a reward model scores a demonstration exactly as a ranked response.
  """
  tokens = np.full((len(records), seq_len), pad_id, np.int32)
  segment_ids = np.zeros((len(records), seq_len), np.int32)
  for i, record in enumerate(records):
    row = np.concatenate([_ids(record["prompt_ids"]), _ids(record["response_ids"])])
    tokens[i, : len(row)], segment_ids[i, : len(row)] = row, 1
  return {"tokens": tokens, "segment_ids": segment_ids}


def rename_packed(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """grain's packing output (each feature with its own `_segment_ids`/`_positions`) -> the SFT layout."""
  return {
    "inputs": packed["inputs"],
    "targets": packed["targets"],
    "mask": packed["mask"].astype(np.float32),
    "segment_ids": packed["inputs_segment_ids"].astype(np.int32),
    "positions": packed["inputs_positions"].astype(np.int32),
  }


# ----------------------------------------------------------------------------------------------------
# Comparisons: the K responses of one prompt in one batch element
# ----------------------------------------------------------------------------------------------------


def comparison_element(
  record: dict, index: int, *, seq_len: int, max_responses: int, pad_id: int
) -> dict[str, np.ndarray]:
  """One prompt's K ranked responses -> tokens and segment_ids [K_max, L], ranks [K_max] (-1 in empty slots),
  response_lengths [K_max], prompt_lengths and index (scalars).

  Row k is prompt ‖ response_k ‖ EOS, right-padded. Every row starts with the same prompt ids, and
  prompt_lengths says how many, so a trainer can encode the prompt once and the K responses after it.
  """
  prompt_ids = _ids(record["prompt_ids"])
  lengths = _ids(record["response_lengths"])
  responses = np.split(_ids(record["response_ids"]), np.cumsum(lengths)[:-1])
  tokens = np.full((max_responses, seq_len), pad_id, np.int32)
  segment_ids = np.zeros((max_responses, seq_len), np.int32)
  ranks = np.full(max_responses, -1, np.int32)
  ranks[: len(lengths)] = record["ranks"]
  response_lengths = np.zeros(max_responses, np.int32)
  response_lengths[: len(lengths)] = lengths
  for k, response in enumerate(responses):
    row = np.concatenate([prompt_ids, response])
    tokens[k, : len(row)] = row
    segment_ids[k, : len(row)] = 1
  return {
    "tokens": tokens,
    "segment_ids": segment_ids,
    "ranks": ranks,
    "prompt_lengths": np.int32(len(prompt_ids)),
    "response_lengths": response_lengths,
    "index": np.int32(index),
  }


# ----------------------------------------------------------------------------------------------------
# PPO prompts: left-padded to a bucket length
# ----------------------------------------------------------------------------------------------------


def bucket_length(n: int, buckets: tuple[int, ...]) -> int:
  """The smallest bucket length >= n (buckets sorted ascending; n never exceeds the last)."""
  return next(b for b in buckets if b >= n)


def left_padded_prompts(prompts: list, indices: list[int], *, width: int, pad_id: int) -> dict:
  """Prompt ids (None for a padding row) -> tokens, segment_ids [B, width], lengths and index [B].

  `width` is the bucket of the longest prompt of the global batch (every host's part of it), so all hosts
  agree on the shape and a batch takes one of len(buckets) shapes (one compile each).
  """
  lengths = _ids([0 if p is None else len(p) for p in prompts])
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  for b, ids in enumerate(prompts):
    if ids is not None and len(ids):
      tokens[b, width - len(ids) :] = ids
  segment_ids = (np.arange(width)[None, :] >= width - lengths[:, None]).astype(np.int32)
  return {"tokens": tokens, "segment_ids": segment_ids, "lengths": lengths, "index": _ids(indices)}


def plan_bucketed_batches(
  lengths: np.ndarray, buckets: tuple[int, ...], global_batch: int, rng: np.random.Generator
) -> list[np.ndarray]:
  """One epoch of global batches of example ids, each batch from one length bucket.

  Each bucket's examples are shuffled and cut into batches of `global_batch`; the few left over join the
  next longer bucket (they fit it), and the leftover of the longest bucket (fewer than one batch) is
  dropped for this epoch, so every epoch has exactly len(lengths) // global_batch batches. The batch order
  is shuffled too. Every host computes the same plan and takes its own slice of each batch.
  """
  bucket_of = np.searchsorted(np.asarray(buckets), lengths)  # first bucket >= length
  batches, carry = [], np.zeros(0, np.int64)
  for b in range(len(buckets)):
    pool = np.concatenate([carry, rng.permutation(np.flatnonzero(bucket_of == b))])
    full = len(pool) // global_batch * global_batch
    batches += np.split(pool[:full], full // global_batch) if full else []
    carry = pool[full:]
  return [batches[i] for i in rng.permutation(len(batches))]
