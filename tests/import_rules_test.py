"""The dependency arrows of docs/architecture.md, checked on the source with `ast`."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "instructgpt_jax"

# module (or package folder) -> internal modules it must never import
FORBIDDEN = {
  "losses.py": ("models", "trainers", "data", "lab", "sharding", "checkpoint"),
  "rl.py": ("models", "trainers", "data", "lab", "sharding", "checkpoint"),
  "models": ("trainers", "data", "lab"),
  "data": ("models", "trainers", "lab"),  # the `lab` scheme is resolved above the data layer (trainers/common.py)
  "lab": ("models", "trainers"),
  "sharding.py": ("trainers",),
  "checkpoint.py": ("trainers",),
  "metrics.py": ("trainers",),
  "optim.py": ("trainers",),
  "train_state.py": ("trainers",),
  "generation.py": ("trainers",),
}
# losses.py and rl.py may import only these third-party modules
MATH_ALLOWED = {"jax", "numpy", "math", "typing", "functools", "__future__", "dataclasses", "collections"}


def internal_imports(path: pathlib.Path) -> set[str]:
  """Top-level internal module names imported by a file, e.g. {"models", "sharding"}."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module:
      parts = node.module.split(".")
      if parts[0] == "instructgpt_jax":
        names.add(parts[1] if len(parts) > 1 else node.names[0].name)
    elif isinstance(node, ast.Import):
      for alias in node.names:
        parts = alias.name.split(".")
        if parts[0] == "instructgpt_jax" and len(parts) > 1:
          names.add(parts[1])
  return names


def files_of(entry: str) -> list[pathlib.Path]:
  target = PACKAGE / entry
  return sorted(target.rglob("*.py")) if target.is_dir() else [target] if target.exists() else []


@pytest.mark.parametrize("entry", sorted(FORBIDDEN))
def test_module_does_not_import_upward(entry):
  for path in files_of(entry):
    bad = internal_imports(path) & set(FORBIDDEN[entry])
    assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {sorted(bad)}"


@pytest.mark.parametrize("entry", ["losses.py", "rl.py"])
def test_math_modules_import_only_jax_and_numpy(entry):
  for path in files_of(entry):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        roots = {a.name.split(".")[0] for a in node.names}
      elif isinstance(node, ast.ImportFrom):
        roots = {(node.module or "").split(".")[0]}
      else:
        continue
      if entry == "rl.py" and isinstance(node, ast.ImportFrom) and node.module == "instructgpt_jax.losses":
        continue  # rl.py shares losses.py's masked statistics and upcast (both files stay jax-only)
      assert roots <= MATH_ALLOWED, f"{entry} imports {sorted(roots - MATH_ALLOWED)}"


def test_the_checker_sees_a_violation(tmp_path):
  # The rule check must be able to fail: a file that imports trainers and data is seen doing so.
  path = tmp_path / "probe.py"
  path.write_text("from instructgpt_jax.trainers import pretrain\nimport instructgpt_jax.data.text\n")
  assert internal_imports(path) == {"trainers", "data"}
