"""Reading a compiled program's HLO text: how many bytes its collectives move per device (`collective_bytes`).

benchmarks/collectives.py compiles PPO's programs for a target (`aot.plan_for`) and passes `compiled.as_text()`
here.
"""

from __future__ import annotations

import math
import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4}
_DTYPE_BYTES.update({"s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1})
_COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\{$")
_COLLECTIVE = re.compile(r"= (.*?) (" + "|".join(COLLECTIVES) + r")(-start)?\(")
_CALLED = re.compile(r"(?:body|condition|calls|to_apply)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"(?:branch_computations|called_computations)=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _shape_bytes(shape: str, *, largest: bool) -> int:
  """Bytes of an HLO result shape ("f32[64,320]{1,0}" or a tuple of them); `largest`: its largest element only
  (an async start's tuple holds its operand, its result and small context values)."""
  sizes = [
    _DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
    for dtype, dims in re.findall(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]", shape)
  ]
  return max(sizes, default=0) if largest else sum(sizes)


def _trip_count(while_line: str, computations: dict[str, list[str]]) -> int | None:
  """A while loop's trip count: XLA:CPU writes it in the backend config; XLA:TPU does not, and a counted loop
  (a scan) is then recognized by its condition, `counter < constant N` and nothing else. None: unknown."""
  known = _TRIP_COUNT.search(while_line)
  if known:
    return int(known.group(1))
  condition = re.search(r"condition=%?([\w.\-]+)", while_line)
  lines = computations.get(condition.group(1), []) if condition else []
  root = next((line for line in lines if line.lstrip().startswith("ROOT ")), "")
  compare = re.search(r"compare\(%?([\w.\-]+), %?([\w.\-]+)\), direction=LT", root)
  if not compare:
    return None
  constants = dict(re.findall(r"%?([\w.\-]+) = s32\[\][^ ]* constant\((\d+)\)", "\n".join(lines)))
  return int(constants[compare.group(2)]) if compare.group(2) in constants else None


def collective_bytes(hlo_text: str) -> dict[str, dict[str, int]]:
  """Per-device bytes of the collectives in a compiled program (`compiled.as_text()`), by kind.

  {"once": {...}, "per_iteration": {...}}: the sum of each collective's per-device result size, "once" for
  those outside any loop of unknown trip count (a counted loop, such as a scan over layers, counts its
  collectives that many times: `_trip_count`), "per_iteration" for those in one iteration of such a loop (the
  sampler's decode loop: the bytes per decode step). A result size is what each device holds after the op:
  for an all-gather the gathered array, for an all-reduce the reduced one; the bytes that cross links are at
  most that.
  """
  computations, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = computations.setdefault(header.group(2), [])
      entry = header.group(2) if header.group(1) else entry
    elif line.startswith("}"):
      current = None
    elif current is not None:
      current.append(line)
  out = {"once": dict.fromkeys(COLLECTIVES, 0), "per_iteration": dict.fromkeys(COLLECTIVES, 0)}

  def walk(name, times, in_loop, depth=0):
    for line in computations.get(name, ()):
      op = _COLLECTIVE.search(line)
      if op:
        out["per_iteration" if in_loop else "once"][op.group(2)] += times * _shape_bytes(
          op.group(1), largest=bool(op.group(3))
        )
      called = _CALLED.findall(line) + [
        c.strip().lstrip("%") for group in _BRANCHES.findall(line) for c in group.split(",") if c.strip()
      ]
      if not called or depth > 64:
        continue
      looped = " while(" in line
      trip = _trip_count(line, computations) if looped else None
      for callee in called:
        walk(callee, times * (trip or 1), in_loop or (looped and not trip), depth + 1)

  walk(entry, 1, False)
  return out
