#!/usr/bin/env bash
# Run HERE (a machine with the package registries), before the GPU runs: fetches the wheels that the GPU machine's
# image lacks into .whl/ at the repository root (ignored by git) so that they travel with the working tree.
# The image has torch, transformers, safetensors, scikit-learn, Pillow, tqdm and pytest; not diffusers.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
for req in diffusers==0.42.1 importlib_metadata==8.7.0; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "$req"
done
ls -l .whl
