"""Simulated labelers: personas that rank K responses Bradley–Terry style, and how often they agree.

A labeler's utility for a response is a weighted sum of the task's judging features (`tasks.features`)
with its own weights, plus Gumbel noise: ranking by noisy utility is sampling from the Plackett–Luce model
(Bradley–Terry for a pair) with logits u/τ. The personas differ in what they weigh (one cares most about
correctness, one about following format, one about brevity...) and in τ, so two labelers agree on about
three pairs in four, as the paper's did (72.6 ± 1.5% among training labelers, spec §4.1).

The training group ranks the RM's comparisons; the held-out group, never seen in training, judges the
final models (the paper's held-out labelers, spec §4.1).
"""

from __future__ import annotations

import dataclasses
import math
import random

from instructgpt_jax.lab import tasks as tasks_lib


@dataclasses.dataclass(frozen=True)
class Labeler:
  name: str
  weights: dict  # feature -> weight (tasks.FEATURES)
  temperature: float  # the noise scale τ: larger means less consistent

  def utility(self, task: tasks_lib.Task, response: str, stopped: bool) -> float:
    f = tasks_lib.features(task, response, stopped=stopped)
    return sum(self.weights.get(k, 0.0) * f[k] for k in tasks_lib.FEATURES)

  def rank(self, task: tasks_lib.Task, responses: list[tuple[str, bool]], rng: random.Random) -> list[int]:
    """Ranks (0 = best) of the (text, stopped) responses: a Plackett–Luce draw; ties only for equal texts."""
    noisy = []
    for text, stopped in responses:
      gumbel = -math.log(-math.log(max(rng.random(), 1e-12)))
      noisy.append(self.utility(task, text, stopped) / self.temperature + gumbel)
    order = sorted(range(len(responses)), key=lambda i: -noisy[i])
    ranks = [0] * len(responses)
    for position, i in enumerate(order):
      ranks[i] = position
    for i, (text, _) in enumerate(responses):  # identical responses tie at the better rank
      for j in range(i):
        if responses[j][0] == text:
          ranks[i] = ranks[j] = min(ranks[i], ranks[j])
    return ranks

  def prefers(self, task: tasks_lib.Task, a: tuple[str, bool], b: tuple[str, bool], rng: random.Random) -> float:
    """1 if this labeler prefers a over b, 0 if b, 0.5 for identical responses (one Bradley–Terry draw)."""
    if a[0] == b[0]:
      return 0.5
    ranks = self.rank(task, [a, b], rng)
    return float(ranks[0] < ranks[1])


def _persona(name, temperature, **weights):
  return Labeler(name, {**tasks_lib.GOLD_WEIGHTS, **weights}, temperature)


# Weights start from the gold quality function and tilt it; τ sets how noisy each labeler is.
TRAINING_LABELERS = (
  _persona("careful", 0.13),
  _persona("correctness-first", 0.15, correct=0.7, contains_answer=0.1),
  _persona("format-stickler", 0.15, constraints=0.35, stopped=0.2),
  _persona("brevity-lover", 0.17, concise=0.25, stopped=0.2),
  _persona("hasty", 0.24),
)
HELD_OUT_LABELERS = (
  _persona("held-out-careful", 0.14),
  _persona("held-out-literal", 0.17, correct=0.6, constraints=0.25),
  _persona("held-out-plain", 0.18, no_hedging=0.15, concise=0.1),
)


def agreement(
  labelers, task_response_pairs: list[tuple[tasks_lib.Task, tuple[str, bool], tuple[str, bool]]], seed: int = 0
) -> float:
  """How often two different labelers make the same choice on the same pair (pairs with distinct responses)."""
  rng = random.Random(seed)
  same = total = 0
  for task, a, b in task_response_pairs:
    if a[0] == b[0]:
      continue
    first, second = rng.sample(list(labelers), 2)
    same += first.prefers(task, a, b, rng) == second.prefers(task, a, b, rng)
    total += 1
  return same / max(total, 1)
