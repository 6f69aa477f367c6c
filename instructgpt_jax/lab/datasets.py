"""The lab's datasets as JSONL files in the formats of docs/data.md: demonstrations, comparisons, prompts.

A spec string names one: `lab:<kind>:<split>:<n>[:<families>]`, e.g. `lab:demonstrations:train:2000` or
`lab:comparisons:eval:200:sort+repeat` (only those task families). Splits never share a prompt: a prompt
belongs to the eval split when a hash of its text falls in the lowest tenth.

* demonstrations: each task answered by a demonstrator (labelers.write_demonstration): half write the gold
  answer, half have a habit (hedging, chatting, rambling, ignoring the format). The SFT model learns both.
* comparisons: K = 4..9 responses per prompt (the gold answer and flawed ones), ranked by the gold quality
  function, ties sharing a rank: a synthetic task with a known scoring rule for the reward model.
* prompts: instructions alone, for PPO.
"""

from __future__ import annotations

import hashlib
import json
import random

from instructgpt_jax import errors, paths
from instructgpt_jax.data import schemes
from instructgpt_jax.lab import labelers
from instructgpt_jax.lab import tasks as tasks_lib
from instructgpt_jax.lab import world as world_lib

KINDS = ("demonstrations", "comparisons", "prompts")
SPLITS = ("train", "eval")


# "GPT prompted" (the paper's Figure 1: GPT-3 given a few-shot prefix that puts it in an instruction-following
# mode): the pretrained model sees these three training-split tasks with their gold answers, then the prompt.
# The shortest task of three families, so that the prefix (about 40 tokens) and the longest held-out prompt
# (about 23) fit the lab model's 96 positions with a 24-token response.
FEW_SHOT_EXAMPLES = (
  ("How many saws are in the forest? Answer in one word.\n", "six"),
  ("Who owns the truck?\n", "Eve owns the truck."),
  ("Repeat the word drill 2 times.\n", "drill drill"),
)
FEW_SHOT_PREFIX = "".join(prompt + answer + "\n" for prompt, answer in FEW_SHOT_EXAMPLES)


def split_of(prompt: str) -> str:
  digest = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16)
  return "eval" if digest % 10 == 0 else "train"


def sample_tasks(
  n: int,
  *,
  split: str,
  seed: int,
  world: world_lib.World,
  families: tuple[str, ...] = tasks_lib.FAMILIES,
  kind: str = "",
) -> list[tasks_lib.Task]:
  """n tasks of one split (seeded; distinct prompts where the split has enough of them).

  Each kind draws its own tasks, as the paper's SFT, RM and PPO prompt sets are distinct (docs/paper.md §7.1).
  """
  rng = random.Random(f"{seed}:{split}:{kind}")
  out, seen = [], set()
  for _ in range(200 * n):
    if len(out) == n:
      break
    task = tasks_lib.make_task(world, rng, rng.choice(families))
    if split_of(task.prompt) != split:
      continue
    if task.prompt in seen and len(seen) < n:  # prefer new prompts, repeat only when the split runs dry
      continue
    seen.add(task.prompt)
    out.append(task)
  return out


def dense_ranks(scores: list[float]) -> list[int]:
  """0 for the best score, 1 for the next distinct score, ...; equal scores share a rank (a tie)."""
  order = sorted(set(round(s, 6) for s in scores), reverse=True)
  return [order.index(round(s, 6)) for s in scores]


def records(
  kind: str, split: str, n: int, *, seed: int = 0, world_seed: int = 0, families: tuple[str, ...] = tasks_lib.FAMILIES
) -> list[dict]:
  world = world_lib.make_world(world_seed)
  rng = random.Random(f"{seed}:{split}:{kind}:responses")
  out = []
  for task in sample_tasks(n, split=split, seed=seed, world=world, families=families, kind=kind):
    if kind == "demonstrations":
      out.append({"prompt": task.prompt, "response": labelers.write_demonstration(task, rng, world)[0]})
    elif kind == "prompts":
      out.append({"prompt": task.prompt})
    elif kind == "comparisons":
      candidates = [(task.answer, True)] + tasks_lib.flawed_responses(task, world, rng)
      picked = rng.sample(candidates, min(rng.randint(4, 9), len(candidates)))
      scores = [tasks_lib.quality(task, text, stopped=stopped) for text, stopped in picked]
      if len(set(scores)) < 2:
        continue
      # A response that did not stop is written as it would be sampled: without EOS, up to a cut.
      out.append({"prompt": task.prompt, "responses": [t for t, _ in picked], "ranks": dense_ranks(scores)})
    else:
      raise ValueError(f"lab data kind {kind!r} is not one of {KINDS}")
  return out


def parse_spec(spec: str) -> tuple[str, str, int, tuple[str, ...]]:
  parts = spec.split(":")
  families = tuple(parts[4].split("+")) if len(parts) == 5 else tasks_lib.FAMILIES
  if (
    len(parts) not in (4, 5)
    or parts[0] != "lab"
    or parts[1] not in KINDS
    or parts[2] not in SPLITS
    or not parts[3].isdigit()
    or not set(families) <= set(tasks_lib.FAMILIES)
  ):
    raise errors.ConfigError(
      f"{spec}: a lab dataset is named lab:<{'|'.join(KINDS)}>:<train|eval>:<count>[:<family>+...], "
      f"families from {'+'.join(tasks_lib.FAMILIES)}"
    )
  return parts[1], parts[2], int(parts[3]), families


def materialize(spec: str, directory: str, *, seed: int = 0) -> str:
  """Writes the dataset a spec names into `directory` (once; the file name holds spec and seed)."""
  kind, split, n, families = parse_spec(spec)
  name = f"lab_{kind}_{split}_{n}" + ("" if families == tasks_lib.FAMILIES else "_" + "+".join(families))
  path = paths.join(directory, f"{name}_seed{seed}.jsonl")
  if not paths.path(path).exists():
    lines = (json.dumps(record) + "\n" for record in records(kind, split, n, seed=seed, families=families))
    paths.write_text(path, "".join(lines))
  return path


def materialize_corpus(n_documents: int, directory: str, *, seed: int = 0) -> str:
  """Writes the generated pretraining prose (world.corpus_documents) into `directory` as `{"text"}` JSONL
  (once; the file name holds the count and the seed), for readers that take only files."""
  path = paths.join(directory, f"lab_corpus_{n_documents}_seed{seed}.jsonl")
  if not paths.path(path).exists():
    documents = world_lib.corpus_documents(n_documents=n_documents, seed=seed)
    paths.write_text(path, "".join(json.dumps({"text": d}) + "\n" for d in documents))
  return path


def tasks_of(spec: str, *, seed: int = 0, world_seed: int = 0) -> dict[str, tasks_lib.Task]:
  """The tasks behind a lab prompt spec, by prompt text: what the gold scorer needs to judge responses."""
  kind, split, n, families = parse_spec(spec)
  world = world_lib.make_world(world_seed)
  return {t.prompt: t for t in sample_tasks(n, split=split, seed=seed, world=world, families=families, kind=kind)}


def gold_scorer(spec: str, *, seed: int = 0):
  """gold(prompt text, response text, stopped): tasks_lib.quality of a response to one of `spec`'s prompts,
  NaN for a prompt that is not one of them."""
  by_prompt = tasks_of(spec, seed=seed)

  def gold(prompt: str, response: str, stopped: bool) -> float:
    task = by_prompt.get(prompt)
    return tasks_lib.quality(task, response, stopped=stopped) if task else float("nan")

  return gold


# The `lab` data scheme (data/schemes.py): `lab:<kind>:<split>:<n>` specs, a corpus field of "lab" (the
# generated prose, `lab_documents` documents of it), and the gold scorer of its prompts.
schemes.register(
  "lab",
  files=materialize,
  corpus=lambda data_cfg, directory, *, seed: materialize_corpus(
    int(data_cfg.get("lab_documents", 4000)), directory, seed=seed
  ),
  gold=gold_scorer,
)
