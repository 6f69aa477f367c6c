"""TPU VMs: create one (or a queued resource), set up every worker, run a stage on all workers, delete it.

    python -m launch.tpu create --name=igpt --zone=us-central2-b --accelerator=v4-512 [--queued] [--spot]
    python -m launch.tpu setup  --name=igpt --zone=us-central2-b
    python -m launch.tpu run    --name=igpt --zone=us-central2-b -- \
        --config=configs/sft.py:size=175b --workdir=gs://my-bucket/sft175b --config.mesh.fsdp=64
    python -m launch.tpu delete --name=igpt --zone=us-central2-b
Add --dry-run to print the exact gcloud commands instead of running them.

setup copies the working tree's tracked files (`git ls-files`, uncommitted edits included) to every
worker and runs launch/setup_worker.sh there: a Python 3.11 venv with `pip install -e .[tpu]` (pinned by
requirements-lock.txt). It is idempotent: rerun setup after every code change. run executes the same
main.py command on every worker (`--worker=all`) with `--config.distributed.mode=auto` (jax.distributed
finds the other workers itself). Paths go through unchanged: the package reads and writes gs:// itself
(the workdir, data, models; no gcsfuse mount), with the VM's service account. Preempted or stopped: run
the same command again and it resumes from the newest checkpoint in the workdir.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Sequence

REMOTE_DIR = "~/instructgpt_jax"
ARCHIVE = "/tmp/instructgpt_jax.tgz"
DEFAULT_VERSION = "tpu-ubuntu2204-base"


def shell(argv: Sequence[str]) -> str:
  return shlex.join(argv)


def _where(zone: str, project: str) -> list[str]:
  return [f"--zone={zone}"] + ([f"--project={project}"] if project else [])


def create_command(
  name: str,
  zone: str,
  accelerator: str,
  *,
  version: str = DEFAULT_VERSION,
  project: str = "",
  queued: bool = False,
  spot: bool = False,
) -> list[str]:
  """A TPU VM now, or a queued resource (the VM is created when capacity frees up; `--node-id` names it)."""
  if queued:
    cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", name, f"--node-id={name}"]
    cmd += _where(zone, project) + [f"--accelerator-type={accelerator}", f"--runtime-version={version}"]
  else:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", "create", name]
    cmd += _where(zone, project) + [f"--accelerator-type={accelerator}", f"--version={version}"]
  return cmd + (["--spot"] if spot else [])


def ssh_command(name: str, zone: str, remote: str, *, project: str = "") -> list[str]:
  return [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "ssh",
    name,
    *_where(zone, project),
    "--worker=all",
    f"--command={remote}",
  ]


def setup_commands(name: str, zone: str, *, project: str = "") -> list[list[str]]:
  """Pack the tracked files here, copy them to every worker, unpack and run setup_worker.sh there."""
  pack = ["bash", "-c", f"git ls-files -z | tar --null -T - -czf {ARCHIVE}"]
  copy = ["gcloud", "compute", "tpus", "tpu-vm", "scp", ARCHIVE, f"{name}:{ARCHIVE}", *_where(zone, project)]
  copy.append("--worker=all")
  remote = f"mkdir -p {REMOTE_DIR} && tar -xzf {ARCHIVE} -C {REMOTE_DIR} && bash {REMOTE_DIR}/launch/setup_worker.sh"
  return [pack, copy, ssh_command(name, zone, remote, project=project)]


def run_command(name: str, zone: str, main_args: Sequence[str], *, project: str = "", log: str = "run.log"):
  """main.py with `main_args` on every worker, multi-host (`distributed.mode=auto`), output also in ~/<log>."""
  args = list(main_args)
  if not any(a.startswith("--config.distributed.mode=") for a in args):
    args.append("--config.distributed.mode=auto")
  main = shell([".venv/bin/python", "-m", "instructgpt_jax.main", *args])
  remote = f"cd {REMOTE_DIR} && {main} 2>&1 | tee -a ~/{log}"
  return ssh_command(name, zone, remote, project=project)


def delete_command(name: str, zone: str, *, project: str = "", queued: bool = False) -> list[str]:
  if queued:
    return [
      "gcloud",
      "compute",
      "tpus",
      "queued-resources",
      "delete",
      name,
      *_where(zone, project),
      "--force",
      "--quiet",
    ]
  return ["gcloud", "compute", "tpus", "tpu-vm", "delete", name, *_where(zone, project), "--quiet"]


def commands(args, main_args: Sequence[str]) -> list[list[str]]:
  where = dict(project=args.project)
  if args.action == "create":
    return [
      create_command(
        args.name, args.zone, args.accelerator, version=args.version, queued=args.queued, spot=args.spot, **where
      )
    ]
  if args.action == "setup":
    return setup_commands(args.name, args.zone, **where)
  if args.action == "run":
    if not main_args:
      raise SystemExit("run: give main.py's arguments after --, e.g. -- --config=configs/sft.py --workdir=gs://b/w")
    return [run_command(args.name, args.zone, main_args, **where)]
  return [delete_command(args.name, args.zone, queued=args.queued, **where)]


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  main_args = argv[argv.index("--") + 1 :] if "--" in argv else []
  argv = argv[: argv.index("--")] if "--" in argv else argv
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("action", choices=("create", "setup", "run", "delete"))
  parser.add_argument("--name", required=True, help="the TPU VM (and queued resource) name")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--project", default="", help="default: gcloud's configured project")
  parser.add_argument("--accelerator", default="v4-8", help="create: e.g. v4-512, v5p-1024, v5litepod-256")
  parser.add_argument("--version", default=DEFAULT_VERSION, help="create: the TPU VM runtime version")
  parser.add_argument("--queued", action="store_true", help="create/delete: a queued resource")
  parser.add_argument("--spot", action="store_true", help="create: preemptible (spot) capacity")
  parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  args = parser.parse_args(argv)
  for cmd in commands(args, main_args):
    print(shell(cmd), flush=True)
    if not args.dry_run:
      subprocess.run(cmd, check=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
