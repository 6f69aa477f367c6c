"""Running stages one after another in one workdir, each once: what the lab pipeline and the recipe share.

`once(workdir, name, fn)` runs `fn(<workdir>/<name>)` and keeps its result in `<workdir>/<name>/done.json`;
a rerun returns the kept result without running it again, so a chain killed at any point continues where it
stopped (a training stage also resumes from its own checkpoints). A preempted stage raises errors.Preempted,
so it is never recorded as done.
"""

from __future__ import annotations

import json
import logging
import time

import jax
import numpy as np

from instructgpt_jax import paths


def once(workdir: str, name: str, fn) -> dict:
  """fn(<workdir>/<name>) the first time; its kept result (done.json) every time after."""
  done = paths.join(workdir, name, "done.json")
  result = paths.read_json(done)
  if result is not None:
    return result
  logging.info("%s: %s", paths.path(workdir).name, name)
  result = fn(paths.join(workdir, name))
  if jax.process_index() == 0:
    paths.write_text(done, json.dumps(result, indent=2, default=float))
  return result


def run_stage(stage_config, directory: str) -> dict[str, float]:
  """One training stage (its config names it) in `directory`; its final scalar metrics, and "wall_time_s" (of
  this call: a stage resumed after a stop counts only its last part)."""
  from instructgpt_jax import stages  # the dispatch table (stages/__init__.py)

  start = time.perf_counter()
  final = {k: float(v) for k, v in stages.run(stage_config, directory).items() if np.isscalar(v)}
  return {**final, "wall_time_s": time.perf_counter() - start}
