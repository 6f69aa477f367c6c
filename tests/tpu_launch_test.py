"""launch/tpu.py and launch/slurm.sbatch: the exact gcloud and srun command lines of dry runs, the checks made
before anything runs (accelerator names, main.py's config), the runtime version per generation, and the exit
status of a failing command through `| tee`."""

import os
import subprocess
import sys

import pytest

from instructgpt_jax import accelerators
from launch import tpu

ZONE = "us-central2-b"


def dry_run(capsys, *argv):
  assert tpu.main([argv[0], "--dry-run", *argv[1:]]) == 0
  return capsys.readouterr().out.splitlines()


def test_tpu_create_prints_the_gcloud_command(capsys):
  assert dry_run(capsys, "create", "--name=igpt", f"--zone={ZONE}", "--accelerator=v4-512", "--project=p1") == [
    "gcloud compute tpus tpu-vm create igpt --zone=us-central2-b --project=p1 --accelerator-type=v4-512 "
    "--version=tpu-ubuntu2204-base"
  ]
  assert dry_run(capsys, "create", "--name=igpt", f"--zone={ZONE}", "--accelerator=v5p-1024", "--queued", "--spot") == [
    "gcloud compute tpus queued-resources create igpt --node-id=igpt --zone=us-central2-b "
    "--accelerator-type=v5p-1024 --runtime-version=v2-alpha-tpuv5 --spot"
  ]


@pytest.mark.parametrize(
  "accelerator, gcloud_type, version",
  [  # https://cloud.google.com/tpu/docs/runtimes, "PyTorch and JAX"
    ("v4-8", "v4-8", "tpu-ubuntu2204-base"),
    ("v4-4096", "v4-4096", "tpu-ubuntu2204-base"),
    ("v5e-16", "v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5litepod-256", "v5litepod-256", "v2-alpha-tpuv5-lite"),
    ("v5p-256", "v5p-256", "v2-alpha-tpuv5"),
    ("v6e-8", "v6e-8", "v2-alpha-tpuv6e"),
  ],
)
def test_create_asks_for_each_generations_runtime_under_gclouds_name(capsys, accelerator, gcloud_type, version):
  (line,) = dry_run(capsys, "create", "--name=igpt", f"--zone={ZONE}", f"--accelerator={accelerator}")
  assert line.endswith(f"--accelerator-type={gcloud_type} --version={version}")
  assert accelerators.parse_slice(accelerator).generation.runtime == version
  (line,) = dry_run(capsys, "create", "--name=igpt", f"--zone={ZONE}", f"--accelerator={accelerator}", "--version=v")
  assert line.endswith(f"--accelerator-type={gcloud_type} --version=v")


@pytest.mark.parametrize(
  "accelerator, message",
  [
    ("v5p-1023", "v5p-1023: not a v5p slice; v5p-N takes N (TensorCores, 2 per chip) in 8, 16, 32, 64, 128, 256,"),
    ("v4-6", "v4-6: not a v4 slice; v4-N takes N (TensorCores, 2 per chip) in 8, 16, 32, 64, 128, 256, 384, 512,"),
    ("v6e-512", "v6e-512: not a v6e slice; v6e-N takes N (chips) in 1, 4, 8, 16, 32, 64, 128, 256"),
    ("foo", "foo: not a TPU slice; use v4-N or v5p-N (N = TensorCores, 2 per chip), v5e-N (or v5litepod-N) or v6e-N"),
    ("8xH100", "8xH100: not a TPU slice; use v4-N or v5p-N (N = TensorCores, 2 per chip), v5e-N"),
  ],
)
def test_create_refuses_a_slice_that_does_not_exist_in_one_line(capsys, accelerator, message):
  assert tpu.main(["create", "--dry-run", "--name=igpt", f"--zone={ZONE}", f"--accelerator={accelerator}"]) == 2
  out, err = capsys.readouterr()
  assert out == "" and err.count("\n") == 1 and err.startswith(f"error: {message}")
  assert tpu.main(["create", "--dry-run", "--name=igpt", f"--zone={ZONE}"]) == 2  # no accelerator: no default
  assert "create: --accelerator is required" in capsys.readouterr().err


def test_tpu_setup_copies_the_code_and_runs_the_worker_script_everywhere(capsys):
  assert dry_run(capsys, "setup", "--name=igpt", f"--zone={ZONE}") == [
    'bash -c \'set -o pipefail; echo "$(git rev-parse HEAD)$(git diff --quiet HEAD -- || echo -dirty)" > GIT_COMMIT '
    "&& { git ls-files -z; printf '\"'\"'GIT_COMMIT\\0'\"'\"'; } | tar --null -T - -czf /tmp/instructgpt_jax.tgz'",
    "gcloud compute tpus tpu-vm scp /tmp/instructgpt_jax.tgz igpt:/tmp/instructgpt_jax.tgz --zone=us-central2-b "
    "--worker=all",
    "gcloud compute tpus tpu-vm ssh igpt --zone=us-central2-b --worker=all '--command=mkdir -p ~/instructgpt_jax "
    "&& tar -xzf /tmp/instructgpt_jax.tgz -C ~/instructgpt_jax && bash ~/instructgpt_jax/launch/setup_worker.sh'",
  ]


def test_setup_names_the_untracked_files_it_leaves_behind_or_ships_them(capsys, tmp_path, monkeypatch):
  def git(*args):
    return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout

  git("init", "-q")
  (tmp_path / ".gitignore").write_text("runs/\n")
  (tmp_path / "tracked.py").write_text("")
  git("add", ".gitignore", "tracked.py")
  git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "new.py").write_text("")  # a new config not added to git yet
  (tmp_path / "runs").mkdir()
  (tmp_path / "runs" / "metrics.jsonl").write_text("")  # ignored: never listed, never shipped
  monkeypatch.chdir(tmp_path)
  assert tpu.untracked_files() == ["configs/new.py"]
  assert tpu.main(["setup", "--dry-run", "--name=igpt", f"--zone={ZONE}"]) == 0
  err = capsys.readouterr().err
  assert err == "setup: leaves 1 untracked files behind (not in git): configs/new.py; --include-untracked ships them\n"
  assert tpu.main(["setup", "--dry-run", "--name=igpt", f"--zone={ZONE}", "--include-untracked"]) == 0
  out, err = capsys.readouterr()
  assert err == "setup: ships 1 untracked files too: configs/new.py\n"
  listing = "git ls-files -z --cached --others --exclude-standard --exclude=GIT_COMMIT"
  pack = out.splitlines()[0]
  assert f"{listing}; printf" in pack and pack.endswith("| tar --null -T - -czf /tmp/instructgpt_jax.tgz'")
  # The packing command, run here: the archive holds the tracked and untracked files and the commit they came from.
  assert subprocess.run(tpu.setup_commands("igpt", ZONE, include_untracked=True)[0], cwd=tmp_path).returncode == 0
  head = git("rev-parse", "HEAD").strip()
  packed = subprocess.run(["tar", "-tzf", "/tmp/instructgpt_jax.tgz"], capture_output=True, text=True).stdout.split()
  assert sorted(packed) == [".gitignore", "GIT_COMMIT", "configs/new.py", "tracked.py"]
  assert (tmp_path / "GIT_COMMIT").read_text() == head + "\n"  # tracked files as committed: not dirty
  outside = tmp_path.parent / f"{tmp_path.name}_outside"  # not inside tmp_path's repository, nor any other
  outside.mkdir()
  monkeypatch.chdir(outside)
  assert tpu.main(["setup", "--dry-run", "--name=igpt", f"--zone={ZONE}"]) == 2
  assert capsys.readouterr().err == f"error: setup: {outside} is not a git checkout: setup ships the files git lists\n"
  assert sorted(git(*listing.split()[1:]).split("\0")[:-1]) == [".gitignore", "configs/new.py", "tracked.py"]


def test_tpu_run_starts_the_stage_on_all_workers_with_gcs_paths_passed_through(capsys):
  lines = dry_run(
    capsys,
    "run",
    "--name=igpt",
    f"--zone={ZONE}",
    "--",
    "--config=configs/sft.py:size=175b",
    "--workdir=gs://my-bucket/sft175b",
    "--config.mesh.fsdp=64",
    "--config.data.train=gs://my-bucket/demos/train*.jsonl",
  )
  assert lines == [
    "gcloud compute tpus tpu-vm ssh igpt --zone=us-central2-b --worker=all '--command=set -o pipefail; "
    "cd ~/instructgpt_jax && .venv/bin/python -m instructgpt_jax.main --config=configs/sft.py:size=175b "
    "--workdir=gs://my-bucket/sft175b --config.mesh.fsdp=64 "
    "'\"'\"'--config.data.train=gs://my-bucket/demos/train*.jsonl'\"'\"' --config.distributed.mode=auto "
    "2>&1 | tee -a ~/run.log'"
  ]


def test_run_checks_the_config_and_the_mesh_before_printing_anything(capsys):
  args = ["run", "--dry-run", "--name=igpt", f"--zone={ZONE}"]
  assert tpu.main([*args, "--", "--config=configs/sft.py:tiny", "--config.optim.lr=-1", "--workdir=w"]) == 2
  out, err = capsys.readouterr()
  assert out == "" and err == "error: optim.lr: -1.0 must be > 0\n"
  assert tpu.main([*args, "--", "--config=configs/sft.py:tiny", "--config.optim.lrr=1", "--workdir=w"]) == 2
  out, err = capsys.readouterr()
  assert out == "" and err.startswith("error: --config.optim.lrr: no such config field 'lrr'; did you mean")
  assert tpu.main([*args, "--", "--workdir=w"]) == 2
  assert "with one --config=<file>[:arg]" in capsys.readouterr().err
  assert tpu.main([*args, "--", "--config=configs/sft.py:tiny"]) == 2  # main.py would refuse it on every worker
  out, err = capsys.readouterr()
  assert (
    out == ""
    and err == "error: run: give main.py a --workdir=<dir> after -- (gs:// for a pod: every worker writes there)\n"
  )
  # v4-8 has 4 devices (one per chip): fsdp=8 cannot lay them out; fsdp=4 can.
  mesh = ["--config=configs/sft.py:tiny", "--workdir=w"]
  assert tpu.main([*args, "--accelerator=v4-8", "--", *mesh, "--config.mesh.fsdp=8"]) == 2
  out, err = capsys.readouterr()
  assert out == "" and err.startswith("error: mesh (") and err.endswith("of v4-8 (4 devices, one per chip)\n")
  assert "does not lay out 4 devices per slice" in err
  assert tpu.main([*args, "--accelerator=v4-8", "--", *mesh, "--config.mesh.fsdp=4"]) == 0
  assert len(capsys.readouterr().out.splitlines()) == 1


def test_run_exits_with_the_commands_status_through_tee(capsys, tmp_path):
  """--local runs the worker's own bash line here. main.py fails (its data file does not exist: exit 2) after the
  launcher's checks pass (they read no file); `| tee` alone would end the line with tee's 0, `set -o pipefail`
  keeps main.py's 2."""
  log = tmp_path / "run.log"
  missing = tmp_path / "no_such_demos.jsonl"
  main_args = ["--config=configs/sft.py:tiny", f"--workdir={tmp_path / 'run'}", f"--config.data.train={missing}"]
  argv = ["run", "--local", f"--log={log}", "--", *main_args]
  assert tpu.main([argv[0], "--dry-run", *argv[1:]]) == 0
  (line,) = capsys.readouterr().out.splitlines()
  assert line.startswith("bash -c 'set -o pipefail; cd ") and line.endswith(f"2>&1 | tee -a {log}'")
  assert "--config.distributed.mode" not in line  # one process: the distributed mode stays as configured
  assert tpu.main(argv) == 2
  assert "launch.tpu run: the command above exited with status 2" in capsys.readouterr().err
  assert f"error: {missing}: data.train: no file matches" in log.read_text()


def test_tpu_delete(capsys):
  assert dry_run(capsys, "delete", "--name=igpt", f"--zone={ZONE}") == [
    "gcloud compute tpus tpu-vm delete igpt --zone=us-central2-b --quiet"
  ]
  assert dry_run(capsys, "delete", "--name=igpt", f"--zone={ZONE}", "--queued") == [
    "gcloud compute tpus queued-resources delete igpt --zone=us-central2-b --force --quiet"
  ]


def test_slurm_script_checks_the_config_then_builds_the_srun_command(tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  py = sys.executable
  env = dict(os.environ, DRY_RUN="1", SLURM_SUBMIT_DIR="/unused", INSTRUCTGPT_JAX_DIR=repo, PYTHON=py)
  args = ["--config=configs/sft.py:size=6.7b", "--workdir=/shared/runs/sft6b", "--config.data.train=d/train*.jsonl"]
  out = subprocess.run(["bash", "launch/slurm.sbatch", *args], env=env, capture_output=True, text=True, check=True)
  assert out.stdout == (
    f"srun --kill-on-bad-exit=1 --chdir={repo} {py} -m "
    "instructgpt_jax.main --config=configs/sft.py:size=6.7b --workdir=/shared/runs/sft6b "
    "--config.data.train=d/train\\*.jsonl --config.distributed.mode=auto\n"
  )
  given = ["--config=configs/sft.py:tiny", "--workdir=/shared/runs/w", "--config.distributed.mode=off"]
  off = subprocess.run(["bash", "launch/slurm.sbatch", *given], env=env, capture_output=True, text=True, check=True)
  assert off.stdout.split()[-3:] == given  # a mode given is kept
  # A mistake stops the job before srun: one line, exit 2, no command.
  for mistake, message in (
    (["--config.data.batchsize=4"], "error: --config.data.batchsize: no such config field 'batchsize'; did you mean"),
    (["--config.optim.lr=abc"], "error: flag --config.optim.lr=abc: could not convert string to float"),
    (["--config.optim.lr=-1"], "error: optim.lr: -1.0 must be > 0"),
  ):
    bad = subprocess.run(["bash", "launch/slurm.sbatch", *args, *mistake], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == "", bad.stderr
    assert [line for line in bad.stderr.splitlines() if line.strip()] == [bad.stderr.strip()] and bad.stderr.startswith(
      message
    )
  bad = subprocess.run(
    ["bash", "launch/slurm.sbatch", "--config=configs/sft.py:tiny"], env=env, capture_output=True, text=True
  )
  assert (bad.returncode, bad.stdout, bad.stderr.strip()) == (
    2,
    "",
    "error: --workdir: required (where the run keeps its checkpoints and metrics)",
  )
  bad = subprocess.run(
    ["bash", "launch/slurm.sbatch", "--config=configs/sft.py:tinyy"], env=env, capture_output=True, text=True
  )
  assert (bad.returncode, bad.stdout, bad.stderr.strip()) == (
    2,
    "",
    "error: config arg 'tinyy': not one of ['size', 'tiny', 'variant']",
  )
