"""The commands the README, docs/scaling.md, docs/sweeps.md, docs/evaluation.md and launch/*.py's docstrings
show, as they write them, and how a test shrinks one to run it here.

Each constant below is one documented command, written exactly as the docs write it (continuation lines
joined). `documented()` reads them back out of the docs; tests/doc_examples_test.py holds the two sets equal
(a new example without a constant here, or a constant whose example changed, fails) and says which test runs
each one. A test runs an example through `shrink()`: its text with named substitutions (each must occur in the
command, so a doc edit cannot silently skip it) and flags appended (smaller sizes, fewer steps).
"""

from __future__ import annotations

import ast
import pathlib
import re
import shlex

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/scaling.md", "docs/sweeps.md", "docs/evaluation.md")
COMMAND_START = ("python ", "python3 ", ".venv/bin/python ", "/tmp/tpuvenv/bin/python ", "bash ", "sbatch ", "DRY_RUN=")
COMMAND_START += ("python3.11 ", "pip ")


def _commands(text: str) -> list[str]:
  """Command lines of a code block or a docstring: a line that starts like a command, its continuation lines
  joined, a trailing `# comment` dropped, runs of spaces made one."""
  out, lines, i = [], text.splitlines(), 0
  while i < len(lines):
    line = lines[i].strip()
    if line.startswith(COMMAND_START):
      while line.endswith("\\") and i + 1 < len(lines):
        i += 1
        line = line[:-1].rstrip() + " " + lines[i].strip()
      line = re.sub(r"\s+#\s.*$", "", line)  # a comment after the command
      out.append(" ".join(line.split()))
    i += 1
  return out


def documented() -> dict[str, list[str]]:
  """{command: [where it is shown]} for every command in the docs' code blocks and launch/*.py's docstrings."""
  found: dict[str, list[str]] = {}
  for name in DOCS:
    for block in re.findall(r"```[a-z]*\n(.*?)```", (ROOT / name).read_text(), flags=re.S):
      for command in _commands(block):
        found.setdefault(command, []).append(name)
  for path in sorted((ROOT / "launch").glob("*.py")):
    for command in _commands(ast.get_docstring(ast.parse(path.read_text())) or ""):
      found.setdefault(command, []).append(f"launch/{path.name}")
  return found


def everywhere() -> dict[str, list[str]]:
  """{command: [where]} over every doc and docstring: all of docs/*.md and the README, and the module
  docstrings of configs/, instructgpt_jax/, launch/ and benchmarks/ (a wider net than `documented()`)."""
  found: dict[str, list[str]] = {}
  for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
    for block in re.findall(r"```[a-z]*\n(.*?)```", path.read_text(), flags=re.S):
      for command in _commands(block):
        found.setdefault(command, []).append(str(path.relative_to(ROOT)))
  for folder in ("configs", "instructgpt_jax", "launch", "benchmarks"):
    for path in sorted((ROOT / folder).rglob("*.py")):
      for command in _commands(ast.get_docstring(ast.parse(path.read_text())) or ""):
        found.setdefault(command, []).append(str(path.relative_to(ROOT)))
  return found


def shrink(command: str, substitutions: dict[str, str] | None = None, extra: tuple[str, ...] = ()) -> str:
  """`command` with each key of `substitutions` (which must occur in it) replaced, and `extra` appended."""
  for old, new in (substitutions or {}).items():
    assert old in command, f"{old!r} is not in the documented command {command!r}: update the test"
    command = command.replace(old, new)
  return " ".join([command, *extra])


def argv(command: str) -> list[str]:
  return shlex.split(command)


def main_flags(command: str) -> tuple[str, list[str], str]:
  """(config arg, --config.* overrides, workdir) of a `python -m instructgpt_jax.main ...` command."""
  args = argv(command)
  args = args[args.index("instructgpt_jax.main") + 1 :]
  config = next(a.split("=", 1)[1] for a in args if a.startswith("--config="))
  workdir = next((a.split("=", 1)[1] for a in args if a.startswith("--workdir=")), "")
  return config, [a for a in args if a.startswith("--config.")], workdir


def run_main(command: str):
  """A `python -m instructgpt_jax.main` command run in this process: its config loaded and checked as main.py
  does (stages.load_checked), then stages.run. -> the stage's final metrics."""
  from instructgpt_jax import stages

  config_arg, overrides, workdir = main_flags(command)
  return stages.run(stages.load_checked(config_arg, overrides), workdir)


# ------------------------------------------------------------------------------------------ README.md

README_MAIN_JOB = (
  "python3 -m venv .venv && .venv/bin/pip install -q -c requirements-lock.txt -e . && .venv/bin/python -m "
  "instructgpt_jax.main --config=configs/pipeline.py --workdir=runs/lab"
)
README_TESTS = "bash tests/run.sh"
README_SFT = "python -m instructgpt_jax.main --config=configs/sft.py:tiny,variant=ppo_init --workdir=runs/sft"
README_RM = (
  "python -m instructgpt_jax.main --config=configs/rm.py:tiny --workdir=runs/rm --config.model.init_from=runs/sft"
)
README_PPO = (
  "python -m instructgpt_jax.main --config=configs/ppo.py:tiny --workdir=runs/ppo --config.model.init_from=runs/sft "
  "--config.ppo.reward_model=runs/rm/export"
)
README_TPU_RUN = (
  "python -m launch.tpu run --name=igpt --zone=us-central2-b -- --config=configs/sft.py:size=1.3b "
  "--workdir=gs://my-bucket/runs/sft --config.data.train='gs://my-bucket/data/demos-*.jsonl' "
  "--config.model.init_from=hf:gs://my-bucket/models/base"
)
README_SAMPLE = (
  'python -m instructgpt_jax.sample --init_from=hf:/path/to/SmolLM2-135M-Instruct --chat --prompt "What is the '
  'capital of France?" --max_new_tokens 32 --greedy'
)
README_RECIPE = (
  "python -m instructgpt_jax.main --workdir=runs/hh --config=configs/recipe.py:model=hf:/path/to/SmolLM2-360M,"
  "data=/data/hh-rlhf/harmless-base/train.jsonl.gz,ptx=/data/text/*.txt"
)
EVALUATE_RUN = (
  "python -m instructgpt_jax.evaluate --init_from=runs/ppo --tasks=hellaswag,truthfulqa_mc2 --out=runs/eval_ppo"
)
EVALUATE_HF = (
  "python -m instructgpt_jax.evaluate --init_from=hf:/path/to/SmolLM2-360M --tasks=my_tasks/local_mc.yaml "
  "--dtype=bfloat16 --fsdp=2 --out=runs/eval_start"
)
RECIPE_EVAL = README_RECIPE + ",eval_tasks=hellaswag+truthfulqa_mc2"  # docs/evaluation.md
README_EXPORT = "python -m instructgpt_jax.export --workdir=runs/hh/ppo --out=runs/hh-policy"
README_PRINT_CONFIG = "python -m instructgpt_jax.main --config=configs/ppo.py:size=1.3b --print_config"
README_AOT = (
  "python -m launch.aot --target=v5p-256 --config=configs/ppo.py:size=1.3b --config.model.scan_layers=true "
  "--config.model.remat=full"
)

# ------------------------------------------------------------------------------------------ docs/scaling.md

TPU_CREATE = "python -m launch.tpu create --name=igpt --zone=us-central2-b --accelerator=v4-512 [--queued] [--spot]"
TPU_SETUP = "python -m launch.tpu setup --name=igpt --zone=us-central2-b [--include-untracked]"
TPU_RUN = (
  "python -m launch.tpu run --name=igpt --zone=us-central2-b --accelerator=v4-512 -- --config=configs/sft.py:size=175b "
  "--workdir=gs://my-bucket/sft175b --config.data.train='gs://my-bucket/demos/train-*.jsonl' "
  "--config.model.init_from=hf:gs://my-bucket/models/base --config.mesh.fsdp=64 --config.mesh.tensor=4 "
  "--config.model.remat=full --config.model.scan_layers=true"
)
TPU_DELETE = "python -m launch.tpu delete --name=igpt --zone=us-central2-b"
SLURM_ARGS = (
  "--config=configs/sft.py:size=6.7b --workdir=/shared/runs/sft6b --config.data.train='/shared/data/demos-*.jsonl' "
  "--config.mesh.fsdp=64"
)
SLURM_SBATCH = f"sbatch --nodes=8 launch/slurm.sbatch {SLURM_ARGS}"
SLURM_DRY_RUN = f"DRY_RUN=1 bash launch/slurm.sbatch {SLURM_ARGS}"
PIP_TPU = 'pip install "jax[tpu]==0.10.2"'
AOT_SFT = (
  "python -m launch.aot --target=v4-512 --config=configs/sft.py:size=1.3b --config.mesh.fsdp=8 "
  "--config.model.scan_layers=true --config.model.remat=full"
)
AOT_PPO = (
  "python -m launch.aot --target=v5p-1024 --config=configs/ppo.py:size=175b --config.mesh.fsdp=64 "
  "--config.mesh.tensor=8 --config.model.remat=full --config.model.scan_layers=true"
)
TPU_VENV = (
  'python3.11 -m venv /tmp/tpuvenv && /tmp/tpuvenv/bin/pip install -c requirements-lock.txt "jax[tpu]==0.10.2" -e .'
)
AOT_REPORT_TPUVENV = "/tmp/tpuvenv/bin/python -m launch.aot --report"
COLLECTIVES_TPU = "/tmp/tpuvenv/bin/python benchmarks/collectives.py --rows tpu"
COLLECTIVES_CPU = "python benchmarks/collectives.py --rows cpu"

# ------------------------------------------------------------------------------------------ docs/sweeps.md

SWEEP_GRID = (
  "--grid=optim.lr=1e-3,3e-3 --grid=seed=0,1 --config.total_steps=20 --config.eval_every_steps=5 "
  "--config.log_every_steps=5 --config.progress_bar=false"
)
SWEEP_RUN = f"python -m launch.sweep --config=configs/pretrain.py:tiny --root=/tmp/sweep_lr --run {SWEEP_GRID}"
SWEEP_PRINT = f"python -m launch.sweep --config=configs/pretrain.py:tiny --root=/tmp/sweep_lr --print {SWEEP_GRID}"
SWEEP_PPO_PRINT = (
  "python -m launch.sweep --config=configs/ppo.py:tiny --root=/tmp/sweep_ppo --print "
  "--config.model.init_from=W_SFT --config.ppo.reward_model=W_RM/export"
)
SWEEP_TABLE = "python -m launch.sweep --root=/tmp/sweep_lr --table"
SWEEP_TABLE_SORTED = "python -m launch.sweep --root=/tmp/sweep_lr --table --sort=eval_loss --reduce=mean:3"
SWEEP_TABLE_CSV = "python -m launch.sweep --root=/tmp/sweep_lr --table --by_seed --format=csv"
SWEEP_BEST = "python -m launch.sweep --root=/tmp/sweep_lr --best=eval_loss"

# ------------------------------------------------------------------------------------------ launch/*.py

AOT_REPORT = "python -m launch.aot --report"
TPU_RUN_DOCSTRING = (
  "python -m launch.tpu run --name=igpt --zone=us-central2-b [--accelerator=v4-512] -- "
  "--config=configs/sft.py:size=175b --workdir=gs://my-bucket/sft175b --config.mesh.fsdp=64 "
  "--config.data.train='gs://my-bucket/demos/train-*.jsonl' --config.model.init_from=hf:gs://my-bucket/models/base"
)
TPU_RUN_LOCAL = "python -m launch.tpu run --local -- --config=configs/sft.py:tiny --workdir=/tmp/sft"
