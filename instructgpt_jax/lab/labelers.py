"""Simulated labelers: personas that rank K responses Bradley–Terry style, and how often they agree.

A labeler's utility for a response is a weighted sum of the task's judging features (`tasks.features`)
with its own weights, plus Gumbel noise: ranking by noisy utility is sampling from the Plackett–Luce model
(Bradley–Terry for a pair) with logits u/τ. The personas differ in what they weigh (one cares most about
correctness, one about following format, one about brevity...) and in τ, so two labelers agree on about
three pairs in four, as the paper's did (72.6 ± 1.5% among training labelers, docs/paper.md §4.1).

The training group ranks the RM's comparisons; the held-out group, never seen in training, judges the
final models (the paper's held-out labelers, docs/paper.md §4.1).

Demonstrations are written by labelers too, and not all of them write the way the rankers would like: as in
the paper, where labeler-written demonstrations vary in quality and the RM's rankings carry what the
demonstrations cannot (docs/paper.md §3), 70% of the lab's demonstrations come from writers with a habit (hedging,
chatting, rambling on, ignoring the format asked for). The SFT model imitates them, habits included; the
reward model learns from the rankings that the habits are disliked; PPO removes them. That is the gap the
lab's headline measures.
"""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np

from instructgpt_jax.lab import tasks as tasks_lib
from instructgpt_jax.lab import world as world_lib


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


# A demonstrator's habit turns the gold answer into a plausible, mildly flawed demonstration. Each keeps the
# right content, so the flaw is one of manner: what a ranking can teach and a demonstration cannot.
def _hedge(task: tasks_lib.Task, rng: random.Random) -> str:
  answer = task.answer.rstrip(".")
  answer = "the" + answer[3:] if answer.startswith("The ") else answer
  return rng.choice(("I think ", "Maybe ", "Probably ")) + answer + rng.choice((".", ", but I am not sure."))


def _chat(task: tasks_lib.Task, rng: random.Random) -> str:
  return rng.choice(("Sure! ", "Of course. ", "Happy to help. ")) + rng.choice(("Here it is: ", "")) + task.answer


def _ramble(task: tasks_lib.Task, rng: random.Random, world) -> str:
  sentence = world_lib.prose(world, n_paragraphs=1, seed=rng.randrange(2**31)).split(". ")[0].rstrip(".")
  return f"{task.answer.rstrip('.')}. {sentence}."


def _ignore_format(task: tasks_lib.Task, rng: random.Random, world) -> str:
  if task.capitals:
    return task.answer.lower()
  if task.one_word:  # the full sentence of the same task without the one-word constraint
    return task.sentence
  return _chat(task, rng)


DEMONSTRATION_HABITS = {
  "careful": lambda task, rng, world: task.answer,
  "hedger": lambda task, rng, world: _hedge(task, rng),
  "chatty": lambda task, rng, world: _chat(task, rng),
  "rambler": _ramble,
  "format-ignorer": _ignore_format,
}
# Who writes the demonstrations (a writer per demonstration, drawn with these weights): 30% are careful.
DEMONSTRATORS = {"careful": 0.3, "hedger": 0.175, "chatty": 0.175, "rambler": 0.175, "format-ignorer": 0.175}


def write_demonstration(task: tasks_lib.Task, rng: random.Random, world) -> tuple[str, str]:
  """(demonstration, writer): a demonstrator drawn by DEMONSTRATORS' weights answers the task in their manner."""
  writer = rng.choices(list(DEMONSTRATORS), weights=list(DEMONSTRATORS.values()))[0]
  return DEMONSTRATION_HABITS[writer](task, rng, world), writer


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
  _persona("held-out-plain", 0.18, direct=0.25, concise=0.15),
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


def bootstrap_interval(per_prompt: np.ndarray, draws: int, seed: int) -> tuple[float, float]:
  """95% interval of the mean over prompts, by resampling prompts."""
  rng = np.random.default_rng(seed)
  means = per_prompt[rng.integers(0, len(per_prompt), (draws, len(per_prompt)))].mean(axis=1)
  return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def held_out_preference(eval_tasks, ours, theirs, seed: int | str) -> np.ndarray:
  """Per prompt, the fraction of the held-out labelers who prefer `ours` to `theirs` ((text, stopped) pairs);
  each comparison draws from its own stream (`seed`), so adding a model moves no other comparison."""
  rng = random.Random(seed)
  return np.array(
    [
      np.mean([labeler.prefers(t, a, b, rng) for labeler in HELD_OUT_LABELERS])
      for t, a, b in zip(eval_tasks, ours, theirs)
    ]
  )
