"""Test setup: 8 fake CPU devices so every sharded code path runs in CI.

XLA reads the flag when the backend starts, so it must be set before anything imports jax.
"""

import os
import pathlib
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# gcsfs reads this when imported: without it, it probes every bucket over gRPC (the GCS emulator never answers).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import jax  # noqa: E402  (after XLA_FLAGS on purpose)
import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# Repeat compiles are 3-4x faster from a persistent cache; tests compile many small programs. Set through the
# environment too, so that the command lines the tests start in subprocesses share it.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO_ROOT / ".cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
  "jax_persistent_cache_min_compile_time_secs", float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"])
)


LIBTPU = REPO_ROOT / ".cache" / "libtpu"  # tests/run.sh installs libtpu here, apart from .venv


@pytest.fixture(scope="session")
def tpu_compiler():
  """XLA:TPU, which compiles for a TPU topology offline (launch.aot's TPU targets): libtpu, which tests/run.sh
  installs into .cache/libtpu rather than .venv (a CPU machine whose venv holds libtpu prints TPU-probing errors
  at every start). Put on the path of this process and of the commands the tests start; skips where absent.
  Returns the environment for those commands."""
  if not (LIBTPU / "libtpu").is_dir():
    pytest.skip(f"TPU targets: no libtpu at {LIBTPU} (tests/run.sh installs it)")
  if str(LIBTPU) not in sys.path:
    sys.path.append(str(LIBTPU))
  return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(LIBTPU)]))}


@pytest.fixture(scope="session")
def shared_data():
  """Path to ../shared/data (real text for tests); skips with a reason where it is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real-data test: {SHARED_DATA} is absent (it exists in the project's CI)")
  return SHARED_DATA


@pytest.fixture(scope="session")
def gcs():
  """A local GCS server (tests/gcs_server.py), its environment set for this process and its subprocesses."""
  from gcs_server import GCSServer

  server = GCSServer()
  yield server
  server.stop()


@pytest.fixture(scope="session")
def shared_data_or_none():
  """../shared/data where it exists (real text), else None: for tests that run either way."""
  return SHARED_DATA if SHARED_DATA.is_dir() else None


@pytest.fixture(scope="session")
def ppo_models(tmp_path_factory):
  """A tiny PPO-init SFT model and an RM from it: the models a PPO run needs (briefly trained, little skill):
  `<root>/sft` (a workdir) and `<root>/rm/export`. Made by the README's first two stage commands
  (doc_examples.README_SFT, README_RM), shrunk to 40 and 20 steps on 400 examples."""
  from doc_examples import README_RM, README_SFT, run_main, shrink

  root = tmp_path_factory.mktemp("ppo_models")
  shorter = ("--config.progress_bar=false",)
  # The README's tiny SFT starts from a random model: the pretraining mix is all the prose it sees. By rows
  # (10% of 256-token rows, ~40% of its loss tokens) it learns the prose about as a pretrained start knows it,
  # which PPO-ptx's pull towards pretraining text presumes; by loss tokens (the default, ~10%) its prose loss
  # stays 0.1 nats higher and PPO-ptx at γ = 27.8 per token trades RM score for prose (docs/results.md).
  sft = ("--config.total_steps=40", "--config.data.train=lab:demonstrations:train:400", *shorter)
  sft += ("--config.data.pretrain_mix_by=rows",)
  run_main(shrink(README_SFT, {"runs/": f"{root}/"}, sft))
  rm = ("--config.total_steps=20", "--config.data.train=lab:comparisons:train:400", *shorter)
  run_main(shrink(README_RM, {"runs/": f"{root}/"}, rm))
  return root


@pytest.fixture(scope="session")
def smollm2_folder():
  """The HF folder of SmolLM2-135M-Instruct, made by ../shared/tools/smollm2.sh with the transformers reference
  venv; skips with the reason where ../shared or the reference venv is absent."""
  import subprocess

  script = REPO_ROOT.parent / "shared" / "tools" / "smollm2.sh"
  if not script.is_file():
    pytest.skip(f"SmolLM2: {script} is absent (it exists in the project's CI)")
  python = os.environ.get("INSTRUCTGPT_JAX_REF_PYTHON") or str(REPO_ROOT / ".cache" / "venv-ref" / "bin" / "python")
  if not os.path.isfile(python):
    pytest.skip(f"SmolLM2: no reference venv at {python} to convert the model (.ci/run creates it)")
  made = subprocess.run(
    ["bash", str(script), "hf"], capture_output=True, text=True, env={**os.environ, "PYTHON": python}
  )
  if made.returncode:
    pytest.skip(f"SmolLM2: smollm2.sh hf failed: {' | '.join(made.stderr.strip().splitlines()[-3:])}")
  return pathlib.Path(made.stdout.strip().splitlines()[-1])


@pytest.fixture
def exclusive_memory(tmp_path_factory):
  """Tests that hold a real model (GBs) take turns: xdist's workers share one lock file, so two of them never
  run at once on a 24 GB machine (the recipe test alone peaks at 17 GB)."""
  import filelock

  with filelock.FileLock(str(tmp_path_factory.getbasetemp().parent / "memory_heavy.lock")):
    yield
