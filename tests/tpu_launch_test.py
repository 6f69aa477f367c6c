"""launch/tpu.py and launch/slurm.sbatch: the exact gcloud and srun command lines of dry runs."""

import os
import subprocess
import sys

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
    "--accelerator-type=v5p-1024 --runtime-version=tpu-ubuntu2204-base --spot"
  ]


def test_tpu_setup_copies_the_code_and_runs_the_worker_script_everywhere(capsys):
  assert dry_run(capsys, "setup", "--name=igpt", f"--zone={ZONE}") == [
    "bash -c 'git ls-files -z | tar --null -T - -czf /tmp/instructgpt_jax.tgz'",
    "gcloud compute tpus tpu-vm scp /tmp/instructgpt_jax.tgz igpt:/tmp/instructgpt_jax.tgz --zone=us-central2-b "
    "--worker=all",
    "gcloud compute tpus tpu-vm ssh igpt --zone=us-central2-b --worker=all '--command=mkdir -p ~/instructgpt_jax "
    "&& tar -xzf /tmp/instructgpt_jax.tgz -C ~/instructgpt_jax && bash ~/instructgpt_jax/launch/setup_worker.sh'",
  ]


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
    "gcloud compute tpus tpu-vm ssh igpt --zone=us-central2-b --worker=all '--command=cd ~/instructgpt_jax && "
    ".venv/bin/python -m instructgpt_jax.main --config=configs/sft.py:size=175b --workdir=gs://my-bucket/sft175b "
    "--config.mesh.fsdp=64 '\"'\"'--config.data.train=gs://my-bucket/demos/train*.jsonl'\"'\"' "
    "--config.distributed.mode=auto "
    "2>&1 | tee -a ~/run.log'"
  ]


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
  manual = subprocess.run(
    ["bash", "launch/slurm.sbatch", "--config=configs/sft.py:tiny", "--config.distributed.mode=manual"],
    env=env,
    capture_output=True,
    text=True,
    check=True,
  )
  assert manual.stdout.split()[-2:] == ["--config=configs/sft.py:tiny", "--config.distributed.mode=manual"]
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
    ["bash", "launch/slurm.sbatch", "--config=configs/sft.py:tinyy"], env=env, capture_output=True, text=True
  )
  assert (bad.returncode, bad.stdout, bad.stderr.strip()) == (
    2,
    "",
    "error: config arg 'tinyy': not one of ['size', 'tiny', 'variant']",
  )
