"""The repository's promises about itself: the README's test command is one script that installs what the tests
need (the reference venv included) and runs the first tier, and CI runs exactly that command, then the slow tier;
every file and module name the README and docs/*.md cite exists in the code."""

import ast
import functools
import importlib
import pathlib
import re

import ml_collections

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bash_blocks(markdown):
  return re.findall(r"```bash\n(.*?)```", markdown, flags=re.S)


def test_ci_runs_the_readme_test_command_exactly_then_the_slow_tier():
  readme = (ROOT / "README.md").read_text()
  commands = [line for block in _bash_blocks(readme) for line in block.splitlines() if "tests/run.sh" in line]
  assert commands == ["bash tests/run.sh"], commands
  script = (ROOT / "tests" / "run.sh").read_text().splitlines()
  installs = [
    'python3 -m venv .venv && .venv/bin/pip install -q -c requirements-lock.txt -e ".[test,eval]"',
    "(python3 -m venv .cache/venv-ref && .cache/venv-ref/bin/pip install -q -r requirements-ref.txt) &",
    'wait "$reference"',
  ]
  first_tier = 'exec .venv/bin/python -m pytest -q -n 2 -m "not slow" tests "$@"'
  assert all(line in script for line in installs) and script[-1] == first_tier
  ci = (ROOT / ".ci" / "run").read_text().splitlines()
  slow = ".venv/bin/python -m pytest -q -n 2 -m slow tests"
  assert commands[0] in ci and slow in ci and ci.index(slow) > ci.index(commands[0]) and f"`{slow}`" in readme


# ------------------------------------------------------------------ the docs' references resolve in the code
#
# What counts as a reference, in README.md and docs/*.md:
# * a file: any `dir/.../name.py` (backticked or not, fenced commands included) must exist relative to the
#   repository's root or to instructgpt_jax/; a backticked bare `name.py` must be the name of a file of the
#   repository; any other backticked path under one of the repository's folders (`docs/losses.md`,
#   `instructgpt_jax/lab/`, `configs/pretrain.py:tiny` up to the colon) must exist. `<placeholders>`, globs
#   and the files of other repositories that docs/paper.md cites are not ours.
# * a name: a backticked `module.name` (or `module.name(...)`, `package.module.name`, `module.Class.attr`)
#   outside fenced blocks. The module is a dotted path inside instructgpt_jax/ (`library.loop`,
#   `data.pipeline`), or in configs/, launch/, benchmarks/ (`launch.sweep`), or the last component of exactly
#   one package module (`loop` is instructgpt_jax/library/loop.py; `pipeline`, which names two, must be
#   written `data.pipeline` or `stages.pipeline`; `common`, only a file of configs/, `configs.common`).
#   `name` must be defined at the module's top level (a def, a class, an assignment; a package's __init__
#   also by import), and `attr` in the class's body. A token whose first part is a config section and whose
#   second a field of that section (`ppo.kl_coef`, `optim.lr`) is a config key, not code; one whose first
#   part names no module of the repository (`jax.jit`, `config.stage`) is not a reference; one that ends in
#   a file extension (`metrics.jsonl`, `report.md`) is a file name.

_OTHER_REPOSITORIES = {  # files of the reference implementations docs/paper.md cites
  "language/model.py",
  "train_policy_jax.py",
  "train_reward_jax.py",
  "tldr_dataset.py",
  "train_reward.py",
  "rewards.py",
  "reward.py",
  "label_types.py",
}
_FILE_EXTENSIONS = {"py", "md", "json", "jsonl", "png", "txt", "yaml", "sh", "jinja", "safetensors", "model", "csv"}
_PATH = re.compile(r"(?<![\w./<>-])((?:[\w.-]+/)+[\w.-]+\.py)(?![\w/])")
_BARE_FILE = re.compile(r"^[\w.-]+\.py$")
_FOLDER_PATH = re.compile(r"^(?:instructgpt_jax|configs|launch|benchmarks|tests|docs|\.ci)/[\w./-]*$")
_NAME = re.compile(r"^([a-z_][a-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+)(?:\(.*)?$", flags=re.S)


def _doc_files() -> list[pathlib.Path]:
  return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _code_spans(markdown: str):
  """(line, text) of every inline code span outside fenced blocks."""
  unfenced = re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), markdown, flags=re.S)
  for m in re.finditer(r"`([^`]+)`", unfenced):
    yield unfenced.count("\n", 0, m.start()) + 1, m.group(1).strip()


def _modules() -> tuple[dict[str, pathlib.Path], dict[str, list[pathlib.Path]], set[str]]:
  """Dotted module names -> files (in the package with and without `instructgpt_jax.`, and configs/launch/
  benchmarks with their folder), the package modules by their last component, and the other files' stems."""
  dotted, short, stems = {}, {}, set()
  for f in sorted((ROOT / "instructgpt_jax").rglob("*.py")):
    parts = f.relative_to(ROOT).with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    dotted[".".join(parts)] = f
    if len(parts) > 1:
      dotted[".".join(parts[1:])] = f
      short.setdefault(parts[-1], []).append(f)
  for folder in ("configs", "launch", "benchmarks"):
    for f in sorted((ROOT / folder).glob("*.py")):
      dotted[f"{folder}.{f.stem}"] = f
      stems.add(f.stem)
  return dotted, short, stems


def _top_level_names(path: pathlib.Path) -> dict[str, ast.AST]:
  """What a module defines at its top level (under if/try too): defs, classes, assignments; in a package's
  __init__, imported names as well."""
  names = {}

  def visit(body):
    for node in body:
      if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        names[node.name] = node
      elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for target in targets:
          for n in ast.walk(target):
            if isinstance(n, ast.Name):
              names[n.id] = node
      elif isinstance(node, ast.Import | ast.ImportFrom) and path.name == "__init__.py":
        for alias in node.names:
          names[(alias.asname or alias.name).split(".")[0]] = node
      elif isinstance(node, ast.If | ast.Try | ast.With):
        for block in (node.body, getattr(node, "orelse", []), getattr(node, "finalbody", [])):
          visit(block)
        for handler in getattr(node, "handlers", []):
          visit(handler.body)

  visit(ast.parse(path.read_text()).body)
  return names


_CONFIG_ARGS = {"pipeline": ("lab", "compare")}  # arguments whose configs have sections the default's lacks


def _config_fields() -> dict[str, set[str]]:
  """Every config section (a ConfigDict at any depth of some configs/*.py get_config(arg)) and its fields."""
  fields = {}

  def visit(config):
    for key, value in config.items():
      if isinstance(value, ml_collections.ConfigDict):
        fields.setdefault(key, set()).update(value.keys())
        visit(value)

  for f in sorted((ROOT / "configs").glob("*.py")):
    module = importlib.import_module(f"configs.{f.stem}")
    for arg in _CONFIG_ARGS.get(f.stem, ("",)):
      if hasattr(module, "get_config"):
        visit(module.get_config(arg) if arg else module.get_config())
  return fields


def broken_references(docs: dict[str, str]) -> list[str]:
  """The references in `docs` (name -> Markdown) that do not resolve, as "doc:line: `token`: why"."""
  dotted, short, stems = _modules()
  sections = _config_fields()
  names_of = functools.cache(_top_level_names)
  all_files = {f.name for f in ROOT.rglob("*.py") if ".venv" not in f.parts and ".cache" not in f.parts}
  problems = []
  for doc, text in docs.items():
    for m in _PATH.finditer(text):
      path = m.group(1)
      if "<" in path or path in _OTHER_REPOSITORIES:
        continue
      if not ((ROOT / path).is_file() or (ROOT / "instructgpt_jax" / path).is_file()):
        problems.append(f"{doc}:{text.count(chr(10), 0, m.start()) + 1}: `{path}`: no such file")
    for line, span in _code_spans(text):
      where = f"{doc}:{line}: `{span}`"
      path = span.split(":")[0]
      if _FOLDER_PATH.match(path) and not path.endswith(".py"):  # .py files: above
        if not (ROOT / path).exists():
          problems.append(f"{where}: no such file or folder")
        continue
      if _BARE_FILE.match(span):
        if span not in all_files and span not in _OTHER_REPOSITORIES:
          problems.append(f"{where}: no file of that name")
        continue
      m = _NAME.match(span)
      if not m:
        continue
      parts = m.group(1).split(".")
      if parts[-1] in _FILE_EXTENSIONS or parts[1] in sections.get(parts[0], ()):
        continue
      found = next((i for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in dotted), None)
      if found is not None:
        module, rest = dotted[".".join(parts[:found])], parts[found:]
      elif parts[0] in short:
        if len(short[parts[0]]) > 1:
          options = " or ".join(
            ".".join(f.relative_to(ROOT / "instructgpt_jax").with_suffix("").parts) for f in short[parts[0]]
          )
          problems.append(f"{where}: `{parts[0]}` names {len(short[parts[0]])} modules: write {options}")
          continue
        module, rest = short[parts[0]][0], parts[1:]
      elif parts[0] in stems:
        problems.append(f"{where}: `{parts[0]}` is no package module (configs/launch/benchmarks: with the folder)")
        continue
      else:
        continue  # not a module of this repository: jax.jit, config.stage, lm_head.weight, ...
      if not rest:
        continue
      defined = names_of(module)
      if rest[0] not in defined:
        problems.append(f"{where}: {module.relative_to(ROOT)} defines no `{rest[0]}`")
      elif len(rest) > 1 and isinstance(defined[rest[0]], ast.ClassDef):
        members = _top_level_names_of_class(defined[rest[0]])
        if rest[1] not in members:
          problems.append(f"{where}: class {rest[0]} in {module.relative_to(ROOT)} has no `{rest[1]}`")
  line = lambda problem: (problem.split(":")[0], int(problem.split(":")[1]))  # noqa: E731
  return sorted(problems, key=line)


def _top_level_names_of_class(node: ast.ClassDef) -> set[str]:
  names = set()
  for child in node.body:
    if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
      names.add(child.name)
    elif isinstance(child, ast.Assign | ast.AnnAssign):
      for target in child.targets if isinstance(child, ast.Assign) else [child.target]:
        names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
  return names


def test_every_file_and_module_name_the_docs_cite_exists():
  docs = {str(f.relative_to(ROOT)): f.read_text() for f in _doc_files()}
  problems = broken_references(docs)
  assert not problems, "\n".join(problems)


def test_the_reference_check_reports_made_up_references():
  probe = "\n".join(
    [
      "`loop.train_loop` `rl.gae` `library.loop.train_loop` `ppo_steps.Models.build` `stages.STAGES`",
      "`ppo.kl_coef` `optim.lr` `compare.table_n` `metrics.jsonl` `launch.sweep` `jax.jit` `config.stage`",
      "`stages/ppo.py` `configs/ppo.py:tiny` `losses.py` `docs/losses.md` instructgpt_jax/library/loop.py",
      "`loop.no_such_loop` `rl.no_such_estimator(x)` `ppo_steps.Models.no_such_method` `pipeline.run`",
      "`common.train_loop` `no_such.py` `instructgpt_jax/trainers/` `trainers/common.py`",
      "and plain library/no_such_file.py",
    ]
  )
  problems = broken_references({"probe.md": probe})
  assert [p.split(": ")[1] for p in problems] == [
    "`loop.no_such_loop`",
    "`rl.no_such_estimator(x)`",
    "`ppo_steps.Models.no_such_method`",
    "`pipeline.run`",
    "`trainers/common.py`",
    "`common.train_loop`",
    "`no_such.py`",
    "`instructgpt_jax/trainers/`",
    "`library/no_such_file.py`",
  ], problems
  assert problems[3].endswith("`pipeline` names 2 modules: write data.pipeline or stages.pipeline")


LONGEST_FUNCTION = 80  # lines, docstring included (issue 28: a function a reader takes in at once)


def long_functions(root: pathlib.Path, limit: int = LONGEST_FUNCTION) -> list[str]:
  """'path:line name (N lines)' for every function or method under `root` longer than `limit` lines."""
  out = []
  for path in sorted(root.rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        if length > limit:
          out.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({length} lines)")
  return out


def test_no_function_in_the_package_is_longer_than_80_lines(tmp_path):
  assert long_functions(ROOT / "instructgpt_jax") == []
  probe = tmp_path / "pkg" / "probe.py"  # the check can fail: an 81-line function is named
  probe.parent.mkdir()
  probe.write_text("def long():\n" + "  x = 1\n" * 79 + "  return x\n\n\ndef short():\n  return 1\n")
  assert long_functions(tmp_path / "pkg") == ["pkg/probe.py:1 long (81 lines)"]
