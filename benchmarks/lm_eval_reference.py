"""lm-evaluation-harness's own HuggingFace backend (`lm_eval.models.huggingface.HFLM`, `--model hf`) on the same
requests or tasks as ours: the reference side of benchmarks/lm_eval_speed.py and tests/lm_eval_parity_test.py.
Run with the reference venv's python (torch, transformers, lm-eval[hf] of requirements-ref.txt), never imported
by the package.

  lm_eval_reference.py requests --pretrained FOLDER --requests REQUESTS.json --out OUT.json \
      [--dtype float32] [--max_length 128] [--batch_size 16] [--passes 1] [--threads 2] [--device cpu]
  lm_eval_reference.py tasks --pretrained FOLDER --tasks A.yaml,B.yaml --out RESULTS.json [--dtype] [--batch_size]

REQUESTS.json: {"loglikelihood": [[context, continuation], ...], "loglikelihood_rolling": [[text], ...],
"generate_until": [[context, {"until": [...], "max_gen_toks": n}], ...]} (any of the three). Each is wrapped as
the harness wraps a task's requests (`lm_eval.api.instance.Instance`, arguments a tuple) and handed to the
backend's method of that name, all requests of a type in one call, `--passes` times. OUT.json: per type the
last pass's results and the wall seconds of each pass (the calls only: loading the model is not timed), with
the versions. `tasks` runs whole task YAMLs through `lm_eval.simple_evaluate(model="hf", ...)` (their folders as
include_path) and writes the harness's results JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time

REQUEST_TYPES = ("loglikelihood", "loglikelihood_rolling", "generate_until")


def as_instances(request_type: str, arguments: list) -> list:
  """The requests as the harness builds them: one Instance each, its arguments a tuple."""
  from lm_eval.api.instance import Instance

  return [Instance(request_type, {}, tuple(a), i, metadata=("parity", i, 1)) for i, a in enumerate(arguments)]


def model_args(args) -> dict:
  out = {"pretrained": args.pretrained, "dtype": args.dtype, "batch_size": args.batch_size, "device": args.device}
  if args.max_length:
    out["max_length"] = args.max_length
  return out


def run_requests(args) -> dict:
  import lm_eval
  import torch
  import transformers
  from lm_eval.models.huggingface import HFLM

  with open(args.requests) as f:
    requests = json.load(f)
  lm = HFLM(**model_args(args))
  out = {
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "lm_eval": lm_eval.__version__,
    "threads": torch.get_num_threads(),
    "dtype": args.dtype,
    "max_length": lm.max_length,
    "batch_size": args.batch_size,
    "device": args.device,
  }
  for request_type in REQUEST_TYPES:
    if not requests.get(request_type):
      continue
    seconds = []
    for _ in range(args.passes):
      instances = as_instances(request_type, requests[request_type])
      start = time.perf_counter()
      results = getattr(lm, request_type)(instances, disable_tqdm=True)
      if args.device.startswith("cuda"):
        torch.cuda.synchronize()
      seconds.append(time.perf_counter() - start)
    out[request_type] = [list(r) if isinstance(r, tuple) else r for r in results]
    out[f"{request_type}_s"] = seconds
  return out


def run_tasks(args) -> dict:
  import lm_eval
  import yaml
  from lm_eval.tasks import TaskManager

  names, folders = [], []
  for path in filter(None, (p.strip() for p in args.tasks.split(","))):
    with open(path) as f:
      names.append(yaml.safe_load(f)["task"])
    folders.append(os.path.dirname(os.path.abspath(path)))
  results = lm_eval.simple_evaluate(
    model="hf",
    model_args=model_args(args),
    tasks=names,
    task_manager=TaskManager(include_path=sorted(set(folders))),
    log_samples=False,
  )
  return results


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("mode", choices=("requests", "tasks"))
  p.add_argument("--pretrained", required=True, help="a HuggingFace model folder")
  p.add_argument("--requests", help="requests mode: the requests JSON")
  p.add_argument("--tasks", help="tasks mode: task YAML paths, comma-separated")
  p.add_argument("--out", required=True, help="the JSON to write")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--max_length", type=int, default=None, help="the window (default: the model's)")
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--passes", type=int, default=1, help="requests mode: run every request type this many times")
  p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
  p.add_argument("--device", default="cpu", help="torch's device: cpu, cuda")
  args = p.parse_args(argv)
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  if args.threads:
    import torch

    torch.set_num_threads(args.threads)
  if args.mode == "requests":
    out = run_requests(args)
  else:
    from lm_eval.utils import handle_non_serializable

    out = json.loads(json.dumps(run_tasks(args), default=handle_non_serializable))
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
