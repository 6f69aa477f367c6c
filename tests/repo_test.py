"""The repository's promises about itself: CI runs the README's test command, exactly, and then the slow tier."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bash_blocks(markdown):
  return re.findall(r"```bash\n(.*?)```", markdown, flags=re.S)


def test_ci_runs_the_readme_test_command_exactly_then_the_slow_tier():
  readme = (ROOT / "README.md").read_text()
  commands = [line for block in _bash_blocks(readme) for line in block.splitlines() if "pytest" in line]
  assert len(commands) == 1 and '-m "not slow"' in commands[0], commands
  ci = (ROOT / ".ci" / "run").read_text().splitlines()
  assert commands[0] in ci
  slow = ".venv/bin/python -m pytest -q -n 2 -m slow tests"
  assert slow in ci and ci.index(slow) > ci.index(commands[0]) and f"`{slow}`" in readme
