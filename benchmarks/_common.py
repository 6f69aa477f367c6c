"""What the benchmark scripts share: the run header (date, device, load, command) and markdown tables."""

from __future__ import annotations

import datetime
import os
import platform
import sys

import jax

from instructgpt_jax import metrics


def load_average() -> str:
  """The 1-, 5- and 15-minute load averages: figures on a shared machine mean little without them."""
  one, five, fifteen = os.getloadavg()
  return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} CPUs"


def header(extra: str = "") -> str:
  device = jax.devices()[0]
  lines = [
    f"# {datetime.date.today()} · {device.device_kind} × {jax.device_count()} "
    f"({platform.processor() or platform.machine()}) · jax {jax.__version__}{' · ' + extra if extra else ''}",
    f"# {load_average()}",
    f"# {' '.join(['python', *sys.argv])}",
  ]
  return "\n".join(lines)


def table(rows: list[dict]) -> str:
  """A markdown table of rows (dicts with the same keys, in order)."""
  return metrics.markdown_table(list(rows[0]), rows) if rows else ""
