"""The dependency arrows of docs/architecture.md, checked on the source with `ast`:
commands -> stages -> library -> foundation (math, models, data, the lab, sharding, checkpoints, ...), no arrow
up and no import cycle."""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "instructgpt_jax"

# The layers, top down. A module is in the first layer whose prefix it matches; the rest is the foundation.
COMMANDS = ("main", "sample", "export", "sweep", "train_tokenizer", "evaluate")
LAYERS = {
  "command": tuple(f"instructgpt_jax.{m}" for m in COMMANDS),
  "stage": ("instructgpt_jax.stages",),
  "library": ("instructgpt_jax.library",),
}
RANK = {"command": 3, "stage": 2, "library": 1, "foundation": 0}

# Within the foundation: module (or package) -> internal modules it must never import.
FOUNDATION_FORBIDDEN = {
  "instructgpt_jax.losses": ("models", "data", "lab", "sharding", "checkpoint"),
  "instructgpt_jax.rl": ("models", "data", "lab", "sharding", "checkpoint"),
  "instructgpt_jax.models": ("data", "lab"),
  "instructgpt_jax.data": ("models", "lab"),  # the lab registers its data scheme with data/schemes.py
  "instructgpt_jax.lab": ("models",),
}
# losses.py and rl.py may import only these third-party modules
MATH_ALLOWED = {"jax", "numpy", "math", "typing", "functools", "__future__", "dataclasses", "collections"}


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(root: pathlib.Path = PACKAGE) -> dict[str, pathlib.Path]:
  return {module_name(p): p for p in sorted(root.rglob("*.py"))}


def imports_of(path: pathlib.Path, known: set[str]) -> set[str]:
  """The package modules a file imports anywhere in it (function-level imports included), as module names:
  `from instructgpt_jax.library import loop` -> instructgpt_jax.library.loop."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        out.add(full if full in known else node.module)
    elif isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
  return {name for name in out if name.split(".")[0] == "instructgpt_jax" and name != "instructgpt_jax"}


def layer(module: str) -> str:
  for name, prefixes in LAYERS.items():
    if any(module == p or module.startswith(p + ".") for p in prefixes):
      return name
  return "foundation"


def import_graph() -> dict[str, set[str]]:
  modules = package_modules()
  return {name: imports_of(path, set(modules)) for name, path in modules.items()}


def arrows_up(graph: dict[str, set[str]]) -> list[str]:
  """'a -> b' for every import of a higher layer, and of a forbidden foundation module."""
  bad = []
  for module, targets in graph.items():
    for target in targets:
      if RANK[layer(target)] > RANK[layer(module)]:
        bad.append(f"{module} ({layer(module)}) -> {target} ({layer(target)})")
      for owner, forbidden in FOUNDATION_FORBIDDEN.items():
        if module == owner or module.startswith(owner + "."):
          if any(target.startswith(f"instructgpt_jax.{f}") for f in forbidden):
            bad.append(f"{module} -> {target} (forbidden for {owner})")
  return sorted(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The import cycles among the package's modules (a package's __init__ counts as the package)."""
  found, state = [], {}

  def visit(node, stack):
    state[node] = "open"
    stack.append(node)
    for target in sorted(graph.get(node, ())):
      if target not in graph:
        continue
      if state.get(target) == "open":
        found.append(stack[stack.index(target) :] + [target])
      elif target not in state:
        visit(target, stack)
    stack.pop()
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node, [])
  return found


def test_nothing_imports_upward():
  assert arrows_up(import_graph()) == []


def test_no_relative_imports():
  # The checks above read absolute imports; a relative one (`from ..stages import ppo`) would pass unseen.
  relative = [
    f"{module}:{node.lineno}"
    for module, path in package_modules().items()
    for node in ast.walk(ast.parse(path.read_text()))
    if isinstance(node, ast.ImportFrom) and node.level > 0
  ]
  assert relative == []


def test_no_import_cycles():
  # A package importing its own submodules (stages/__init__ naming the stage modules) is not a cycle: it
  # does so by name through `importlib`, so no module here imports the package that imports it back.
  assert cycles(import_graph()) == []


def test_stages_are_dispatched_from_one_table():
  """`importlib` turns a config's stage into a module in one place, `stages.STAGES`, and every entry of the
  table is a module of the stage layer with the functions the dispatch calls."""
  from instructgpt_jax import stages

  users = [
    module
    for module, path in package_modules().items()
    if re.search(r"\bimport_module\b|__import__", path.read_text()) and module != "instructgpt_jax.stages"
  ]
  assert users == []
  for name, module_path in stages.STAGES.items():
    assert layer(module_path) == "stage"
    module = stages.stage_module(name)
    assert callable(module.train) and callable(module.check_config), name


@pytest.mark.parametrize("module", ["instructgpt_jax.losses", "instructgpt_jax.rl"])
def test_math_modules_import_only_jax_and_numpy(module):
  path = package_modules()[module]
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      roots = {a.name.split(".")[0] for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      roots = {(node.module or "").split(".")[0]}
    else:
      continue
    if module.endswith("rl") and isinstance(node, ast.ImportFrom) and node.module == "instructgpt_jax.losses":
      continue  # rl.py shares losses.py's masked statistics and upcast (both files stay jax-only)
    assert roots <= MATH_ALLOWED, f"{module} imports {sorted(roots - MATH_ALLOWED)}"


def test_the_checks_see_an_arrow_up_and_a_cycle(tmp_path):
  # The checks must be able to fail: a library module importing a stage and a command, a data module importing
  # models, and a two-module cycle are each seen.
  graph = {
    "instructgpt_jax.library.loop": {"instructgpt_jax.stages.ppo", "instructgpt_jax.main"},
    "instructgpt_jax.data.text": {"instructgpt_jax.models.sizes"},
    "instructgpt_jax.stages.ppo": set(),
    "instructgpt_jax.main": set(),
    "instructgpt_jax.models.sizes": set(),
  }
  assert arrows_up(graph) == [
    "instructgpt_jax.data.text -> instructgpt_jax.models.sizes (forbidden for instructgpt_jax.data)",
    "instructgpt_jax.library.loop (library) -> instructgpt_jax.main (command)",
    "instructgpt_jax.library.loop (library) -> instructgpt_jax.stages.ppo (stage)",
  ]
  assert cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]
  probe = tmp_path / "probe.py"
  probe.write_text("def f():\n  from instructgpt_jax.library import loop\n  import instructgpt_jax.data.text\n")
  assert imports_of(probe, {"instructgpt_jax.library.loop"}) == {
    "instructgpt_jax.library.loop",
    "instructgpt_jax.data.text",
  }
