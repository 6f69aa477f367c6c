"""Our lm-eval backend (library/lm_eval_model.JaxLM) against lm-eval's own HuggingFace backend (`--model hf`,
torch) on one mixed set of requests from real text, on the CPU (or a GPU: --ref_device cuda beside a jax with
CUDA): requests/s per request type, side by side, and how far the two sides' answers are apart.

The requests (`build_requests`; SmolLM2's tokenizer measures them), made from ../shared/data:
  loglikelihood          `contexts` multiple-choice questions × `choices` continuations: Shakespeare speeches cut
                         after 3-12 words (the true next 1-4 words against other speeches' words; every third
                         context ends in its space, which lm-eval moves to the continuation), two with an empty
                         context (the prefix token), two longer than the window (the context is cut), and
                         single-turn HH-RLHF dialogues up to "Assistant:" with the first 12 words of their
                         chosen and rejected replies and of two replies to other dialogues
  loglikelihood_rolling  `documents` documents of ~200-530 tokens (whole Shakespeare speeches; every fourth an
                         HH-RLHF dialogue): 2-5 windows each at the window of 128 tokens
  generate_until         `prompts` greedy prompts of `max_gen_toks` new tokens: a Shakespeare speech and the next
                         speaker's name (stop at a blank line) and HH-RLHF first questions (stop at
                         "\\n\\nHuman:"; the HF backend batches the two stop sets apart, ours together)

Both sides get the same window (`--max_length`, 128 by default, so that rolling windows stay cheap) and run
every request type `--passes` times in one run (ours in this python on one device: on the CPU, XLA
on all cores; the reference in the reference venv, benchmarks/lm_eval_reference.py, torch on `--threads`
threads, on `--ref_device`). `--requests FILE` reads the request set (the JSON `build_requests` returns)
instead of building it; `--only ours` runs our side alone and writes its answers to `--json_out`
(tests/lm_eval_parity_test.py runs it so, to share the compilation cache with its other commands).
The sides alternate `--rounds` times (the reference first in every other round), so that a shared machine's
load falls on both alike. The table's times are medians over the rounds of the fastest pass after the first
(the steady state); the "first pass" includes, on our side, the compilation of each shape (every round: a
fresh JaxLM, unless JAX_COMPILATION_CACHE_DIR names a cache that an earlier run filled).
Generated tokens/s count the tokens of the returned texts (after the stop string), the same count for both.

    python benchmarks/lm_eval_speed.py --hf ~/.cache/smollm2/hf --batch_size 16 --float64_check     # RESULTS.md
    python benchmarks/lm_eval_speed.py --hf FOLDER --contexts 3 --documents 1 --prompts 1 \
        --passes 1 --rounds 1                                                                        # the test's
The folder: `bash ../shared/tools/smollm2.sh hf` prints it. The reference's python: --ref_python, else
$INSTRUCTGPT_JAX_REF_PYTHON, else .cache/venv-ref/bin/python.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

from benchmarks import _common, side_by_side  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_DATA = os.path.join(side_by_side.REPO_ROOT, os.pardir, "shared", "data")
REQUEST_TYPES = ("loglikelihood", "loglikelihood_rolling", "generate_until")


# ---------------------------------------------------------------- the requests


def _speeches(text: str) -> list[tuple[str, str]]:
  """(speaker, speech) of the Shakespeare corpus, speeches of at least 25 words."""
  out = []
  for block in text.split("\n\n"):
    speaker, _, speech = block.partition(":\n")
    if speech and "\n" not in speaker and len(speech.split()) >= 25:
      out.append((speaker, speech))
  return out


def _dialogues(path: str, n: int) -> list[dict]:
  """The first `n` HH-RLHF pairs whose chosen and rejected last replies differ; "single": one Human turn."""
  out = []
  with gzip.open(path, "rt") as f:
    for line in f:
      record = json.loads(line)
      head, _, chosen = record["chosen"].rpartition("\n\nAssistant:")
      _, _, rejected = record["rejected"].rpartition("\n\nAssistant:")
      if chosen.split() and rejected.split() and chosen.split()[:12] != rejected.split()[:12]:
        context = head + "\n\nAssistant:"
        single = context.count("\n\nHuman:") == 1
        out.append({"dialogue": record["chosen"], "context": context, "replies": (chosen, rejected), "single": single})
      if len(out) == n:
        break
  return out


def _words(text: str, n: int) -> str:
  """The first `n` words of `text` with a leading space (a reply as a continuation)."""
  return " " + " ".join(text.split()[:n])


def build_requests(
  tokenizer,
  data_dir: str = SHARED_DATA,
  *,
  contexts: int = 40,
  choices: int = 4,
  documents: int = 8,
  prompts: int = 32,
  max_gen_toks: int = 24,
  seed: int = 0,
) -> dict:
  """The mixed request set: {"loglikelihood": [[context, continuation]] (`contexts` groups of `choices`,
  the first of each group the true one), "loglikelihood_rolling": [[text]], "generate_until": [[context,
  {"until", "max_gen_toks"}]], "choices": choices}. `tokenizer` (ours) measures the documents."""
  rng = random.Random(seed)
  with open(os.path.join(data_dir, "tinyshakespeare.txt")) as f:
    text = f.read()
  speeches = _speeches(text)
  n_dialogues = max(1, contexts // 6)
  dialogues = _dialogues(os.path.join(data_dir, "hh_rlhf_harmless_base_test.jsonl.gz"), 4 * n_dialogues + prompts)
  single_turn = [d for d in dialogues if d["single"]][:n_dialogues]  # short contexts: the questions

  def cut(speaker: str, speech: str, words: int, trailing_space: bool, n_next: int) -> tuple[str, str, str]:
    """(context, true continuation, the context's remaining words) of a speech cut after `words` words."""
    spaces = [m.start() for m in re.finditer(r" ", speech)]
    at = spaces[min(words, len(spaces) - n_next - 1)]
    end = spaces[spaces.index(at) + n_next] if spaces.index(at) + n_next < len(spaces) else len(speech)
    context = f"{speaker}:\n{speech[:at]}"
    continuation = speech[at:end]
    if trailing_space:
      context, continuation = context + " ", continuation[1:]
    return context, continuation, speech[end:]

  loglikelihood = []
  n_shakespeare = contexts - n_dialogues
  for i in range(n_shakespeare):
    speaker, speech = speeches[rng.randrange(len(speeches))]
    n_next = rng.randint(1, 4)
    trailing_space = i % 3 == 2
    context, true, _ = cut(speaker, speech, rng.randint(3, 12), trailing_space, n_next)
    if i < 2 and n_shakespeare > 4:  # an empty context: each continuation is scored from the prefix token
      context, true = "", speech.split("\n")[0]
    elif i in (2, 3) and n_shakespeare > 4:  # longer than the 128-token window: the context is cut
      first = rng.randrange(len(speeches) - 8)
      before = "\n\n".join(f"{s}:\n{t}" for s, t in speeches[first : first + 8])[-700:]  # ~160 tokens
      context = f"{before}\n\n{context}"
    group = [true]
    while len(group) < choices:
      other_speaker, other = speeches[rng.randrange(len(speeches))]
      distractor = cut(other_speaker, other, rng.randint(3, 15), trailing_space, n_next)[1]
      if context == "":
        distractor = other.split("\n")[0]
      if distractor not in group:
        group.append(distractor)
    loglikelihood += [[context, c] for c in group]
  for k, d in enumerate(single_turn):
    others = [dialogues[(k + j) % len(dialogues)]["replies"][0] for j in range(1, len(dialogues))]
    replies = [*d["replies"], *others][:choices]
    loglikelihood += [[d["context"], _words(r, 12)] for r in replies]

  rolling, start = [], 0
  for k in range(documents):
    want = rng.randint(200, 500)
    if k % 4 == 3:  # a dialogue, cut to its first `want` tokens
      ids = tokenizer.encode(dialogues[k % len(dialogues)]["dialogue"] * 3)
      rolling.append([tokenizer.decode(ids[:want])])
      continue
    document = ""
    while len(tokenizer.encode(document)) < want:
      speaker, speech = speeches[start % len(speeches)]
      document += f"{speaker}:\n{speech}\n\n"
      start += 1
    rolling.append([document])

  generate = []
  for k in range(prompts):
    if k % 2 == 0:
      i = rng.randrange(len(speeches) - 1)
      (speaker, speech), (next_speaker, _) = speeches[i], speeches[i + 1]
      context = f"{speaker}:\n{speech}\n\n{next_speaker}:\n"
      generate.append([context, {"until": ["\n\n"], "max_gen_toks": max_gen_toks, "do_sample": False}])
    else:
      first_turn = dialogues[-1 - k // 2]["dialogue"].split("\n\nAssistant:")[0]
      generate.append(
        [first_turn + "\n\nAssistant:", {"until": ["\n\nHuman:"], "max_gen_toks": max_gen_toks, "do_sample": False}]
      )
  return {
    "loglikelihood": loglikelihood,
    "loglikelihood_rolling": rolling,
    "generate_until": generate,
    "choices": choices,
  }


def count(requests: dict) -> int:
  return sum(len(requests.get(t, [])) for t in REQUEST_TYPES)


# ---------------------------------------------------------------- the two sides


def run_ours(
  folder: str, requests: dict, *, dtype: str, max_length: int, batch_size: int, passes: int = 1, devices=None
) -> dict:
  """Ours on the requests, every type `passes` times: {type: the last pass's results, type_s: [seconds per
  pass], "load_s", "compiled": the shapes compiled}."""
  from lm_eval.api.instance import Instance

  from instructgpt_jax.library import lm_eval_model

  start = time.perf_counter()
  lm = lm_eval_model.JaxLM(f"hf:{folder}", dtype=dtype, max_length=max_length, batch_size=batch_size, devices=devices)
  out = {"load_s": time.perf_counter() - start, "batch_size": lm.batch_size, "dtype": dtype, "max_length": max_length}
  for request_type in REQUEST_TYPES:
    if not requests.get(request_type):
      continue
    seconds = []
    for _ in range(passes):
      instances = [Instance(request_type, {}, tuple(a), i) for i, a in enumerate(requests[request_type])]
      start = time.perf_counter()
      results = getattr(lm, request_type)(instances)
      seconds.append(time.perf_counter() - start)
    out[request_type] = [list(r) if isinstance(r, tuple) else r for r in results]
    out[f"{request_type}_s"] = seconds
  out["compiled"] = sorted(map(list, lm.compiled))
  out["truncated"] = lm.truncated // passes  # per pass: every pass counts its own
  return out


def run_reference(
  folder: str,
  requests: dict,
  *,
  dtype: str,
  max_length: int,
  batch_size: int,
  passes: int = 1,
  threads: int = 2,
  ref_python: str = "",
  device: str = "cpu",
) -> dict:
  """lm-eval's HF backend on the same requests, in the reference venv (benchmarks/lm_eval_reference.py)."""
  with tempfile.TemporaryDirectory() as tmp:
    spec, out = os.path.join(tmp, "requests.json"), os.path.join(tmp, "out.json")
    with open(spec, "w") as f:
      json.dump(requests, f)
    command = [side_by_side.reference_python(ref_python), os.path.join(HERE, "lm_eval_reference.py"), "requests"]
    command += ["--pretrained", folder, "--requests", spec, "--out", out, "--dtype", dtype]
    command += ["--max_length", str(max_length), "--batch_size", str(batch_size), "--passes", str(passes)]
    command += ["--threads", str(threads), "--device", device]
    done = subprocess.run(command, capture_output=True, text=True, env=side_by_side.child_env())
    if done.returncode:
      raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    with open(out) as f:
      return json.load(f)


# ---------------------------------------------------------------- how far apart


def compare(ours: dict, reference: dict, choices: int) -> dict:
  """Parity figures: the largest |Δ| of the log-likelihoods and of the rolling sums, the is_greedy and
  generation mismatches (with the first mismatch of each), and how often the argmax over each
  multiple-choice group agrees."""
  out = {}
  if "loglikelihood" in ours:
    a, b = ours["loglikelihood"], reference["loglikelihood"]
    deltas = [abs(x[0] - y[0]) for x, y in zip(a, b)]
    out["loglikelihood_max_abs_diff"] = max(deltas)
    out["loglikelihood_worst"] = int(max(range(len(deltas)), key=deltas.__getitem__))
    out["is_greedy_mismatches"] = [i for i, (x, y) in enumerate(zip(a, b)) if bool(x[1]) != bool(y[1])]
    groups = range(0, len(a) - len(a) % choices, choices)
    argmax = lambda rows, g: max(range(choices), key=lambda j: rows[g + j][0])
    out["mc_argmax_agreement"] = sum(argmax(a, g) == argmax(b, g) for g in groups) / max(1, len(groups))
    out["mc_groups"] = len(groups)
  if "loglikelihood_rolling" in ours:
    a, b = ours["loglikelihood_rolling"], reference["loglikelihood_rolling"]
    out["rolling_max_abs_diff"] = max(abs(x - y) for x, y in zip(a, b))
    out["rolling_max_rel_diff"] = max(abs(x - y) / abs(y) for x, y in zip(a, b))
  if "generate_until" in ours:
    a, b = ours["generate_until"], reference["generate_until"]
    out["generation_mismatches"] = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
  return out


# ---------------------------------------------------------------- the table


def generated_tokens(tokenizer, texts: list[str]) -> int:
  return sum(len(tokenizer.encode(t)) for t in texts)


def steady_s(seconds: list[float]) -> float:
  """A request type's time in one run: the fastest pass after the first (the first compiles), or the only one."""
  return min(seconds[1:]) if len(seconds) > 1 else seconds[0]


def speed_rows(requests: dict, ours: list[dict], reference: list[dict], tokenizer) -> list[dict]:
  """The table: per request type, each side's median over its runs (rounds) of the steady time, and of the
  first pass's."""
  rows, total = [], {"ours": [0.0, 0.0], "HF": [0.0, 0.0]}
  for request_type in REQUEST_TYPES:
    if not requests.get(request_type):
      continue
    n = len(requests[request_type])
    row = {"request type": request_type, "requests": str(n)}
    if request_type == "loglikelihood_rolling":
      windows = sum(-(-len(tokenizer.encode(t)) // ours[0]["max_length"]) for (t,) in requests[request_type])
      row["requests"] += f" ({windows} windows)"
    tokens = generated_tokens(tokenizer, ours[0]["generate_until"]) if request_type == "generate_until" else 0
    steady = {}
    for side, runs in (("ours", ours), ("HF", reference)):
      steady[side] = statistics.median(steady_s(r[f"{request_type}_s"]) for r in runs)
      first = statistics.median(r[f"{request_type}_s"][0] for r in runs)
      total[side][0] += steady[side]
      total[side][1] += first
      row[f"{side} req/s"] = f"{n / steady[side]:.2f}"
      row[f"{side} tok/s"] = f"{tokens / steady[side]:.1f}" if tokens else ""
      row[f"{side} s (first pass)"] = f"{steady[side]:.2f} ({first:.2f})"
    row["ours / HF"] = f"{steady['HF'] / steady['ours']:.2f}x"
    rows.append(row)
  row = {"request type": "all", "requests": str(count(requests))}
  for side in ("ours", "HF"):
    row[f"{side} req/s"] = f"{count(requests) / total[side][0]:.2f}"
    row[f"{side} tok/s"] = ""
    row[f"{side} s (first pass)"] = f"{total[side][0]:.2f} ({total[side][1]:.2f})"
  row["ours / HF"] = f"{total['HF'][0] / total['ours'][0]:.2f}x"
  return rows + [row]


def against_truth(results: dict, truth: dict) -> str:
  """The largest |Δ| of a side's scores from the same scores in float64 (the HF backend's float64 run)."""
  parts = []
  for request_type in ("loglikelihood", "loglikelihood_rolling"):
    if request_type in results and request_type in truth:
      value = (lambda r: r[0]) if request_type == "loglikelihood" else (lambda r: r)
      deltas = [value(a) - value(b) for a, b in zip(results[request_type], truth[request_type])]
      parts.append(f"{request_type} max |Δ| {max(map(abs, deltas)):.2e} (mean Δ {sum(deltas) / len(deltas):+.1e})")
  return "; ".join(parts)


def parity_lines(figures: dict) -> list[str]:
  lines = []
  if "loglikelihood_max_abs_diff" in figures:
    lines.append(
      f"PARITY loglikelihood: max |Δ| {figures['loglikelihood_max_abs_diff']:.2e} (request "
      f"{figures['loglikelihood_worst']}); is_greedy mismatches {len(figures['is_greedy_mismatches'])}; "
      f"multiple-choice argmax agreement {figures['mc_argmax_agreement']:.1%} of {figures['mc_groups']}"
    )
  if "rolling_max_abs_diff" in figures:
    lines.append(
      f"PARITY loglikelihood_rolling: max |Δ| {figures['rolling_max_abs_diff']:.2e} "
      f"(relative {figures['rolling_max_rel_diff']:.1e})"
    )
  if "generation_mismatches" in figures:
    lines.append(f"PARITY generate_until: mismatches {len(figures['generation_mismatches'])}")
  return lines


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--hf", required=True, help="the HuggingFace model folder (SmolLM2: ../shared/tools/smollm2.sh hf)")
  p.add_argument("--data", default=SHARED_DATA, help="the folder of tinyshakespeare.txt and the HH-RLHF test file")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--max_length", type=int, default=128, help="the window, both sides")
  p.add_argument("--batch_size", type=int, default=16, help="ours: rows per compiled call")
  p.add_argument("--ref_batch_size", type=int, default=0, help="the HF backend's batch (default: --batch_size)")
  p.add_argument("--contexts", type=int, default=40, help="multiple-choice questions")
  p.add_argument("--choices", type=int, default=4)
  p.add_argument("--documents", type=int, default=8, help="rolling-perplexity documents")
  p.add_argument("--prompts", type=int, default=32, help="generation prompts")
  p.add_argument("--max_gen_toks", type=int, default=24)
  p.add_argument("--passes", type=int, default=2, help="runs of every request type per round (the first compiles)")
  p.add_argument("--rounds", type=int, default=2, help="runs of both sides, alternating; the table takes medians")
  p.add_argument("--threads", type=int, default=2, help="torch threads")
  p.add_argument("--ref_python", default="")
  p.add_argument("--ref_device", default="cpu", help="the HF backend's torch device (cpu, cuda)")
  p.add_argument("--requests", default="", help="read the request set from this JSON instead of building it")
  p.add_argument("--only", choices=("ours",), default=None, help="run our side alone; its answers to --json_out")
  p.add_argument("--json_out", default="", help="also write both sides' answers and timings here")
  p.add_argument(
    "--float64_check",
    action="store_true",
    help="also score the scoring requests with the HF backend in float64 and print each side's distance from it",
  )
  return p


def main(argv=None):
  args = parser().parse_args(argv)
  import jax

  from instructgpt_jax.data import tokenizer as tokenizer_lib

  tokenizer = tokenizer_lib.load(args.hf)
  if args.requests:
    with open(args.requests) as f:
      requests = json.load(f)
  else:
    requests = build_requests(
      tokenizer,
      args.data,
      contexts=args.contexts,
      choices=args.choices,
      documents=args.documents,
      prompts=args.prompts,
      max_gen_toks=args.max_gen_toks,
    )
  sizes = dict(dtype=args.dtype, max_length=args.max_length, passes=args.passes)
  if args.only == "ours":
    if not args.json_out:
      raise SystemExit("lm_eval_speed: --only ours writes its answers to --json_out; give one")
    ours = run_ours(args.hf, requests, batch_size=args.batch_size, devices=jax.devices()[:1], **sizes)
    with open(args.json_out, "w") as f:
      json.dump(ours, f)
    return
  before = _common.load_average()
  ours_runs, reference_runs = [], []
  for round_index in range(args.rounds):  # the sides alternate, so that a shared machine's load falls on both
    sides = ["reference", "ours"] if round_index % 2 == 0 else ["ours", "reference"]
    for side in sides:
      if side == "reference":
        reference_runs.append(
          run_reference(
            args.hf,
            requests,
            batch_size=args.ref_batch_size or args.batch_size,
            threads=args.threads,
            ref_python=args.ref_python,
            device=args.ref_device,
            **sizes,
          )
        )
      else:
        ours_runs.append(run_ours(args.hf, requests, batch_size=args.batch_size, devices=jax.devices()[:1], **sizes))
      print(f"# round {round_index + 1} {side} done: {_common.load_average()}", file=sys.stderr)
  ours, reference = ours_runs[-1], reference_runs[-1]
  truth = {}
  if args.float64_check:
    scoring = {t: requests[t] for t in ("loglikelihood", "loglikelihood_rolling")}
    truth = run_reference(
      args.hf,
      scoring,
      dtype="float64",
      max_length=args.max_length,
      batch_size=args.ref_batch_size or args.batch_size,
      threads=args.threads,
      ref_python=args.ref_python,
      device=args.ref_device,
    )
  figures = compare(ours, reference, args.choices)
  if args.json_out:
    with open(args.json_out, "w") as f:
      everything = {"requests": requests, "parity": figures, "float64": truth}
      json.dump(everything | {"ours": ours_runs, "reference": reference_runs}, f)
  print(_common.header(f"{args.dtype}, window {args.max_length}"))
  print(f"# before: {before}; after: {_common.load_average()}")
  print(
    f"# ours: batch {ours['batch_size']}, load {ours['load_s']:.1f} s, {len(ours['compiled'])} shapes compiled, "
    f"{ours['truncated']} requests cut to the window; HF: lm-eval {reference['lm_eval']}, torch {reference['torch']} "
    f"on {reference['threads']} threads ({reference['device']}), batch {reference['batch_size']}"
  )
  print(_common.table(speed_rows(requests, ours_runs, reference_runs, tokenizer)))
  print("\n".join(parity_lines(figures)))
  if truth:
    for side, result in (("ours", ours), ("HF", reference)):
      print(f"FLOAT64 {side} {args.dtype} against the HF backend in float64: {against_truth(result, truth)}")


if __name__ == "__main__":
  main()
