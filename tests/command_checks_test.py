"""Every command that starts or prints runs checks the whole config first, as main.py does: each kind of mistake
is one line on stderr and exit status 2, with nothing printed, created or compiled before it.

main.py runs as a subprocess (its flags are process-global); launch.sweep, launch.tpu and launch.aot in this
process. launch/slurm.sbatch runs main.py's --check_config (tests/tpu_launch_test.py)."""

import subprocess
import sys

import pytest

from instructgpt_jax.library import aot
from launch import aot as aot_cli
from launch import sweep as sweep_cli
from launch import tpu

# (the kind of mistake, the config argument, the overrides, the line it must give)
MISTAKES = [
  (
    "typo",
    "configs/sft.py:tiny",
    ["--config.optim.lrr=1e-4"],
    "--config.optim.lrr: no such config field 'lrr'; did you",
  ),
  (
    "bad type",
    "configs/sft.py:tiny",
    ["--config.optim.lr=abc"],
    "flag --config.optim.lr=abc: could not convert string",
  ),
  ("out of range", "configs/sft.py:tiny", ["--config.optim.lr=-1"], "optim.lr: -1.0 must be > 0"),
  ("bad config arg", "configs/sft.py:tinyy", [], "config arg 'tinyy': not one of ['size', 'tiny', 'variant']"),
  ("unused override", "configs/sft.py:tiny", ["--config.eval_rm.num_prompts=8"], "eval_rm.num_prompts: given, but"),
]
IDS = [m[0] for m in MISTAKES]


def _one_line(err: str, message: str) -> None:
  assert err.count("\n") == 1 and err.startswith(f"error: {message}"), err


@pytest.mark.parametrize("kind, config, overrides, message", MISTAKES, ids=IDS)
def test_main(kind, config, overrides, message, tmp_path):
  cmd = [sys.executable, "-m", "instructgpt_jax.main", f"--config={config}", f"--workdir={tmp_path}/run", *overrides]
  out = subprocess.run(cmd, capture_output=True, text=True)
  assert (out.returncode, out.stdout) == (2, "")
  _one_line(out.stderr, message)
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind, config, overrides, message", MISTAKES, ids=IDS)
def test_launch_sweep_in_every_mode_and_launcher(kind, config, overrides, message, tmp_path, capsys):
  grid = ["--grid=seed=0,1"]
  for mode in (
    ["--print"],
    ["--print", "--launcher=tpu", "--tpu=igpt", "--zone=z"],
    ["--print", "--launcher=slurm"],
    ["--run"],
  ):
    root = tmp_path / "root"
    assert sweep_cli.main([f"--config={config}", f"--root={root}", *mode, *grid, *overrides]) == 2, mode
    out, err = capsys.readouterr()
    assert out == "" and not root.exists(), mode
    _one_line(err, message)


@pytest.mark.parametrize("kind, config, overrides, message", MISTAKES, ids=IDS)
def test_launch_tpu_run_dry_run(kind, config, overrides, message, capsys):
  args = ["run", "--dry-run", "--name=igpt", "--zone=z", "--accelerator=v4-8", "--", f"--config={config}"]
  assert tpu.main([*args, "--workdir=gs://b/w", *overrides]) == 2
  out, err = capsys.readouterr()
  assert out == ""
  _one_line(err, message)


@pytest.mark.parametrize("kind, config, overrides, message", MISTAKES, ids=IDS)
def test_launch_aot(kind, config, overrides, message, capsys, monkeypatch):
  monkeypatch.setattr(aot, "report", lambda *a, **k: pytest.fail("compiled"))
  assert aot_cli.main(["--target=cpu-8", f"--config={config}", *overrides]) == 2
  out, err = capsys.readouterr()
  assert out == ""
  _one_line(err, message)


@pytest.mark.parametrize(
  "overrides, message",
  [
    (["--config.data.batch_size=0"], "data.batch_size: 0 must be >= 1"),
    (["--config.optim.microbatches=0"], "optim.microbatches: 0 must be >= 1"),
    (["--config.mesh.tensor=0"], "mesh.tensor: 0 must be >= 1 or -1 (the rest)"),
    (["--config.mesh.fsdp=3", "--config.mesh.data=1"], "mesh: ici sizes {'data': 1, 'fsdp': 3, 'tensor': 1} need 3"),
  ],
)
def test_launch_aot_checks_batches_and_the_mesh_before_raising_or_laying_them_out(overrides, message, capsys):
  """A batch the mesh does not divide is raised by the plan (the pod then runs that batch), but a batch, a number of
  microbatches or a mesh size that no mesh can hold is one line, as is a mesh the target's devices do not fill."""
  assert aot_cli.main(["--target=cpu-8", "--config=configs/sft.py:tiny", *overrides]) == 2
  out, err = capsys.readouterr()
  assert out == ""
  _one_line(err, message)
