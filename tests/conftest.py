"""Test setup: 8 fake CPU devices so every sharded code path runs in CI.

XLA reads the flag when the backend starts, so it must be set before anything imports jax.
"""

import os
import pathlib

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after XLA_FLAGS on purpose)
import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# Repeat compiles are 3-4x faster from a persistent cache; tests compile many small programs.
jax.config.update("jax_compilation_cache_dir", str(REPO_ROOT / ".cache" / "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def shared_data():
  """Path to ../shared/data (real text for tests); skips with a reason where it is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real-data test: {SHARED_DATA} is absent (it exists in the project's CI)")
  return SHARED_DATA
