"""TPU VMs: create one (or a queued resource), set up every worker, run a stage on all workers, delete it.

    python -m launch.tpu create --name=igpt --zone=us-central2-b --accelerator=v4-512 [--queued] [--spot]
    python -m launch.tpu setup  --name=igpt --zone=us-central2-b [--include-untracked]
    python -m launch.tpu run    --name=igpt --zone=us-central2-b [--accelerator=v4-512] -- \
        --config=configs/sft.py:size=175b --workdir=gs://my-bucket/sft175b --config.mesh.fsdp=64 \
        --config.data.train='gs://my-bucket/demos/train-*.jsonl' --config.model.init_from=hf:gs://my-bucket/models/base
    python -m launch.tpu delete --name=igpt --zone=us-central2-b
    python -m launch.tpu run --local -- --config=configs/sft.py:tiny --workdir=/tmp/sft   # a worker's command, here
Add --dry-run to print the exact commands instead of running them.

create checks the accelerator type against the table of TPU generations (instructgpt_jax/accelerators.py:
v4-N and v5p-N count TensorCores, v5e-N (gcloud's v5litepod-N) and v6e-N chips; a size Google does not offer
is one line, exit status 2) and asks for the TPU VM software version Google documents for JAX on that
generation (accelerators.Generation.runtime; --version overrides it).

setup copies the working tree's tracked files (`git ls-files`, uncommitted edits included) to every worker
and runs launch/setup_worker.sh there: a Python 3.11 venv with `pip install -e .[tpu]` (pinned by
requirements-lock.txt). Untracked files (a new config not yet added to git) are left behind, and setup lists
them; --include-untracked ships them too (all but what .gitignore ignores). It is idempotent: rerun setup
after every code change.

run first checks main.py's config and overrides as main.py will (`stages.load_checked`: one line per problem,
exit status 2, nothing started); with --accelerator it also checks that the mesh lays out that slice's
devices. Then it executes the same main.py command on every worker (`--worker=all`) with
`--config.distributed.mode=auto` (jax.distributed finds the other workers itself), its output also appended
to ~/run.log on each worker (--log), under `set -o pipefail` so that the command's status is main.py's, not
tee's; run exits with the status of the command it ran. --local runs that worker command with bash in this
checkout instead (one process, this Python, no gcloud, the distributed mode left as configured). Paths go
through unchanged: the package reads and writes gs:// itself (the workdir, data, models; no gcsfuse mount),
with the VM's service account. Preempted or stopped: run the same command again and it resumes from the newest
checkpoint in the workdir.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence

from instructgpt_jax import accelerators, errors

REMOTE_DIR = "~/instructgpt_jax"
ARCHIVE = "/tmp/instructgpt_jax.tgz"
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shell(argv: Sequence[str]) -> str:
  return shlex.join(argv)


def _where(zone: str, project: str) -> list[str]:
  return [f"--zone={zone}"] + ([f"--project={project}"] if project else [])


def create_command(
  name: str,
  zone: str,
  accelerator: str,
  *,
  version: str = "",
  project: str = "",
  queued: bool = False,
  spot: bool = False,
) -> list[str]:
  """A TPU VM now, or a queued resource (the VM is created when capacity frees up; `--node-id` names it).
  `accelerator` is checked (errors.UserError) and written as gcloud names it (v5e-16 -> v5litepod-16);
  `version` "" is the generation's documented runtime (accelerators.Generation.runtime)."""
  tpu = accelerators.parse_slice(accelerator)
  version = version or tpu.generation.runtime
  where = _where(zone, project) + [f"--accelerator-type={tpu.accelerator_type}"]
  if queued:
    cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", name, f"--node-id={name}"]
    cmd += where + [f"--runtime-version={version}"]
  else:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", "create", name] + where + [f"--version={version}"]
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


def untracked_files(root: str = ".") -> list[str]:
  """Files in the working tree at `root` that git neither tracks nor ignores: what setup leaves behind by
  default (setup packs the tree of the folder it runs in, as `git ls-files` lists it)."""
  listing = subprocess.run(
    ["git", "ls-files", "-z", "--others", "--exclude-standard"], cwd=root, capture_output=True, text=True
  )
  if listing.returncode:
    raise errors.UserError(f"setup: {os.path.abspath(root)} is not a git checkout: setup ships the files git lists")
  return [f for f in listing.stdout.split("\0") if f]


def setup_commands(name: str, zone: str, *, project: str = "", include_untracked: bool = False) -> list[list[str]]:
  """Pack the tracked files here (and the untracked, not ignored ones with `include_untracked`) with a GIT_COMMIT
  file naming the commit they came from ("-dirty" when tracked files differ from it: a worker has no .git, and
  every run records the commit in its config.json), copy them to every worker, unpack and run setup_worker.sh."""
  listing = "git ls-files -z" + (
    " --cached --others --exclude-standard --exclude=GIT_COMMIT" if include_untracked else ""
  )
  commit = 'echo "$(git rev-parse HEAD)$(git diff --quiet HEAD -- || echo -dirty)" > GIT_COMMIT'
  files = f"{{ {listing}; printf 'GIT_COMMIT\\0'; }}"
  pack = ["bash", "-c", f"set -o pipefail; {commit} && {files} | tar --null -T - -czf {ARCHIVE}"]
  copy = ["gcloud", "compute", "tpus", "tpu-vm", "scp", ARCHIVE, f"{name}:{ARCHIVE}", *_where(zone, project)]
  copy.append("--worker=all")
  remote = f"mkdir -p {REMOTE_DIR} && tar -xzf {ARCHIVE} -C {REMOTE_DIR} && bash {REMOTE_DIR}/launch/setup_worker.sh"
  return [pack, copy, ssh_command(name, zone, remote, project=project)]


def _home_path(path: str) -> str:
  """`path` for a shell: quoted, with a leading ~/ left for the shell to expand."""
  return "~/" + shlex.quote(path[2:]) if path.startswith("~/") else shlex.quote(path)


def worker_command(
  main_args: Sequence[str], *, directory: str = REMOTE_DIR, log: str = "~/run.log", python: str = ".venv/bin/python"
) -> str:
  """The bash line every worker runs: main.py with `main_args` in `directory`, its output also appended to
  `log`. `set -o pipefail`: the line's status is main.py's (tee's alone would be 0)."""
  main = shell([python, "-m", "instructgpt_jax.main", *main_args])
  return f"set -o pipefail; cd {directory} && {main} 2>&1 | tee -a {_home_path(log)}"


def multihost_args(main_args: Sequence[str]) -> list[str]:
  """`main_args` with `--config.distributed.mode=auto` unless they set a mode."""
  args = list(main_args)
  if not any(a.startswith("--config.distributed.mode=") for a in args):
    args.append("--config.distributed.mode=auto")
  return args


def run_command(name: str, zone: str, main_args: Sequence[str], *, project: str = "", log: str = "~/run.log"):
  """main.py with `main_args` on every worker, multi-host (`distributed.mode=auto`), output also in `log`."""
  return ssh_command(name, zone, worker_command(multihost_args(main_args), log=log), project=project)


def local_command(main_args: Sequence[str], *, log: str) -> list[str]:
  """The worker's bash line run here, in this checkout, with this Python: one process, no gcloud."""
  return ["bash", "-c", worker_command(main_args, directory=shlex.quote(CHECKOUT), log=log, python=sys.executable)]


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


def check_main_args(main_args: Sequence[str], accelerator: str = "") -> None:
  """main.py's config and overrides checked as main.py checks them (`stages.load_checked`), and with
  `accelerator` the mesh against that slice's devices; errors.UserError, one line per problem."""
  args = list(main_args)
  configs = [a.removeprefix("--config=") for a in args if a.startswith("--config=")]
  configs += [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]
  if len(configs) != 1:
    raise errors.UserError("run: give main.py's arguments after --, with one --config=<file>[:arg]")
  printing = any(a in ("--print_config", "--check_config") for a in args)
  if not printing and not any(a.startswith("--workdir=") for a in args):
    raise errors.UserError("run: give main.py a --workdir=<dir> after -- (gs:// for a pod: every worker writes there)")
  overrides = [a for a in args if a.startswith("--config.")]
  from instructgpt_jax import stages  # imports jax: only `run` needs it

  config = stages.load_checked(configs[0], overrides, inputs="--print_config" not in args)
  if accelerator and "mesh" in config:
    tpu = accelerators.parse_slice(accelerator)
    problem = accelerators.mesh_error(config.mesh.to_dict(), tpu.chips)
    if problem:
      raise errors.UserError(f"{problem} of {tpu.accelerator_type} ({tpu.chips} devices, one per chip)")


def commands(args, main_args: Sequence[str]) -> list[list[str]]:
  where = dict(project=args.project)
  if args.action == "create":
    if not args.accelerator:
      raise errors.UserError("create: --accelerator is required, e.g. v4-8, v5p-128, v5e-16, v6e-8")
    return [
      create_command(
        args.name, args.zone, args.accelerator, version=args.version, queued=args.queued, spot=args.spot, **where
      )
    ]
  if args.action == "setup":
    return setup_commands(args.name, args.zone, include_untracked=args.include_untracked, **where)
  if args.action == "run":
    check_main_args(main_args, args.accelerator)
    if args.local:
      return [local_command(main_args, log=args.log)]
    return [run_command(args.name, args.zone, main_args, log=args.log, **where)]
  return [delete_command(args.name, args.zone, queued=args.queued, **where)]


def _say_untracked(include: bool) -> None:
  files = untracked_files()
  if not files:
    return
  shown = ", ".join(files[:10]) + (f" and {len(files) - 10} more" if len(files) > 10 else "")
  if include:
    print(f"setup: ships {len(files)} untracked files too: {shown}", file=sys.stderr)
  else:
    print(
      f"setup: leaves {len(files)} untracked files behind (not in git): {shown}; --include-untracked ships them",
      file=sys.stderr,
    )


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  main_args = argv[argv.index("--") + 1 :] if "--" in argv else []
  argv = argv[: argv.index("--")] if "--" in argv else argv
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("action", choices=("create", "setup", "run", "delete"))
  parser.add_argument("--name", default="", help="the TPU VM (and queued resource) name")
  parser.add_argument("--zone", default="")
  parser.add_argument("--project", default="", help="default: gcloud's configured project")
  parser.add_argument(
    "--accelerator", default="", help="create: e.g. v4-512, v5p-1024, v5e-256, v6e-64; run: checks the mesh"
  )
  parser.add_argument("--version", default="", help="create: the TPU VM runtime version (default: the generation's)")
  parser.add_argument("--queued", action="store_true", help="create/delete: a queued resource")
  parser.add_argument("--spot", action="store_true", help="create: preemptible (spot) capacity")
  parser.add_argument("--include-untracked", action="store_true", help="setup: ship untracked, not ignored files too")
  parser.add_argument("--log", default="~/run.log", help="run: the file each worker appends main.py's output to")
  parser.add_argument("--local", action="store_true", help="run: the worker's command here, with bash, no gcloud")
  parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  args = parser.parse_args(argv)
  if not (args.name and args.zone) and not (args.action == "run" and args.local):
    parser.error(f"{args.action}: --name and --zone are required")
  try:
    cmds = commands(args, main_args)
    if args.action == "setup":
      _say_untracked(args.include_untracked)
  except errors.UserError as e:
    for line in str(e).splitlines():
      print(f"error: {line}", file=sys.stderr)
    return 2
  for cmd in cmds:
    print(shell(cmd), flush=True)
    if args.dry_run:
      continue
    status = subprocess.run(cmd).returncode
    if status:
      print(f"launch.tpu {args.action}: the command above exited with status {status}", file=sys.stderr)
      return status
  return 0


if __name__ == "__main__":
  sys.exit(main())
