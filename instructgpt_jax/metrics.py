"""Metrics: `workdir/metrics.jsonl`, TensorBoard event files and a progress bar, written by process 0.

Metrics of step s are fetched from the device while step s+1 runs (`LateFetcher`), so the host never
makes the device wait. A non-finite loss or gradient norm stops the run with a message naming the step.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import numpy as np


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
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    _drop_rows_after(path, start_step)
    self._jsonl = open(path, "a")
    from tensorboardX import SummaryWriter  # imported here: only process 0 writes events

    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
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
    self._jsonl.write(json.dumps({"step": int(step), **row}) + "\n")
    self._jsonl.flush()
    for k, v in row.items():
      self._tb.add_scalar(k, v, step)
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      shown = {k: f"{row[k]:.4g}" for k in ("loss", "eval_loss", "tokens_per_sec") if k in row}
      self._bar.set_postfix(shown)
    return row

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
      self._tb.close()
    if self._bar is not None:
      self._bar.close()


def _drop_rows_after(path: str, step: int) -> None:
  """A resumed run repeats the steps after its checkpoint: drop their rows from the interrupted run."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
  with open(path + ".tmp", "w") as f:
    f.writelines(rows)
  os.replace(path + ".tmp", path)


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
