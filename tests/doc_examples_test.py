"""Every command the README, docs/scaling.md, docs/sweeps.md, docs/evaluation.md and launch/*.py's docstrings show is
run by a test, as written or shrunk to the tiny configs (tests/doc_examples.py): the ones that print or check run
here, the ones that train run where a fixture or an end-to-end test already trains (EXAMPLES names it), so that no
stage run is paid twice. The exceptions are the two install commands for libtpu (`pip install "jax[tpu]==0.10.2"`
into a venv): not run; tests/run.sh installs the same libtpu another way (into .cache/libtpu, apart from .venv),
which is what the TPU-slice tests use. Beyond these docs, every `instructgpt_jax.main` command in any doc or
docstring is checked, not run."""

import csv
import importlib.util
import io
import json
import os
import subprocess
import sys

import pytest

from launch import aot as aot_cli
from launch import sweep as sweep_cli
from launch import tpu

import doc_examples as d

# {documented command: the test that runs it}. A test elsewhere names the constant it runs (checked below).
EXAMPLES = {
  d.README_MAIN_JOB: "tests/lab_test.py::test_lab_quick_shows_each_finding_in_its_direction (:lab_quick)",
  d.README_TESTS: ".ci/run (tests/repo_test.py holds it to the README)",
  d.README_SFT: "tests/conftest.py::ppo_models",
  d.README_RM: "tests/conftest.py::ppo_models",
  d.README_PPO: "tests/ppo_test.py::short_ppo",
  d.README_TPU_RUN: "test_tpu_commands_print_their_gcloud_lines",
  d.README_SAMPLE: "test_the_readme_sample_command_answers_on_smollm2",
  d.README_RECIPE: "tests/recipe_test.py::test_recipe_smoke_on_smollm2_and_hh_rlhf (size=smoke)",
  d.README_EXPORT: "tests/recipe_test.py::test_recipe_smoke_on_smollm2_and_hh_rlhf",
  d.RECIPE_EVAL: "tests/recipe_test.py::test_recipe_smoke_on_smollm2_and_hh_rlhf (size=smoke, local tasks)",
  d.EVALUATE_RUN: "tests/lm_eval_test.py::test_the_documented_commands_run (a tiny model, local tasks)",
  d.EVALUATE_HF: "tests/lm_eval_test.py::test_the_documented_commands_run (a tiny model, local tasks)",
  d.README_PRINT_CONFIG: "test_print_config_prints_the_paper_size_config",
  d.README_AOT: "test_aot_examples_compile_for_their_tpu_slices",
  d.TPU_CREATE: "test_tpu_commands_print_their_gcloud_lines",
  d.TPU_SETUP: "test_tpu_commands_print_their_gcloud_lines",
  d.TPU_RUN: "test_tpu_commands_print_their_gcloud_lines",
  d.TPU_DELETE: "test_tpu_commands_print_their_gcloud_lines",
  d.TPU_RUN_DOCSTRING: "test_tpu_commands_print_their_gcloud_lines",
  d.TPU_RUN_LOCAL: "test_tpu_run_local_runs_the_worker_command_here",
  d.SLURM_SBATCH: "test_slurm_commands_check_the_config_and_print_srun",
  d.SLURM_DRY_RUN: "test_slurm_commands_check_the_config_and_print_srun",
  d.PIP_TPU: "install: not run (tests/run.sh installs libtpu 0.0.42.1, the version jax[tpu]==0.10.2 pins, apart)",
  d.TPU_VENV: "install: not run (tests/run.sh installs libtpu 0.0.42.1, the version jax[tpu]==0.10.2 pins, apart)",
  d.AOT_SFT: "test_aot_examples_compile_for_their_tpu_slices",
  d.AOT_PPO: "test_aot_examples_compile_for_their_tpu_slices",
  d.AOT_REPORT: "test_the_aot_report_and_the_collectives_benchmark",
  d.AOT_REPORT_TPUVENV: "test_the_aot_report_and_the_collectives_benchmark",
  d.COLLECTIVES_TPU: "test_the_aot_report_and_the_collectives_benchmark",
  d.COLLECTIVES_CPU: "test_the_aot_report_and_the_collectives_benchmark",
  d.SWEEP_RUN: "test_the_sweep_commands_run_print_rank_and_pool",
  d.SWEEP_PRINT: "test_the_sweep_commands_run_print_rank_and_pool",
  d.SWEEP_PPO_PRINT: "test_the_sweep_commands_run_print_rank_and_pool",
  d.SWEEP_TABLE: "test_the_sweep_commands_run_print_rank_and_pool",
  d.SWEEP_TABLE_SORTED: "test_the_sweep_commands_run_print_rank_and_pool",
  d.SWEEP_TABLE_CSV: "test_the_sweep_commands_run_print_rank_and_pool",
  d.SWEEP_BEST: "test_the_sweep_commands_run_print_rank_and_pool",
}


def test_every_documented_command_is_listed_and_run_by_a_test():
  found = d.documented()
  assert sorted(set(found) - set(EXAMPLES)) == [], "documented commands that no test runs: add them to EXAMPLES"
  assert sorted(set(EXAMPLES) - set(found)) == [], "EXAMPLES that the docs no longer show"
  names = {value: name for name, value in vars(d).items() if name.isupper() and isinstance(value, str)}
  this_file = open(__file__).read()
  for command, runner in EXAMPLES.items():
    where = runner.split(" ")[0]
    if where.startswith("tests/") and "::" in where:  # another test runs it: it names the constant
      source = open(os.path.join(d.ROOT, where.split("::")[0])).read()
      assert names[command] in source, (where, names[command])
    elif where == "install:":
      assert command.startswith(("pip install", "python3.11 -m venv")) and "jax[tpu]==0.10.2" in command, command
    elif not where.startswith(("tests/", ".ci/")):
      assert f"def {where}(" in this_file, where


def test_every_main_command_in_any_doc_passes_the_config_check():
  """Beyond the docs above, every `instructgpt_jax.main` command any doc or docstring shows is checked as main.py
  checks it first (stages.load_checked): a field, a value or a config argument that the code no longer takes
  fails here, though the command itself is not run."""
  from instructgpt_jax import stages

  checked = 0
  for command, where in d.everywhere().items():
    if "instructgpt_jax.main" not in command:
      continue
    config_arg, overrides, _ = d.main_flags(command.split(" && ")[-1])
    try:  # --print_config needs no inputs, as main.py has it
      stages.load_checked(config_arg, overrides, inputs="--print_config" not in command)
    except Exception as e:
      pytest.fail(f"{where}: {command}: {e}")
    checked += 1
  assert checked >= 20


def _variants(command: str) -> list[str]:
  """A command with `[--optional]` flags: without them, and with all of them."""
  bare = " ".join(word for word in command.split() if not word.startswith("["))
  full = command.replace("[", "").replace("]", "")
  return [bare] if bare == full else [bare, full]


def test_tpu_commands_print_their_gcloud_lines(capsys):
  """The launch.tpu examples as written, with --dry-run: each checks what it can (the accelerator, main.py's
  config, the mesh on the slice) and prints gcloud command lines."""
  for command in (d.TPU_CREATE, d.TPU_SETUP, d.TPU_RUN, d.TPU_DELETE, d.TPU_RUN_DOCSTRING, d.README_TPU_RUN):
    for variant in _variants(command):
      args = d.argv(variant)[3:]
      args.insert(args.index("--") if "--" in args else len(args), "--dry-run")
      assert tpu.main(args) == 0, variant
      lines = capsys.readouterr().out.splitlines()
      assert lines and all(line.startswith(("gcloud ", "bash -c ")) for line in lines), (variant, lines)
      if args[0] == "run":
        assert "instructgpt_jax.main" in lines[0] and "set -o pipefail" in lines[0]


def test_slurm_commands_check_the_config_and_print_srun(tmp_path):
  """`sbatch ... launch/slurm.sbatch ARGS` runs the script with ARGS; its dry run (DRY_RUN=1) checks the config
  and prints the srun line. Both examples run as dry runs here (no SLURM), from the repository."""
  env = dict(os.environ, INSTRUCTGPT_JAX_DIR=str(d.ROOT), PYTHON=sys.executable, DRY_RUN="1")
  for command in (d.SLURM_DRY_RUN, d.shrink(d.SLURM_SBATCH, {"sbatch --nodes=8 ": "bash "})):
    args = d.argv(command.removeprefix("DRY_RUN=1 "))
    out = subprocess.run(args, cwd=d.ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"srun --kill-on-bad-exit=1 --chdir={d.ROOT} {sys.executable} -m instructgpt_jax.main")
    assert "--config.data.train=/shared/data/demos-\\*.jsonl" in out.stdout


@pytest.mark.slow
def test_tpu_run_local_runs_the_worker_command_here(tmp_path):
  """`launch.tpu run --local` runs the worker's line in this checkout: here a 2-step SFT run."""
  command = d.shrink(d.TPU_RUN_LOCAL, {"/tmp/sft": str(tmp_path / "sft")}, ("--config.total_steps=2",))
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a worker's command has
  out = subprocess.run(
    [sys.executable, *d.argv(command)[1:], "--config.progress_bar=false"],
    cwd=d.ROOT,
    env=env,
    capture_output=True,
    text=True,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads((tmp_path / "sft" / "config.json").read_text())["total_steps"] == 2
  assert "final:" in out.stdout


@pytest.mark.slow
def test_aot_examples_compile_for_their_tpu_slices(capsys, tpu_compiler):
  """The two launch.aot examples, on their slices (v4-512, v5p-1024), with the tiny model instead of 1.3B / 175B
  (which take minutes to compile): the batch fallback, the plan's lines, a fit."""
  sft = d.shrink(d.AOT_SFT, {"size=1.3b": "tiny"})
  assert aot_cli.main(d.argv(sft)[3:]) == 0
  out = capsys.readouterr().out
  assert "batch raised: data.batch_size 16 -> 256" in out and "pass --config.data.batch_size=256" in out
  assert "mesh {'data': 32, 'fsdp': 8, 'tensor': 1}" in out and "=> fits" in out
  for command in (d.shrink(d.AOT_PPO, {"size=175b": "tiny"}), d.shrink(d.README_AOT, {"size=1.3b": "tiny"})):
    assert aot_cli.main([*d.argv(command)[3:], "--rm_size=tiny"]) == 0
    out = capsys.readouterr().out
    assert "rollout layout:" in out and "rollout:" in out and "train_step:" in out and "=> fits" in out


def test_print_config_prints_the_paper_size_config():
  out = subprocess.run([sys.executable, *d.argv(d.README_PRINT_CONFIG)[1:]], cwd=d.ROOT, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  config = json.loads(out.stdout)
  assert (config["model"]["n_layers"], config["model"]["d_model"], config["ppo"]["kl_coef"]) == (24, 2048, 0.02)


@pytest.mark.slow
def test_the_aot_report_and_the_collectives_benchmark(tpu_compiler, monkeypatch, capsys):
  """`launch.aot --report` (its first SFT and PPO rows at the tiny size) and benchmarks/collectives.py (--rows cpu
  with its tiny row; --rows tpu with one row, the tiny model on v4-8): both layouts' rollout and train step."""
  rows = [(target, config.split(":")[0] + ":tiny", flags) for target, config, flags in aot_cli.REPORT]
  monkeypatch.setattr(aot_cli, "REPORT", [rows[0], next(r for r in rows if "ppo" in r[1])])  # an SFT and a PPO row
  for command in (d.AOT_REPORT, d.AOT_REPORT_TPUVENV):
    assert aot_cli.main(d.argv(command)[3:] + ["--rm_size=tiny"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| v")]
    assert [line.split(" | ")[1] for line in table] == ["sft", "ppo", "ppo"], table  # PPO: rollout, train
  # The benchmark in this process (8 CPU devices, as its cpu rows ask); its TPU rows shrink to the first, tiny.
  spec = importlib.util.spec_from_file_location("collectives", d.ROOT / "benchmarks" / "collectives.py")
  collectives = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(collectives)
  # The TPU rows' paper sizes, shrunk to the tiny model on the smallest v4 slice (4 chips: data 2 × fsdp 2).
  small = ["--config.mesh.data=2", "--config.mesh.fsdp=2", *collectives.CPU_SMALL]
  monkeypatch.setitem(collectives.ROWS, "tpu", [("v4-8", "tiny", "tiny", small)])
  monkeypatch.setitem(collectives.ROWS, "cpu", collectives.ROWS["cpu"][:1])  # its tiny row
  for command in (d.COLLECTIVES_CPU, d.COLLECTIVES_TPU):
    monkeypatch.setattr(sys, "argv", d.argv(command)[1:])
    assert collectives.main() == 0
    table = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert table[0][:2] == ["| target", "size"] and [row[1] for row in table[1:]] == ["tiny"] * 4, table


@pytest.mark.slow
def test_the_readme_sample_command_answers_on_smollm2(smollm2_folder):
  command = d.shrink(d.README_SAMPLE, {"/path/to/SmolLM2-135M-Instruct": str(smollm2_folder)})
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  out = subprocess.run([sys.executable, *d.argv(command)[1:]], cwd=d.ROOT, env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Paris" in out.stdout  # ../shared/data/README.md: transformers' greedy answer names Paris


@pytest.mark.slow
def test_the_sweep_commands_run_print_rank_and_pool(tmp_path, capsys):
  """docs/sweeps.md's commands in order, on their own root: a 2 × 2 grid of 20-step tiny pretraining runs (two
  learning rates, two seeds), the commands it would print, then the tables of what is on disk."""
  root = {"/tmp/sweep_lr": str(tmp_path / "sweep_lr")}

  def run(command: str) -> str:
    assert sweep_cli.main(d.argv(d.shrink(command, root if "/tmp/sweep_lr" in command else None))[3:]) == 0
    return capsys.readouterr().out

  printed = run(d.SWEEP_PRINT).splitlines()
  assert len(printed) == 4 and all("--config.total_steps=20" in line for line in printed)
  ppo = run(d.shrink(d.SWEEP_PPO_PRINT, {"/tmp/sweep_ppo": str(tmp_path / "ppo")})).splitlines()
  assert [line.split("--workdir=")[1].split()[0].rsplit("/", 1)[1] for line in ppo] == [
    "ptx_coef=0.0+kl_coef=0.01",
    "ptx_coef=0.0+kl_coef=0.02",
    "ptx_coef=27.8+kl_coef=0.01",
    "ptx_coef=27.8+kl_coef=0.02",
  ]
  run(d.SWEEP_RUN)
  table = [line for line in run(d.SWEEP_TABLE).splitlines() if line.startswith("| ")]
  assert len(table) == 1 + 2  # the header, one pooled row per learning rate
  assert "| seeds |" in table[0] and table[1].startswith("| lr=0.001+seed=* |")
  sorted_table = [line for line in run(d.SWEEP_TABLE_SORTED).splitlines() if line.startswith("| ")]
  header = [c.strip() for c in sorted_table[0].strip("|").split("|")]
  ranked = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in sorted_table[1:]]
  means = [float(row["eval_loss (mean of last 3)"].split(" ")[0]) for row in ranked]
  assert len(means) == 2 and means == sorted(means)  # best (lowest) first
  by_seed = list(csv.DictReader(io.StringIO(run(d.SWEEP_TABLE_CSV))))
  assert sorted(row["run"] for row in by_seed) == sorted(
    f"lr={lr}+seed={seed}" for lr in ("0.001", "0.003") for seed in (0, 1)
  )
  best = run(d.SWEEP_BEST).splitlines()
  assert len(best) == 2 and best[0].split("\t")[0] == ranked[0]["run"].replace("*", "0")
