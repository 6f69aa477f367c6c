"""Did a change move any number? Compares two run folders (a single stage's workdir, or the lab's workdir of
stage folders) metric by metric, leaving out the wall-clock ones, and the lab's report.md line by line.

    python benchmarks/same_results.py runs/before runs/after

Prints one line per metrics.jsonl (identical, or the first differing rows and keys) and exits 1 on any
difference. Used to show that a refactor changed no computation (the numbers are equal to the last digit).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

from instructgpt_jax import metrics, paths  # noqa: E402

TIMING = ("time_", "per_sec")  # wall-clock figures: they differ between any two runs


def _numbers(row: dict) -> dict:
  return {k: v for k, v in row.items() if not any(t in k for t in TIMING)}


def compare_rows(before: list[dict], after: list[dict]) -> list[str]:
  """The differences between two runs' metric rows, as short lines ([] when identical)."""
  if len(before) != len(after):
    return [f"{len(before)} rows before, {len(after)} after"]
  out = []
  for a, b in zip(before, after):
    a, b = _numbers(a), _numbers(b)
    for key in sorted(set(a) | set(b)):
      if a.get(key) != b.get(key):
        out.append(f"step {a.get('step', b.get('step'))} {key}: {a.get(key)} -> {b.get(key)}")
  return out


def run_folders(root: str) -> list[str]:
  """`root` itself when it holds metrics.jsonl, else its sub-folders that do (the lab's stages), by name."""
  if paths.path(root, "metrics.jsonl").exists():
    return [""]
  return sorted(p.name for p in paths.path(root).iterdir() if (p / "metrics.jsonl").exists())


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("before")
  parser.add_argument("after")
  args = parser.parse_args(argv)
  different = False
  for name in run_folders(args.before):
    diffs = compare_rows(
      metrics.read_rows(paths.join(args.before, name) if name else args.before),
      metrics.read_rows(paths.join(args.after, name) if name else args.after),
    )
    print(f"{name or '.'}/metrics.jsonl: " + ("identical" if not diffs else "; ".join(diffs[:5])))
    different |= bool(diffs)
  report = [paths.path(folder, "report.md") for folder in (args.before, args.after)]
  if report[0].exists():
    same = report[1].exists() and report[0].read_text() == report[1].read_text()
    print("report.md: " + ("identical" if same else "differs"))
    different |= not same
  return 1 if different else 0


if __name__ == "__main__":
  sys.exit(main())
