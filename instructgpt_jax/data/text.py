"""Pretraining text: documents from files or the generated corpus, packed into fixed-length sequences.

Documents are tokenized, each followed by EOS, concatenated, and cut into rows of `seq_len + 1` tokens
(GPT-style packing: a row may span documents, which EOS separates). Rows are shuffled with a seed and
batched by grain. The dataset is random-access, so batch `i` is a pure function of (seed, i): the iterator's whole
state is the index of the next batch, and a resumed run sees exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from instructgpt_jax.data import formats, pipeline
from instructgpt_jax.data.tokenizer import Tokenizer

DataError = formats.DataError  # where callers of this module have always found it


def load_documents(corpus: str) -> list[str]:
  """Comma-separated globs of .txt (one document per file) and .jsonl / .jsonl.gz (`{"text": str}` per line)
  files, checked as formats.py describes. (A stage's "lab" corpus is written out as such a file before it
  gets here: data/schemes.py.)"""
  if not corpus:
    raise DataError("data.corpus: empty; give comma-separated globs of .txt or .jsonl files, or 'lab'")
  paths = formats.expand(corpus, what="data.corpus")
  return [record["text"] for _, record in formats.read_records(paths, "text")]


def pack(token_lists: list[list[int]], *, eos_id: int, seq_len: int) -> np.ndarray:
  """Concatenates documents (each followed by EOS) and cuts rows of seq_len + 1 tokens: [N, seq_len + 1].

  Consecutive rows overlap by one token, so every token is a prediction target exactly once.
  """
  stream = np.fromiter((t for ids in token_lists for t in (*ids, eos_id)), dtype=np.int32)
  n_rows = (len(stream) - 1) // seq_len
  if n_rows < 1:
    raise DataError(f"data: the corpus has {len(stream)} tokens, fewer than one row of {seq_len + 1}")
  index = np.arange(n_rows)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
  return stream[index]


@dataclasses.dataclass
class TextData:
  """Packed rows split into train and eval; iterates over this host's training batches."""

  train_rows: np.ndarray  # [N, seq_len + 1] int32
  eval_rows: np.ndarray
  batch_size: int  # per host
  seed: int
  process_index: int = 0
  process_count: int = 1
  shuffle: bool = True

  def __post_init__(self):
    rows = grain.MapDataset.source(self.train_rows)
    rows = (rows.shuffle(seed=self.seed) if self.shuffle else rows).repeat(None)
    batches = rows[self.process_index :: self.process_count].batch(self.batch_size, drop_remainder=True)
    self._train = pipeline.IndexedBatches(batches.map(to_lm_batch))

  # The batch-iterator protocol of every stage's data (data/pipeline.py): numpy batches of this host, and a
  # JSON-able state saved with each checkpoint so that a resumed run continues with the exact next batch.
  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._train)

  def get_state(self) -> dict:
    return self._train.get_state()

  def set_state(self, state: dict) -> None:
    self._train.set_state(state)

  def eval_batches(self, n: int):
    # Every host yields the same number of batches (a sharded eval step needs all of them).
    rows = self.eval_rows[self.process_index :: self.process_count]
    for i in range(min(n, len(self.eval_rows) // self.process_count // self.batch_size)):
      yield to_lm_batch(rows[i * self.batch_size : (i + 1) * self.batch_size])


def to_lm_batch(rows: np.ndarray) -> dict[str, np.ndarray]:
  """rows [B, L + 1] -> inputs, targets [B, L] (shifted by one) and a loss mask of ones."""
  rows = np.asarray(rows)
  return {"inputs": rows[:, :-1], "targets": rows[:, 1:], "mask": np.ones(rows[:, 1:].shape, np.float32)}


def build_text_data(
  data_cfg, tokenizer: Tokenizer, *, seed: int, process_index: int = 0, process_count: int = 1
) -> TextData:
  documents = load_documents(data_cfg.corpus)
  rows = pack(tokenizer.encode_batch(documents), eos_id=tokenizer.eos_id, seq_len=data_cfg.seq_len)
  n_eval = int(len(rows) * data_cfg.eval_fraction)
  train, evals = rows[: len(rows) - n_eval], rows[len(rows) - n_eval :]
  if len(train) < data_cfg.batch_size:
    raise DataError(
      f"data: {len(train)} training rows of {data_cfg.seq_len + 1} tokens are fewer than "
      f"one batch of {data_cfg.batch_size}"
    )
  return TextData(train, evals, data_cfg.batch_size // process_count, seed, process_index, process_count)
