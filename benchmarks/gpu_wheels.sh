#!/usr/bin/env bash
# Fetches, on a host with network, the wheels benchmarks/gpu.sh installs on a GPU host that has none: the
# packages of setup.py (and TRL's) that a CUDA image with jax, flax, optax, orbax, torch and transformers
# lacks, pinned as in requirements-lock.txt and requirements-ref.txt, for CPython 3.12 on x86-64 Linux.
#
#   benchmarks/gpu_wheels.sh .whl            # then carry .whl to the GPU host: bash benchmarks/gpu.sh .whl
#
# gpu.sh installs only those a host lacks, so carrying one it already has is harmless. About 10 MB.
set -euo pipefail
out="${1:-.whl}"
python_version="${PYTHON_VERSION:-3.12}"
mkdir -p "$out"

# The package's own (setup.py install_requires, with their requirements) and TRL 1.12's PPO trainer.
binary=(
  ml_collections==1.1.0 tensorflow-datasets==4.9.10 array_record==0.8.6 grain==0.2.18 importlib_resources==7.1.0
  tensorboardX==2.6.5 dm-tree==0.1.10 immutabledict==4.3.1 simple-parsing==0.1.9 docstring_parser==0.18.0
  termcolor==3.3.0 toml==0.10.2 tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0 portpicker==1.6.0
  etils==1.15.0 trl==1.12.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
)
source_only=(promise==2.3)  # published as an sdist only: built here into a pure-Python wheel

python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d "$out" "${binary[@]}"
python3 -m pip wheel -q --no-deps -w "$out" "${source_only[@]}"
du -sh "$out"
ls "$out"
