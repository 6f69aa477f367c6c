"""Metrics: `workdir/metrics.jsonl`, TensorBoard event files and a progress bar, written by process 0.

The workdir may be a bucket. Objects cannot be appended to, so there metrics.jsonl is rewritten whole at
every `flush()` (each checkpoint save calls it, and rows older than FLUSH_SECONDS trigger it); a local file
gets each row at once. Either way every row up to a saved checkpoint is in the file before that checkpoint
can be resumed from. TensorBoard events in a bucket are written the same way (`_BucketEventFile`, rewritten
at each of tensorboardX's flushes, every 2 minutes by default).

Metrics of step s are fetched from the device while step s+1 runs (`LateFetcher`), so the host never
makes the device wait. A non-finite loss or gradient norm stops the run with a message naming the step.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import jax
import numpy as np

from instructgpt_jax import paths

FLUSH_SECONDS = 30.0  # the longest a row waits before a bucket's metrics.jsonl is rewritten


class NonFiniteError(RuntimeError):
  pass


def _scalar(x) -> float:
  return float(np.asarray(x))


class MetricWriter:
  """Writes scalar metrics to metrics.jsonl and TensorBoard on process 0; a no-op on other processes."""

  def __init__(
    self, workdir: str, *, total_steps: int, start_step: int = 0, progress: bool = True, tokens_per_step: int = 0
  ):
    self.enabled = jax.process_index() == 0
    self.total_steps = total_steps
    self.tokens_per_step = tokens_per_step
    self._jsonl = self._tb = self._bar = None
    if not self.enabled:
      return
    self._jsonl = _JsonlFile(paths.join(workdir, "metrics.jsonl"), keep_rows_upto=start_step)
    from tensorboardX import SummaryWriter, record_writer  # imported here: only process 0 writes events

    for scheme in ("gs", "s3"):  # in place of tensorboardX's own cloud writers: one client, epath's
      record_writer.register_writer_factory(scheme, _BucketEventFiles())
    self._tb = SummaryWriter(paths.join(workdir, "tensorboard"))
    if progress:
      from tqdm import tqdm

      self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
    self._last_time, self._last_step = time.perf_counter(), start_step

  def write(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
    """Writes one row (step, metrics, steps_per_sec, tokens_per_sec); returns it with Python floats.

    The rates are measured between consecutive writes, so the first row after a compile is slow.
    """
    row = {k: _scalar(v) for k, v in metrics.items()}
    if not self.enabled:
      return row
    now = time.perf_counter()
    if step > self._last_step:
      row["steps_per_sec"] = (step - self._last_step) / max(now - self._last_time, 1e-9)
      if self.tokens_per_step:
        row["tokens_per_sec"] = row["steps_per_sec"] * self.tokens_per_step
    self._last_time, self._last_step = now, step
    self._jsonl.append({"step": int(step), **row})
    for k, v in row.items():
      self._tb.add_scalar(k, v, step)
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      shown = {k: f"{row[k]:.4g}" for k in ("loss", "eval_loss", "tokens_per_sec") if k in row}
      self._bar.set_postfix(shown)
    return row

  def status(self, text: str) -> None:
    """Shows what the run is doing between steps (e.g. evaluating) beside the progress bar."""
    if self._bar is not None:
      self._bar.set_description_str(text)

  def flush(self) -> None:
    """Makes every row written so far durable (called before each checkpoint save)."""
    if self._jsonl:
      self._jsonl.flush()

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
      self._tb.close()
    if self._bar is not None:
      self._bar.close()


class _BucketEventFile:
  """A TensorBoard event file in a bucket: the records are kept and the object rewritten at each flush."""

  def __init__(self, path: str):
    self.path, self.data, self.dirty = path, bytearray(), False

  def write(self, data: bytes) -> None:
    self.data += data
    self.dirty = True

  def flush(self) -> None:
    if self.dirty:
      paths.write_bytes(self.path, bytes(self.data))
      self.dirty = False

  def close(self) -> None:
    self.flush()


class _BucketEventFiles:
  """The factory tensorboardX asks for a writer of a gs:// (or s3://) event file."""

  def open(self, path: str) -> _BucketEventFile:
    return _BucketEventFile(path)

  def directory_check(self, path: str) -> None:
    pass  # a bucket has no folders to create


class _JsonlFile:
  """metrics.jsonl: one JSON row a line. A resumed run repeats the steps after its checkpoint, so the rows of
  the interrupted run after `keep_rows_upto` are dropped when it opens."""

  def __init__(self, path: str, *, keep_rows_upto: int):
    self.path, self.remote = path, paths.is_remote(path)
    self.rows = [row for row in read_rows_of(path) if row["step"] <= keep_rows_upto]
    paths.write_text(path, "".join(json.dumps(row) + "\n" for row in self.rows))
    self._unflushed_since: float | None = None
    self._file = None if self.remote else paths.path(path).open("a")

  def append(self, row: dict) -> None:
    if self._file is not None:
      self._file.write(json.dumps(row) + "\n")
      self._file.flush()
      return
    self.rows.append(row)
    now = time.monotonic()
    self._unflushed_since = self._unflushed_since or now
    if now - self._unflushed_since > FLUSH_SECONDS:
      self.flush()

  def flush(self) -> None:
    if self._file is None and self._unflushed_since is not None:
      paths.write_text(self.path, "".join(json.dumps(row) + "\n" for row in self.rows))
      self._unflushed_since = None

  def close(self) -> None:
    self.flush()
    if self._file is not None:
      self._file.close()


def read_rows_of(path: str) -> list[dict]:
  """The rows of a metrics.jsonl file ([] when there is none)."""
  p = paths.path(path)
  if not p.exists():
    return []
  return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def read_rows(workdir: str) -> list[dict]:
  """The rows of a run's `workdir/metrics.jsonl`."""
  return read_rows_of(paths.join(workdir, "metrics.jsonl"))


def markdown_table(columns, rows, cell=str) -> str:
  """A Markdown table (readable as plain text too): a header of `columns`, one line per row (a dict), each
  value written by `cell`."""
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
  return "\n".join(lines)


def check_finite(step: int, row: dict[str, float], keys=("loss", "grad_norm")) -> None:
  bad = [k for k in keys if k in row and not math.isfinite(row[k])]
  if bad:
    raise NonFiniteError(
      f"step {step}: {', '.join(f'{k}={row[k]}' for k in bad)} is not finite; "
      "stopping (the last good checkpoint is kept)"
    )


class LateFetcher:
  """Holds the device metrics of one step and hands them back at the next: fetch(step, m) -> previous."""

  def __init__(self):
    self._pending: tuple[int, Any] | None = None

  def push(self, step: int, metrics: Any) -> tuple[int, dict] | None:
    previous, self._pending = self._pending, (step, metrics)
    return None if previous is None else (previous[0], jax.device_get(previous[1]))

  def flush(self) -> tuple[int, dict] | None:
    previous, self._pending = self._pending, None
    return None if previous is None else (previous[0], jax.device_get(previous[1]))
