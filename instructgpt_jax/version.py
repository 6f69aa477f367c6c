"""The package's version (the one source: setup.py reads it from here) and the code's git commit, which every
run records in its config.json so that a paper can say exactly what it ran."""

from __future__ import annotations

import functools
import pathlib
import subprocess

__version__ = "0.2.0"

REPO = pathlib.Path(__file__).resolve().parents[1]
# Where a checkout without its .git folder (a TPU worker's copy: launch/tpu.py setup) keeps the commit it came from.
COMMIT_FILE = REPO / "GIT_COMMIT"


@functools.cache
def git_commit() -> str | None:
  """The commit of the code that runs: `git rev-parse HEAD`, with "-dirty" when tracked files differ from it;
  else the GIT_COMMIT file beside the package; None when neither exists (e.g. an installed wheel)."""
  try:
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    if head.returncode == 0:
      status = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=10,
      )
      return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")
  except (OSError, subprocess.TimeoutExpired):
    pass
  return COMMIT_FILE.read_text().strip() if COMMIT_FILE.is_file() else None
