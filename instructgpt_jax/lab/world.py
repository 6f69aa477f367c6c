"""A small procedurally generated world of objects, and plain prose about it.

The prose is the pretraining corpus of the embedded demo: it states facts about the world (what each
object is, its colour, size, place and owner) and contains no instruction following, so a model
pretrained on it knows the world but does not follow instructions, as GPT-3 before InstructGPT.
Everything is a pure function of a seed.
"""

from __future__ import annotations

import dataclasses
import random

CATEGORIES = {
  "fruit": ["apple", "pear", "plum", "lemon", "mango", "peach", "cherry", "grape", "melon", "fig"],
  "animal": ["cat", "dog", "horse", "goat", "fox", "owl", "duck", "mouse", "bear", "frog"],
  "tool": ["hammer", "saw", "spade", "rake", "drill", "chisel", "ladder", "wrench", "axe", "brush"],
  "vehicle": ["cart", "boat", "bicycle", "wagon", "sled", "canoe", "tram", "truck", "raft", "van"],
  "instrument": ["drum", "flute", "harp", "lute", "horn", "bell", "fiddle", "gong", "pipe", "organ"],
}
COLORS = ["red", "blue", "green", "yellow", "white", "black", "brown", "grey", "orange", "purple"]
SIZES = ["tiny", "small", "large", "huge"]
PLACES = ["kitchen", "garden", "barn", "attic", "cellar", "market", "harbour", "forest", "library", "mill"]
OWNERS = ["Ada", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivo", "June"]


@dataclasses.dataclass(frozen=True)
class Thing:
  name: str
  category: str
  color: str
  size: str
  place: str
  owner: str
  count: int


@dataclasses.dataclass(frozen=True)
class World:
  things: tuple[Thing, ...]

  def by_category(self, category: str) -> list[Thing]:
    return [t for t in self.things if t.category == category]

  def by_place(self, place: str) -> list[Thing]:
    return [t for t in self.things if t.place == place]


def make_world(seed: int = 0) -> World:
  """Every object of every category, each with seeded attributes."""
  rng = random.Random(seed)
  things = []
  for category, names in CATEGORIES.items():
    for name in names:
      things.append(
        Thing(
          name=name,
          category=category,
          color=rng.choice(COLORS),
          size=rng.choice(SIZES),
          place=rng.choice(PLACES),
          owner=rng.choice(OWNERS),
          count=rng.randint(1, 9),
        )
      )
  return World(tuple(things))


NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _plural(name: str, count: int) -> str:
  if count == 1:
    return name
  if name.endswith(("sh", "ch", "x", "s")):
    return name + "es"
  if name == "mouse":
    return "mice"
  return name + "s"


def article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def _fact(thing: Thing, rng: random.Random) -> str:
  t = thing
  templates = [
    f"The {t.name} is {t.color}.",
    f"The {t.name} is {article(t.size)} {t.size} {t.category}.",
    f"The {t.color} {t.name} is in the {t.place}.",
    f"{t.owner} owns the {t.name}.",
    f"There {'is' if t.count == 1 else 'are'} {NUMBER_WORDS[t.count]} {_plural(t.name, t.count)} in the {t.place}.",
    f"{article(t.name).capitalize()} {t.name} is a kind of {t.category}.",
    f"{t.owner} keeps the {t.size} {t.name} in the {t.place}.",
    f"In the {t.place} you can find the {t.color} {t.name} of {t.owner}.",
  ]
  return rng.choice(templates)


def _scene(world: World, rng: random.Random) -> str:
  place = rng.choice(PLACES)
  here = world.by_place(place)
  if not here:
    return f"Nothing is kept in the {place}."
  names = [t.name for t in rng.sample(here, min(len(here), rng.randint(2, 4)))]
  listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
  return f"In the {place} there is the {listed}."


def prose(world: World, *, n_paragraphs: int, seed: int = 0) -> str:
  """Paragraphs of 3-7 true sentences about the world, separated by blank lines."""
  rng = random.Random(seed)
  paragraphs = []
  for _ in range(n_paragraphs):
    sentences = [
      _scene(world, rng) if rng.random() < 0.2 else _fact(rng.choice(world.things), rng)
      for _ in range(rng.randint(3, 7))
    ]
    paragraphs.append(" ".join(sentences))
  return "\n\n".join(paragraphs)


def corpus_documents(*, n_documents: int, seed: int = 0, world_seed: int = 0) -> list[str]:
  """The generated pretraining corpus: `n_documents` short documents of prose."""
  world = make_world(world_seed)
  rng = random.Random(seed)
  return [prose(world, n_paragraphs=rng.randint(1, 3), seed=rng.randrange(2**31)) for _ in range(n_documents)]
