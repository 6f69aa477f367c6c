"""The repository's promises about itself: the README's test command is one script that installs what the tests
need (the reference venv included) and runs the first tier, and CI runs exactly that command, then the slow tier."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bash_blocks(markdown):
  return re.findall(r"```bash\n(.*?)```", markdown, flags=re.S)


def test_ci_runs_the_readme_test_command_exactly_then_the_slow_tier():
  readme = (ROOT / "README.md").read_text()
  commands = [line for block in _bash_blocks(readme) for line in block.splitlines() if "tests/run.sh" in line]
  assert commands == ["bash tests/run.sh"], commands
  script = (ROOT / "tests" / "run.sh").read_text().splitlines()
  installs = [
    'python3 -m venv .venv && .venv/bin/pip install -q -c requirements-lock.txt -e ".[test]"',
    "(python3 -m venv .cache/venv-ref && .cache/venv-ref/bin/pip install -q -r requirements-ref.txt) &",
    'wait "$reference"',
  ]
  first_tier = 'exec .venv/bin/python -m pytest -q -n 2 -m "not slow" tests "$@"'
  assert all(line in script for line in installs) and script[-1] == first_tier
  ci = (ROOT / ".ci" / "run").read_text().splitlines()
  slow = ".venv/bin/python -m pytest -q -n 2 -m slow tests"
  assert commands[0] in ci and slow in ci and ci.index(slow) > ci.index(commands[0]) and f"`{slow}`" in readme
