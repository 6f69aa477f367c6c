"""Instruction families with programmatic gold answers, and the gold quality of a response.

A task is what a user types (the prompt, with no template: the paper's format) plus what the gold scorer
needs to judge any response. Families, each with optional constraints, so one prompt can carry several:

  list       "List 3 fruits that are red."            items from the world, the right count, commas
  attribute  "What color is the plum? Answer in one word."
  count      "How many pears are in the attic?"
  sort       "Sort these words alphabetically: owl, cat, fox."   (also "reverse the order of")
  repeat     "Repeat the word drum 3 times."
  sentence   "Write a sentence about the cart that mentions the mill."
  + "Write your answer in capital letters." on list, sort and repeat.

`quality(task, response, stopped)` is the gold quality function the simulated labelers start from:
correct, contains the answer, satisfies every constraint, concise, no hedging, and stopped (ended with EOS).
"""

from __future__ import annotations

import dataclasses
import random
import re

from instructgpt_jax.lab import world as world_lib

HEDGES = ("i think", "maybe", "perhaps", "probably", "i am not sure", "it might be")
FILLERS = ("sure!", "of course", "happy to help", "here it is")  # chatter around the answer
FAMILIES = ("list", "attribute", "count", "sort", "repeat", "sentence")


@dataclasses.dataclass(frozen=True)
class Task:
  family: str
  prompt: str  # the instruction as typed, ending with a newline; the response is its continuation
  answer: str  # one ideal response (the demonstration)
  expected: tuple[str, ...]  # what correctness is checked against (valid items, the right word, ...)
  n: int = 0  # how many items (list, repeat)
  one_word: bool = False
  capitals: bool = False
  mentions: tuple[str, ...] = ()
  sentence: str = ""  # attribute, count: the answer as a full sentence (what "in one word" asks to avoid)

  @property
  def n_constraints(self) -> int:
    """How many requirements the prompt states beyond the bare question (for success-by-constraints)."""
    extra = {"list": 1 + sum(w in self.prompt for w in (" that are ", " in the ")), "repeat": 1, "sentence": 1}
    return extra.get(self.family, 0) + self.one_word + self.capitals


def _items(text: str) -> list[str]:
  return [w for w in re.split(r"[,\s]+", text.strip().rstrip(".").lower()) if w and w != "and"]


def _join(words, capitals: bool) -> str:
  out = ", ".join(words)
  return out.upper() if capitals else out


def make_task(world: world_lib.World, rng: random.Random, family: str | None = None) -> Task:
  """One random task of `family` (or of a random family) about `world`."""
  family = family or rng.choice(FAMILIES)
  capitals = rng.random() < 0.25
  if family == "list":
    category = rng.choice(list(world_lib.CATEGORIES))
    pool, condition = world.by_category(category), ""
    if rng.random() < 0.5:
      color = rng.choice(sorted({t.color for t in pool}))
      pool, condition = [t for t in pool if t.color == color], f" that are {color}"
    elif rng.random() < 0.5:
      place = rng.choice(sorted({t.place for t in pool}))
      pool, condition = [t for t in pool if t.place == place], f" in the {place}"
    n = rng.randint(1, min(3, len(pool)))
    plural = category if n == 1 else category + "s"
    valid = sorted(t.name for t in pool)
    prompt = f"List {n} {plural}{condition}." + (" Write your answer in capital letters." if capitals else "")
    return Task("list", prompt + "\n", _join(valid[:n], capitals), tuple(valid), n=n, capitals=capitals)
  if family == "attribute":
    thing = rng.choice(world.things)
    field, question = rng.choice([("color", "What color is"), ("place", "Where is"), ("owner", "Who owns")])
    value = getattr(thing, field)
    one_word = rng.random() < 0.5
    prompt = f"{question} the {thing.name}?" + (" Answer in one word." if one_word else "")
    sentence = {
      "color": f"The {thing.name} is {value}.",
      "place": f"The {thing.name} is in the {value}.",
      "owner": f"{value} owns the {thing.name}.",
    }[field]
    answer = value if one_word else sentence
    return Task(
      "attribute", prompt + "\n", answer, (value.lower(),), one_word=one_word, mentions=(thing.name,), sentence=sentence
    )
  if family == "count":
    thing = rng.choice(world.things)
    word = world_lib.NUMBER_WORDS[thing.count]
    one_word = rng.random() < 0.5
    prompt = f"How many {world_lib._plural(thing.name, 2)} are in the {thing.place}?"
    prompt += " Answer in one word." if one_word else ""
    plural = world_lib._plural(thing.name, thing.count)
    sentence = f"There {'is' if thing.count == 1 else 'are'} {word} {plural} in the {thing.place}."
    answer = word if one_word else sentence
    expected = (word, str(thing.count))
    return Task("count", prompt + "\n", answer, expected, one_word=one_word, mentions=(thing.name,), sentence=sentence)
  if family == "sort":
    words = rng.sample([t.name for t in world.things], rng.randint(3, 4))
    reverse = rng.random() < 0.5
    order = list(reversed(words)) if reverse else sorted(words)
    verb = "Reverse the order of these words" if reverse else "Sort these words alphabetically"
    prompt = f"{verb}: {', '.join(words)}." + (" Write your answer in capital letters." if capitals else "")
    return Task("sort", prompt + "\n", _join(order, capitals), tuple(order), n=len(order), capitals=capitals)
  if family == "repeat":
    word, n = rng.choice(world.things).name, rng.randint(2, 4)
    prompt = f"Repeat the word {word} {n} times." + (" Write your answer in capital letters." if capitals else "")
    answer = " ".join([word] * n)
    return Task("repeat", prompt + "\n", answer.upper() if capitals else answer, (word,), n=n, capitals=capitals)
  if family == "sentence":
    thing = rng.choice(world.things)
    other = rng.choice([thing.place, thing.owner, thing.color])
    mention = other if other in (thing.owner, thing.color) else f"the {other}"  # "mentions Ada", "mentions red"
    prompt = f"Write a sentence about the {thing.name} that mentions {mention}."
    answer = {
      thing.place: f"The {thing.name} is in the {other}.",
      thing.owner: f"{other} owns the {thing.name}.",
      thing.color: f"The {thing.name} is {other}.",
    }[other]
    return Task("sentence", prompt + "\n", answer, (), mentions=(thing.name, other.lower()))
  raise ValueError(f"unknown task family {family!r}; choose from {FAMILIES}")


def is_correct(task: Task, response: str) -> bool:
  """Whether the response answers the question (constraints are judged apart, in `constraints_met`)."""
  text = response.strip().lower()
  if task.prompt.strip().lower()[:24] in text:  # restating the instruction is not answering it
    return False
  if task.family == "list":
    items = _items(text)
    return len(items) == task.n and len(set(items)) == task.n and set(items) <= set(task.expected)
  if task.family in ("attribute", "count"):  # the right word, about the right thing unless one word was asked
    about = task.one_word or all(m in text for m in task.mentions)
    return about and any(re.search(rf"\b{re.escape(e)}\b", text) for e in task.expected)
  if task.family == "sort":
    return _items(text) == list(task.expected)
  if task.family == "repeat":
    return _items(text) == [task.expected[0]] * task.n
  if task.family == "sentence":
    return all(re.search(rf"\b{re.escape(m)}\b", text) for m in task.mentions)
  raise ValueError(task.family)


def constraints_met(task: Task, response: str) -> float:
  """The fraction of the prompt's formatting constraints the response satisfies (1.0 with none)."""
  checks = []
  text = response.strip()
  if task.one_word:
    checks.append(len(text.rstrip(".").split()) == 1)
  if task.capitals:
    checks.append(text == text.upper() and any(c.isalpha() for c in text))
  if task.family == "sentence":
    checks.append(text.count(".") == 1 and text.endswith(".") and len(text.split()) <= 12)
  return sum(checks) / len(checks) if checks else 1.0


def _normalized(text: str) -> str:
  return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def contains_answer(task: Task, response: str) -> bool:
  """Whether the gold answer appears inside the response (right content, maybe wrapped in noise)."""
  return _normalized(task.answer) in _normalized(response)


FEATURES = ("correct", "contains_answer", "constraints", "concise", "direct", "stopped")
GOLD_WEIGHTS = {
  "correct": 0.35,
  "contains_answer": 0.15,
  "constraints": 0.15,
  "concise": 0.10,
  "direct": 0.15,
  "stopped": 0.10,
}


def features(task: Task, response: str, *, stopped: bool = True) -> dict[str, float]:
  """What a judge of `response` looks at, each in [0, 1]. Constraints count only when the response is on task."""
  correct, contains = is_correct(task, response), contains_answer(task, response)
  words, gold_words = len(response.split()), max(len(task.answer.split()), 1)
  return {
    "correct": float(correct),
    "contains_answer": float(contains),
    "constraints": float(correct or contains) * constraints_met(task, response),
    "concise": float(words <= 1.5 * gold_words + 1),
    "direct": float(not any(h in response.lower() for h in HEDGES + FILLERS)),
    "stopped": float(stopped),
  }


def quality(task: Task, response: str, *, stopped: bool = True) -> float:
  """Gold quality in [0, 1], what the simulated labelers start from:

      0.35 correct + 0.15 contains the gold answer + 0.15 constraints (only when on task)
      + 0.10 concise + 0.15 direct (no hedging, no filler) + 0.10 stopped

  So an answer wrapped in hedging or rambling beats ignoring the instruction, a clean correct answer beats
  both, and manner counts even when the content is wrong: labelers dislike hedging and chatter in any answer.
  """
  return gold_score(features(task, response, stopped=stopped))


def gold_score(f: dict[str, float]) -> float:
  """The gold quality of a response from its `features` (for callers that already have them)."""
  return sum(GOLD_WEIGHTS[k] * f[k] for k in FEATURES)


def _wrong_answer(task: Task, world: world_lib.World, rng: random.Random) -> str:
  """A response in the right form with the wrong content."""
  if task.family == "list":
    outsider = rng.choice([t.name for t in world.things if t.name not in task.expected])
    return _join([outsider] + list(task.expected[: task.n - 1]), task.capitals)
  if task.family in ("attribute", "count"):
    right = task.expected[0]
    pool = world_lib.NUMBER_WORDS[1:] if task.family == "count" else world_lib.COLORS + world_lib.PLACES
    pool = [w for w in pool if w != right] if task.family == "count" else pool
    replacement = rng.choice([w for w in pool if w.lower() != right])
    return re.sub(rf"\b{re.escape(right)}\b", replacement, task.answer, flags=re.IGNORECASE)
  if task.family == "sort":
    return _join(list(reversed(task.expected)), task.capitals)
  if task.family == "repeat":
    word = task.answer.split()[0]
    return " ".join([word] * (task.n + 1))
  other = rng.choice([t for t in world.things if t.name not in task.mentions])
  return f"The {other.name} is {other.color}."


def flawed_responses(task: Task, world: world_lib.World, rng: random.Random) -> list[tuple[str, bool]]:
  """Plausible bad responses as (text, stopped): the kinds of mistakes an unaligned model makes."""
  prose = world_lib.prose(world, n_paragraphs=1, seed=rng.randrange(2**31)).split(". ")[0].rstrip(".") + "."
  return [
    (_wrong_answer(task, world, rng), True),
    ("I think " + task.answer + ", but I am not sure.", True),
    (task.answer + " " + prose, False),  # does not stop: rambles on into pretraining-style prose
    (task.answer.lower() if task.capitals else task.answer + " " + task.answer, True),
    (prose, True),  # ignores the instruction
    (task.prompt.strip(), True),  # echoes the prompt
  ]
