#!/usr/bin/env bash
# Fetch, on a machine that reaches the package registries, the wheels that the lent GPU
# machine lacks, into .whl/ (ignored by git) for benchmarks/gpu_check.sh to install offline.
#
#   bash benchmarks/gpu_wheels.sh            # then carry ".whl" to the GPU machine
#
# That machine (device tool, kind nvidia-h200) reaches no registry; its image's python3
# (Python 3.12) holds torch, jax, cupy, flax, optax, equinox, transformers, pytest, hypothesis,
# matplotlib and scipy, but not this project's own dependency array-api-compat, the tests'
# array-api-strict, nor the step-cost peers ASDL (asdfghjkl), pytorch-optimizer (SophiaH)
# and ivon-opt. All of these are pure Python; the versions are those the CPU test setup
# resolved (session 13). heavyball and kfac-jax are left out (their own dependencies are not
# pure Python): their rows say "not runnable" on the GPU machine.
set -eu -o pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEELS=${1:-$ROOT/.whl}
mkdir -p "$WHEELS"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WHEELS" \
    array-api-compat==1.16.0 array-api-strict==2.6.1 asdfghjkl==0.1a5 \
    pytorch_optimizer==4.1.0 ivon-opt==0.1.3
ls -l "$WHEELS"
